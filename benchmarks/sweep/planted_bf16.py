"""Same answers in bf16 on the GPU: the demo's planted task (teacher = base + a rank-4 update in the
MLP; the configs really differ there) swept with the PEFT engine and with the fast engine, same
trials, seed and data; per trial the two eval losses and their relative difference (goal: ≤ 1%), the
spread between configs, and one fast-engine adapter reloaded with PeftModel.from_pretrained and
evaluated by PEFT's own forward (its loss against the recorded one).

    python benchmarks/sweep/planted_bf16.py --out $OUT      # GPU (bf16); on CPU it runs in fp32
    python benchmarks/sweep/planted_bf16.py --steps 4 --examples 64 --out /tmp/pl   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def main() -> None:
    import torch

    from loraplan.sweeps.demo import DEMO_TRAINING, DEMO_TRIALS
    from loraplan.sweeps.planted import PlantedSpec, make_planted_task
    from loraplan.sweeps.runner import sweep

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=DEMO_TRAINING["max_steps"])
    p.add_argument("--examples", type=int, default=PlantedSpec().examples, help="training sequences of the task")
    p.add_argument("--trials", default=None, help="comma-separated names (default: the demo's trials and mlp_r4_dora)")
    p.add_argument("--work", default="/tmp/planted_bf16")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = p.parse_args()
    work, out = Path(args.work) / str(int(time.time())), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    task = make_planted_task(work / "task", PlantedSpec(examples=args.examples, eval_examples=max(32, args.examples // 8)))
    made = time.time() - t0
    trials = DEMO_TRIALS + [{"name": "mlp_r4_dora", "targets": "mlp", "r": 4, "use_dora": True}]
    if args.trials:
        trials = [t for t in trials if t["name"] in args.trials.split(",")]
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    training = {**DEMO_TRAINING, "max_steps": args.steps, "dtype": dtype}
    runs = {}
    for engine in ("peft", "fast"):
        t1 = time.time()
        result = sweep(str(task.base), str(task.train), eval=str(task.eval), out=work / engine, progress=False,
                       overrides={"trials": trials, **{f"training.{k}": v for k, v in training.items()},
                              "training.engine": engine, "data.max_length": task.spec.seq_len + 8})
        runs[engine] = {"wall_s": round(time.time() - t1, 1), "results": {r["name"]: r for r in result.results},
                        "recommended": result.summary.get("recommended"), "warnings": result.warnings}
    rows = []
    for t in trials:
        a, b = runs["peft"]["results"][t["name"]], runs["fast"]["results"][t["name"]]
        rows.append({"trial": t["name"], "peft_eval_loss": a["eval_loss"], "fast_eval_loss": b["eval_loss"],
                     "relative_difference": abs(a["eval_loss"] - b["eval_loss"]) / a["eval_loss"],
                     "fast_engine": b.get("engine")})
    losses = [r["peft_eval_loss"] for r in rows]
    reloaded = reload_loss(task, work / "fast" / "trials" / "mlp_r4_dora", dtype)
    recorded = runs["fast"]["results"]["mlp_r4_dora"]["eval_loss"]
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "dtype": dtype,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "task_s": round(made, 1),
              "ideal_eval_loss": task.ideal_eval_loss, "base_eval_loss": task.base_eval_loss, "rows": rows,
              "max_relative_difference": max(r["relative_difference"] for r in rows),
              "config_spread": (max(losses) - min(losses)) / min(losses),
              "recommended": {k: v["recommended"] for k, v in runs.items()},
              "wall_s": {k: v["wall_s"] for k, v in runs.items()},
              "reload": {"trial": "mlp_r4_dora", "recorded": recorded, "peft_from_pretrained": reloaded,
                         "relative_difference": abs(reloaded - recorded) / recorded}}
    (out / "planted_bf16.json").write_text(json.dumps(report, indent=1))
    print(f"{'trial':14s} {'PEFT':>9s} {'fast':>9s} {'rel diff':>9s}")
    for r in rows:
        print(f"{r['trial']:14s} {r['peft_eval_loss']:9.4f} {r['fast_eval_loss']:9.4f} {r['relative_difference']:9.2e}")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))


def reload_loss(task, trial_dir: Path, dtype: str) -> float:
    """The adapter in trial_dir loaded by PeftModel.from_pretrained on the base, its eval loss by
    PEFT's own forward (the sweep's eval batches and token weighting)."""
    import torch
    from peft import PeftModel

    from loraplan.autograd.lm_loss import causal_lm_loss_sum
    from loraplan.data.batches import eval_batches
    from loraplan.data.load import load_data
    from loraplan.model.loading import load_model, load_tokenizer
    from loraplan.sweeps.ranking import weighted_mean_sem

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(str(task.base))
    splits = load_data(str(task.train), tokenizer, eval=str(task.eval), max_length=task.spec.seq_len + 8, seed=0)
    model = PeftModel.from_pretrained(load_model(str(task.base), dtype=dtype, device=device), str(trial_dir / "adapter"))
    model.eval()
    losses, counts = [], []
    with torch.no_grad():
        for mb in eval_batches(splits.eval, 16):
            ids, labels, mask = mb.tensors(device, tokenizer.pad_token_id)
            losses.append(float(causal_lm_loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)) / mb.supervised)
            counts.append(mb.supervised)
    return weighted_mean_sem(losses, counts)[0]


if __name__ == "__main__":
    main()

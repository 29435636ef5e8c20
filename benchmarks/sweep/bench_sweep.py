"""loraplan's sweep engine on the seeds' grid, on the same synthetic data as the seeds' method
(../shared/bench/seed_method_sweep.py): random-init Llama shapes, 2000 train / 200 eval sequences of
64-512 random tokens, batch 8 per optimizer step, lr 2e-4, cosine, 10 warmup steps, eval every 50.

    python benchmarks/sweep/bench_sweep.py --shape llama-1b --steps 100 --out $OUT
    python benchmarks/sweep/bench_sweep.py --shape tiny --steps 4 --out /tmp/bench   # CPU smoke test

Writes $OUT/loraplan_sweep_<shape>.json: per config train seconds, real (non-pad) tokens/s (also by the
seed script's formula), peak GiB, eval loss; the sweep's wall time; and a profile of one config's steps.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

SHAPES = {"llama-1b": "builtin:llama-3.2-1b", "llama-8b": "builtin:llama-3.1-8b"}


def tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from tiny import save_tiny_model

    if not (folder / "config.json").exists():
        save_tiny_model(folder, "llama")
    return str(folder)


def main() -> None:
    import torch

    from loraplan.data.batches import eval_batches, training_steps
    from loraplan.sweeps.engine import PeftEngine
    from loraplan.sweeps.folder import SweepLedger, now
    from loraplan.sweeps.spec import SweepSpec, TrainingSettings, expand

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-1b", choices=[*SHAPES, "tiny"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--only", default=None, help="comma-separated config names")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="torch.profiler over 5 steps of the first config")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = SHAPES.get(args.shape) or tiny_model(Path("/tmp/bench_tiny_model"))
    vocab = 128256 if args.shape != "tiny" else 128
    lo, hi = (64, 512) if args.shape != "tiny" else (8, 32)
    first = 1000 if args.shape != "tiny" else 7
    settings = TrainingSettings(max_steps=args.steps, batch_size=8, micro_batch_size=args.micro_batch_size,
                                learning_rate=2e-4, warmup_steps=10, scheduler="cosine", eval_every=50, seed=0,
                                dtype="auto")
    t_load = time.time()
    engine = PeftEngine(model, settings, random_init=True)
    engine.load(pad_id=0)
    load_s = time.time() - t_load

    def data(n, seed):
        """The seed script's data(): the same RNG calls, so the same token sequences."""
        rng = random.Random(seed)
        from loraplan.data.formats import TokenizedExample

        items = []
        for _ in range(n):
            length = rng.randint(lo, hi)
            ids = [rng.randrange(first, vocab) for _ in range(length)]
            items.append(TokenizedExample(input_ids=ids, labels=list(ids)))
        return items

    train, evald = data(2000, 1), data(200, 2)
    steps = training_steps(train, args.steps, 8, args.micro_batch_size, 0)
    evalset = eval_batches(evald, args.micro_batch_size or 8)
    trials = expand(SweepSpec())
    if args.only:
        trials = [t for t in trials if t.name in args.only.split(",")]
    ledger = SweepLedger(out / f"ledger_{args.shape}")
    ledger.open({"spec": {"bench": args.shape, "steps": args.steps}, "spec_hash": f"{args.shape}-{args.steps}-{time.time()}",
                 "created": now()}, [t.name for t in trials])
    rows = []
    sweep_t0 = time.time()
    for i, trial in enumerate(trials):
        t0 = time.time()
        if args.profile and i == 0:
            profile(engine, trial, steps, ledger.root, out, args.shape)
        state = engine.start(trial, ledger.recorder(trial.name), settings.model_dump())
        engine.advance([state], steps, args.steps, evalset, settings.eval_every)
        result = engine.finish(state)
        expected_tokens = args.steps * 8 * (lo + hi) / 2  # the seed script's formula
        row = {"config": trial.name, "status": result["status"], "trainable": result["trainable_params"],
               "train_s": result["train_s"], "total_s": round(time.time() - t0, 2),
               "eval_loss": result["eval_loss"], "real_tok_per_s": result["tokens_per_s"],
               "seed_formula_tok_per_s": round(expected_tokens / result["train_s"]) if result["train_s"] else None,
               "peak_gib": round((result["peak_memory_bytes"] or 0) / 2**30, 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    sweep_s = time.time() - sweep_t0
    summary = {"shape": args.shape, "steps": args.steps, "load_s": round(load_s, 2), "sweep_s": round(sweep_s, 1),
               "sweep_plus_load_s": round(sweep_s + load_s, 1), "device": engine.device_name(),
               "torch": torch.__version__, "rows": rows}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}), flush=True)
    (out / f"loraplan_sweep_{args.shape}.json").write_text(json.dumps(summary, indent=1))
    engine.close()


def profile(engine, trial, steps, ledger_dir: Path, out: Path, shape: str) -> None:
    """Where the time goes in 5 training steps of a throwaway copy of `trial` (after one warm-up
    step): the top operators by self device time (CPU time without a GPU)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from loraplan.sweeps.folder import TrialRecorder
    from loraplan.sweeps.spec import Trial

    state = engine.start(Trial(name="_profile", plan=trial.plan), TrialRecorder(ledger_dir / "_profile", "_profile"), {})
    engine._train_step(state, steps[0])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        for k in range(1, 6):
            engine._train_step(state, steps[k])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    (out / f"profile_{shape}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=30))
    engine.finish(state, "failed", "profiling copy")


if __name__ == "__main__":
    main()

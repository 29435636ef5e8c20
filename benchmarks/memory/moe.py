"""Measure the peak GPU memory of LoRA on MoE models and record loraplan's estimate next to it.

The step is measure.py's (random init bf16, sdpa, fused AdamW, 3 steps of forward/backward/step,
no autocast) on fused-expert MoE layouts of transformers 5 (experts as 3-D parameters, the default
`grouped_mm` experts implementation), cut to a few layers so that one GPU holds them:

- Qwen3-30B-A3B, 12 of its 48 layers (128 experts, top-8, vocabulary 151,936);
- Mixtral-8x7B, 4 of its 32 layers (8 experts, top-2, vocabulary 32,000).

Adapters, PEFT defaults (dropout 0) at r = 16:
- `all-linear` as PEFT reads it (`LoraConfig(target_modules="all-linear")`: attention, the router
  and the fused experts through its transformers-v5 conversion, gate_up at 2r); the estimate uses
  the same set spelled out (`attention,experts,router`, gate_up_proj at 2r), and each row records
  both trainable counts so that a difference shows;
- attention only (q, k, v, o; the experts and the router frozen).
Batch × sequence 1 × 2048 and 4 × 1024: 8 configs, about two minutes on an H200.

    python benchmarks/memory/moe.py --out $OUT            # rows in $OUT/memory_moe.json, table in $OUT/moe.md
    python benchmarks/memory/moe.py --dry-run             # the configs and their estimates, no GPU
    python benchmarks/memory/moe.py --device cpu --tiny --out /tmp/moe   # CPU smoke test of the whole path

The rows have measure.py's format, so `compare.py` reads them with the others.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))
sys.path.insert(0, str(HERE))

from measure import Memory, environment, train_steps  # noqa: E402

MODELS = {"qwen3-30b-a3b": ("builtin:qwen3-30b-a3b", 12), "mixtral-8x7b": ("builtin:mixtral-8x7b", 4)}
TINY = {
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=64,
                          intermediate_size=128, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          vocab_size=256, norm_topk_prob=True),
    "mixtral-8x7b": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=64,
                         intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256),
}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
SHAPES = ((1, 2048), (4, 1024))
RANK = 16


def plans(r: int) -> dict[str, tuple[dict, dict]]:
    """target name -> (the plan the estimate uses, the LoraConfig arguments PEFT gets)."""
    return {
        "all-linear": (dict(targets="attention,experts,router", r=r, lora_dropout=0.0,
                            rank_pattern={"gate_up_proj": 2 * r}),
                       dict(r=r, target_modules="all-linear")),
        "attention": (dict(targets="attention", r=r, lora_dropout=0.0), dict(r=r, target_modules=ATTENTION)),
    }


def config_dict(name: str, tiny: bool) -> dict:
    from loraplan.model.loading import read_config_dict

    if tiny:
        return dict(TINY[name])
    model_id, layers = MODELS[name]
    config = dict(read_config_dict(model_id)[0])
    config["num_hidden_layers"] = layers
    return config


def structure_of(model_id: str, tiny: bool = False):
    """The structure the estimate reads, for a model of MODELS named by its id (compare.py uses it too)."""
    from loraplan.model.loading import make_config
    from loraplan.model.structure import build_structure

    name = next(k for k, (mid, _) in MODELS.items() if mid == model_id)
    return build_structure(make_config(config_dict(name, tiny)), source=f"{model_id} ({MODELS[name][1]} layers)")


def load_base(config: dict, device: str):
    import torch
    import transformers

    from loraplan.model.loading import make_config

    transformers.logging.set_verbosity_error()
    cfg = make_config(dict(config))
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, cfg.architectures[0])._from_config(
            cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def run_case(base, peft_kwargs: dict, batch: int, seq: int, vocab: int, device: str, memory: Memory) -> dict:
    """Add the adapter, run the steps, remove it: one row's measurements (failures recorded)."""
    import torch
    from peft import LoraConfig, get_peft_model

    memory.clean()
    row: dict = {"status": "ok", "error": None, "allocated_before": memory.allocated(), "steps": []}
    model = opt = None
    started = time.perf_counter()
    memory.reset()
    try:
        model = get_peft_model(base, LoraConfig(**peft_kwargs))
        model.train()
        row["peft_trainable"] = model.get_nb_trainable_parameters()[0]
        row["experts_implementation"] = getattr(base.config, "_experts_implementation", None)
        row["grouped_mm"] = ("torch.nn.functional.grouped_mm" if hasattr(torch.nn.functional, "grouped_mm")
                             else "torch._grouped_mm" if hasattr(torch, "_grouped_mm") else "fallback")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
        row["adapter_allocated"] = memory.allocated()
        shape = SimpleNamespace(batch_size=batch, seq_len=seq)
        train_steps(model, opt, shape, vocab, device, memory, row["steps"])
    except torch.OutOfMemoryError as e:
        row.update(status="oom", error=str(e).splitlines()[0])
    except Exception as e:  # noqa: BLE001 - a failed config is recorded and the run goes on
        row.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
    row["seconds"] = round(time.perf_counter() - started, 2)
    allocated, reserved = memory.peak()
    if allocated is not None:
        row["allocated_peak"] = max([allocated] + [s["peak"] for s in row["steps"]])
        row["reserved_peak"] = max([reserved] + [s["reserved_peak"] for s in row["steps"]])
    else:
        row["allocated_peak"] = row["reserved_peak"] = None
    opt = None
    if model is not None:
        model.unload()
    model = None
    memory.clean()
    leftover = [n for n, _ in base.named_modules() if "lora_" in n or n.endswith("parametrizations")]
    row["base_dirty"] = bool(leftover or any(p.requires_grad for p in base.parameters()))
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny layouts, 2 × 32 tokens (smoke test)")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--max-seconds", type=float, default=300, help="stop starting configs after this")
    p.add_argument("--dry-run", action="store_true", help="print the configs with their estimates, run nothing")
    args = p.parse_args()

    from loraplan.plan.count import count_plan, human_bytes
    from loraplan.plan.lora_plan import LoraPlan
    from loraplan.plan.memory import estimate_memory

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        p.error(f"unknown model {unknown[0]}; choose from {', '.join(MODELS)}")
    shapes = ((2, 32),) if args.tiny else SHAPES
    r = 4 if args.tiny else RANK
    out = Path(args.out)
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    path = out / f"memory_moe{'_tiny' if args.tiny else ''}.json"
    env = None if args.dry_run else environment()
    memory = Memory(args.device)
    started = time.perf_counter()
    rows = []
    for name in names:
        model_id, layers = MODELS[name]
        structure = structure_of(model_id, args.tiny)
        cases = [(t, b, s) for t in plans(r) for b, s in shapes]
        estimates = {}
        for t, b, s in cases:
            plan = LoraPlan(**plans(r)[t][0])
            estimates[(t, b, s)] = (plan, estimate_memory(structure, plan, b, s))
        cases.sort(key=lambda c: estimates[c][1].total_bytes)
        print(f"{model_id}, {layers} layers: {len(cases)} configs", flush=True)
        if args.dry_run:
            for c in cases:
                e = estimates[c][1]
                print(f"  {c[0]:<11} r{r} {c[1]}x{c[2]:<5} {human_bytes(e.total_bytes):>10}  {e.peak_phase}")
            continue
        base = None
        for t, b, s in cases:
            if time.perf_counter() - started > args.max_seconds:
                print(f"stopping: --max-seconds {args.max_seconds:g} reached", flush=True)
                break
            if base is None:
                memory.clean()
                print(f"loading {model_id} ({layers} layers, random init)…", flush=True)
                base = load_base(config_dict(name, args.tiny), args.device)
                memory.clean()
            plan, e = estimates[(t, b, s)]
            row = {"model": model_id, "name": f"{t} r{r} {b}x{s}", "base_allocated": memory.allocated(),
                   "config": {"targets": t, "r": r, "batch_size": b, "seq_len": s, "grad_ckpt": False, "dora": False,
                              "quant": None, "double_quant": True, "layers": layers, "tiny": args.tiny,
                              "plan": plans(r)[t][0], "peft": plans(r)[t][1]}}
            row.update(run_case(base, plans(r)[t][1], b, s, structure.text_config()["vocab_size"], args.device,
                                memory))
            row["loraplan_trainable"] = count_plan(structure, plan).trainable_params
            if row.pop("base_dirty"):
                base = None
            row["estimate"] = {"total_bytes": e.total_bytes, "saved_bytes": e.saved_bytes, "peak_phase": e.peak_phase,
                               "phases": e.phases, "terms": [x.to_json() for x in e.terms]}
            row["env"] = env
            row["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
            measured = row["allocated_peak"]
            error = f"{(e.total_bytes - measured) / measured:+.1%}" if measured and row["status"] == "ok" else "-"
            same = "" if row.get("peft_trainable") == row["loraplan_trainable"] else (
                f"  (PEFT trains {row.get('peft_trainable')}, the plan {row['loraplan_trainable']})")
            print(f"  {row['name']:<24} {row['status']:<6} measured {human_bytes(measured) if measured else 'n/a':>10}"
                  f"  estimate {human_bytes(e.total_bytes):>10}  {error:>7}  {row['seconds']:.1f}s{same}", flush=True)
        base = None
        gc.collect()
    if rows:
        from compare import build_report

        report, worst = build_report(rows)
        (out / "moe.md").write_text(report)
        print(f"rows appended to {path}; table in {out / 'moe.md'}; worst |error| "
              f"{'n/a' if worst is None else f'{worst:.1%}'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

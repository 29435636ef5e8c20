"""Run the ablation: short LoRA runs of a grid of configs on your model and data, ranked by eval
loss, with the cheapest config as good as the best recommended. Resumable: rerun the same command
and finished trials are skipped; a crashed or interrupted trial restarts.

The default grid is the seeds' six configs (q,v r8 · q,k,v,o r8 · q,k,v,o r16 rsLoRA · all seven
r16/r32 rsLoRA · all seven r16 DoRA). --grid takes KEY=VALUES pairs; target sets are separated by ';'.
An empty `grid:` or `trials:` in a spec is an error (leave the key out for the seeds' grid).

Trial names (a spec's `name:`, the grid's, --from's `from_<file>`) become folders under --out/trials/:
letters, digits, '-', '_', '+' and '.', not starting with '.'; a name given twice is an error (never
renamed). Nothing is written or removed outside --out, symlinks included.

examples:
  loraplan sweep ./my-model --data train.jsonl --out runs/sweep1
  loraplan sweep ./my-model --data chat.jsonl --eval dev.jsonl --grid "targets=qv;attention;attention,mlp r=8,16,32" --out runs/s2
  loraplan sweep --config examples/sweep.yaml --out runs/s3 --dry-run
"""

from __future__ import annotations

from ..errors import RunError
from .options import add_json, add_model_argument, add_schema_flags, schema_overrides
from .render import emit_json, table

# flag -> spec key: each flag's type, help and default come from the key's Field in sweeps/spec.py.
SPEC_FLAGS = {
    "--data": "data.train", "--eval": "data.eval", "--format": "data.format", "--max-length": "data.max_length",
    "--max-examples": "data.max_examples", "--max-steps": "training.max_steps",
    "--batch-size": "training.batch_size", "--micro-batch-size": "training.micro_batch_size",
    "--lr": "training.learning_rate", "--eval-every": "training.eval_every", "--seed": "training.seed",
    "--grad-ckpt": "training.grad_ckpt", "--quant": "training.quantization", "--engine": "training.engine",
    "--halving": "halving.enabled", "--budget": "training.budget_steps", "--lr-policy": "training.lr_policy",
    "--executor": "executor.kind", "--gpus": "executor.gpus", "--ray-address": "executor.ray_address",
    "--gpus-per-trial": "executor.gpus_per_trial", "--workers": "executor.workers",
    "--trust-remote-code": "trust_remote_code",
}


def register(parser):
    from ..sweeps.spec import GridSpec, SweepSpec

    add_model_argument(parser, "a model folder or Hub id (or `model:` in --config)", optional=True)
    parser.add_argument("--config", help="a sweep spec (YAML, keys in docs/sweep.md); flags override it")
    parser.add_argument("--from-probe", metavar="PROBE_JSON",
                        help="a grid around `loraplan probe --out` 's plan: its targets and all-linear × r/2, r, 2r")
    parser.add_argument("--from", dest="from_file", metavar="FILE",
                        help="add your existing config as a trial: a PEFT adapter_config.json (or adapter folder), "
                             "an axolotl or LLaMA-Factory YAML")
    parser.add_argument("--out", required=True, help="the sweep directory (the ledger); reuse it to resume")
    add_schema_flags(parser, SweepSpec, SPEC_FLAGS)
    parser.add_argument("--grid", default=None,
                        help=f"the grid as KEY=VALUES ({', '.join(GridSpec.model_fields)}), e.g. "
                             '"targets=qv;attention;attention,mlp r=8,16 alpha=r rslora=false dora=false,true"')
    parser.add_argument("--dry-run", action="store_true", help="list the trials with params and memory; train nothing")
    add_json(parser, "machine-readable summary; no progress bars")


def overrides_from_args(args) -> dict:
    from ..sweeps.spec import parse_grid_flag

    out = schema_overrides(args)
    if args.grid:
        out["grid"] = parse_grid_flag(args.grid)
    return out


def run(args) -> int:
    from ..plan.count import human_bytes, human_count
    from ..sweeps.folder import TrialStatus
    from ..sweeps.runner import RESULT_HEADERS, result_rows, sweep

    result = sweep(args.model, config=args.config, out=args.out,
                   overrides=overrides_from_args(args), from_file=args.from_file, from_probe=args.from_probe,
                   dry_run=args.dry_run,
                   progress=not args.json)
    if args.json:
        emit_json(result.to_json())
        return 0
    for w in result.warnings:
        print(f"warning: {w}")
    if result.dry_run:
        rows = [[p["name"], p["targets"], p["r"], f"{p['lora_alpha']:g}", "✓" if p["use_rslora"] else "",
                 "✓" if p["use_dora"] else "", human_count(p["trainable_params"]),
                 human_bytes(p["memory_bytes"]) if p.get("memory_bytes") else "—", p["worker"],
                 ", ".join(p["target_modules"]) if isinstance(p["target_modules"], list) else p["target_modules"]]
                for p in result.preview]
        print(table(["trial", "targets", "r", "alpha", "rsLoRA", "DoRA", "params", "est. GPU memory", "worker",
                     "target_modules"], rows, "llrrllrrll"))
        for line in placement_lines(result.preview):
            print(line)
        print(f"{result.schedule}; nothing trained (--dry-run)")
        return 0
    print()
    for line in result.data or []:
        print(f"data: {line}")
    print(table(RESULT_HEADERS, result_rows(result.results, result.summary), "llrrrllrlllrrrl"))
    print()
    s = result.summary
    if s.recommended:
        print(f"recommended: {s.recommended} — {s.reason}")
        if s.settle_note:
            print(f"{'settled' if s.settled else 'NOT SETTLED'}: {s.settle_note}")
    else:
        print(f"no recommendation: {s.reason}")
    print(f"ledger: {result.out}/ (summary.md, results.csv, trials/*/adapter)")
    if not any(r.status is TrialStatus.COMPLETED for r in result.results):
        raise RunError("no trial completed", "see summary.md and trials/*/result.json (error.txt for failures)")
    return 0


def placement_lines(preview: list[dict]) -> list[str]:
    """Per worker: its device, the trials it takes first, and the memory check of the largest."""
    from ..plan.count import human_bytes

    workers: dict[str, list[dict]] = {}
    for p in preview:
        workers.setdefault(p["worker"], []).append(p)
    lines = []
    for worker, rows in workers.items():
        device, total = rows[0]["device"], rows[0]["device_memory_bytes"]
        needs = [r["memory_bytes"] for r in rows if r.get("memory_bytes")]
        if total is None or not needs:
            check = "memory checked when it loads"
        else:
            verdict = "fits" if max(needs) <= total else "does NOT fit"
            check = f"largest trial needs {human_bytes(max(needs))} of {human_bytes(total)}: {verdict}"
        lines.append(f"worker {worker} ({device}): {', '.join(r['name'] for r in rows)}; {check}")
    if len(workers) > 1:
        lines.append("(trial i goes to worker i mod n first; then each free worker takes the next trial)")
    return lines

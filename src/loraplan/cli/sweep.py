"""Run the ablation: short LoRA runs of a grid of configs on your model and data, ranked by eval
loss, with the cheapest config as good as the best recommended. Resumable: rerun the same command
and finished trials are skipped; a crashed or interrupted trial restarts.

The default grid is the seeds' six configs (q,v r8 · q,k,v,o r8 · q,k,v,o r16 rsLoRA · all seven
r16/r32 rsLoRA · all seven r16 DoRA). --grid takes KEY=VALUES pairs; target sets are separated by ';'.

examples:
  loraplan sweep ./my-model --data train.jsonl --out runs/sweep1
  loraplan sweep ./my-model --data chat.jsonl --eval dev.jsonl --grid "targets=qv;attention;attention,mlp r=8,16,32" --out runs/s2
  loraplan sweep --config examples/sweep.yaml --out runs/s3 --dry-run
"""

from __future__ import annotations

from ..errors import RunError
from .count import positive_float, positive_int
from .render import emit_json, table


def register(parser):
    parser.add_argument("model", metavar="MODEL", nargs="?", help="a model folder or Hub id (or `model:` in --config)")
    parser.add_argument("--data", help="training data: .jsonl/.json/.csv/.parquet or a Hub dataset id")
    parser.add_argument("--eval", help="eval data (default: a held-out 10%% of --data, fixed seed)")
    parser.add_argument("--config", help="a sweep spec (YAML); flags override it")
    parser.add_argument("--from-probe", metavar="PROBE_JSON",
                        help="a grid around `loraplan probe --out` 's plan: its targets and all-linear × r/2, r, 2r")
    parser.add_argument("--from", dest="from_file", metavar="FILE",
                        help="add your existing config as a trial: a PEFT adapter_config.json (or adapter folder), "
                             "an axolotl or LLaMA-Factory YAML")
    parser.add_argument("--out", required=True, help="the sweep directory (the ledger); reuse it to resume")
    parser.add_argument("--format", choices=["auto", "text", "prompt_completion", "alpaca", "chat"], default=None)
    parser.add_argument("--max-length", type=positive_int, default=None, help="tokens per example (default 512)")
    parser.add_argument("--max-examples", type=positive_int, default=None, help="use only the first N training rows")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps per trial (default 100)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="examples per step (default 8)")
    parser.add_argument("--micro-batch-size", type=positive_int, default=None, help="examples per forward pass")
    parser.add_argument("--lr", type=positive_float, default=None, help="learning rate (default 2e-4)")
    parser.add_argument("--eval-every", type=positive_int, default=None, help="steps between evals (default 25)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--grad-ckpt", action="store_true", default=None, help="gradient checkpointing")
    parser.add_argument("--quant", choices=["4bit", "8bit"], default=None, help="QLoRA (bitsandbytes, CUDA)")
    parser.add_argument("--engine", choices=["auto", "fast", "peft"], default=None,
                        help="fast: loraplan's engine; peft: transformers + PEFT; auto (default): fast on a CUDA GPU")
    parser.add_argument("--grid", default=None,
                        help='e.g. "targets=qv;attention;attention,mlp r=8,16 alpha=r rslora=false dora=false,true"')
    parser.add_argument("--halving", action="store_true", default=None,
                        help="successive halving: stop the worst half of the trials at each rung")
    parser.add_argument("--dry-run", action="store_true", help="list the trials with params and memory; train nothing")
    parser.add_argument("--trust-remote-code", action="store_true", default=None)
    parser.add_argument("--json", action="store_true", help="machine-readable summary; no progress bars")


def overrides_from_args(args) -> dict:
    from ..sweeps.spec import parse_grid_flag

    out = {
        "data.format": args.format, "data.max_length": args.max_length, "data.max_examples": args.max_examples,
        "training.max_steps": args.max_steps, "training.batch_size": args.batch_size,
        "training.micro_batch_size": args.micro_batch_size, "training.learning_rate": args.lr,
        "training.eval_every": args.eval_every, "training.seed": args.seed, "training.grad_ckpt": args.grad_ckpt,
        "training.quantization": args.quant, "training.engine": args.engine, "halving.enabled": args.halving,
        "trust_remote_code": args.trust_remote_code,
    }
    if args.grid:
        out["grid"] = parse_grid_flag(args.grid)
    return out


def run(args) -> int:
    from ..plan.count import human_bytes, human_count
    from ..sweeps.runner import RESULT_HEADERS, result_rows, sweep

    result = sweep(args.model, args.data, eval=args.eval, config=args.config, out=args.out,
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
                 human_bytes(p["memory_bytes"]) if p.get("memory_bytes") else "—",
                 ", ".join(p["target_modules"]) if isinstance(p["target_modules"], list) else p["target_modules"]]
                for p in result.preview]
        print(table(["trial", "targets", "r", "alpha", "rsLoRA", "DoRA", "params", "est. GPU memory", "target_modules"],
                    rows, "llrrllrrl"))
        print(f"{len(rows)} trials; nothing trained (--dry-run)")
        return 0
    print()
    for line in result.data or []:
        print(f"data: {line}")
    print(table(RESULT_HEADERS, result_rows(result.results, result.summary), "llrrllrlllrrrl"))
    print()
    s = result.summary
    if s.get("recommended"):
        print(f"recommended: {s['recommended']} — {s['reason']}")
    else:
        print(f"no recommendation: {s.get('reason')}")
    print(f"ledger: {result.out}/ (summary.md, results.csv, trials/*/adapter)")
    if not any(r.get("status") == "completed" for r in result.results):
        raise RunError("no trial completed", "see summary.md and trials/*/result.json (error.txt for failures)")
    return 0

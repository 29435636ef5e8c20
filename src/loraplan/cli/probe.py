"""Measure, before training, where the model wants to change and in how many directions: a few
gradient batches of your data through the frozen model; for every Linear module the K-FAC-whitened
gradient energy (importance, comparable across modules) and the rank holding 90% of it. Prints the
importance per role and layer and a plan; `loraplan sweep --from-probe probe.json` checks it.

The gradient at the base model sees the first steps of training, not where training ends: on planted
tasks it credits the MLP for changes planted in attention, and its rank estimate barely follows the
planted rank (benchmarks/probe/RESULTS.md, issue 24). It prints these blind spots, and
`sweep --from-probe` keeps both sides (attention and mlp, r/4 … 2r). A first look; the sweep decides.

examples:
  loraplan probe ./my-model --data train.jsonl
  loraplan probe ./my-model --data chat.jsonl --batches 16 --batch-size 8 --out probe.json
"""

from __future__ import annotations

from ..files import check_output, write_json
from .options import add_model_arguments, positive_int, size
from .render import emit_json, table


def register(parser):
    add_model_arguments(parser, "a model folder or Hub id (weights are needed)")
    parser.add_argument("--data", required=True, help="training data (as for sweep)")
    parser.add_argument("--format", choices=["auto", "text", "prompt_completion", "alpaca", "chat"], default="auto")
    parser.add_argument("--targets", default="all-linear", help="modules to probe (default: %(default)s)")
    parser.add_argument("--batches", type=positive_int, default=8, help="gradient batches (default 8; even)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--max-length", type=positive_int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-memory", metavar="SIZE", type=size, default=None,
                        help="cap the GPU memory the probe plans for, weights included, e.g. 40GB (default: 90%% of "
                             "what is free; less memory means more layers recomputed or more passes, not an error)")
    parser.add_argument("--out", help="also write the result as JSON (a sweep folder reads it as probe.json)")


def run(args) -> int:
    import os

    # before CUDA starts (read then): the allocator grows segments instead of cutting new ones, so its
    # cache does not fragment. Measured on the H100 (8B): batches that ran out of memory with 4.45 GiB
    # cached in unusable pieces fit with it, at the same speed. A user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from ..probing.probe import probe

    if args.out:
        check_output(args.out, "file")
    result = probe(args.model, args.data, targets=args.targets, batches=args.batches, batch_size=args.batch_size,
                   max_length=args.max_length, fmt=args.format, seed=args.seed,
                   trust_remote_code=args.trust_remote_code, progress=not args.json, max_memory=args.max_memory)
    data = result.to_json()
    if args.out:
        write_json(args.out, data)
    if args.json:
        emit_json(data)
        return 0
    print(f"{result.model} · {result.batches} batches, {result.tokens:,} tokens · {result.seconds:.1f} s · "
          f"signal/noise {result.snr:.2f}")
    print()
    rows = [[r.role, f"{r.share:.1%}", r.rank, r.modules,
             " ".join(f"{layer}:{share:.0%}" for layer, share in sorted(r.per_layer.items()))]
            for r in result.roles]
    print(table(["role", "importance", "rank (90%)", "modules", "share per layer"], rows, "lrrrl"))
    print()
    if result.plan is not None:
        p = result.plan
        print(f"plan: targets {p.targets} · r={p.r} · lora_alpha={p.alpha:g}" + (" · rsLoRA" if p.use_rslora else ""))
        for reason in p.reasons:
            print(f"  {reason.choice:10s} {reason.text}")
    for note in result.notes:
        print(f"note: {note}")
    from ..probing.result import BLIND_SPOTS

    print("what the probe cannot tell (the sweep must):")
    for spot in BLIND_SPOTS:
        print(f"  - {spot}")
    print("check it: loraplan sweep MODEL --data FILE --from-probe PROBE.json --out DIR")
    return 0

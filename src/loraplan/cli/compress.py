"""Shrink an adapter by SVD truncation of each ΔW: a valid PEFT adapter of lower rank, with the
update energy each weight keeps. Works from the adapter alone (no base model) in seconds. Each
weight keeps its scale alpha/r (the new lora_alpha is scale × new r), so training it further
behaves like the original; --energy picks a rank per weight (rank_pattern).

examples:
  loraplan compress ./out/adapter --rank 8 --out ./out/adapter-r8
  loraplan compress ./sweep/trials/full_r64 --energy 0.9 --out ./full_r64-e90
  loraplan compress ./out/adapter --rank 16 --out ./small --json
"""

from __future__ import annotations

from collections import Counter

from ..plan.count import human_bytes, human_count
from .options import add_json, positive_int, share
from .render import emit_json, table


def register(parser):
    parser.add_argument("adapter", metavar="ADAPTER", help="a PEFT adapter folder or a loraplan trial folder")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--rank", "-r", type=positive_int, default=None, help="the new rank of every weight")
    target.add_argument("--energy", type=share, default=None,
                        help="keep this share of each ΔW's squared Frobenius norm, e.g. 0.9 (a rank per weight)")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="the folder for the new adapter")
    parser.add_argument("--overwrite", action="store_true", help="replace the adapter already in --out")
    add_json(parser)


def run(args) -> int:
    from ..adapter.compress import compress

    result = compress(args.adapter, args.out, rank=args.rank, energy=args.energy, overwrite=args.overwrite)
    if args.json:
        emit_json(result.to_json())
        return 0
    ranks = Counter(w.r_after for w in result.weights)
    spread = ", ".join(f"r={r}×{n}" for r, n in sorted(ranks.items()))
    print(f"wrote {result.out}: r={result.r}, lora_alpha={result.lora_alpha:g}"
          + (f" (ranks per weight: {spread})" if len(ranks) > 1 else ""))
    print(f"  LoRA params {human_count(result.params_before)} → {human_count(result.params_after)} · "
          f"file {human_bytes(result.bytes_before)} → {human_bytes(result.bytes_after)}")
    print(f"  update energy kept: mean {result.retained:.2%}, worst weight "
          f"{min(w.retained_min for w in result.weights):.2%}")
    print()
    by_role: dict[str, list] = {}
    for w in result.weights:
        by_role.setdefault(w.role, []).append(w)
    rows = []
    for role, ws in by_role.items():
        before = sorted({w.r_before for w in ws})
        after = sorted({w.r_after for w in ws})
        rows.append([role, len(ws), _span(before), _span(after), f"{sum(w.retained for w in ws) / len(ws):.2%}",
                     f"{min(w.retained_min for w in ws):.2%}"])
    print(table(["role", "weights", "r before", "r after", "energy kept (mean)", "worst"], rows, "lrrrrr"))
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nload it as any adapter: PeftModel.from_pretrained(base_model, \"{result.out}\")")
    return 0


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"

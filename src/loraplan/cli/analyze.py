"""What a trained adapter learned: the singular values of every ΔW = scale·B·A (from a QR of B and
Aᵀ and an r×r SVD, never the dense matrix), energy rank at 90/95/99%, stable and entropy effective
rank, summaries per role and per layer, and a verdict on the rank. With --base, ‖ΔW‖/‖W‖ shows
which modules barely moved; with --compare, the subspace similarity φ of the LoRA paper (§7.2).

examples:
  loraplan analyze ./out/adapter
  loraplan analyze ./sweep/trials/full_r64 --compare ./sweep/trials/full_r8
  loraplan analyze ./checkpoint-500 --base ./Llama-3.2-1B --all
  loraplan analyze ./out/adapter --base builtin:llama-3.1-8b --json
"""

from __future__ import annotations

from ..plan.count import human_count
from .options import add_json, add_trust_remote_code
from .render import emit_json, table


def register(parser):
    parser.add_argument("adapter", metavar="ADAPTER", help="a PEFT adapter folder (adapter_config.json + "
                        "adapter_model.safetensors), or a loraplan trial folder")
    parser.add_argument("--base", default=None, metavar="MODEL",
                        help="the base model: exact roles, a fit check, and ‖ΔW‖/‖W‖ from its weights")
    parser.add_argument("--compare", default=None, metavar="OTHER_ADAPTER",
                        help="a second adapter of the same base: subspace similarity per weight")
    parser.add_argument("--all", action="store_true", help="also list every adapted weight")
    add_trust_remote_code(parser, "the base model's")
    add_json(parser)


def run(args) -> int:
    from ..adapter.analyze import ENERGY_LEVELS, analyze

    result = analyze(args.adapter, base=args.base, compare=args.compare, trust_remote_code=args.trust_remote_code)
    if args.json:
        emit_json(result.to_json())
        return 0
    ad = result.adapter
    print(f"{ad.path} · {ad.summary()} · {human_count(ad.lora_params)} params · {ad.dtype}")
    if result.base:
        print(f"base {result.base}" + ("" if any(s.relative_change is not None for s in result.spectra)
                                       else " (roles and fit only)"))
    elif ad.base_model:
        print(f"trained on {ad.base_model} (pass --base for ‖ΔW‖/‖W‖ and exact roles)")
    with_base = any(g.relative_change is not None for g in result.by_role)
    levels = "/".join(f"{p:.0%}".rstrip("%") for p in ENERGY_LEVELS)
    headers = ["ΔWs", "r", f"energy rank {levels}", "stable rank", "entropy rank", "share of ΔW"]
    headers += ["‖ΔW‖/‖W‖"] if with_base else []

    def rows(groups):
        out = []
        for g in groups:
            ranks = "/".join(f"{g.energy_rank[p]:g}" for p in ENERGY_LEVELS)
            r = str(g.ranks[0]) if len(g.ranks) == 1 else f"{g.ranks[0]}–{g.ranks[-1]}"
            row = [g.key, g.weights, r, ranks, f"{g.stable_rank:.2f}", f"{g.entropy_rank:.1f}", f"{g.share:.1%}"]
            out.append(row + ([_fmt(g.relative_change)] if with_base else []))
        return out

    print()
    print("medians per role")
    print(table(["role"] + headers, rows(result.by_role), "lrrrrrrr"[:len(headers) + 1]))
    if len(result.by_layer) > 1:
        print()
        print("medians per layer")
        print(table(["layer"] + headers, rows(result.by_layer), "rrrrrrrr"[:len(headers) + 1]))
    if args.all:
        print()
        rows_all = [[s.label, s.role, s.r, f"{s.sigma[0]:.3g}" if s.sigma else "0", f"{s.norm:.3g}",
                     "/".join(str(s.energy_rank(p)) for p in ENERGY_LEVELS), f"{s.stable_rank:.2f}",
                     f"{s.entropy_rank:.1f}"] + ([_fmt(s.relative_change)] if with_base else [])
                    for s in result.spectra]
        print(table(["weight", "role", "r", "σ1", "‖ΔW‖", f"energy rank {levels}", "stable", "entropy"]
                    + (["‖ΔW‖/‖W‖"] if with_base else []), rows_all, "llrrrrrrr"[:8 + with_base]))
    if result.comparison:
        c = result.comparison
        print()
        print(f"compared with {c.other} · {c.other_summary}")
        crow = [[role, v["weights"], f"{v['phi_top']:.2f}", f"{v['phi_full']:.2f}", f"{v['phi_delta_top']:.2f}",
                 f"{v['phi_delta_full']:.2f}", f"{v['random_full']:.2g} / {v['random_delta_full']:.2g}"]
                for role, v in c.by_role().items()]
        print(table(["role", "weights", "φ(1,1) A", "φ(r,r') A", "φ(1,1) ΔW", "φ(r,r') ΔW", "random A / ΔW"],
                    crow, "lrrrrrr"))
        print("  φ on A: LoRA paper §7.2 (right-singular vectors of A); on ΔW: its output (column) space, "
              "directions ordered by ΔW's singular values")
        if c.only_here or c.only_there:
            print(f"  only in the first: {len(c.only_here)} weights; only in the other: {len(c.only_there)}")
    print()
    for v in result.verdicts + (result.comparison.verdicts if result.comparison else []):
        print(f"• {v.message}")
    for note in ad.notes + result.notes:
        print(f"note: {note}")
    return 0


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2g}"

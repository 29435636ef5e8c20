"""Read a training run and say what went wrong: overfitting (eval loss turns up while train keeps
falling; train loss near zero), underfitting (an early plateau; in a sweep, a higher rank clearly
better), instability (spikes, NaN, divergence) and the alpha-fixed-while-r-varies trap — each with
its evidence and which way to move the rank.

RUN is a loraplan sweep folder, one of its trial folders, or a transformers trainer_state.json
(or a checkpoint / output folder that holds one). A step or loss that is not a number ("ten",
"high") is an error, never read as NaN; a trial folder whose result.json is damaged is an error, and
in a sweep folder such a trial is listed as damaged with a note (docs/sweep-dir.md).

examples:
  loraplan diagnose ./sweep
  loraplan diagnose ./sweep/trials/full_r64
  loraplan diagnose ./outputs/checkpoint-1000/trainer_state.json
  loraplan diagnose ./outputs --json
"""

from __future__ import annotations

from .options import add_json
from .render import emit_json, table

_ARROW = {"lower": "→ lower r", "higher": "→ raise r"}


def register(parser):
    parser.add_argument("run", metavar="RUN", help="a sweep folder, a trial folder, or a trainer_state.json")
    add_json(parser)


def run(args) -> int:
    from ..diagnosis import diagnose

    result = diagnose(args.run)
    if args.json:
        emit_json(result.to_json())
        return 0
    print(f"{result.source} ({result.kind.replace('_', ' ')}, {len(result.runs)} run{'s' * (len(result.runs) > 1)})")
    rows = []
    for r in result.runs:
        s = r.summary()
        rows.append([s["name"], s["r"] if s["r"] is not None else "—", _g(s["lora_alpha"]), s["status"] or "—",
                     s["steps"] or "—", _g(s["train_first"]), _g(s["train_last"]),
                     f"{_g(s['eval_best'])} @ {s['eval_best_step']}" if s["eval_best"] is not None else "—",
                     _g(s["eval_loss"])])
    print()
    print(table(["run", "r", "alpha", "status", "steps", "train first", "train end", "best eval", "final eval"],
                rows, "lrrlrrrrr"))
    print()
    if result.healthy:
        print("no problem found: no overfitting, underfitting, instability or alpha trap in these curves")
    for f in sorted(result.findings, key=lambda f: ("error", "warning", "info").index(f.severity)):
        where = f"{f.trial}: " if f.trial else ""
        arrow = f" {_ARROW[f.rank]}" if f.rank else ""
        print(f"[{f.severity}] {f.kind.replace('_', ' ')}{arrow} · {where}{f.message}")
        if f.advice:
            print(f"    fix: {f.advice}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _g(x) -> str:
    return "—" if x is None else f"{x:.4g}"

"""Write a sweep's report: one self-contained HTML page (ranked table, recommendation and its
reason, plots, each trial's settings; the probe's importance and the adapters' spectra when
probe.json / analysis.json are in the folder), with the plots also saved as PNG in plots/ next to
it. No network and no external asset: the page opens anywhere. Works on a sweep that is still
running (unfinished trials are shown as such).

examples:
  loraplan report runs/sweep
  loraplan report runs/sweep --out ~/reports/qwen-lora.html
  loraplan report runs/sweep --json
"""

from __future__ import annotations

from .options import add_json
from .render import emit_json


def register(parser):
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the folder `loraplan sweep --out` wrote")
    parser.add_argument("--out", "-o", default=None,
                        help="the HTML file to write (default: SWEEP_DIR/report.html); PNGs go to plots/ beside it")
    add_json(parser)


def run(args) -> int:
    from ..sweeps.report import read_sweep, write_report

    sweep = read_sweep(args.sweep_dir)
    out, images = write_report(sweep, args.out)
    s = sweep.summary
    if args.json:
        emit_json({"report": str(out), "plots": {k: str(v) for k, v in images.items()},
                   "trials": {t.name: t.status for t in sweep.trials}, "ranking": s.get("ranking"),
                   "best": s.get("best"), "recommended": s.get("recommended"), "noise": s.get("noise"),
                   "reason": s.get("reason"), "summary_source": sweep.summary_source, "notes": sweep.notes})
        return 0
    counts: dict[str, int] = {}
    for t in sweep.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    print(f"wrote {out} ({len(sweep.trials)} trials: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + ")")
    print(f"plots in {out.parent / 'plots'}: " + ", ".join(p.name for p in images.values()))
    if s.get("recommended"):
        print(f"recommended {s['recommended']}: {s.get('reason')}")
    else:
        print(f"no recommendation: {s.get('reason')}")
    for note in sweep.notes:
        print(f"note: {note}")
    return 0

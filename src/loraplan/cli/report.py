"""Write a sweep's report: one self-contained HTML page (ranked table, recommendation and its
reason, plots, each trial's settings; the probe's importance and the adapters' spectra when
probe.json / analysis.json are in the folder), with the plots also saved as PNG in plots/ next to
it. No network and no external asset: the page opens anywhere. Works on a sweep that is still
running (unfinished trials are shown as such). A trial whose result.json is cut or holds a value of
the wrong type is shown as damaged (the next sweep runs it again), never as completed; a folder
without trials/ is an error, never a stale recommendation (docs/sweep-dir.md).

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
    from ..sweeps.folder import read_sweep
    from ..sweeps.report import write_report

    sweep = read_sweep(args.sweep_dir)
    written = write_report(sweep, args.out)
    out, images, s = written.page, written.images, written.summary
    if args.json:
        emit_json({"report": str(out), "plots": {k: str(v) for k, v in images.items()},
                   "trials": {t.name: t.status.value for t in sweep.trials}, "ranking": s.ranking,
                   "best": s.best, "recommended": s.recommended, "noise": s.noise,
                   "reason": s.reason, "summary_source": written.summary_source, "notes": sweep.notes})
        return 0
    print(f"wrote {out} ({len(sweep.trials)} trials: " + ", ".join(f"{n} {k}" for k, n in sweep.counts().items())
          + ")")
    print(f"plots in {out.parent / 'plots'}: " + ", ".join(p.name for p in images.values()))
    if s.recommended:
        print(f"recommended {s.recommended}: {s.reason}")
    else:
        print(f"no recommendation: {s.reason}")
    for note in sweep.notes:
        print(f"note: {note}")
    return 0

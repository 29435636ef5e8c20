"""The whole journey offline on CPU in a few minutes, on a task whose answer is known: a planted
rank-4 update in the MLP of a small Llama. loraplan writes the task, sweeps target sets × ranks, and
checks that the config it recommends covers the planted modules at a rank ≥ the planted one.

examples:
  loraplan demo
  loraplan demo --out /tmp/loraplan-demo
"""

from __future__ import annotations

from ..errors import RunError
from .options import add_json
from .render import emit_json, table


def register(parser):
    parser.add_argument("--out", default="loraplan-demo", help="where to write the task and the sweep (default: %(default)s)")
    add_json(parser, "machine-readable summary; no progress bars")


def run(args) -> int:
    from ..sweeps.demo import run_demo
    from ..sweeps.runner import RESULT_HEADERS, result_rows

    echo = (lambda *a, **k: None) if args.json else print
    result = run_demo(args.out, progress=not args.json, echo=echo)
    sweep = result.sweep
    if args.json:
        emit_json({"recovered": result.recovered, "recommended": result.recommended,
                   "planted": result.task.to_json(), "sweep": sweep.to_json()})
    else:
        print()
        print(table(RESULT_HEADERS, result_rows(sweep.results, sweep.summary), "llrrrllrlllrrrl"))
        print()
        task = result.task
        print(f"recommended: {sweep.summary.recommended} — {sweep.summary.reason}")
        print(f"4/4 check: planted rank {task.spec.rank} in {', '.join(task.roles)}; the recommended config "
              f"{'covers' if result.found_modules else 'MISSES'} those modules at "
              f"r={result.recommended_r}, {'within' if result.found_rank else 'OUTSIDE'} [k, 2k] = "
              f"[{task.spec.rank}, {2 * task.spec.rank}] "
              f"({'recovered' if result.recovered else 'NOT recovered'}); teacher's loss {task.ideal_eval_loss:.4f}")
        if sweep.summary.settle_note:
            print(f"{'settled' if sweep.summary.settled else 'not settled'}: {sweep.summary.settle_note}")
        print(f"next: open {sweep.out}/report.html · loraplan analyze {sweep.out}/trials/"
              f"{sweep.summary.recommended}/adapter · loraplan diagnose {sweep.out}")
    if not result.recovered:
        raise RunError("the sweep did not recover the planted modules and rank",
                       f"see {sweep.out}/summary.md")
    return 0

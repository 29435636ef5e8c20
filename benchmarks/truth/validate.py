"""The validation table: the sweep as a user runs it (loraplan's own code path, default lr policy) on
the planted tasks of cases.py, one case after another, and whether its pick covers the planted roles
at a rank within [k, 2k].

Each case: the task (made once under --tasks), then `loraplan.sweeps.runner.sweep` with the grid
below, its folder under --work; one JSON line per case appended to --results (a case already there
is not run again). `--table` writes RESULTS.md's table from that file.

    nice -n 10 python benchmarks/truth/validate.py --cases held_out
    python benchmarks/truth/validate.py --table
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))
sys.path.insert(0, str(HERE))

# what a user comparing role groups and ranks would run: the seeds' target sets × a rank ladder
GRID = {"targets": ["q,v", "attention", "mlp", "attention,mlp"], "r": [2, 4, 8, 16], "alpha": ["r"]}
TRAINING = {"max_steps": 200, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 10, "eval_every": 25,
            "max_eval_examples": 128, "seed": 0}


def run_case(case, tasks: Path, work: Path, training: dict) -> dict:
    import torch

    from cases import make

    from loraplan.model.loading import load_structure
    from loraplan.model.targets import resolve_targets
    from loraplan.sweeps.runner import sweep

    torch.set_num_threads(1)
    task = make(case, str(tasks))
    t0 = time.time()
    result = sweep(str(task.base), str(task.train), eval=str(task.eval), out=work / case.name, progress=False,
                   overrides={"grid": GRID, **{f"training.{k}": v for k, v in training.items()},
                              "data.max_length": 2 * task.spec.seq_len + 16})
    seconds = time.time() - t0
    s = result.summary
    structure = load_structure(str(task.base))
    row = {"case": case.name, "planted": case.targets, "k": case.rank, "recommended": s.recommended,
           "best": s.best, "settled": s.settled, "settle_note": s.settle_note, "seconds": round(seconds, 1),
           "steps": sum(r.steps or 0 for r in result.results), "max_steps": result.trials and
           training["max_steps"], "base_eval_loss": task.base_eval_loss, "ideal_eval_loss": task.ideal_eval_loss}
    rec = next((r for r in result.results if r.name == s.recommended), None)
    if rec is not None:
        chosen = {m.name for m in resolve_targets(structure, rec.targets).modules}
        row.update(targets=rec.targets, r=rec.r, lr=rec.learning_rate, eval_loss=rec.eval_loss,
                   covers=set(task.modules) <= chosen, rank_ok=case.rank <= rec.r <= 2 * case.rank)
        row["pass"] = row["covers"] and row["rank_ok"]
    else:
        row["pass"] = False
    return row


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| case | planted | k | pick (targets, r, lr) | eval loss (base → ideal) | settled | pass |",
             "|---|---|---|---|---|---|---|"]
    for x in rows:
        pick = f"{x.get('targets')} r{x.get('r')} lr {x.get('lr'):g}" if x.get("targets") else "none"
        why = "" if x["pass"] else (" (roles)" if not x.get("covers") else " (rank)")
        lines.append(f"| {x['case']} | {x['planted']} | {x['k']} | {pick} | {x.get('eval_loss', float('nan')):.4f} "
                     f"({x['base_eval_loss']:.4f} → {x['ideal_eval_loss']:.4f}) | "
                     f"{'yes' if x['settled'] else 'no'} | {'✓' if x['pass'] else '✗' + why} |")
    passed = sum(x["pass"] for x in rows)
    lines += ["", f"{passed}/{len(rows)} pass."]
    return "\n".join(lines)


def main() -> None:
    from cases import CASES, HELD_OUT, TUNING

    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="held_out", help="held_out, tuning, or comma-separated case names")
    p.add_argument("--tasks", default="/tmp/loraplan-truth/tasks")
    p.add_argument("--work", default="/tmp/loraplan-truth/validate")
    p.add_argument("--results", default=str(HERE / "results" / "validate.jsonl"))
    p.add_argument("--steps", type=int, default=TRAINING["max_steps"])
    p.add_argument("--table", action="store_true")
    args = p.parse_args()
    results = Path(args.results)
    if args.table:
        print(table(results))
        return
    chosen = {"held_out": HELD_OUT, "tuning": TUNING}.get(args.cases) or [CASES[n] for n in args.cases.split(",")]
    done = {json.loads(x)["case"] for x in results.read_text().splitlines() if x.strip()} if results.exists() else set()
    results.parent.mkdir(parents=True, exist_ok=True)
    for case in chosen:
        if case.name in done:
            continue
        row = run_case(case, Path(args.tasks), Path(args.work), {**TRAINING, "max_steps": args.steps})
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{case.name}: {row.get('targets')} r{row.get('r')} -> {'PASS' if row['pass'] else 'FAIL'} "
              f"({row['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

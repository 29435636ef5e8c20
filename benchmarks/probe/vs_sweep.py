"""The probe's plan against the sweep's winner on planted tasks, and the probe's cost relative to
the sweep's (same data, same CPU).

    python benchmarks/probe/vs_sweep.py --tasks /tmp/probe_validation --out /tmp/probe_vs_sweep

It reuses the planted tasks that validate.py wrote under --tasks. Each sweep: targets attention / mlp /
down / attention,mlp × r 2, 4, 8 (alpha = r), 200 steps of 16 sequences, lr 1e-2 (the demo's settings).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

TASKS = ["task_mlp_r4", "task_attention_r4", "task_down_r2"]
GRID = {"targets": ["attention", "mlp", "down", "attention,mlp"], "r": [2, 4, 8], "alpha": ["r"]}
TRAINING = {"training.max_steps": 200, "training.batch_size": 16, "training.learning_rate": 1e-2,
            "training.eval_every": 50, "data.max_length": 64}


def main() -> None:
    from loraplan.probing.probe import probe
    from loraplan.sweeps.runner import sweep

    p = argparse.ArgumentParser()
    p.add_argument("--tasks", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in TASKS:
        task = Path(args.tasks) / name
        planted = json.loads((task / "planted.json").read_text())
        t0 = time.time()
        pr = probe(str(task / "base"), str(task / "train.jsonl"), batches=16, batch_size=32, max_length=64)
        probe_s = time.time() - t0
        t0 = time.time()
        sw = sweep(str(task / "base"), str(task / "train.jsonl"), eval=str(task / "eval.jsonl"), out=out / name,
                   overrides={"grid": GRID, **TRAINING}, progress=False)
        sweep_s = time.time() - t0
        rec = next(r for r in sw.results if r.name == sw.summary.recommended)
        best = next(r for r in sw.results if r.name == sw.summary.best)
        row = {"task": name, "planted": f"{','.join(planted['roles'])} r{planted['rank']}",
               "probe_plan": f"{pr.plan.targets} r{pr.plan.r}", "sweep_best": f"{best.targets} r{best.r}",
               "sweep_recommended": f"{rec.targets} r{rec.r}",
               "probe_s": round(probe_s, 1), "sweep_s": round(sweep_s, 1), "cost_ratio": round(probe_s / sweep_s, 4)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    (out / "vs_sweep.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

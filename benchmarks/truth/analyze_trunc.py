"""Rank by truncation: does cutting the highest-rank adapter's ΔW to r' directions tell what rank the
task needs, earlier than training rank r' itself?

For every snapshot of an exp_grid.py run (--snapshots), every target set, alpha policy and lr: the
top-rank config's ΔW is SVD-truncated to each lower rank of the grid and evaluated on the same eval
batches; printed next to the trained config of that rank (same lr, and its best lr) and the paired
noise to the best trained config at that step.

    python benchmarks/truth/analyze_trunc.py --tag lr_transfer --case t02_mlp_r4
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))
sys.path.insert(0, str(HERE))


def paired(a: list[float], b: list[float], w: list[int]) -> tuple[float, float]:
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    total = sum(w)
    m = sum(x * c for x, c in zip(diffs, w, strict=True)) / total
    n = len(diffs)
    var = sum((c * (x - m)) ** 2 for x, c in zip(diffs, w, strict=True)) / total ** 2 * n / (n - 1)
    return m, math.sqrt(var)


def main() -> None:
    import torch

    from exp_grid import SNAP, TASKS, load_snapshot
    from multitrain import MergedEval, deltas, truncate

    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--case", required=True)
    p.add_argument("--policy", default="16")
    args = p.parse_args()
    data = json.loads((HERE / "results" / args.tag / f"{args.case}.json").read_text())
    configs = data["configs"]
    steps = data["curves"]["eval_steps"]
    w = data["curves"]["eval_tokens"]
    ev = MergedEval(str(TASKS / args.case), max_eval_examples=data["args"]["max_eval"],
                    batch_size=data["args"]["batch_size"], max_length=4 * 32 + 8)
    out = {}
    print(f"{args.case}: planted {data['planted']['targets']} r{data['planted']['rank']}, ideal {data['ideal_eval_loss']:.4f}")
    for snap in sorted((SNAP / args.tag / args.case).glob("step*.safetensors"), key=lambda p: int(p.stem[4:])):
        step = int(snap.stem[4:])
        e = steps.index(step)
        snapshot = load_snapshot(snap)
        losses = data["curves"]["eval"][e]
        batches = data["curves"]["eval_batches"][e]
        best = min(range(len(configs)), key=lambda i: losses[i])
        print(f"\n step {step}: best trained {configs[best]['name']} {losses[best]:.4f}")
        for targets in sorted({c["targets"] for c in configs}):
            members = [(i, c) for i, c in enumerate(configs) if c["targets"] == targets]
            top = max(c["r"] for _, c in members)
            for i, c in members:
                policy = c["name"].split("_a")[1].split("_lr")[0]
                if c["r"] != top:
                    continue
                d = deltas(snapshot, i)
                row = []
                for r in sorted({c2["r"] for _, c2 in members if c2["r"] < top}):
                    loss, per = ev(truncate(d, r))
                    m, se = paired(per, batches[best], w)
                    same = [j for j, c2 in members if c2["r"] == r and c2["lr"] == c["lr"]
                            and (c2["name"].split("_a")[1].split("_lr")[0] == args.policy or c2["r"] == 16)]
                    own = min((j for j, c2 in members if c2["r"] == r), key=lambda j: losses[j])
                    row.append(f"r{r}: trunc {loss:.4f} (+{m:.4f}±{2 * se:.4f})"
                               + (f" trained {losses[same[0]]:.4f}" if same else "") + f" best-lr {losses[own]:.4f}")
                    out.setdefault(str(step), {}).setdefault(c["name"], {})[r] = [loss, m, 2 * se]
                print(f"  {c['name']} ({losses[i]:.4f}): " + "; ".join(row))
    (HERE / "results" / args.tag / f"{args.case}.trunc.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()

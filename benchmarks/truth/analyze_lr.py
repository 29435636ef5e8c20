"""Does one learning rate transfer across ranks? From results/<tag>/<case>.json (exp_grid.py).

For each alpha policy and target set: eval loss at a few budgets for every (rank, lr), the best lr
per rank, and the ranking of ranks at the best shared lr vs at each rank's own best lr.

    python benchmarks/truth/analyze_lr.py results/lr_transfer/t01_o_r4.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(path: str, budgets=(100, 200, 400, 600)) -> str:
    data = json.loads(open(path).read())
    steps = data["curves"]["eval_steps"]
    evals = data["curves"]["eval"]
    lines = [f"## {data['case']}: planted {data['planted']['targets']} r{data['planted']['rank']}; "
             f"base {data['base_eval_loss']:.4f}, ideal {data['ideal_eval_loss']:.4f}", ""]
    groups = defaultdict(list)
    for i, c in enumerate(data["configs"]):
        policy = c["name"].split("_a")[1].split("_lr")[0]
        groups[(c["targets"], policy)].append((i, c))
    for (targets, policy), members in groups.items():
        ranks = sorted({c["r"] for _, c in members})
        lrs = sorted({c["lr"] for _, c in members})
        for budget in budgets:
            if budget not in steps:
                continue
            e = steps.index(budget)
            lines.append(f"### {targets}, alpha {policy}, step {budget} (eval loss by rank × lr; ◀ best lr of the rank)")
            lines.append("| r | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |")
            lines.append("|---|" + "---|" * (len(lrs) + 1))
            for r in ranks:
                row = {c["lr"]: evals[e][i] for i, c in members if c["r"] == r}
                best = min(row, key=row.get) if row else None
                cells = [(f"{row[lr]:.4f}" + (" ◀" if lr == best else "")) if lr in row else "—" for lr in lrs]
                lines.append(f"| {r} | " + " | ".join(cells) + f" | {best:g} |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(table(p))

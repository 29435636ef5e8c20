"""Derived adapters of an exp_grid.py run, evaluated at every snapshot, for the replay of sweep rules.

For each target set's highest-rank configs (every lr): the ΔW truncated to each lower grid rank; for
the all-linear ones also the ΔW restricted to each smaller target set of the grid (roles removed),
at full rank and truncated. Each evaluated on the same eval batches as the trained configs, so the
replay can compare them pairwise. Writes results/<tag>/<case>.cert.json:
{step: {"<config>|<targets>|r<rank>": [mean, [per-batch losses]]}}.

    python benchmarks/truth/certify.py --tag grid --case t01_o_r4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))
sys.path.insert(0, str(HERE))


def main() -> None:
    import torch

    from exp_grid import SNAP, TASKS, load_snapshot
    from multitrain import MergedEval, deltas, truncate

    from loraplan.model.targets import resolve_targets

    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--case", required=True)
    args = p.parse_args()
    path = HERE / "results" / args.tag / f"{args.case}.cert.json"
    data = json.loads((HERE / "results" / args.tag / f"{args.case}.json").read_text())
    configs = data["configs"]
    ev = MergedEval(str(TASKS / args.case), max_eval_examples=data["args"]["max_eval"],
                    batch_size=data["args"]["batch_size"], max_length=4 * 32 + 8)
    targets = list(dict.fromkeys(c["targets"] for c in configs))
    ranks = sorted({c["r"] for c in configs})
    members = {t: {m.name for m in resolve_targets(ev.structure, t).modules} for t in targets}
    out = json.loads(path.read_text()) if path.exists() else {}
    base = ev({})
    out["base"] = [base[0], base[1]]
    for snap in sorted((SNAP / args.tag / args.case).glob("step*.safetensors"), key=lambda p: int(p.stem[4:])):
        step = snap.stem[4:]
        if step in out:
            continue
        snapshot = load_snapshot(snap)
        row = {}
        for i, c in enumerate(configs):
            top = max(x["r"] for x in configs if x["targets"] == c["targets"])
            if c["r"] != top:
                continue
            d = deltas(snapshot, i)
            subsets = [t for t in targets if members[t] < members[c["targets"]]] + [c["targets"]]
            for t in subsets:
                part = {n: x for n, x in d.items() if n in members[t]}
                for r in ranks:
                    if r > c["r"] or (t == c["targets"] and r == c["r"]):
                        continue
                    if t != c["targets"] and c["targets"] != "all-linear":
                        continue
                    loss, per = ev(truncate(part, r) if r < c["r"] else part)
                    row[f"{c['name']}|{t}|r{r}"] = [loss, per]
        out[step] = row
        print(f"{args.case} step {step}: {len(row)} derived adapters", flush=True)
        path.write_text(json.dumps(out))


if __name__ == "__main__":
    main()

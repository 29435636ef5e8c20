"""Probe candidates on an exp_grid.py run with an all-linear config and one config per role:

- joint fit + leave-one-role-out: the all-linear adapter with one role's ΔW removed (loss increase);
- joint fit, keep-one-role: only that role's ΔW kept (loss decrease from the base);
- solo fits: each single-role adapter's own eval loss;
- rank: per role, the smallest truncation of that role's ΔW (others intact) within noise of the
  untruncated joint fit; and the 90%-energy rank of the role's ΔW.

    python benchmarks/truth/analyze_probe.py --tag probe --case t01_o_r4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))
sys.path.insert(0, str(HERE))

ROLES = ["q", "k", "v", "o", "gate", "up", "down"]


def energy_rank(d, share=0.9) -> int:
    import torch

    s = torch.linalg.svdvals(d) ** 2
    c = torch.cumsum(s, 0) / s.sum()
    return int((c < share).sum()) + 1


def main() -> None:
    import torch

    from analyze_trunc import paired
    from exp_grid import SNAP, TASKS, load_snapshot
    from multitrain import MergedEval, deltas, truncate

    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--case", required=True)
    p.add_argument("--config", default=None, help="the joint fit (default: the first all-linear config)")
    args = p.parse_args()
    data = json.loads((HERE / "results" / args.tag / f"{args.case}.json").read_text())
    configs = data["configs"]
    steps = data["curves"]["eval_steps"]
    w = data["curves"]["eval_tokens"]
    ev = MergedEval(str(TASKS / args.case), max_eval_examples=data["args"]["max_eval"],
                    batch_size=data["args"]["batch_size"], max_length=4 * 32 + 8)
    planted = data["planted"]
    print(f"{args.case}: planted {planted['roles']} r{planted['rank']}; base {data['base_eval_loss']:.4f} "
          f"ideal {data['ideal_eval_loss']:.4f}")
    record = {}
    joint = next(i for i, c in enumerate(configs) if c["targets"] == "all-linear"
                 and (args.config is None or c["name"] == args.config))
    solo = {c["targets"]: i for i, c in enumerate(configs) if c["targets"] in ROLES}
    base_loss, base_batches = ev({})
    for snap in sorted((SNAP / args.tag / args.case).glob("step*.safetensors"), key=lambda p: int(p.stem[4:])):
        step = int(snap.stem[4:])
        e = steps.index(step)
        snapshot = load_snapshot(snap)
        d = deltas(snapshot, joint)
        full, full_b = ev(d)
        by_role = {r: {n: x for n, x in d.items() if ev.roles[n] == r} for r in ROLES}
        rows = {}
        for role in ROLES:
            if not by_role[role]:
                continue
            without, wb = ev({n: x for n, x in d.items() if ev.roles[n] != role})
            only, _ = ev(by_role[role])
            m, se = paired(wb, full_b, w)
            rank = None
            for r in (1, 2, 4, 8, 16):
                trunc, tb = ev({**d, **truncate(by_role[role], r)})
                mt, st = paired(tb, full_b, w)
                if mt <= 2 * st:
                    rank = r
                    break
            energy = sorted(energy_rank(x) for x in by_role[role].values())
            norm = sum(float(x.norm() ** 2) for x in by_role[role].values())
            rows[role] = {"loo": without - full, "loo_noise": 2 * se, "only": base_loss - only,
                          "solo": data["curves"]["eval"][e][solo[role]] if role in solo else None,
                          "trunc_rank": rank, "energy_rank": energy[len(energy) // 2], "norm2": norm}
        record[step] = {"joint": full, "roles": rows}
        print(f"\n step {step}: joint {full:.4f}")
        for key, label in (("loo", "leave-one-out Δ"), ("only", "keep-only gain"), ("norm2", "‖ΔW‖²")):
            order = sorted(rows, key=lambda r: -rows[r][key])
            print(f"  {label:16s}: " + ", ".join(f"{r} {rows[r][key]:.4f}" for r in order))
        order = sorted((r for r in rows if rows[r]["solo"] is not None), key=lambda r: rows[r]["solo"])
        print("  solo fit loss   : " + ", ".join(f"{r} {rows[r]['solo']:.4f}" for r in order))
        print("  rank (trunc/90%): " + ", ".join(f"{r} {rows[r]['trunc_rank']}/{rows[r]['energy_rank']}" for r in rows))
    name = configs[joint]["name"]
    (HERE / "results" / args.tag / f"{args.case}.probe.{name}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()

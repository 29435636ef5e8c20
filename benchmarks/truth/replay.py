"""Replay sweep decision rules on the curves and derived adapters of exp_grid.py + certify.py.

For each case and each snapshot step, every rule picks a config: the cheapest candidate whose eval
loss is within noise (2σ of the paired per-batch difference) of the best candidate. The rules
differ in their candidates:

  one_lr      every trained config at one learning rate (3e-3): the sweep before this work, with a
              fixed alpha (the alpha = r version is in results/lr_transfer)
  own_lr      every trained config at its own best learning rate of those trained
  trunc       own_lr + each target set's top-rank adapter SVD-truncated to every lower grid rank
  trunc_roles trunc + the all-linear top-rank adapter restricted to each smaller target set

A pick is right when its targets cover the planted modules and its rank is within [k, 2k].

    python benchmarks/truth/replay.py --tag grid [cases…]
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

COVERS = {  # which grid target sets contain which roles
    "q,v": {"q", "v"},
    "attention": {"q", "k", "v", "o"},
    "mlp": {"gate", "up", "down"},
    "all-linear": {"q", "k", "v", "o", "gate", "up", "down"},
}


def paired_noise(a: list[float], b: list[float], w: list[int], sigmas: float = 2.0) -> float:
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    total = sum(w)
    m = sum(x * c for x, c in zip(diffs, w, strict=True)) / total
    n = len(diffs)
    var = sum((c * (x - m)) ** 2 for x, c in zip(diffs, w, strict=True)) / total ** 2 * n / (n - 1)
    return sigmas * math.sqrt(var)


def candidates(data: dict, cert: dict, step: int, rule: str, lr_choice: dict | None = None) -> list[dict]:
    configs = data["configs"]
    e = data["curves"]["eval_steps"].index(step)
    losses, batches = data["curves"]["eval"][e], data["curves"]["eval_batches"][e]
    params = {(c["targets"], c["r"]): c["params"] for c in configs}
    trained = [dict(name=c["name"], targets=c["targets"], r=c["r"], lr=c["lr"], params=c["params"],
                    loss=losses[i], batches=batches[i], derived=False) for i, c in enumerate(configs)]
    if rule == "one_lr":
        return [t for t in trained if t["lr"] == 3e-3]
    out = []
    for key in {(t["targets"], t["r"]) for t in trained}:
        group = [t for t in trained if (t["targets"], t["r"]) == key]
        if lr_choice is not None and key[0] in lr_choice:
            same = [t for t in group if t["lr"] == lr_choice[key[0]]]
            group = same or group
        out.append(min(group, key=lambda t: t["loss"]))
    if rule in ("trunc", "trunc_roles"):
        for key, (loss, per) in cert.get(str(step), {}).items():
            source, targets, r = key.split("|")
            r = int(r[1:])
            src = next(c for c in configs if c["name"] == source)
            if lr_choice is not None and src["lr"] != lr_choice.get(src["targets"], src["lr"]):
                continue
            if targets != src["targets"] and rule != "trunc_roles":
                continue
            out.append(dict(name=f"{source}→{targets} r{r}", targets=targets, r=r, lr=src["lr"],
                            params=params[(targets, r)], loss=loss, batches=per, derived=True))
    return out


def decide(cands: list[dict], w: list[int]) -> dict:
    best = min(cands, key=lambda c: c["loss"])
    within = [c for c in cands if c is best or c["loss"] - best["loss"] <= paired_noise(c["batches"], best["batches"], w)]
    pick = min(within, key=lambda c: (c["params"], c["loss"]))
    return {"best": best, "pick": pick}


def right(pick: dict, planted: dict) -> tuple[bool, bool]:
    covers = set(planted["roles"]) <= COVERS[pick["targets"]]
    k = planted["rank"]
    return covers, k <= pick["r"] <= 2 * k


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", default="grid")
    p.add_argument("--rules", default="one_lr,own_lr,trunc,trunc_roles")
    p.add_argument("cases", nargs="*")
    args = p.parse_args()
    folder = HERE / "results" / args.tag
    cases = args.cases or sorted(f.stem for f in folder.glob("*.json") if "." not in f.stem)
    score = {}
    for case in cases:
        data = json.loads((folder / f"{case}.json").read_text())
        cert_path = folder / f"{case}.cert.json"
        cert = json.loads(cert_path.read_text()) if cert_path.exists() else {}
        w = data["curves"]["eval_tokens"]
        planted = data["planted"]
        print(f"\n{case}: planted {','.join(planted['roles'])} r{planted['rank']}  (ideal {data['ideal_eval_loss']:.4f})")
        for step in [s for s in data["curves"]["eval_steps"] if str(s) in cert or not cert]:
            if step == 0:
                continue
            cells = []
            for rule in args.rules.split(","):
                d = decide(candidates(data, cert, step, rule), w)
                cov, rank = right(d["pick"], planted)
                ok = cov and rank
                score.setdefault((rule, step), []).append(ok)
                pk = d["pick"]
                cells.append(f"{rule}: {pk['targets']} r{pk['r']}{'*' if pk['derived'] else ''} "
                             f"{pk['loss']:.4f}{'' if ok else ' ✗'}")
            print(f"  step {step}: " + " | ".join(cells))
    print("\nright picks (covers the planted roles, r in [k, 2k]):")
    for (rule, step), oks in sorted(score.items(), key=lambda x: (x[0][1], x[0][0])):
        print(f"  step {step} {rule}: {sum(oks)}/{len(oks)}")


if __name__ == "__main__":
    main()

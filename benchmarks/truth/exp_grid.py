"""Train a grid of LoRA configs on one planted case with multitrain.Grid and keep every curve.

    nice -n 10 python benchmarks/truth/exp_grid.py --case t01_o_r4 --targets o --ranks 1,2,4,8,16,32 \
        --lrs 1e-3,3e-3,1e-2,3e-2 --alphas r,16 --steps 600 --tag lr_transfer

Writes results/<tag>/<case>.json: the configs, trainable params, train losses per step, eval losses
(mean and per batch) every --eval-every steps, and the task's base/ideal eval loss.
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

TASKS = Path("/tmp/truth/tasks")
SNAP = Path("/tmp/truth/snap")


def save_snapshot(snapshot: dict, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({f"{name}|{part}": t.contiguous() for name, parts in snapshot.items()
               for part, t in zip("ABs", parts, strict=True)}, str(path))


def load_snapshot(path: Path) -> dict:
    from safetensors.torch import load_file

    flat = load_file(str(path))
    names = sorted({k.rpartition("|")[0] for k in flat})
    return {n: (flat[f"{n}|A"], flat[f"{n}|B"], flat[f"{n}|s"]) for n in names}


def configs_for(targets: list[str], ranks: list[int], lrs: list[float], alphas: list[str]):
    from multitrain import Config

    out, seen = [], set()
    for t in targets:
        for a in alphas:
            rslora = a.endswith("rs")  # "16rs": alpha 16 with rsLoRA's alpha/sqrt(r)
            policy = a[:-2] if rslora else a
            for r in ranks:
                alpha = r * float(policy[:-1] or 1) if policy.endswith("r") else float(policy)
                for lr in lrs:
                    config = Config(f"{t.replace(',', '+')}_r{r}_a{a}_lr{lr:g}", t, r, alpha, lr, rslora=rslora)
                    key = (t, r, config.scale, lr)
                    if key in seen:
                        continue
                    seen.add(key)
                    out.append(config)
    return out


def main() -> None:
    import torch

    from cases import CASES, make
    from multitrain import Grid

    p = argparse.ArgumentParser()
    p.add_argument("--case", required=True)
    p.add_argument("--targets", required=True, help="target sets separated by ';'")
    p.add_argument("--ranks", default="1,2,4,8,16,32")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    p.add_argument("--alphas", default="16")
    p.add_argument("--lead-lrs", default="", help="extra lrs for each target set's highest rank only")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--schedule", default="constant")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--max-eval", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tag", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--snapshots", default="", help="steps at which every adapter is saved (to /tmp/truth/snap)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    case = CASES[args.case]
    task = make(case, str(TASKS))
    ranks = [int(x) for x in args.ranks.split(",")]
    configs = configs_for(args.targets.split(";"), ranks, [float(x) for x in args.lrs.split(",")],
                          args.alphas.split(","))
    if args.lead_lrs:
        configs += configs_for(args.targets.split(";"), [max(ranks)], [float(x) for x in args.lead_lrs.split(",")],
                               args.alphas.split(","))
    grid = Grid(str(task.folder), configs, batch_size=args.batch_size, max_length=4 * task.spec.seq_len + 8,
                max_eval_examples=args.max_eval)
    out = HERE / "results" / args.tag / f"{args.case}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(step, seconds, ev):
        best = min(range(len(configs)), key=lambda i: float(ev[i]))
        print(f"{args.case} step {step} {seconds:.0f}s best {configs[best].name} {float(ev[best]):.4f}", flush=True)

    snaps = sorted(int(x) for x in args.snapshots.split(",") if x)
    done = 0
    for stop in snaps + [args.steps]:
        if stop > done:
            grid.train(stop - done, total_steps=args.steps, warmup=args.warmup, schedule=args.schedule,
                       eval_every=args.eval_every, log=log)
            done = stop
        if stop in snaps:
            folder = SNAP / args.tag / args.case
            folder.mkdir(parents=True, exist_ok=True)
            save_snapshot(grid.snapshot(), folder / f"step{stop}.safetensors")
    record = {"case": args.case, "planted": {"targets": case.targets, "rank": case.rank, "roles": task.roles,
                                             "spec": case.spec},
              "base_eval_loss": task.base_eval_loss, "ideal_eval_loss": task.ideal_eval_loss,
              "args": vars(args), "seconds": time.time() - t0,
              "configs": [{**c.__dict__, "params": grid.trainable(i)} for i, c in enumerate(configs)],
              "curves": grid.curves}
    out.write_text(json.dumps(record))
    print(f"wrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()

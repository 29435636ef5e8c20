"""What the local executor costs on one GPU: the same sweep run in this process (today's path, the
default on a one-GPU machine) and by one worker process (`--gpus 0`: spawned, loads the base, takes
trials from the queue), alternated, each from the `loraplan.sweep` call to its return (base load,
worker start and report included). Issue 28: the local executor must cost no more than today's path.

    python benchmarks/sweep/executor_ratio.py --shape llama-1b --steps 30 --repeats 2 --out $OUT   # one GPU
    python benchmarks/sweep/executor_ratio.py --shape tiny --steps 4 --repeats 1 --out /tmp/ratio  # CPU smoke test

The model is a random-init Llama shape (no weights downloaded) with a character-level tokenizer; the
data is 600 synthetic text rows (120 for tiny) of 64-512 characters. Writes $OUT/executor_ratio_<shape>.json: the
wall seconds of every run, the ratio local / in-process (median over repeats), the sum of the
trials' own train seconds per run, and the largest eval-loss difference between the two paths.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

GRID = "targets=q,v;attention;attention,mlp r=8,16"


def model_folder(shape: str, folder: Path) -> str:
    """config.json of the shape and a character-level tokenizer (random init: no weights)."""
    from support.tiny import FAMILIES, make_tokenizer

    from loraplan.model.builtin import BUILTIN_MODELS

    folder.mkdir(parents=True, exist_ok=True)
    if shape == "tiny":
        config = dict(FAMILIES["llama"])
    else:
        config = dict(BUILTIN_MODELS["llama-3.2-1b"].config)
    (folder / "config.json").write_text(json.dumps(config))
    make_tokenizer(int(config["vocab_size"])).save_pretrained(folder)
    return str(folder)


def data_file(path: Path, rows: int) -> str:
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.;:0123456789"
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": "".join(rng.choice(alphabet) for _ in range(rng.randint(64, 512)))}) + "\n")
    return str(path)


def run(model: str, data: str, out: Path, gpus: str | None, steps: int) -> dict:
    import torch

    from loraplan.sweeps.runner import sweep
    from loraplan.sweeps.spec import parse_grid_flag

    overrides = {"grid": parse_grid_flag(GRID), "training.max_steps": steps, "training.batch_size": 8,
                 "training.eval_every": max(1, steps // 2), "training.warmup_steps": min(10, steps - 1),
                 "data.max_length": 512, "executor.gpus": gpus}
    t0 = time.perf_counter()
    result = sweep(model, data, out=out, overrides=overrides, progress=False, random_init=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"executor": json.loads((out / "sweep.json").read_text())["executor"], "wall_s": round(wall, 2),
            "train_s": round(sum(r.train_s or 0 for r in result.results), 2),
            "eval_loss": {r.name: r.eval_loss for r in result.results},
            "status": {r.name: r.status.value for r in result.results}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-1b", choices=["llama-1b", "tiny"])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--work", default="/tmp/executor_ratio", help="model folder, data and sweep folders")
    args = p.parse_args()
    import torch

    work = Path(args.work)
    model = model_folder(args.shape, work / f"model_{args.shape}")
    data = data_file(work / "train.jsonl", 600 if args.shape != "tiny" else 120)
    local = "0" if torch.cuda.is_available() else "cpu:1"  # one worker process on the one device
    runs = []
    for k in range(args.repeats):
        for name, gpus in (("in-process", None), ("local", local)):
            out = work / f"sweep_{name}_{k}_{time.time():.0f}"
            row = {"path": name, "repeat": k, **run(model, data, out, gpus, args.steps)}
            print(f"{name} #{k}: {row['wall_s']} s wall, {row['train_s']} s training, {row['executor']}", flush=True)
            runs.append(row)
    wall = {name: statistics.median(r["wall_s"] for r in runs if r["path"] == name) for name in ("in-process", "local")}
    a = next(r for r in runs if r["path"] == "in-process")["eval_loss"]
    b = next(r for r in runs if r["path"] == "local")["eval_loss"]
    diff = max((abs(a[n] - b[n]) for n in a if a[n] is not None and b.get(n) is not None), default=None)
    report = {"shape": args.shape, "steps": args.steps, "grid": GRID, "repeats": args.repeats,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "median_wall_s": wall,
              "ratio_local_over_in_process": round(wall["local"] / wall["in-process"], 3),
              "max_eval_loss_difference": diff, "runs": runs}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    target = Path(args.out) / f"executor_ratio_{args.shape}.json"
    target.write_text(json.dumps(report, indent=1))
    print(f"local / in-process wall: {report['ratio_local_over_in_process']} (median of {args.repeats}); "
          f"largest eval-loss difference {diff}; wrote {target}")


if __name__ == "__main__":  # the local executor spawns its worker: this module is imported there again
    main()

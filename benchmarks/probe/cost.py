"""The probe's cost on a big model (random init is fine for cost): time and peak GPU memory.

    python benchmarks/probe/cost.py --shape llama-8b --batches 8 --out $OUT
    python benchmarks/probe/cost.py --shape llama-8b --within $OUT/loraplan_sweep_llama-8b.json --out $OUT

Batches are the sweep benchmark's synthetic sequences (8 per batch, 64-512 random tokens), so the
figures sit next to one trial of benchmarks/sweep/RESULTS.md on the same shape. The probe runs
twice in one process: the first call pays CUDA's start-up (kernels loaded on first use), as a CLI
call would; as in `loraplan probe`, the whitening's libraries load in a thread while the model
loads (_WarmUp.before_loading), and the allocator uses expandable segments. `--within TRIAL.json`
(bench_sweep.py's output) adds a third call capped at that trial's peak memory (`max_memory`):
what the probe costs on a GPU that just holds one trial.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

SHAPES = {"llama-1b": "builtin:llama-3.2-1b", "llama-8b": "builtin:llama-3.1-8b"}


def synthetic_batches(count: int = 8) -> list:
    """`count` micro-batches of 8 sequences of 64–512 random tokens (the sweep benchmark's kind), seeded."""
    from loraplan.data.batches import training_steps
    from loraplan.data.formats import TokenizedExample

    rng = random.Random(1)
    examples = []
    for _ in range(200):
        ids = [rng.randrange(1000, 128256) for _ in range(rng.randint(64, 512))]
        examples.append(TokenizedExample(input_ids=ids, labels=list(ids)))
    return [s[0] for s in training_steps(examples, count, 8, None, 0)]


def main() -> None:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as `probe()` sets it
    import torch

    from loraplan.model.loading import load_model, load_structure
    from loraplan.probing.passes import _WarmUp
    from loraplan.probing.probe import _candidates, probe_batches
    from loraplan.sweeps.runner import package_versions

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-8b", choices=list(SHAPES))
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--within", help="bench_sweep.py's JSON: also probe capped at its trial's peak memory")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = p.parse_args()
    model = SHAPES[args.shape]
    batches = synthetic_batches(args.batches)
    t0 = time.time()
    warm_up = _WarmUp.before_loading("bf16")  # as probe() starts it
    net = load_model(model, dtype="bf16", random_init=True)
    load_s = time.time() - t0
    structure = load_structure(model)
    modules = _candidates(structure, "all-linear")
    result = probe_batches(net, structure, modules, batches, pad_id=0, progress=True, warm_up=warm_up)
    # again in the same process: the first call pays CUDA/cuBLAS/cuSOLVER start-up, as a CLI call would
    warm = probe_batches(net, structure, modules, batches, pad_id=0)
    capped = None
    if args.within:
        trial = json.loads(Path(args.within).read_text())["rows"][0]
        cap = int(trial["peak_gib"] * 2**30)
        capped = probe_batches(net, structure, modules, batches, pad_id=0, max_memory=cap)
        capped = {"max_memory_gib": trial["peak_gib"], "trial_train_s": trial["train_s"], "probe_s": capped.seconds,
                  "peak_gib": round((capped.peak_memory_bytes or 0) / 2**30, 2), "notes": capped.notes}
    row = {"shape": args.shape, "batches": args.batches, "tokens": result.tokens, "probe_s": result.seconds,
           "probe_warm_s": warm.seconds, "warm_peak_gib": round((warm.peak_memory_bytes or 0) / 2**30, 2),
           "within_trial_memory": capped,
           "load_s": round(load_s, 1), "peak_gib": round((result.peak_memory_bytes or 0) / 2**30, 2),
           "notes": result.notes, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "versions": package_versions(), "date": time.strftime("%Y-%m-%d"),
           "roles": [(r.role, round(r.share, 3), r.rank) for r in result.roles]}
    print(json.dumps(row), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"probe_cost_{args.shape}.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()

"""What lean_saved_tensors saves and costs: 8 probe batches' forward and backward, as the probe runs
them (frozen model, the probed Linear weights requiring a gradient, the lean loss), with and without.

    python benchmarks/probe/saved_tensors.py --shape llama-8b --out $OUT

Peak memory above the weights (one fold's gradients included) and time, median of 3, alternated.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch
    from cost import SHAPES, synthetic_batches

    from loraplan.autograd.lm_loss import lean_causal_lm_loss
    from loraplan.autograd.saved_tensors import lean_saved_tensors
    from loraplan.model.loading import load_model, load_structure
    from loraplan.probing.passes import _attention_kernels
    from loraplan.probing.probe import _candidates
    from loraplan.sweeps.runner import package_versions

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-8b", choices=list(SHAPES))
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = p.parse_args()
    device = torch.device("cuda")
    batches = synthetic_batches()
    net = load_model(SHAPES[args.shape], dtype="bf16", random_init=True).eval()
    net.requires_grad_(False)
    by_name = dict(net.named_modules())
    weights = [by_name[m.name].weight for m in _candidates(load_structure(SHAPES[args.shape]), "all-linear")]
    for w in weights:
        w.requires_grad_(True)
    variants = {"kept": lambda: contextlib.nullcontext(), "lean_saved_tensors": lambda: lean_saved_tensors(net)}

    def run(make) -> tuple[float, float]:
        for w in weights:
            w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, t = torch.cuda.memory_allocated(), time.perf_counter()
        with _attention_kernels(device), lean_causal_lm_loss(net), make():
            for mb in batches:
                ids, labels, mask = mb.tensors(device, 0)
                net(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        torch.cuda.synchronize()
        return time.perf_counter() - t, (torch.cuda.max_memory_allocated() - base) / 2**30

    for make in variants.values():
        run(make)  # kernels loaded, allocator warm
    seconds, peaks = {k: [] for k in variants}, {}
    for rep in range(3):
        for name, make in (variants.items() if rep % 2 == 0 else reversed(variants.items())):
            s, peak = run(make)
            seconds[name].append(round(s, 4))
            peaks[name] = round(peak, 2)
    median = {k: sorted(v)[1] for k, v in seconds.items()}
    row = {"shape": args.shape, "batches": len(batches), "peak_gib_above_weights": peaks, "median_s": median,
           "all_s": seconds, "time_ratio": round(median["lean_saved_tensors"] / median["kept"], 3),
           "device": torch.cuda.get_device_name(0), "versions": package_versions(), "date": time.strftime("%Y-%m-%d")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"saved_tensors_{args.shape}.json").write_text(json.dumps(row, indent=1))
    print(json.dumps(row))


if __name__ == "__main__":
    main()

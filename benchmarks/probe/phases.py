"""The probe's calls on one random-init shape, and where a warm call's time goes. For A/B of two trees
of the code on one machine (the probe's time moves by ~5% between machines, more than most changes):

    PYTHONPATH=/tmp/old/src python benchmarks/probe/phases.py --shape llama-8b
    PYTHONPATH=src          python benchmarks/probe/phases.py --shape llama-8b

Prints, for a first call, two more, one capped at --cap GiB (the trial's peak: `max_memory`) and one
more: time, peak memory, checkpointed layers; then one more call with phase timers (each phase ends
in a GPU sync): the memory plan, the passes over the batches, the whitening, the spectra (`_finish`).
Batches as in cost.py (8 × 8 sequences of 64–512 random tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import loraplan.probing.probe  # noqa: F401  (the tree on PYTHONPATH, before cost.py puts this checkout's src first)
except ImportError:
    pass
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cost import SHAPES, synthetic_batches  # noqa: E402  (the same shapes and batches as cost.py)


def main() -> None:
    import torch

    import loraplan.probing.passes as passes_module
    import loraplan.probing.probe as probing
    from loraplan.model.loading import load_model, load_structure

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-8b", choices=list(SHAPES))
    p.add_argument("--cap", type=float, default=63.76, help="GiB for the capped call (default: the 8B trial's peak)")
    args = p.parse_args()
    batches = synthetic_batches()
    net = load_model(SHAPES[args.shape], dtype="bf16", random_init=True)
    structure = load_structure(SHAPES[args.shape])
    modules = probing._candidates(structure, "all-linear")
    print(f"probing.py: {probing.__file__}", flush=True)

    def run(**kw):
        return probing.probe_batches(net, structure, modules, batches, pad_id=0, **kw)

    for call in ("first", "again", "again", "capped", "again"):
        r = run(**({"max_memory": int(args.cap * 2**30)} if call == "capped" else {}))
        recomputed = next((n.split(" of")[0] for n in r.notes if "recompute" in n), "0")
        print(f"{call}: {r.seconds:.3f} s, peak {r.peak_memory_bytes / 2**30:.2f} GiB, "
              f"{recomputed} layers checkpointed", flush=True)

    marks: dict[str, float] = {}

    def timed(module, name):
        fn = getattr(module, name)

        def wrapper(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            marks[name] = marks.get(name, 0.0) + time.perf_counter() - t
            return out
        setattr(module, name, wrapper)

    timed(probing, "_memory_plan")
    timed(passes_module, "_finish")
    passes, factorizer = probing._probe_layers, passes_module._Factorizer.__init__

    def probe_layers(*a, **k):
        torch.cuda.synchronize()
        marks["passes_start"] = time.perf_counter()
        return passes(*a, **k)

    def whitening_start(self, *args):
        torch.cuda.synchronize()
        marks["whitening_start"] = time.perf_counter()
        factorizer(self, *args)
    probing._probe_layers, passes_module._Factorizer.__init__ = probe_layers, whitening_start
    t0 = time.perf_counter()
    run()
    end = time.perf_counter()
    print(f"phases: total {end - t0:.2f} s; memory plan {marks['_memory_plan']:.3f}, "
          f"passes {marks['whitening_start'] - marks['passes_start']:.2f}, "
          f"whitening {end - marks['whitening_start'] - marks['_finish']:.2f}, spectra {marks['_finish']:.3f}")


if __name__ == "__main__":
    main()

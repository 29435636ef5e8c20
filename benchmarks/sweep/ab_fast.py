"""What each lever of the fast engine is worth, as ratios measured in one process on one loaded base:
the PEFT engine, the fast engine with everything on, and the fast engine with one lever off at a time
(FastOptions), on the seeds' workload (bench_sweep.py's data); plus torch.profiler kernel tables of a
few steps (host time against device time).

    python benchmarks/sweep/ab_fast.py --shape llama-1b --steps 30 --out $OUT
    python benchmarks/sweep/ab_fast.py --shape llama-8b --steps 20 --runs "peft:full_r16,fast:full_r16" --out $OUT
    python benchmarks/sweep/ab_fast.py --shape tiny --steps 4 --out /tmp/ab     # CPU smoke test

A run is ENGINE[+OPTIONS]:CONFIG[@STEPS], e.g. "fast+graphs=0;bucket=16:full_r16@50". Writes $OUT/ab_<shape>.json
(ms per step, eval seconds, peak GiB, eval loss, ratio to the first fast run of the same config) and
$OUT/profiles_<shape>.txt (one table per profiled run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sweep import parse_options, settings_for, workload

RUNS = (
    "peft:full_r16", "peft:full_r16_dora",
    "fast:full_r16", "fast:full_r16_dora", "fast:baseline_qv_r8",
    "fast+graphs_all=1:full_r16", "fast+lazy=0:full_r16", "fast+lean_lora=0:full_r16",
    "fast+bucket=16:full_r16", "fast+flash=0:full_r16", "fast+eval_tokens=4096:full_r16",
    "fast+dora_factors=0:full_r16_dora", "fast+graphs=0:full_r16_dora",
)
DEFAULT_PROFILES = "peft:full_r16,fast:full_r16,fast:full_r16_dora"


def shared_base():
    """Load the base once: every engine made after the first gets the same model object back."""
    from loraplan.model import loading

    original, cache = loading.load_model, {}

    def load_model(model, **kwargs):
        if model not in cache:
            t0 = time.time()
            cache[model] = original(model, **kwargs)
            print(f"loaded {model} in {time.time() - t0:.1f} s", flush=True)
        return cache[model]

    loading.load_model = load_model


def engine_for(run: str, model: str, settings):
    from loraplan.sweeps.fast_engine import make_engine

    kind, _, options = run.partition("+")
    engine = make_engine(kind, model, settings, random_init=True, options=parse_options(options.replace(";", ",")))
    engine.load(pad_id=0)
    return engine


def measure(run: str, config: str, model, settings, steps, evalset, ledger_root: Path) -> dict:
    import torch

    from loraplan.sweeps.folder import SweepFolder, now, read_sweep
    from loraplan.sweeps.spec import SweepSpec, expand

    trial = next(t for t in expand(SweepSpec()) if t.name == config)
    engine = engine_for(run, model, settings)
    ledger = SweepFolder(ledger_root / f"{run.replace(':', '_').replace('+', '_').replace('=', '').replace(';', '_')}_{time.time()}")
    ledger.open({"spec": {}, "spec_hash": "ab", "created": now()}, [trial.name])
    n = settings.max_steps
    state = engine.start(trial, ledger.trial(trial.name), {})
    t0 = time.time()
    engine.advance([state], steps, n, evalset, n)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.time() - t0
    result = engine.finish(state)
    engine.close()
    evals = read_sweep(ledger.root).trial(trial.name).evals
    ledger.close()
    return {"run": run, "config": config, "status": result.status.value, "engine": result.engine or "peft",
            "steps": result.steps, "params": sum(p.numel() for p in engine.base.parameters()),
            "ms_per_step": round(1000 * result.train_s / max(result.steps, 1), 2),
            "eval_s": round(sum(p.eval_seconds or 0 for p in evals), 3), "advance_s": round(wall, 2),
            "real_tok_per_s": result.tokens_per_s, "tokens": state.tokens,
            "peak_gib": round((result.peak_memory_bytes or 0) / 2**30, 2), "eval_loss": result.eval_loss,
            "message": result.message, "notes": engine.notes}


def profile(run: str, config: str, model, settings, steps, out: Path, shape: str, ledger_root: Path) -> dict:
    """5 training steps (after 3 unprofiled ones: captures, warm-up) under torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from loraplan.sweeps.folder import TrialRecorder
    from loraplan.sweeps.spec import SweepSpec, expand

    trial = next(t for t in expand(SweepSpec()) if t.name == config)
    engine = engine_for(run, model, settings)
    state = engine.start(trial, TrialRecorder(ledger_root / f"_profile_{time.time()}", "_profile"), {})
    fast = hasattr(engine, "_activate")
    if fast:
        engine._activate(state.name)
        engine._to_device([mb for s in steps[:8] for mb in s])
        engine.base.train()
    context = engine._attention() if fast else _null()
    cuda = torch.cuda.is_available()
    with context:
        for k in range(3):
            engine._train_step(state, steps[k])
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        t0 = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            for k in range(3, 8):
                engine._train_step(state, steps[k])
            if cuda:
                torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    averages = prof.key_averages()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"

    host = sum(e.self_cpu_time_total for e in averages) / 1e6
    device = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in averages) / 1e6
    header = (f"{run} {config}: 5 steps, wall {wall:.3f} s (profiled), host (self CPU) {host:.3f} s, "
              f"device (self CUDA) {device:.3f} s, kernels/ops: {sum(e.count for e in averages)}\n")
    with open(out / f"profiles_{shape}.txt", "a") as f:
        f.write(header + averages.table(sort_by=key, row_limit=25, max_name_column_width=60) + "\n\n")
    print(header, flush=True)
    engine.finish(state, "failed", "profiling copy")
    engine.close()
    return {"run": run, "config": config, "wall_s": round(wall, 3), "host_s": round(host, 3), "device_s": round(device, 3)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from loraplan.data.batches import eval_batches, training_steps

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-1b")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--profiles", default=DEFAULT_PROFILES)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ledger_root = Path("/tmp/ab_ledgers")
    shared_base()
    model, train, evald = workload(args.shape)
    settings = settings_for(args.steps)
    longest = max([args.steps, 8] + [int(r.partition("@")[2]) for r in args.runs.split(",") if "@" in r])
    steps = training_steps(train, longest, 8, None, 0)
    evalset = eval_batches(evald, 8)
    report = {"shape": args.shape, "steps": args.steps, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": [], "profiles": []}
    path = out / f"ab_{args.shape}.json"
    for item in filter(None, args.runs.split(",")):
        run, _, config = item.rpartition(":")
        config, _, n = config.partition("@")
        try:
            row = measure(run, config, model, settings_for(int(n)) if n else settings, steps, evalset, ledger_root)
        except Exception as e:  # noqa: BLE001 - one broken variant must not cost the others
            row = {"run": run, "config": config, "status": f"error: {type(e).__name__}: {str(e)[:300]}"}
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        path.write_text(json.dumps(report, indent=1))
    for item in filter(None, args.profiles.split(",")):
        run, _, config = item.rpartition(":")
        try:
            report["profiles"].append(profile(run, config, model, settings, steps, out, args.shape, ledger_root))
        except Exception as e:  # noqa: BLE001
            report["profiles"].append({"run": run, "config": config, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        path.write_text(json.dumps(report, indent=1))
    reference = {r["config"]: r for r in report["rows"] if r["run"] == "fast" and "ms_per_step" in r}
    print(f"\n{'run':40s} {'config':18s} {'ms/step':>8s} {'× fast':>7s} {'eval s':>7s} {'GiB':>6s} {'eval loss':>9s}")
    for r in report["rows"]:
        if "ms_per_step" not in r:
            print(f"{r['run']:40s} {r['config']:18s} {r['status']}")
            continue
        ref = reference.get(r["config"])
        ratio = r["ms_per_step"] / ref["ms_per_step"] if ref else float("nan")
        print(f"{r['run']:40s} {r['config']:18s} {r['ms_per_step']:8.1f} {ratio:7.2f} {r['eval_s']:7.2f} "
              f"{r['peak_gib']:6.1f} {r['eval_loss'] or float('nan'):9.4f}")
    path.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""loraplan's sweep engine on the seeds' grid, on the same synthetic data as the seeds' method
(../shared/bench/seed_method_sweep.py): random-init Llama shapes, 2000 train / 200 eval sequences of
64-512 random tokens, batch 8 per optimizer step, lr 2e-4, cosine, 10 warmup steps, eval every 50.

    python benchmarks/sweep/bench_sweep.py --shape llama-1b --steps 100 --engine fast --out $OUT
    python benchmarks/sweep/bench_sweep.py --shape llama-1b --steps 100 --engine peft --out $OUT
    python benchmarks/sweep/bench_sweep.py --shape tiny --steps 4 --out /tmp/bench   # CPU smoke test

Writes $OUT/loraplan_sweep_<shape>_<engine>.json: per config train seconds, real (non-pad) tokens/s
(also by the seed script's formula), peak GiB, eval loss; the sweep's wall time, the base's load
included (transformers and PEFT are imported before the clock starts, as in the seeds' script).
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


def tiny_model(folder: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from support.tiny import save_tiny_model

    if not (folder / "config.json").exists():
        save_tiny_model(folder, "llama")
    return str(folder)


def workload(shape: str):
    """(model, train examples, eval examples) of the seed script's data(): the same RNG calls, so
    the same token sequences."""
    from loraplan.data.formats import TokenizedExample

    model = SHAPES.get(shape) or tiny_model(Path("/tmp/bench_tiny_model"))
    vocab = 128256 if shape != "tiny" else 128
    lo, hi = (64, 512) if shape != "tiny" else (8, 32)
    first = 1000 if shape != "tiny" else 7

    def data(n, seed):
        rng = random.Random(seed)
        items = []
        for _ in range(n):
            length = rng.randint(lo, hi)
            ids = [rng.randrange(first, vocab) for _ in range(length)]
            items.append(TokenizedExample(input_ids=ids, labels=list(ids)))
        return items

    return model, data(2000, 1), data(200, 2)


def settings_for(steps: int, micro_batch_size: int | None = None, engine: str = "auto"):
    from loraplan.sweeps.spec import TrainingSettings

    return TrainingSettings(max_steps=steps, batch_size=8, micro_batch_size=micro_batch_size, learning_rate=2e-4,
                            warmup_steps=10, scheduler="cosine", eval_every=50, seed=0, dtype="auto", engine=engine)


def parse_options(text: str | None):
    """"graphs=0,bucket=16" -> FastOptions."""
    from dataclasses import fields

    from loraplan.sweeps.fast_engine import FastOptions

    kinds = {f.name: f.type for f in fields(FastOptions)}
    values = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        kind = str(kinds[key])
        values[key] = (int(value) if kind == "int" else float(value) if kind == "float"
                       else value.lower() in ("1", "true", "on", "yes"))
    return FastOptions(**values)


def main() -> None:
    import peft
    import torch
    import transformers

    from loraplan.data.batches import eval_batches, training_steps
    from loraplan.sweeps.fast_engine import make_engine
    from loraplan.sweeps.folder import SweepFolder, now
    from loraplan.sweeps.spec import SweepSpec, expand

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-1b", choices=[*SHAPES, "tiny"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--only", default=None, help="comma-separated config names")
    p.add_argument("--engine", default="auto", choices=["auto", "fast", "peft"])
    p.add_argument("--options", default=None, help="fast engine options, e.g. graphs=0,bucket=16")
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--ledgers", default="/tmp/bench_ledgers", help="where the sweep ledgers (adapters) go")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, train, evald = workload(args.shape)
    settings = settings_for(args.steps, args.micro_batch_size, args.engine)
    t_load = time.time()
    engine = make_engine(args.engine, model, settings, random_init=True, options=parse_options(args.options))
    engine.load(pad_id=0)
    load_s = time.time() - t_load
    steps = training_steps(train, args.steps, 8, args.micro_batch_size, 0)
    evalset = eval_batches(evald, args.micro_batch_size or 8)
    trials = expand(SweepSpec())
    if args.only:
        trials = [t for t in trials if t.name in args.only.split(",")]
    ledger = SweepFolder(Path(args.ledgers) / f"{args.shape}_{engine.name}_{time.time():.0f}")
    ledger.open({"spec": {"bench": args.shape, "steps": args.steps}, "spec_hash": f"{args.shape}-{args.steps}-{time.time()}",
                 "created": now()}, [t.name for t in trials])
    rows = []
    sweep_t0 = time.time()
    n_params = sum(p.numel() for p in engine.base.parameters())

    def write(done: bool) -> dict:
        sweep_s = time.time() - sweep_t0
        summary = {"shape": args.shape, "steps": args.steps, "engine": engine.name, "options": args.options,
                   "finished": done, "load_s": round(load_s, 2), "sweep_s": round(sweep_s, 1),
                   "sweep_plus_load_s": round(sweep_s + load_s, 1), "params": n_params, "device": engine.device_name(),
                   "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                   "notes": engine.notes, "date": time.strftime("%Y-%m-%d"), "rows": rows}
        (out / f"loraplan_sweep_{args.shape}_{engine.name}.json").write_text(json.dumps(summary, indent=1))
        return summary

    for trial in trials:
        t0 = time.time()
        state = engine.start(trial, ledger.trial(trial.name), settings.model_dump())
        engine.advance([state], steps, args.steps, evalset, settings.eval_every)
        result = engine.finish(state)
        expected_tokens = args.steps * 8 * (64 + 512) / 2  # the seed script's formula
        row = {"config": trial.name, "status": result.status.value, "engine": result.engine or "peft",
               "trainable": result.trainable_params, "train_s": result.train_s,
               "total_s": round(time.time() - t0, 2), "eval_loss": result.eval_loss,
               "real_tokens": state.tokens, "real_tok_per_s": result.tokens_per_s,
               "seed_formula_tok_per_s": round(expected_tokens / result.train_s) if result.train_s else None,
               "peak_gib": round((result.peak_memory_bytes or 0) / 2**30, 2), "message": result.message}
        print(json.dumps(row), flush=True)
        rows.append(row)
        write(done=False)  # a run stopped by its time limit still leaves its finished configs
    engine.close()
    summary = write(done=True)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}), flush=True)


if __name__ == "__main__":
    main()

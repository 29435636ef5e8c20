"""Measure the peak GPU memory of LoRA / QLoRA training steps and record loraplan's estimate next to it.

The step is the one loraplan's sweep runs: a transformers model (random init, sdpa attention) with a
PEFT LoRA from `LoraPlan.to_peft_kwargs`, fused AdamW, `loss = model(input_ids, labels=input_ids).loss;
loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)`, no autocast. One process per model:
the base loads once; each config adds an adapter, runs 3 steps and removes it (`unload()`), and its
row is appended to $OUT/memory_<tag>.json (JSON Lines, flushed per row: a killed run keeps its rows).

    python benchmarks/memory/measure.py --model 1b --out $OUT          # 18 configs, ~1 min on an H100
    python benchmarks/memory/measure.py --model 8b --out $OUT          # 18 configs, ~4 min
    python benchmarks/memory/measure.py --model 1b --qlora --out $OUT  # QLoRA set (bitsandbytes), ~1 min
    python benchmarks/memory/measure.py --model 8b --qlora --out $OUT  # saves the 8B once to --scratch, ~4 min
    python benchmarks/memory/measure.py --device cpu --tiny --out /tmp/mem   # CPU smoke test of the whole path
    python benchmarks/memory/measure.py --model 1b --dry-run           # print the design and the estimates

The design covers every factor (targets, rank, batch × sequence, checkpointing, DoRA; for QLoRA
also double quant) and every pair of factors at least once, preferring configs predicted to fit.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

MODELS = {"1b": "builtin:llama-3.2-1b", "8b": "builtin:llama-3.1-8b"}
TINY = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=160,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            max_position_embeddings=256)
TARGETS = ("qv", "attention", "all-linear")
RANKS = (8, 64)
SHAPES = ((1, 2048), (4, 512), (8, 1024))
STEPS = 3
GiB = 1024**3


@dataclass(frozen=True)
class Config:
    targets: str
    r: int
    batch_size: int
    seq_len: int
    grad_ckpt: bool
    dora: bool
    quant: str | None = None
    double_quant: bool = True

    @property
    def name(self) -> str:
        parts = [self.targets, f"r{self.r}", f"{self.batch_size}x{self.seq_len}"]
        parts += ["ckpt"] * self.grad_ckpt + ["dora"] * self.dora
        if self.quant:
            parts.append(self.quant + ("" if self.double_quant else "-nodq"))
        return " ".join(parts)


def design(structure, qlora: bool, gpu_bytes: int | None) -> list[Config]:
    """Every (targets, rank, shape) once; checkpointing, DoRA (and double quant) chosen greedily so
    that every pair of factor values appears, preferring configs predicted to fit, then balance."""
    from loraplan.plan.lora_plan import LoraPlan
    from loraplan.plan.memory import estimate_memory

    targets = ("qv", "all-linear") if qlora else TARGETS
    shapes = SHAPES[:2] if qlora else SHAPES
    base_rows = list(itertools.product(targets, RANKS, shapes))
    extras = list(itertools.product((False, True), (False, True), (True, False) if qlora else (True,)))
    covered: set = set()
    counts: dict = {}
    out = []
    for t, r, (b, l) in base_rows:
        best, best_key = None, None
        for ckpt, dora, dq in extras:
            if qlora and dora and r == 64 and t == "all-linear":
                continue  # DoRA on a 4-bit base dequantizes every weight per step: keep the set quick
            values = {"targets": t, "r": r, "shape": (b, l), "ckpt": ckpt, "dora": dora, "dq": dq}
            pairs = {(k1, v1, k2, v2) for (k1, v1), (k2, v2) in itertools.combinations(values.items(), 2)}
            estimate = estimate_memory(structure, LoraPlan(targets=t, r=r, use_dora=dora), b, l, grad_ckpt=ckpt,
                                       quant="4bit" if qlora else None, double_quant=dq)
            fits = gpu_bytes is None or estimate.fits(gpu_bytes)
            balance = -sum(counts.get((k, v), 0) for k, v in (("ckpt", ckpt), ("dora", dora), ("dq", dq)))
            key = (len(pairs - covered), fits, balance)
            if best_key is None or key > best_key:
                best, best_key, best_pairs = (ckpt, dora, dq), key, pairs
        ckpt, dora, dq = best
        covered |= best_pairs
        for k, v in (("ckpt", ckpt), ("dora", dora), ("dq", dq)):
            counts[(k, v)] = counts.get((k, v), 0) + 1
        out.append(Config(t, r, b, l, ckpt, dora, "4bit" if qlora else None, dq))
    return out


def environment() -> dict:
    import peft
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        env["bitsandbytes"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, device_total_bytes=props.total_memory,
                   capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    else:
        env.update(device="cpu", device_total_bytes=None)
    return env


class Memory:
    """CUDA allocator statistics; on the CPU every reading is None (the smoke test checks the path)."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")

    def clean(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def allocated(self) -> int | None:
        return self.torch.cuda.memory_allocated() if self.cuda else None

    def peak(self) -> tuple[int | None, int | None]:
        if not self.cuda:
            return None, None
        self.torch.cuda.synchronize()
        return self.torch.cuda.max_memory_allocated(), self.torch.cuda.max_memory_reserved()


def load_base(args, config_dict: dict, qlora: bool, double_quant: bool):
    """The base model, random init, as the sweep loads it (QLoRA: saved once as safetensors, then
    loaded through BitsAndBytesConfig and prepare_model_for_kbit_training)."""
    import torch
    import transformers

    from loraplan.model.loading import make_config

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = make_config(dict(config_dict))
    dtype = torch.bfloat16
    cls = getattr(transformers, config.architectures[0])
    torch.manual_seed(0)
    if not qlora:
        with torch.device(args.device):
            return cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    folder = Path(args.scratch) / f"{args.tag}_bf16"
    if not (folder / "config.json").exists():
        with torch.device(args.device):
            model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
        model.save_pretrained(folder, safe_serialization=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype)
    device_map = {"": 0} if args.device.startswith("cuda") else {"": "cpu"}
    return cls.from_pretrained(folder, quantization_config=quant, dtype=dtype, device_map=device_map,
                               attn_implementation="sdpa")


def train_steps(model, opt, cfg: Config, vocab: int, device: str, memory: Memory, steps: list[dict]) -> None:
    """The sweep's step, STEPS times, with the allocator's readings around forward and backward
    appended to `steps` as each step ends (a step that runs out of memory leaves the earlier ones)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(STEPS):
        memory.reset()  # per step: the peaks after forward and backward belong to this step
        ids = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), generator=generator).to(device)
        labels = ids.clone()
        step: dict = {"before": memory.allocated()}
        loss = model(input_ids=ids, labels=labels).loss
        step["after_forward"] = memory.allocated()
        step["forward_peak"] = memory.peak()[0]
        loss.backward()
        step["backward_peak"] = memory.peak()[0]
        opt.step()
        opt.zero_grad(set_to_none=True)
        step["peak"], step["reserved_peak"] = memory.peak()
        step["loss"] = float(loss.detach())
        del loss, ids, labels
        steps.append(step)


def run_config(base, structure, cfg: Config, args, memory: Memory) -> dict:
    """Add the adapter, run the steps, remove the adapter: one row. A failure is recorded, not raised;
    `row["base_dirty"]` says the base must be loaded again."""
    import torch
    from peft import LoraConfig, get_peft_model

    from loraplan.plan.lora_plan import LoraPlan

    plan = LoraPlan(targets=cfg.targets, r=cfg.r, use_dora=cfg.dora)
    memory.clean()
    row: dict = {"status": "ok", "error": None, "allocated_before": memory.allocated(), "steps": []}
    model = opt = None
    started = time.perf_counter()
    memory.reset()
    try:
        model = get_peft_model(base, LoraConfig(**plan.to_peft_kwargs(structure)))
        if cfg.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, fused=True)
        row["adapter_allocated"] = memory.allocated()
        train_steps(model, opt, cfg, structure.text_config()["vocab_size"], args.device, memory, row["steps"])
    except torch.OutOfMemoryError as e:
        row.update(status="oom", error=str(e).splitlines()[0])
    except Exception as e:  # noqa: BLE001 - a failed config is recorded and the run goes on
        row.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=6))
    row["seconds"] = round(time.perf_counter() - started, 2)
    # the peak over the steps (and over the step that failed, if one did)
    allocated, reserved = memory.peak()
    if allocated is not None:
        row["allocated_peak"] = max([allocated] + [s["peak"] for s in row["steps"]])
        row["reserved_peak"] = max([reserved] + [s["reserved_peak"] for s in row["steps"]])
    else:
        row["allocated_peak"] = row["reserved_peak"] = None
    # remove the adapter and all the step left behind: the next config starts from the clean base
    try:
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        opt = None
        if model is not None:
            if cfg.grad_ckpt:
                model.gradient_checkpointing_disable()
                model.disable_input_require_grads()
            model.unload()
        model = None
        memory.clean()
        row["allocated_after"] = memory.allocated()
        leftover = [n for n, _ in base.named_modules() if "lora_" in n]
        trainable = [n for n, p in base.named_parameters() if p.requires_grad]
        row["base_dirty"] = bool(leftover or trainable)
        if leftover or trainable:
            row["error"] = (row["error"] or "") + f" base not clean after unload(): {(leftover + trainable)[:3]}"
    except Exception as e:  # noqa: BLE001
        row.update(base_dirty=True, error=(row["error"] or "") + f" cleanup failed: {type(e).__name__}: {e}")
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="1b")
    p.add_argument("--qlora", action="store_true", help="the QLoRA set (bitsandbytes 4-bit base)")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama and 2 configs (smoke test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    p.add_argument("--scratch", default="/tmp/loraplan_memory", help="where the QLoRA base is saved once")
    p.add_argument("--only", default=None, help="run the configs whose name contains this text")
    p.add_argument("--max-seconds", type=float, default=540, help="stop starting configs after this")
    p.add_argument("--dry-run", action="store_true", help="print the design with its estimates, run nothing")
    args = p.parse_args()

    from loraplan.model.loading import read_config_dict
    from loraplan.model.structure import build_structure
    from loraplan.plan.count import human_bytes
    from loraplan.plan.lora_plan import LoraPlan
    from loraplan.plan.memory import estimate_memory

    model_id = "tiny" if args.tiny else MODELS[args.model]
    args.tag = ("tiny" if args.tiny else args.model) + ("_qlora" if args.qlora else "")
    config_dict = dict(TINY) if args.tiny else read_config_dict(model_id)[0]
    from loraplan.model.loading import make_config

    structure = build_structure(make_config(dict(config_dict)), source=model_id)
    capacity = None
    if not args.dry_run and args.device.startswith("cuda"):
        import torch

        capacity = torch.cuda.get_device_properties(0).total_memory
    configs = design(structure, args.qlora, capacity or (80 * GiB if not args.tiny else None))
    if args.tiny:
        quant = "4bit" if args.qlora else None
        configs = [Config("qv", 4, 2, 32, False, False, quant), Config("all-linear", 8, 2, 32, True, True, quant)]
    if args.only:
        configs = [c for c in configs if args.only in c.name]
    plans = {c: LoraPlan(targets=c.targets, r=c.r, use_dora=c.dora) for c in configs}
    estimates = {c: estimate_memory(structure, plans[c], c.batch_size, c.seq_len, grad_ckpt=c.grad_ckpt,
                                    quant=c.quant, double_quant=c.double_quant) for c in configs}
    # one base load per double-quant setting; within it the OOMs, if any, come last
    configs.sort(key=lambda c: (not c.double_quant, estimates[c].total_bytes))
    print(f"{model_id}: {len(configs)} configs{' (QLoRA)' if args.qlora else ''}", flush=True)
    if args.dry_run:
        for c in configs:
            e = estimates[c]
            verdict = "fits" if e.fits(80 * GiB) else "does not fit"
            print(f"  {c.name:<38} {human_bytes(e.total_bytes):>10}  {e.peak_phase:<28} ({verdict} on 80 GiB)")
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"memory_{args.tag}.json"
    env = environment()
    memory = Memory(args.device)
    started = time.perf_counter()
    base = base_dq = base_allocated = None
    with path.open("a") as f:
        for index, cfg in enumerate(configs, 1):
            if time.perf_counter() - started > args.max_seconds:
                print(f"stopping: --max-seconds {args.max_seconds:g} reached", flush=True)
                break
            if base is None or (cfg.quant and cfg.double_quant != base_dq):
                base = None
                memory.clean()
                print(f"loading {model_id}{' in 4 bit' if cfg.quant else ''}…", flush=True)
                base = load_base(args, config_dict, bool(cfg.quant), cfg.double_quant)
                if cfg.quant:
                    from peft import prepare_model_for_kbit_training

                    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
                for param in base.parameters():
                    param.requires_grad_(False)
                base_dq = cfg.double_quant
                memory.clean()
                base_allocated = memory.allocated()
            e = estimates[cfg]
            row = {"model": model_id, "name": cfg.name, "config": asdict(cfg), "base_allocated": base_allocated}
            row.update(run_config(base, structure, cfg, args, memory))
            if row.pop("base_dirty", False):
                base = None  # load it again for the next config
            row["estimate"] = {"total_bytes": e.total_bytes, "saved_bytes": e.saved_bytes, "peak_phase": e.peak_phase,
                               "phases": e.phases, "terms": [t.to_json() for t in e.terms],
                               "fits_device": e.fits(env["device_total_bytes"]) if env["device_total_bytes"] else None}
            row["env"] = env
            row["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            f.write(json.dumps(row) + "\n")
            f.flush()
            measured = row["allocated_peak"]
            error = f"{(e.total_bytes - measured) / measured:+.1%}" if measured and row["status"] == "ok" else "-"
            shown = human_bytes(measured) if measured else "n/a"
            print(f"[{index}/{len(configs)}] {cfg.name:<38} {row['status']:<6} measured {shown:>10}  "
                  f"estimate {human_bytes(e.total_bytes):>10}  {error:>7}  {row['seconds']:.1f}s", flush=True)
    print(f"rows appended to {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

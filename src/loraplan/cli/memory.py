"""Peak GPU memory of a LoRA / QLoRA training step, term by term, and whether it fits your GPU.

Predicts torch.cuda.max_memory_allocated() of the step loraplan's sweep runs (transformers + PEFT,
SDPA attention, fused AdamW, no autocast): base weights, LoRA weights, optimizer state, the
activations autograd keeps (each adapted module keeps its own fp32 input copy), the fp32 logits of
the loss, DoRA's buffers. With --gpu-memory: a verdict, and what would make it fit. Sizes are
binary: GB means GiB, as GPU makers use it.

examples:
  loraplan memory builtin:llama-3.1-8b --targets all-linear --rank 16 --batch-size 4 --seq-len 1024
  loraplan memory builtin:llama-3.1-8b -t attention -r 64 -b 1 -l 4096 --quant 4bit --gpu-memory 24GB
  loraplan memory ./my-model --targets q,v --grad-ckpt --optimizer adamw8bit --gpu-memory 80GiB --json
  loraplan memory builtin:llama-3.1-8b --from qlora.yml --gpu-memory 24GB   (axolotl / LLaMA-Factory / torchtune:
      quantization, micro-batch, sequence length and checkpointing come from the file; flags override)
"""

from __future__ import annotations

import argparse
from argparse import ArgumentTypeError

from ..errors import UsageError
from ..model.targets import spec_text
from ..plan.count import human_bytes
from ..plan.memory import ALLOCATOR_MARGIN, CUDA_CONTEXT_BYTES, MemoryEstimate, estimate_memory
from .options import add_model_arguments, add_plan_arguments, plan_from_args, positive_int, size
from .render import emit_json, table


def register(parser):
    add_model_arguments(parser)
    add_plan_arguments(parser)
    parser.add_argument("--batch-size", "-b", type=positive_int, default=None,
                        help=f"sequences per step (default: --from FILE's micro-batch, else {DEFAULTS['batch_size']})")
    parser.add_argument("--seq-len", "-l", type=positive_int, default=None,
                        help=f"tokens per sequence, no padding (default: --from FILE's, else {DEFAULTS['seq_len']})")
    parser.add_argument("--dtype", default="bf16",
                        help="base model dtype: bf16, fp16 or fp32 (default %(default)s)")
    parser.add_argument("--quant", default=None,
                        help="none, 8bit (LLM.int8) or 4bit (QLoRA NF4) (default: --from FILE's, else none)")
    parser.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                        help="4-bit: quantize the quantization constants too (default on, as QLoRA)")
    parser.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                        help="gradient checkpointing, non-reentrant (default: --from FILE's, else off)")
    parser.add_argument("--optimizer", default="adamw",
                        help="adamw (fp32 states), adamw8bit (bitsandbytes) or sgd (default %(default)s)")
    parser.add_argument("--gpu-memory", type=size, default=None, metavar="SIZE",
                        help="your GPU's memory for a verdict, e.g. 24GB, 80GiB, 40960MiB")


# What a step looks like when neither a flag nor --from FILE says.
DEFAULTS = {"batch_size": 1, "seq_len": 2048, "quant": "none", "grad_ckpt": False}


def training_settings(args) -> tuple[dict, list[str]]:
    """(batch_size, seq_len, quant, grad_ckpt; the ones taken from --from FILE): a flag given wins,
    then the training config's own value, then DEFAULTS."""
    from ..plan.read_config import read_training_settings

    from_file = read_training_settings(args.from_file) if getattr(args, "from_file", None) else {}
    given = {"batch_size": args.batch_size, "seq_len": args.seq_len, "quant": args.quant, "grad_ckpt": args.grad_ckpt}
    settings, taken = {}, []
    for key, default in DEFAULTS.items():
        if given[key] is not None:
            settings[key] = given[key]
        elif key in from_file:
            settings[key] = from_file[key]
            taken.append(key)
        else:
            settings[key] = default
    for key, flag in (("batch_size", "--batch-size"), ("seq_len", "--seq-len")):
        if key in taken:  # the flags are checked by argparse; a training config's value here
            try:
                settings[key] = positive_int(str(settings[key]))
            except ArgumentTypeError as err:
                raise UsageError(f"{args.from_file}: {err} for the {flag.lstrip('-')}", f"set {flag}") from None
    return settings, taken


def run(args) -> int:
    from ..model.loading import load_structure

    settings, taken = training_settings(args)
    if settings["quant"].lower() != "4bit" and not args.double_quant:
        raise UsageError("--no-double-quant applies to --quant 4bit only")
    plan = plan_from_args(args)
    structure = load_structure(args.model, trust_remote_code=args.trust_remote_code)
    estimate = estimate_memory(structure, plan, settings["batch_size"], settings["seq_len"], dtype=args.dtype,
                               quant=settings["quant"], double_quant=args.double_quant,
                               grad_ckpt=settings["grad_ckpt"], optimizer=args.optimizer)
    estimate.gpu_bytes = args.gpu_memory
    if args.json:
        emit_json({**estimate.to_json(), "from_file": {k: settings[k] for k in taken}})
        return 0
    print_estimate(estimate, structure.architecture)
    if taken:
        names = {"batch_size": "micro-batch", "seq_len": "sequence length", "quant": "quantization",
                 "grad_ckpt": "gradient checkpointing"}
        print(f"from {args.from_file}: {', '.join(names[k] for k in taken)} (flags override)")
    return 0


def _setting(e: MemoryEstimate) -> str:
    quant = {"4bit": "QLoRA NF4" + (" double-quant" if e.double_quant else ""), "8bit": "LLM.int8"}.get(e.quant or "", e.dtype)
    parts = [quant, f"batch {e.batch_size} × seq {e.seq_len:,}", e.optimizer,
             "grad checkpointing" if e.grad_ckpt else "no checkpointing"]
    return " · ".join(parts)


def print_estimate(e: MemoryEstimate, architecture: str = "") -> None:
    p = e.plan
    dora = " · DoRA" if p.use_dora else ""
    print(f"{e.model} · {architecture} · targets {spec_text(p.targets)} · r={p.r}{dora} · {_setting(e)}")
    print()
    rows = [[t.name, human_bytes(t.bytes), t.formula] for t in e.terms]
    print(table(["term", "size", "how"], rows, "lrl"))
    print()
    others = ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(e.phases.items(), key=lambda kv: -kv[1])
                       if k != e.peak_phase)
    print(f"peak moment     {e.peak_phase} (others: {others})")
    print(f"predicted peak  {human_bytes(e.total_bytes)}  (torch.cuda.max_memory_allocated)")
    margin = e.needed_bytes - e.total_bytes - CUDA_CONTEXT_BYTES
    print(f"needed on GPU   {human_bytes(e.needed_bytes)}  (+ {ALLOCATOR_MARGIN:.0%} allocator margin "
          f"{human_bytes(margin)}, + CUDA context {human_bytes(CUDA_CONTEXT_BYTES)})")
    if e.gpu_bytes is not None:
        if e.fits(e.gpu_bytes):
            print(f"verdict         fits on {human_bytes(e.gpu_bytes)} "
                  f"({human_bytes(e.gpu_bytes - e.needed_bytes)} to spare)")
        else:
            print(f"verdict         does NOT fit on {human_bytes(e.gpu_bytes)} "
                  f"({human_bytes(e.needed_bytes - e.gpu_bytes)} short); what would fit:")
            for s in e.suggestions(e.gpu_bytes):
                print(f"  - {s}")
    for note in e.notes:
        print(f"note: {note}")

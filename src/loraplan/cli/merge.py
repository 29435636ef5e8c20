"""Merge an adapter into its base model and save a standalone model (safetensors + tokenizer).
Checks first that the adapter fits the base — every adapted weight exists with the shapes of
lora_A and lora_B — before loading any weight, then merges with PEFT's merge_and_unload and
verifies the merged model's logits against base + adapter on a few tokens before writing.

examples:
  loraplan merge ./Llama-3.2-1B ./out/adapter --out ./merged
  loraplan merge meta-llama/Llama-3.1-8B ./checkpoint-500 --out ./merged --dtype bf16
  loraplan merge ./base ./sweep/trials/full_r16 --out ./merged --json
"""

from __future__ import annotations

from .options import add_json, add_trust_remote_code
from .render import emit_json


def register(parser):
    from ..model.loading import DTYPES

    parser.add_argument("model", metavar="MODEL", help="the base model: a folder or Hub id (safetensors weights)")
    parser.add_argument("adapter", metavar="ADAPTER", help="a PEFT adapter folder or a loraplan trial folder")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="the folder for the merged model")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="dtype of the merged model (default: the base checkpoint's own)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    add_trust_remote_code(parser, "the model's")
    add_json(parser)


def run(args) -> int:
    from ..adapter.merge import merge

    result = merge(args.model, args.adapter, args.out, dtype=args.dtype, overwrite=args.overwrite,
                   trust_remote_code=args.trust_remote_code)
    if args.json:
        emit_json(result.to_json())
        return 0
    print(f"merged {result.weights} LoRA weights of {result.adapter} into {result.model} ({result.dtype})")
    print(f"logits check on 2×16 tokens: max |merged − (base + adapter)| = {result.max_abs_diff:.3g} "
          f"(tolerance {result.tolerance:.3g}); the adapter itself moves logits by up to {result.adapter_effect:.3g}")
    print(f"wrote {result.out}: {', '.join(result.files)}")
    for note in result.notes:
        print(f"note: {note}")
    return 0

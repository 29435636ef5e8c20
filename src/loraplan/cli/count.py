"""Exact trainable parameters of a LoRA adapter: per module pattern, per layer and in total — the
number PEFT's print_trainable_parameters() will show, before loading anything.

examples:
  loraplan count builtin:llama-3.1-8b --targets q,k,v,o --rank 16
  loraplan count builtin:llama-3.1-8b --targets attention,mlp --ranks 8,16,64
  loraplan count ./my-model --targets all-linear --rank 32 --dora --layers 16-31 --json
  loraplan count ./my-model --from ./my-adapter --rank 32     (an adapter's plan, at another rank)
"""

from __future__ import annotations

from ..errors import UsageError
from ..plan.count import CountResult, human_bytes, rank_table
from ..plan.lora_plan import LoraPlan
from .options import add_model_arguments, add_plan_arguments, int_list, plan_from_args
from .render import emit_json, num, table


def register(parser):
    add_model_arguments(parser)
    add_plan_arguments(parser)
    parser.add_argument("--ranks", type=int_list, default=None,
                        help="a rank table instead of one rank, e.g. 4,8,16,32,64")


def run(args) -> int:
    from ..model.loading import load_structure

    if args.rank is not None and args.ranks:
        raise UsageError("give --rank or --ranks, not both")
    structure = load_structure(args.model, trust_remote_code=args.trust_remote_code)
    plan = plan_from_args(args)
    if args.ranks:
        results = rank_table(structure, plan, args.ranks)
        if args.json:  # the notes every rank shares: the targets' and the alpha rule's
            emit_json({"ranks": [r.to_json() for r in results], "notes": results[0].notes})
            return 0
        _print_header(results[0], one_rank=False)
        rows = [[r.plan.r, _fmt_alpha(r.plan), num(r.trainable_params), f"{r.trainable_percent:.4f}%",
                 human_bytes(r.adapter_bytes("bf16")), human_bytes(r.adapter_bytes("fp32"))] for r in results]
        print(table(["r", "alpha", "trainable", "% of total", "bf16 size", "fp32 size"], rows, "rrrrrr"))
        for note in results[0].notes:
            print(f"note: {note}")
        return 0
    result = rank_table(structure, plan, [plan.r])[0]
    if args.json:
        emit_json(result.to_json())
        return 0
    _print_header(result)
    _print_result(result)
    return 0


def _fmt_alpha(plan: LoraPlan) -> str:
    return f"{plan.alpha:g}"


def _print_header(result: CountResult, one_rank: bool = True) -> None:
    p = result.plan
    scale = f"alpha/sqrt(r) = {p.scaling:.3g}" if p.use_rslora else f"alpha/r = {p.scaling:.3g}"
    rank = f" · r={p.r} · alpha={p.alpha:g} ({scale})" if one_rank else ""
    flags = (" · rsLoRA" if p.use_rslora and not one_rank else "") + (" · DoRA" if p.use_dora else "")
    print(f"{result.model} · {result.architecture} · targets {result.targets.spec}{rank}{flags}")
    t = result.targets
    print(f"target_modules = {t.target_modules!r}")
    if t.target_parameters:
        print(f"target_parameters = {t.target_parameters!r}")
    if t.layers is not None:
        print(f"layers_to_transform = {list(t.layers)!r}")
    print()


def _print_result(result: CountResult) -> None:
    rows = []
    for p in result.patterns:
        per = num(p.per_module) if p.per_module else "mixed"
        rows.append([p.pattern, p.role, p.shape, p.modules, p.rank, per, num(p.params)])
    print(table(["module", "role", "in→out", "×", "r", "per module", "params"], rows, "lllrrrr"))
    print()
    layer_values = [v for k, v in result.per_layer.items() if k is not None]
    if layer_values and len(set(layer_values)) == 1:
        print(f"per layer      {num(layer_values[0])} × {len(layer_values)} layers")
    elif layer_values:
        print("per layer      " + ", ".join(f"{k}: {num(v)}" for k, v in result.per_layer.items() if k is not None))
    if None in result.per_layer:
        print(f"outside layers {num(result.per_layer[None])}")
    if result.bias_params:
        print(f"biases         {num(result.bias_params)} (bias={result.plan.bias})")
    if result.saved_params:
        print(f"modules_to_save {num(result.saved_params)} (full copies)")
    print(f"trainable      {num(result.trainable_params)}")
    print(f"total          {num(result.total_params)}")
    print(f"trainable %    {result.trainable_percent:.4f}%")
    print(f"adapter size   {human_bytes(result.adapter_bytes('bf16'))} in bf16, "
          f"{human_bytes(result.adapter_bytes('fp32'))} in fp32")
    for note in result.notes:
        print(f"note: {note}")

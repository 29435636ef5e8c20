"""Exact trainable parameters of a LoRA adapter: per module pattern, per layer and in total — the
number PEFT's print_trainable_parameters() will show, before loading anything.

examples:
  loraplan count builtin:llama-3.1-8b --targets q,k,v,o --rank 16
  loraplan count builtin:llama-3.1-8b --targets attention,mlp --ranks 8,16,64
  loraplan count ./my-model --targets all-linear --rank 32 --dora --layers 16-31 --json
  loraplan count ./my-model --from ./my-adapter --rank 32     (an adapter's plan, at another rank)
"""

from __future__ import annotations

from argparse import ArgumentTypeError

from ..errors import UsageError
from ..plan.count import CountResult, human_bytes, rank_table
from ..plan.lora_plan import LoraPlan
from .render import add_model_arguments, emit_json, num, table


def positive_int(text: str) -> int:
    """argparse type: argparse turns the message into `error: argument --rank: …`, exit 2."""
    try:
        value = int(text)
    except ValueError:
        raise ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value <= 0:
        raise ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def int_list(text: str) -> list[int]:
    return [positive_int(t) for t in text.split(",") if t.strip()]


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ArgumentTypeError(f"expected a positive number, got '{text}'") from None
    if not value > 0:
        raise ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def add_plan_arguments(parser, default_targets: str | None = "all-linear"):
    """The flags that describe one adapter, shared by count, memory and sweep. With --from FILE the
    plan comes from the file and each flag given on the command line overrides its value."""
    import argparse

    parser.set_defaults(_default_targets=default_targets)
    parser.add_argument("--from", dest="from_file", metavar="FILE", default=None,
                        help="read targets, rank, alpha, rsLoRA, DoRA, dropout… from a PEFT adapter_config.json "
                             "(or adapter folder), an axolotl or LLaMA-Factory YAML or a torchtune config; "
                             "flags given here override the file's values (--rank alone keeps its lora_alpha)")
    parser.add_argument("--targets", "-t", default=None,
                        help="roles (q,k,v,o,gate,up,down,…), groups (attention, mlp, qv), presets "
                             f"(all-linear, all), module names or re:REGEX (default: {default_targets})")
    parser.add_argument("--rank", "-r", type=positive_int, default=None, help="LoRA rank r (default 8)")
    parser.add_argument("--alpha", type=positive_float, default=None,
                        help="lora_alpha (default: alpha = r)")
    parser.add_argument("--dora", action=argparse.BooleanOptionalAction, default=None,
                        help="DoRA (adds a magnitude vector per output)")
    parser.add_argument("--rslora", action=argparse.BooleanOptionalAction, default=None,
                        help="rsLoRA scaling alpha/sqrt(r)")
    parser.add_argument("--layers", default=None, help="only these layers, e.g. 0-7,30,31 or -8: (PEFT layers_to_transform)")
    parser.add_argument("--bias", choices=["none", "all", "lora_only"], default=None,
                        help="PEFT bias option (default none)")
    parser.add_argument("--modules-to-save", default=None,
                        help="comma-separated modules trained in full, e.g. lm_head,embed_tokens")


def plan_from_args(args) -> LoraPlan:
    """The plan the flags describe: --from FILE's values, overridden by every flag given."""
    from ..plan.read_config import read_plan_fields

    fields = read_plan_fields(args.from_file) if getattr(args, "from_file", None) else {}
    saved = None
    if args.modules_to_save is not None:
        saved = tuple(s.strip() for s in args.modules_to_save.split(",") if s.strip())
    given = {"targets": args.targets, "r": args.rank, "lora_alpha": args.alpha, "use_dora": args.dora,
             "use_rslora": args.rslora, "layers": args.layers, "bias": args.bias, "modules_to_save": saved}
    fields.update({k: v for k, v in given.items() if v is not None})
    fields.setdefault("targets", getattr(args, "_default_targets", None) or "all-linear")
    return LoraPlan(**fields)


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
        notes = _alpha_notes(plan, args.ranks)
        if args.json:
            emit_json({"ranks": [r.to_json() for r in results], "notes": notes})
            return 0
        _print_header(results[0], one_rank=False)
        rows = [[r.plan.r, _fmt_alpha(r.plan), num(r.trainable_params), f"{r.trainable_percent:.4f}%",
                 human_bytes(r.adapter_bytes("bf16")), human_bytes(r.adapter_bytes("fp32"))] for r in results]
        print(table(["r", "alpha", "trainable", "% of total", "bf16 size", "fp32 size"], rows, "rrrrrr"))
        for note in results[0].notes + notes:
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


def _alpha_notes(plan: LoraPlan, ranks) -> list[str]:
    if plan.lora_alpha is not None and len(set(ranks)) > 1:
        kind = "alpha/sqrt(r)" if plan.use_rslora else "alpha/r"
        return [f"lora_alpha is fixed at {plan.lora_alpha:g} while r varies, so the scale {kind} changes "
                "with r (the effective learning rate too): leave --alpha out for alpha = r"]
    return []


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

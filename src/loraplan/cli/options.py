"""The flags and value types the commands share, defined once.

Value types are argparse `type=` functions: a bad value raises ArgumentTypeError, which argparse
turns into one `error: argument --flag: …` line (exit 2) through `cli.ArgumentParser`. A plan's
flags take their help and defaults from LoraPlan's fields; the sweep's from its spec schema, so
neither is restated here.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from argparse import ArgumentTypeError
from collections.abc import Mapping

from ..errors import UsageError
from ..plan.lora_plan import LoraPlan

# -- value types ----------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value <= 0:
        raise ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ArgumentTypeError(f"expected a positive number, got '{text}'") from None
    if not value > 0:
        raise ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def int_list(text: str) -> list[int]:
    """`4,8,16` -> [4, 8, 16], each a positive integer."""
    return [positive_int(t) for t in text.split(",") if t.strip()]


def dropout(text: str) -> float:
    """A probability that may be 0 but not 1: [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise ArgumentTypeError(f"expected a number in [0, 1) such as 0.05, got '{text}'")
    return value


def share(text: str) -> float:
    """A share of a whole: (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise ArgumentTypeError(f"expected a number in (0, 1] such as 0.9, got '{text}'") from None
    if not 0 < value <= 1:
        raise ArgumentTypeError(f"expected a number in (0, 1], got {text}: a share such as 0.9, not a percentage")
    return value


def size(text: str) -> int:
    """A memory size in bytes: 24GiB, 80GB (GB means GiB, as GPU makers use it), 40960MiB, 24 (GiB)."""
    from ..plan.memory import parse_size

    try:
        return parse_size(text)
    except UsageError as e:
        raise ArgumentTypeError(f"{e.message}: {e.hint}" if e.hint else e.message) from None


def size_text(n: int) -> str:
    """Bytes as the shortest exact size `size` reads back: 25769803776 -> '24GiB'."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def examples_count(text: str) -> int:
    """`5000`, `5_000`, `50,000`, `5k`, `1.2M` -> an int."""
    match = re.fullmatch(r"\s*(-?[\d_,]*\.?\d+)\s*([kKmM]?)\s*", text)
    if not match:
        raise ArgumentTypeError(f"expected a number of training examples such as 5000 or 5k, got '{text}'")
    scale = {"": 1, "k": 1e3, "m": 1e6}[match.group(2).lower()]
    value = float(match.group(1).replace(",", "").replace("_", "")) * scale
    if value <= 0 or not value.is_integer():
        raise ArgumentTypeError(f"expected a positive whole number of training examples, got '{text}'")
    return int(value)


# -- the model, --trust-remote-code, --json -------------------------------------------------------


def add_model_arguments(parser, model_help: str = "a model folder, config.json, Hub id or builtin:NAME",
                        optional: bool = False, json_help: str = "machine-readable output"):
    """MODEL, --trust-remote-code and --json."""
    add_model_argument(parser, model_help, optional)
    add_trust_remote_code(parser)
    add_json(parser, json_help)


def add_model_argument(parser, help: str = "a model folder, config.json, Hub id or builtin:NAME",
                       optional: bool = False):
    parser.add_argument("model", metavar="MODEL", help=help, **({"nargs": "?"} if optional else {}))


def add_trust_remote_code(parser, whose: str = "a model's"):
    parser.add_argument("--trust-remote-code", action="store_true",
                        help=f"allow {whose} own code (off by default: read the code first)")


def add_json(parser, help: str = "machine-readable output"):
    parser.add_argument("--json", action="store_true", help=help)


# -- one LoRA plan --------------------------------------------------------------------------------


def _plan_help(name: str, default: str | None = None) -> str:
    spec = LoraPlan.__dataclass_fields__[name]
    text = spec.metadata["help"].split("; null:")[0]
    return f"{text} (default {default if default is not None else spec.default})"


def add_plan_arguments(parser, default_targets: str = "all-linear"):
    """The flags that describe one adapter (count, memory). With --from FILE the plan comes from the
    file and each flag given on the command line overrides its value."""
    parser.set_defaults(_default_targets=default_targets)
    parser.add_argument("--from", dest="from_file", metavar="FILE", default=None,
                        help="read targets, rank, alpha, rsLoRA, DoRA, dropout… from a PEFT adapter_config.json "
                             "(or adapter folder), an axolotl or LLaMA-Factory YAML or a torchtune config; "
                             "flags given here override the file's values (--rank alone keeps its lora_alpha)")
    parser.add_argument("--targets", "-t", default=None, help=_plan_help("targets", default_targets))
    parser.add_argument("--rank", "-r", type=positive_int, default=None, help=_plan_help("r"))
    parser.add_argument("--alpha", type=positive_float, default=None, help=_plan_help("lora_alpha", "alpha = r"))
    parser.add_argument("--rslora", action=argparse.BooleanOptionalAction, default=None,
                        help=_plan_help("use_rslora", "off"))
    parser.add_argument("--dora", action=argparse.BooleanOptionalAction, default=None,
                        help=_plan_help("use_dora", "off"))
    parser.add_argument("--lora-dropout", type=dropout, default=None, help=_plan_help("lora_dropout"))
    parser.add_argument("--layers", default=None, help=_plan_help("layers", "every layer"))
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
             "use_rslora": args.rslora, "lora_dropout": args.lora_dropout, "layers": args.layers, "bias": args.bias,
             "modules_to_save": saved}
    fields.update({k: v for k, v in given.items() if v is not None})
    fields.setdefault("targets", getattr(args, "_default_targets", None) or "all-linear")
    return LoraPlan(**fields)


# -- flags made from a pydantic schema (the sweep spec) -------------------------------------------


def add_schema_flags(parser, schema, flags: Mapping[str, str]):
    """One flag per dotted key of a pydantic `schema` (`{"--max-steps": "training.max_steps"}`): its
    type, choices, help and the default it names come from the key's Field. A flag left out parses
    to None, so a spec file's value stands; `schema_overrides(args)` gives the keys that were set."""
    dests = {}
    for flag, key in flags.items():
        info = _schema_field(schema, key)
        dest = flag.lstrip("-").replace("-", "_")
        dests[dest] = key
        kind = _flag_kind(info)
        text = (info.description or "").replace("%", "%%")
        if "; null: " in text:
            text, _, fallback = text.partition("; null: ")
            text += f" (default: {fallback})"
        elif info.default is not None and info.default is not False and not info.is_required():
            text += f" (default {info.default})"
        parser.add_argument(flag, dest=dest, default=None, help=text, **kind)
    parser.set_defaults(_schema_flags=dests)


def schema_overrides(args) -> dict:
    """{dotted key: value} for the schema flags given on the command line."""
    return {key: getattr(args, dest) for dest, key in args._schema_flags.items() if getattr(args, dest) is not None}


def _schema_field(schema, dotted: str):
    *parents, leaf = dotted.split(".")
    for part in parents:
        schema = _unwrap(schema.model_fields[part].annotation)[0]
    return schema.model_fields[leaf]


def _unwrap(annotation) -> list:
    """The types of an annotation without None: `int | None` -> [int]."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _flag_kind(info) -> dict:
    (kind,) = _unwrap(info.annotation)
    if typing.get_origin(kind) is typing.Literal:
        return {"choices": list(typing.get_args(kind))}
    if kind is bool:
        return {"action": "store_true"}
    positive = any(getattr(m, "gt", None) == 0 for m in info.metadata)
    if kind is int:
        return {"type": positive_int if positive else int}
    if kind is float:
        return {"type": positive_float if positive else float}
    return {}

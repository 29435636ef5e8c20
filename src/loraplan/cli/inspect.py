"""List every module LoRA can adapt, its role, shape and the name PEFT needs.

examples:
  loraplan inspect builtin:llama-3.1-8b
  loraplan inspect ./my-model --json
  loraplan inspect Qwen/Qwen2.5-7B-Instruct
"""

from __future__ import annotations

from ..plan.count import human_count
from .options import add_model_arguments
from .render import emit_json, table


def register(parser):
    add_model_arguments(parser)
    parser.add_argument("--all", action="store_true",
                        help="also list modules outside the role table (position embeddings, vision parts)")


def run(args) -> int:
    from ..model.inspect import inspect

    result = inspect(args.model, trust_remote_code=args.trust_remote_code)
    if args.json:
        emit_json(result.to_json())
        return 0
    s = result.structure
    print(f"{s.architecture} ({s.model_type}) · {human_count(s.total_params)} params "
          f"({s.total_params:,}) · {s.num_layers} layers · {s.source}")
    print()
    rows = []
    for g in result.groups:
        if g.role == "other" and not args.all and g.kind in ("embedding", "conv"):
            continue
        role = g.role if g.role != "other" else f"other ({g.guess})"
        params = "tied" if g.tied else human_count(g.params)
        rows.append([g.pattern, role, g.cls, g.shape, g.count, params, g.peft_name])
    print(table(["module", "role", "type", "in→out", "count", "params", "PEFT name"], rows, "lllrrrl"))
    print()
    print("target_modules for each role and group (loraplan --targets accepts the role names):")
    width = max(len(k) for k in result.roles)
    for key, names in result.roles.items():
        print(f"  {key.ljust(width)}  {', '.join(names)}")
    for note in result.notes:
        print(f"note: {note}")
    return 0

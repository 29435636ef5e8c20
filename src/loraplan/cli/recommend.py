"""Recommend a LoRA plan (targets, r, alpha, rsLoRA, DoRA, LoRA+, dropout) for a task and the size of
your training set, with the reason for each choice. With MODEL the targets are the model's own
names and the plan is sized (trainable params; peak memory with --batch-size/--seq-len, and a
verdict with --gpu-memory). --format writes the plan for PEFT, axolotl, LLaMA-Factory or torchtune.

tasks: format_only, instruction_following (alias chat), domain_adaptation, code,
       complex_domain (medical, legal), multitask

examples:
  loraplan recommend --task format_only --examples 500
  loraplan recommend --task domain_adaptation --examples 50000 --complexity high
  loraplan recommend builtin:llama-3.1-8b --task code --examples 20000 --gpu-memory 24GiB --batch-size 4 --seq-len 2048
  loraplan recommend builtin:phi-3-mini --task chat --examples 5000 --format axolotl > lora.yaml
  loraplan recommend ./my-model --task complex_domain --examples 200000 --new-tokens --format peft
"""

from __future__ import annotations

import shlex
import shutil
import sys
import textwrap

from ..errors import UsageError
from ..plan.export import FORMATS
from .options import add_model_arguments, examples_count, positive_int, size, size_text
from .render import emit_json, table


def register(parser):
    add_model_arguments(parser, "optional: a model folder, config.json, Hub id or builtin:NAME (names and sizing)",
                        optional=True, json_help="the same as --format json")
    parser.add_argument("--task", required=True, metavar="TASK", help="format_only, instruction_following (chat), "
                        "domain_adaptation, code, complex_domain, multitask")
    parser.add_argument("--examples", "-n", required=True, type=examples_count, metavar="N",
                        help="training examples in your data set (5000, 50k)")
    parser.add_argument("--complexity", default=None, help="low, medium or high (default medium)")
    parser.add_argument("--new-tokens", action="store_true",
                        help="you add tokens to the vocabulary: also train the embeddings and lm_head (in full: "
                             "modules_to_save)")
    parser.add_argument("--dora", action="store_true", help="DoRA at half the rank")
    parser.add_argument("--no-loraplus", dest="loraplus", action="store_false", help="leave LoRA+ (ratio 16) out")
    memory = parser.add_argument_group("memory (needs MODEL, --batch-size and --seq-len)")
    memory.add_argument("--gpu-memory", type=size, default=None, metavar="SIZE",
                        help="GPU memory to fit in, e.g. 24GiB or 80GB")
    memory.add_argument("--batch-size", type=positive_int, default=None, help="micro-batch size")
    memory.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence")
    memory.add_argument("--quant", choices=["4bit", "8bit"], default=None,
                        help="a quantized base (QLoRA: 4bit); also written into the exports")
    memory.add_argument("--grad-ckpt", action="store_true", help="with gradient checkpointing")
    memory.add_argument("--optimizer", choices=["adamw", "adamw8bit", "sgd"], default="adamw",
                        help="optimizer state to budget for (default adamw)")
    parser.add_argument("--format", "-f", choices=("text", "json") + FORMATS, default=None, metavar="FORMAT",
                        help="text (default), json, peft (Python), peft-json (LoraConfig(**json)), axolotl, "
                             "llamafactory, torchtune")


def run(args) -> int:
    from ..plan.export import export_plan, unsaid
    from ..plan.recommend import TASK_ALIASES, TASKS, make_recommendation

    fmt = _format(args)
    if args.model and args.model.lower() in set(TASKS) | set(TASK_ALIASES) and "/" not in args.model:
        raise UsageError(f"'{args.model}' is a task, not a model", f"pass it as --task {args.model}; MODEL is optional")
    result = make_recommendation(args.task, args.examples, args.complexity, model=args.model,
                                 new_tokens=args.new_tokens, dora=args.dora, loraplus=args.loraplus,
                                 gpu_memory=args.gpu_memory, batch_size=args.batch_size, seq_len=args.seq_len,
                                 quant=args.quant, grad_ckpt=args.grad_ckpt, optimizer=args.optimizer,
                                 trust_remote_code=args.trust_remote_code)
    warning = _fit_warning(result)
    if fmt == "json":
        emit_json(result.to_json())
    elif fmt == "text":
        _print_text(result)
    else:
        notes = [r.text for r in result.plan.reasons if r.choice in FILE_NOTES]
        sys.stdout.write(export_plan(result.plan, fmt, result.structure, command=_command(args, fmt),
                                     quant=args.quant, notes=notes, warnings=[warning] if warning else []))
        for note in unsaid(result.plan, fmt, notes):
            print(f"note: {note}", file=sys.stderr)
    if warning and fmt != "text":
        print(f"warning: {warning}", file=sys.stderr)
    return 0


# Reasons that a tool's file must carry, not only the text output: what to do for new tokens.
FILE_NOTES = ("new_tokens",)


def _format(args) -> str:
    if args.json and args.format not in (None, "json"):
        raise UsageError(f"--json contradicts --format {args.format}", "give one of them")
    return "json" if args.json else (args.format or "text")


def _fit_warning(result) -> str | None:
    if result.fits is not False:
        return None
    return next(r.text for r in result.plan.reasons if r.choice == "memory")


def _command(args, fmt: str) -> str:
    """The command line that makes this output, flags in a fixed order."""
    parts = ["loraplan", "recommend"] + ([args.model] if args.model else [])
    parts += ["--task", args.task, "--examples", str(args.examples)]
    if args.complexity:
        parts += ["--complexity", args.complexity]
    parts += [flag for flag, on in (("--new-tokens", args.new_tokens), ("--dora", args.dora),
                                    ("--no-loraplus", not args.loraplus)) if on]
    gpu = size_text(args.gpu_memory) if args.gpu_memory is not None else None
    for flag, value in (("--gpu-memory", gpu), ("--batch-size", args.batch_size),
                        ("--seq-len", args.seq_len), ("--quant", args.quant)):
        if value is not None:
            parts += [flag, str(value)]
    if args.grad_ckpt:
        parts.append("--grad-ckpt")
    if args.optimizer != "adamw":
        parts += ["--optimizer", args.optimizer]
    parts += ["--format", fmt]
    return shlex.join(parts)


def _print_text(result) -> None:
    from ..plan.recommend import QUADRANTS, size_bucket

    plan, task = result.plan, result.task
    behavior, knowledge = QUADRANTS[task.quadrant]
    print(f"{task.name} · {result.examples:,} examples ({size_bucket(result.examples).label}) · complexity "
          f"{result.complexity} · quadrant {task.quadrant}: {behavior} behavioral change, {knowledge} knowledge "
          "injection")
    if result.structure is not None:
        print(f"{result.structure.source} · {result.structure.architecture}")
    print()
    cfg = result.peft_config()
    targets = cfg["target_modules"] if isinstance(cfg["target_modules"], str) else ", ".join(cfg["target_modules"])
    if cfg.get("target_parameters"):
        targets += f" + parameters {', '.join(cfg['target_parameters'])}"
    scale = f"alpha/sqrt(r) = {plan.scaling:.3g}" if plan.use_rslora else f"alpha/r = {plan.scaling:.3g}"
    rows = [["target_modules", targets], ["r", plan.r], ["lora_alpha", f"{plan.alpha:g} ({scale})"],
            ["use_rslora", _yes(plan.use_rslora)], ["use_dora", _yes(plan.use_dora)],
            ["loraplus_lr_ratio", f"{plan.loraplus_lr_ratio:g}" if plan.loraplus_lr_ratio else "off"],
            ["lora_dropout", cfg["lora_dropout"]], ["bias", plan.bias], ["task_type", plan.task_type]]
    if cfg.get("modules_to_save"):
        rows.insert(1, ["modules_to_save", ", ".join(cfg["modules_to_save"])])
    print(table(["setting", "value"], rows))
    print()
    width = max(60, shutil.get_terminal_size((110, 24)).columns - 1)
    print("why")
    for r in plan.reasons:
        if r.choice not in ("quadrant", "note", "size", "memory") + FILE_NOTES:
            print(_wrapped(f"  {r.choice:<18} ", r.text, width))
    sized = [r for r in plan.reasons if r.choice in ("size", "memory")]
    if sized:
        print()
        for r in sized:
            print(_wrapped(f"{r.choice}: ", r.text, width))
    notes = [r for r in plan.reasons if r.choice in ("note",) + FILE_NOTES]
    if notes:
        print()
        for r in notes:
            print(_wrapped("note: ", r.text + (f" [{r.source}]" if r.source else ""), width))
    print()
    print("export: --format peft | peft-json | axolotl | llamafactory | torchtune")


def _wrapped(lead: str, text: str, width: int) -> str:
    return textwrap.fill(text, width=width, initial_indent=lead, subsequent_indent=" " * len(lead),
                         break_on_hyphens=False, break_long_words=False)


def _yes(flag: bool) -> str:
    return "true" if flag else "false"

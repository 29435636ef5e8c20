"""`loraplan` command line: a thin layer over the Python API, one module per command group.

Exit codes: 0 success, 2 bad input (one `error: …` line with a hint), 1 failure at run time.
`LORAPLAN_DEBUG=1` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import LoraplanError, UsageError

# command -> (module, one-line help). Modules load lazily so `loraplan count` never imports torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect", "list every adaptable module, its role, shape and PEFT name"),
    "count": ("count", "exact trainable parameters for targets and rank (equal to PEFT's)"),
    "memory": ("memory", "peak GPU memory of a LoRA/QLoRA training step, term by term; fits or not"),
    "analyze": ("analyze", "spectra of a trained adapter: directions used, which modules moved, subspace similarity"),
    "compress": ("compress", "a smaller valid PEFT adapter by SVD truncation, with the energy kept"),
    "diagnose": ("diagnose", "overfitting, underfitting, instability and the alpha trap in a run's curves"),
    "merge": ("merge", "merge an adapter into its base after checking it fits; verified, safetensors"),
    "recommend": ("recommend", "a LoRA plan for your task and data size, each choice with its reason; exports"),
    "probe": ("probe", "importance per module and an intrinsic-rank estimate from a few gradient batches"),
    "sweep": ("sweep", "the ablation: short runs of a grid of LoRA configs, ranked, resumable"),
    "planted": ("planted", "write a task with a known answer: a base model, a planted low-rank update, data"),
    "demo": ("demo", "the whole journey offline on CPU: planted task -> sweep -> recommendation"),
    "report": ("report", "a sweep as one self-contained HTML page with its plots (also as PNG)"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line and exit code 2, like every other bad input."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        raise UsageError(message, f"see `{self.prog} --help`")


def build_parser(command: str | None = None) -> ArgumentParser:
    """The parser; only the chosen command's module is imported (the others list their help line)."""
    parser = ArgumentParser(
        prog="loraplan",
        description="Choose LoRA target modules and rank for your model and data.",
        epilog="Run `loraplan COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name, (module, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text)
            continue
        mod = importlib.import_module(f".{module}", __name__)
        cmd = sub.add_parser(name, help=help_text, description=mod.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.register(cmd)
        cmd.set_defaults(_run=mod.run)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"loraplan {version('loraplan')}"
    except PackageNotFoundError:
        return "loraplan (not installed)"


def main(argv: list[str] | None = None) -> int:
    debug = bool(os.environ.get("LORAPLAN_DEBUG"))
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        command = next((a for a in argv if not a.startswith("-")), None)
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            return 2
        return args._run(args) or 0
    except LoraplanError as e:
        if debug:
            raise
        print(e.one_line(), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted (a sweep keeps its finished trials: rerun the same command to resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `loraplan inspect … | head`
        sys.stderr.close()
        return 0

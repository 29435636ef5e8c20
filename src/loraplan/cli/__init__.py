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
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one `error:` line and exit code 2, like every other bad input."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        raise UsageError(message, f"see `{self.prog} --help`")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="loraplan",
        description="Choose LoRA target modules and rank for your model and data.",
        epilog="Run `loraplan COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    for name, (module, help_text) in COMMANDS.items():
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
        parser = build_parser()
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
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `loraplan inspect … | head`
        sys.stderr.close()
        return 0

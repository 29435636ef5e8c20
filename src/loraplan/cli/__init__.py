"""`loraplan` command line: a thin layer over the Python API, one module per command group.

Exit codes: 0 success, 2 bad input (one `error: …` line with a hint), 1 failure at run time.
`LORAPLAN_DEBUG=1` shows tracebacks.

`main` is the one error boundary. Besides loraplan's own errors it knows the expected failures of
files and models that a library raises on a user's input — an OS error on a path (a file where a
folder is wanted, read-only, a full disk), a file that is not UTF-8, damaged safetensors — and turns
each into one line, exit 2. Anything else is a failure at run time: one line, exit 1.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from ..errors import LoraplanError, RunError, UsageError

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
    except KeyboardInterrupt:
        print("error: interrupted (a sweep keeps its finished trials: rerun the same command to resume)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `loraplan inspect … | head`
        sys.stderr.close()
        return 0
    except Exception as e:  # noqa: BLE001 - the boundary: every failure becomes one line
        if debug:
            raise
        error = as_loraplan_error(e)
        print(error.one_line(), file=sys.stderr)
        return error.exit_code


# errno -> (what it means, hint): the OS errors that a user's path or disk causes (exit 2)
_PATH_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space, or choose --out on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space, or choose --out on another disk"),
    errno.EROFS: ("read-only file system", "choose a folder you can write to"),
    errno.EACCES: ("permission denied", "choose a path you can read and write"),
    errno.EPERM: ("operation not permitted", "choose a path you can read and write"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.EISDIR: ("is a folder, not a file", "give a file name"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EEXIST: ("already exists", "choose a new path"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter name"),
    errno.ELOOP: ("too many levels of symbolic links", "check the links on the path"),
}


def as_loraplan_error(e: Exception) -> LoraplanError:
    """One error for any exception: loraplan's own as they are; the expected failures of files and
    models as UsageError (exit 2); anything else a RunError (exit 1) that names the exception."""
    if isinstance(e, LoraplanError):
        return e
    if isinstance(e, OSError) and e.errno in _PATH_ERRORS:
        what, hint = _PATH_ERRORS[e.errno]
        where = f"{e.filename}: " if e.filename else ""
        return UsageError(f"{where}{what}", hint)
    if isinstance(e, UnicodeDecodeError):
        return UsageError(f"a file is not UTF-8 text ({e.reason} at byte {e.start})",
                          "give a text file (UTF-8): YAML, JSON or JSONL")
    if type(e).__name__ == "SafetensorError":
        return UsageError(f"a safetensors file is damaged or not safetensors: {_first_line(e)}",
                          "download or save the weights again")
    text = _first_line(e)
    return RunError(f"{type(e).__name__}{': ' + text if text else ''}",
                    "not caused by your input, as far as loraplan can tell; LORAPLAN_DEBUG=1 shows the traceback")


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), "")

"""Errors that reach the user as one line.

`UsageError` is bad input (exit 2): the CLI prints `error: <message> (hint: <hint>)` and no
traceback. `RunError` is a failure at run time (exit 1). The CLI's boundary (`cli.as_loraplan_error`)
maps the other exceptions: a library's failure on a user's file or output path is a UsageError,
anything else a one-line RunError. `LORAPLAN_DEBUG=1` shows the traceback for all of them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LoraplanError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return " ".join(text.split())


class UsageError(LoraplanError, ValueError):
    """The input is wrong: a name, a number, a file. Exit code 2."""

    exit_code = 2


class RunError(LoraplanError, RuntimeError):
    """The input was fine but the work failed. Exit code 1."""

    exit_code = 1


def nearest(word: str, choices: Iterable[str], n: int = 1, cutoff: float = 0.6) -> list[str]:
    """The closest spellings of `word` among `choices` (case-insensitive), best first."""
    choices = list(dict.fromkeys(choices))
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=cutoff)
    return [lowered[h] for h in hits]


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    hit = nearest(word, choices)
    return f"did you mean '{hit[0]}'?" if hit else None


def listing(items: Iterable[str], limit: int = 12) -> str:
    """`a, b, c` — shortened with a count when long."""
    items = list(items)
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", … ({len(items) - limit} more)"

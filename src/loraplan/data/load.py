"""Training data for the sweep and the probe: the train and eval splits, their rows read
(records.py), their format detected and tokenized with loss masks (formats.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import UsageError
from .formats import (
    DataSummary,
    TokenizedExample,
    _check_max_length,
    _normalize,
    check_format,
    detect_format,
    tokenize_records,
)
from .records import Record, read_records


@dataclass
class DataSplits:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    train_summary: DataSummary
    eval_summary: DataSummary
    eval_source: str  # the eval path, or "held-out 10% (seed 0)"

    def to_json(self) -> dict:
        """The `data` block of sweep.json (docs/sweep-dir.md), with the two summaries."""
        t, e = self.train_summary, self.eval_summary
        return {"train": t.source, "eval": e.source if e.source == self.eval_source else None,
                "eval_source": self.eval_source, "format": t.format, "train_examples": t.examples,
                "eval_examples": e.examples, "train_tokens": t.tokens, "truncated": t.truncated,
                "max_length": t.max_length, "train_summary": t.to_json(), "eval_summary": e.to_json()}


def load_data(train: str, tokenizer, *, eval: str | None = None, fmt: str = "auto", max_length: int = 1024,
              eval_fraction: float = 0.1, seed: int = 0, max_examples: int | None = None) -> DataSplits:
    """Train and eval examples from files or Hub datasets, tokenized and masked.

    The eval split is the `eval` source, else a held-out `eval_fraction` of the train rows chosen with
    `seed` (at least one row each side). `max_examples` keeps a seeded random subset of each source's
    rows (in file order) before the split. The train format (given or detected) applies to eval too.
    """
    fmt = check_format(fmt)
    _check_max_length(max_length)
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise UsageError(f"max_examples must be a positive integer, not {max_examples!r}", "e.g. --max-examples 2000")
    records = _subset(read_records(train), max_examples, seed)
    if fmt == "auto":
        fmt = detect_format(records)
    _check_rows(records, fmt)  # before the split, so the first bad row in file order is the one named
    if eval is not None:
        eval_records = _subset(read_records(eval), max_examples, seed)
        _check_rows(eval_records, fmt)
        eval_source, eval_label = str(eval), str(eval)
    else:
        records, eval_records = hold_out(records, eval_fraction, seed, source=str(train))
        eval_source = f"held-out {eval_fraction * 100:g}% (seed {seed})"
        eval_label = f"{train}, {eval_source}"
    train_examples, train_summary = tokenize_records(records, tokenizer, fmt, max_length, source=str(train))
    eval_examples, eval_summary = tokenize_records(eval_records, tokenizer, fmt, max_length, source=eval_label)
    for examples, summary in ((train_examples, train_summary), (eval_examples, eval_summary)):
        if not examples:
            raise UsageError(f"no example of {summary.source} has a token to learn from: all {summary.dropped:,} "
                             f"rows dropped ({summary.truncated:,} were cut to max_length {max_length})",
                             "raise --max-length, or check that the rows have completions / assistant turns")
    return DataSplits(train_examples, eval_examples, train_summary, eval_summary, eval_source)


def _check_rows(records: list[Record], fmt: str) -> None:
    for location, row in records:
        _normalize(location, row, fmt)


def hold_out(records: list[Record], fraction: float, seed: int, *, source: str = "the train data"
             ) -> tuple[list[Record], list[Record]]:
    """(train, eval): a seeded random `fraction` of the rows for eval, both in their original order."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise UsageError(f"eval_fraction must be between 0 and 1 (exclusive), not {fraction!r}",
                         "e.g. --eval-fraction 0.1, or give an eval file")
    if len(records) < 2:
        raise UsageError(f"{source} has {len(records)} row, too few to hold out an eval split",
                         "give more rows, or an eval file (--eval)")
    n_eval = min(max(1, round(len(records) * fraction)), len(records) - 1)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:n_eval])
    return ([r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen])


def _subset(records: list[Record], limit: int | None, seed: int) -> list[Record]:
    if limit is None or len(records) <= limit:
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]

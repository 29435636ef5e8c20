"""Fixed batches shared by every trial of a sweep, so configs are compared on identical data.

Examples are grouped by length before batching (shuffled in windows, sorted inside each window),
so a batch pads only to its own longest example; every trial then sees the same batches in the same
order. Loss is token-weighted over the supervised tokens of the whole optimizer step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .formats import IGNORE_INDEX as IGNORE


@dataclass(frozen=True)
class MicroBatch:
    input_ids: list[list[int]]
    labels: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    @property
    def supervised(self) -> int:
        # labels are shifted by one inside the loss: the first position never counts
        return sum(sum(1 for t in y[1:] if t != IGNORE) for y in self.labels)

    def tensors(self, device, pad_id: int, multiple: int = 1):
        """Right-padded ids, labels (-100 on padding) and attention mask. `multiple` rounds the width
        up so that few distinct shapes occur (cuDNN plans attention once per shape)."""
        import torch

        width = max(len(x) for x in self.input_ids)
        width = -(-width // multiple) * multiple
        n = len(self.input_ids)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, (x, y) in enumerate(zip(self.input_ids, self.labels, strict=True)):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
            mask[i, : len(x)] = 1
        if torch.device(device).type == "cuda":  # from pinned memory: the host does not wait for the GPU
            return tuple(t.pin_memory().to(device, non_blocking=True) for t in (ids, labels, mask))
        return ids.to(device), labels.to(device), mask.to(device)


def _length_grouped(examples: list, batch: int, rng: random.Random, window: int = 50) -> list[list]:
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches = []
    span = batch * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span], key=lambda i: len(examples[i].input_ids))
        batches.extend(chunk[k:k + batch] for k in range(0, len(chunk), batch))
    rng.shuffle(batches)
    return [[examples[i] for i in b] for b in batches if len(b) == batch]


def training_steps(examples: list, steps: int, batch_size: int, micro_batch_size: int | None,
                   seed: int) -> list[list[MicroBatch]]:
    """`steps` optimizer steps, each a list of micro-batches; epochs repeat with a new shuffle."""
    micro = min(micro_batch_size or batch_size, batch_size)
    if len(examples) < batch_size:
        from ..errors import UsageError

        raise UsageError(f"{len(examples)} training examples are fewer than one batch of {batch_size}",
                         "lower --batch-size or add data")
    rng = random.Random(seed)
    out: list[list[MicroBatch]] = []
    while len(out) < steps:
        for batch in _length_grouped(examples, batch_size, rng):
            micro_batches = [batch[k:k + micro] for k in range(0, batch_size, micro)]
            out.append([MicroBatch([e.input_ids for e in m], [e.labels for e in m]) for m in micro_batches])
            if len(out) == steps:
                break
    return out


def eval_batches(examples: list, batch_size: int) -> list[MicroBatch]:
    """Eval examples sorted by length (least padding), in fixed batches."""
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    return [MicroBatch([e.input_ids for e in ordered[k:k + batch_size]], [e.labels for e in ordered[k:k + batch_size]])
            for k in range(0, len(ordered), batch_size)]

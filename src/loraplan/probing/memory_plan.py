"""How the probe fits in memory: how many layer groups (one pass over the batches each) and how many
layers recomputed in the backward pass, from the bytes each layer's statistics take, the temporaries
of their whitening, and the activations of the longest batch measured with no layer and every layer
recomputed. On a GPU it plans for SHARES[0] of the free memory (or `max_memory`), and for the next
shares after running out of memory all the same (the allocator's cache cut into pieces too small),
the last with every layer recomputed.
"""

from __future__ import annotations

import math

from ..errors import UsageError
from .passes import _by_layer, _checkpointed, _no_cache
from .statistics import DENSE_MAX, FOLDS, _factor_bytes

SHARES = (0.9, 0.75, 0.6)  # of the GPU's free memory, what the probe plans for; the next after running out
# of memory, the last with every layer recomputed


def _layer_bytes(group, grad_bytes: int, packed: bool = True) -> int:
    """Statistics of one layer: an input factor per distinct input (q/k/v read the same one, as do
    gate/up), an output factor and FOLDS fold gradients per module."""
    inputs = {(m.in_features, m.role in ("q", "k", "v"), m.role in ("gate", "up")) for m in group}
    size = sum(_factor_bytes(dim, packed) for dim, *_ in inputs)
    return size + sum(_factor_bytes(m.out_features, packed) + FOLDS * grad_bytes * m.in_features * m.out_features
                      for m in group)


def _whitening_bytes(group) -> int:
    """Temporaries of the whitening, a layer at a time: two layers' whitening matrices (fp32; the next
    layer's are built meanwhile) with one factor's float64 work (the factor or its Cholesky factor,
    the inverse and its parts: 28 bytes an entry), then one module's folds in fp32 and their
    whitened copies. The cross-Grams kept for the end of the pass (fp32, the weight's smaller side
    squared) are smaller than the fold gradients freed as each is made. The whitening starts once
    the pass's batches are done: its temporaries never meet the activations."""
    widest = max((d for m in group for d in (m.in_features, m.out_features) if d <= DENSE_MAX), default=0)
    return (2 * max(_layer_bytes(members, 0, packed=False) for members in _by_layer(group)) + 28 * widest ** 2
            + max(4 * 3 * FOLDS * m.in_features * m.out_features for m in group))


def _stats_bytes(modules, grad_bytes: int) -> int:
    """What a pass's statistics hold until its whitening: factors and fold gradients of every layer."""
    return sum(_layer_bytes(group, grad_bytes) for group in _by_layer(modules))


def _memory_plan(net, modules, batches, pad_id: int, grad_bytes: int, layers: int,
                 checkpointing: bool | None, max_memory: int | None = None,
                 share: float = SHARES[0]) -> tuple[int, int, int]:
    """(bytes usable, bytes the activations take, how many layers to checkpoint). On a CPU: 8 GiB, no
    activations counted, and checkpointing only when asked. On a GPU the activations of the longest
    batch are measured on one of its rows (they grow with the tokens), with every layer checkpointed
    and with none: all the statistics in one pass with as few layers recomputed as fit 90% of the
    free memory; if even a fully checkpointed pass cannot hold them, every layer is checkpointed and
    layers go in groups. `share` replaces the 90% (less after running out of memory once)."""
    import torch

    device = next(net.parameters()).device
    if device.type != "cuda":
        return int((8 << 30) * share / SHARES[0]), 0, layers if checkpointing else 0
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # the allocator's cache
    usable = int(share * free)
    if max_memory is not None:
        from ..plan.count import human_bytes

        taken = torch.cuda.memory_allocated(device)
        if max_memory <= taken:
            raise UsageError(f"--max-memory {human_bytes(max_memory)} is less than the model already takes on the GPU "
                             f"({human_bytes(taken)})", "raise it, or probe on a GPU with more memory")
        usable = min(usable, max_memory - taken)
    longest = max(batches, key=lambda mb: len(mb.input_ids) * max(map(len, mb.input_ids)))  # padded size
    if not layers:
        checkpointing = False
    stats, whitening = _stats_bytes(modules, grad_bytes), _whitening_bytes(modules)
    by_name = dict(net.named_modules())
    weights = [by_name[m.name].weight for m in modules]
    full = _activations(net, longest, pad_id, 0, weights) if checkpointing is not True else 0
    if checkpointing is False or (checkpointing is None and usable - stats >= max(full, whitening)):
        lean = 0  # not needed: nothing is checkpointed (a pass of the model saved)
    else:
        lean = _activations(net, longest, pad_id, layers, weights)
    return (usable, *_choose(usable, stats, whitening, full, lean, layers, checkpointing))


def _choose(usable: int, stats: int, whitening: int, full: int, lean: int, layers: int,
            checkpointing: bool | None) -> tuple[int, int]:
    """(bytes of activations, layers to checkpoint) from the usable memory, the statistics of one pass
    and its whitening's temporaries (which come after the activations are freed), and the activations
    with no layer (`full`) and every layer (`lean`) checkpointed."""
    if checkpointing is False or not layers:
        return full, 0
    if checkpointing is True:
        return lean, layers
    room = usable - stats
    if room >= max(full, whitening):
        return full, 0
    per_layer = (full - lean) / layers
    if room >= max(lean, whitening) and per_layer > 0:
        recomputed = min(layers, math.ceil((full - room) / per_layer))
        return int(full - recomputed * per_layer), recomputed
    return lean, layers


def _activations(net, batch, pad_id: int, checkpointed: int, weights=()) -> int:
    """Peak bytes a forward and backward of `batch` adds to the weights, with the first `checkpointed`
    layers recomputed: measured on its longest row, times its rows (the loss's chunks, which do not
    grow with the rows, cut to their share of that row). `weights` require a gradient, as in the
    probe's passes, so that the forward pass keeps what theirs would (a Linear keeps its input for
    its weight's gradient); the backward pass stops at the embeddings' output, computing no weight
    gradient (those are the statistics' share)."""
    import torch

    from ..autograd import lm_loss
    from ..data.batches import MicroBatch

    device = next(net.parameters()).device
    row = max(range(len(batch.input_ids)), key=lambda i: len(batch.input_ids[i]))
    ids, labels, mask = MicroBatch([batch.input_ids[row]], [batch.labels[row]]).tensors(device, pad_id)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    embedded = []
    hook = net.get_input_embeddings().register_forward_hook(
        lambda module, args, output: embedded.append(output.requires_grad_()))
    for w in weights:
        w.requires_grad_(True)
    try:
        with _checkpointed(net, checkpointed), lm_loss.chunks(lm_loss.CHUNK_BYTES // len(batch.input_ids)):
            loss = net(input_ids=ids, attention_mask=mask, labels=labels, **_no_cache(net)).loss
            torch.autograd.grad(loss, embedded[:1])
            del loss
    finally:
        hook.remove()
        for w in weights:
            w.requires_grad_(False)
    peak = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.reset_peak_memory_stats(device)
    return peak * len(batch.input_ids)


def _passes(modules, usable: int, activations: int, grad_bytes: int) -> list[list]:
    """Whole layers per pass, as many as fit the usable memory next to the activations of a batch and
    then next to their own whitening (a layer alone always gets a pass)."""
    passes, current, used = [], [], 0
    for group in _by_layer(modules):
        size = _layer_bytes(group, grad_bytes)
        if current and used + size + max(activations, _whitening_bytes(current + group)) > usable:
            passes.append(current)
            current, used = [], 0
        current.extend(group)
        used += size
    if current:
        passes.append(current)
    return passes

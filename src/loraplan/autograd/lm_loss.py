"""A causal-LM loss that never holds the logits in fp32.

transformers' `ForCausalLMLoss` upcasts the logits (tokens × vocabulary) to fp32, keeps the fp32
log-softmax for the backward pass and builds two more fp32 tensors of that size there: with a
128k vocabulary, 2 GiB each for 4096 positions, the biggest activations of a small model's pass.
`LeanCausalLMLoss` gives the same loss and the same gradient (in the logits' dtype, as autograd's
cast back from fp32 gives it) a chunk of rows at a time: the gradient is computed in the forward
pass and kept, in the logits' dtype; nothing else of the vocabulary's size outlives a chunk.

`lean_causal_lm_loss(net)` puts it in the place of transformers' loss for the duration, where the
model would use `ForCausalLMLoss` itself (a model with another loss is left as it is). `chunks(n)`
sets the chunks' size for a while: measuring one row of a batch of n rows with chunks of
CHUNK_BYTES / n, times n, gives the batch's peak with its chunks (which do not grow with the rows).
"""

from __future__ import annotations

import contextlib

from ..data.formats import IGNORE_INDEX

CHUNK_BYTES = 128 << 20  # the fp32 rows of one chunk (twice that at its peak: the log-sum-exp's temporary)


def _autograd_function():
    import torch

    class LeanCausalLMLoss(torch.autograd.Function):
        """Σ cross-entropy(logits, targets) / count over the rows whose target is not `ignore`; the
        gradient with respect to the logits is computed in the forward pass, a chunk at a time."""

        @staticmethod
        def forward(ctx, logits, targets, count, ignore: int):
            rows, vocab = logits.shape
            step = max(1, CHUNK_BYTES // (4 * vocab))
            total = torch.zeros((), dtype=torch.float32, device=logits.device)
            grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
            for start in range(0, rows, step):
                chunk = logits[start:start + step].to(torch.float32, copy=True)  # never the logits themselves
                target = targets[start:start + step]
                kept = target != ignore
                index = torch.where(kept, target, 0)[:, None]
                lse = torch.logsumexp(chunk, dim=-1)
                total += ((lse - chunk.gather(1, index)[:, 0]) * kept).sum()
                if grad is not None:  # (softmax - one-hot) / count, 0 on ignored rows
                    probs = chunk.sub_(lse[:, None]).exp_()
                    probs.scatter_add_(1, index, -kept[:, None].float())
                    probs.mul_((kept / count)[:, None])
                    grad[start:start + step].copy_(probs)
            if grad is not None:
                ctx.save_for_backward(grad)
            ctx.spent = False
            return total / count

        @staticmethod
        def backward(ctx, upstream):
            if ctx.spent:
                raise RuntimeError("LeanCausalLMLoss scales its saved gradient in place: one backward pass only")
            ctx.spent = True
            (grad,) = ctx.saved_tensors
            return grad.mul_(upstream), None, None, None  # in place: no second logits-sized tensor

    return LeanCausalLMLoss


_FUNCTION = None


def causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                   shift_labels=None, **kwargs):
    """transformers' `ForCausalLMLoss`, same arguments and result, computed by LeanCausalLMLoss."""
    import torch

    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _autograd_function()
    if shift_labels is None:  # tokens < n predict n
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:  # the mean over the supervised tokens
        count = (targets != ignore_index).sum().float()
    elif torch.is_tensor(num_items_in_batch):
        count = num_items_in_batch.to(logits.device).float()
    else:
        count = torch.tensor(float(num_items_in_batch), device=logits.device)
    return _FUNCTION.apply(logits.reshape(-1, vocab_size), targets, count, ignore_index)


@contextlib.contextmanager
def lean_causal_lm_loss(net):
    """`net` computes its loss by `causal_lm_loss` inside the block, if it would use transformers'
    `ForCausalLMLoss` (the model's own setting is restored after)."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        ForCausalLMLoss = None  # noqa: N806
    if ForCausalLMLoss is None or getattr(net, "loss_function", None) is not ForCausalLMLoss:
        yield False
        return
    own = net.__dict__.get("_loss_function", _MISSING)
    net.loss_function = causal_lm_loss
    try:
        yield True
    finally:
        if own is _MISSING:
            del net._loss_function
        else:
            net._loss_function = own


_MISSING = object()


@contextlib.contextmanager
def chunks(nbytes: int):
    """Chunks of `nbytes` fp32 rows for the duration (not thread-safe: one setting per process)."""
    global CHUNK_BYTES
    before, CHUNK_BYTES = CHUNK_BYTES, max(1, nbytes)
    try:
        yield
    finally:
        CHUNK_BYTES = before


def causal_lm_loss_sum(logits, labels):
    """Summed next-token cross entropy over supervised positions, computed in fp32."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")

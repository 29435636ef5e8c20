"""`loraplan probe`: where the model wants to change, and in how many directions, from a few
gradient batches of the user's data — before any training.

The raw gradient misleads: ‖∂L/∂W‖/‖W‖ is not comparable across modules whose inputs, outputs and
positions differ (on a planted task with the change in the MLP it ranks v_proj/o_proj first). Here
each module's gradient G is whitened by its Kronecker-factored Fisher (K-FAC; Martens & Grosse 2015):
M = S^-1/2 · G · A^-1/2, with A = E[x xᵀ] over the module's inputs and S = E[δ δᵀ] over the gradients
at its outputs. ½‖M‖² is the loss decrease a natural-gradient step achieves per unit of KL change in
the model's predictions — invariant to the scale and basis of each module's inputs and outputs, so
modules of any shape and place compare — and the singular spectrum of M says how many directions
hold that decrease (the rank a LoRA adapter needs for it).

The steps, a module each: passes.py runs the batches (memory_plan.py decides how many passes and
how many layers recomputed), statistics.py gathers the factors and fold gradients, whitening.py
whitens them, spectra.py turns two folds into a signal, a noise floor and a rank, and result.py
adds the modules up into roles and a plan.

Validated on planted tasks and one real-data task (benchmarks/probe/RESULTS.md), including where it
fails: the gradient at the base measures the first steps, not what an adapter can finally reach, and
the MLP (down_proj above all) can compensate at first order for changes planted in attention.
"""

from __future__ import annotations

import os
import sys
import time

from ..autograd.lm_loss import lean_causal_lm_loss
from ..autograd.saved_tensors import lean_saved_tensors
from ..errors import UsageError
from .memory_plan import SHARES, _memory_plan, _passes
from .passes import (
    _attention_kernels,
    _checkpointable,
    _checkpointed,
    _probe_layers,
    _release,
    _WarmUp,
)
from .result import ModuleSignal, ProbeResult, _roles, plan_from_signals
from .statistics import DENSE_MAX, FOLDS


def probe(model: str, data: str, *, targets: str = "all-linear", batches: int = 8, batch_size: int = 8,
          max_length: int = 512, fmt: str = "auto", seed: int = 0, dtype: str = "auto",
          trust_remote_code: bool = False, progress: bool = False, max_memory: int | None = None) -> ProbeResult:
    """Probe MODEL on DATA: `loraplan probe` as a function."""
    from ..data.batches import training_steps
    from ..data.load import load_data
    from ..model.loading import load_model, load_structure, load_tokenizer

    if batches < 2 * FOLDS:
        raise UsageError(f"--batches must be at least {2 * FOLDS} (the noise estimate splits them)", "e.g. --batches 8")
    _expandable_segments()
    warm_up = _WarmUp.before_loading(dtype)
    structure = load_structure(model, trust_remote_code=trust_remote_code)
    modules = _candidates(structure, targets)
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    splits = load_data(data, tokenizer, fmt=fmt, max_length=max_length, seed=seed)
    steps = training_steps(splits.train, batches, batch_size, None, seed)
    net = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    result = probe_batches(net, structure, modules, [s[0] for s in steps], tokenizer.pad_token_id,
                           progress=progress, max_memory=max_memory, warm_up=warm_up)
    result.model, result.data = model, data
    result.plan = plan_from_signals(result, structure, examples=len(splits.train))
    return result


def _expandable_segments() -> None:
    """Before CUDA starts (its allocator reads the setting then): PYTORCH_CUDA_ALLOC_CONF=
    expandable_segments:True, with which the allocator grows its segments instead of cutting new ones,
    so that its cache does not fragment into pieces too small for a batch (benchmarks/probe/RESULTS.md,
    "Out of memory"). A user's own setting (or torch's newer PYTORCH_ALLOC_CONF) wins; once CUDA has
    started in this process it is too late, and the probe goes on without it."""
    if "PYTORCH_CUDA_ALLOC_CONF" in os.environ or "PYTORCH_ALLOC_CONF" in os.environ:
        return
    torch = sys.modules.get("torch")  # not imported: CUDA has not started
    if torch is not None and torch.cuda.is_initialized():
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def _candidates(structure, targets: str):
    from ..model.targets import resolve_targets

    resolved = resolve_targets(structure, targets)
    modules = [m for m in resolved.modules if m.kind in ("linear", "conv1d") and m.role != "lm_head"]
    if not modules:
        raise UsageError(f"'{targets}' selects no Linear layers to probe",
                         "the probe covers Linear/Conv1D weights (MoE expert parameters and embeddings are not probed)")
    return modules


def probe_batches(net, structure, modules, batches, pad_id: int, progress: bool = False,
                  memory_budget: int | None = None, checkpointing: bool | None = None,
                  max_memory: int | None = None, warm_up: _WarmUp | None = None) -> ProbeResult:
    """The probe proper, on a loaded model and a list of micro-batches. When the statistics of all
    layers do not fit in `memory_budget` bytes (default: on a GPU, what the activations of the longest
    batch leave free; 8 GiB on a CPU), layers are probed in groups, one pass over the batches per group.
    The batches split into FOLDS contiguous folds; each fold's gradient is summed where autograd puts
    it (in the weights' dtype). Checkpointed layers recompute their activations in the backward pass,
    so the statistics get the memory the activations would have taken (one more forward of those
    layers per batch). `checkpointing`: True, every layer; False, none; None (default), on a GPU as
    many as the memory left requires (none when everything fits, all when layer groups are needed
    anyway; all when `memory_budget` is given), none on a CPU. `max_memory` caps the GPU memory the
    probe plans for (bytes allocated at the peak, weights included; default 90% of what is free).
    Out of memory all the same (the allocator's cache cut into pieces too small; `probe()` sets
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True against that), the probe plans again for 75% of
    the free memory, then 60% with every layer recomputed, keeping the passes already done, and says
    so in a note. On a GPU a thread loads the whitening's CUDA libraries meanwhile (_WarmUp; `warm_up`:
    one started earlier, while the model loaded)."""
    import torch

    device = next(net.parameters()).device
    by_name = dict(net.named_modules())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    net.eval()  # no dropout: the gradient of the model as it is
    net.requires_grad_(False)
    grad_bytes = next(net.parameters()).element_size()
    fold_of = [i * FOLDS // len(batches) for i in range(len(batches))]
    signals: dict[str, ModuleSignal] = {}
    # the factors' products in TF32 (fp32 sums): in full fp32 they cost as much as the passes themselves
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    layers = _checkpointable(net)
    if warm_up is None and device.type == "cuda":
        warm_up = _WarmUp(device, grad_bytes == 2)
    retried = []  # (share planned for, the error) of each try that ran out of memory
    try:
        with _attention_kernels(device), lean_causal_lm_loss(net), lean_saved_tensors(net):
            for attempt, share in enumerate(SHARES):  # out of memory: again, planning for less (a pass done is kept)
                last = attempt + 1 == len(SHARES)
                policy = bool(layers) if last else checkpointing
                todo = [m for m in modules if m.name not in signals]
                try:
                    if memory_budget is None:
                        usable, activations, recomputed = _memory_plan(net, todo, batches, pad_id, grad_bytes, layers,
                                                                       policy, max_memory, share)
                    else:
                        usable, activations = int(memory_budget * share / SHARES[0]), 0
                        recomputed = layers if policy or (policy is None and device.type == "cuda") else 0
                    passes = _passes(todo, usable, activations, grad_bytes)
                    with _checkpointed(net, recomputed):
                        for k, group in enumerate(passes):
                            signals.update(_probe_layers(net, by_name, group, batches, pad_id, device, fold_of,
                                                         f"{k + 1}/{len(passes)}" if progress else None,
                                                         warm_up.join if warm_up else None))
                    break
                except torch.OutOfMemoryError as e:
                    if last:
                        raise UsageError("out of GPU memory while probing, even with every layer recomputed in the "
                                         f"backward pass and {share:.0%} of the free memory planned for",
                                         "fewer or shorter sequences (--batch-size, --max-length), fewer modules "
                                         "(--targets), or a GPU with more memory") from None
                    retried.append((share, str(e).splitlines()[0]))
                _release(device)  # the failed pass's tensors (its traceback held them until here)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if warm_up:
            warm_up.join()
    tokens = sum(mb.tokens for mb in batches)
    ordered = [signals[m.name] for m in modules]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    result = ProbeResult(model="", data="", batches=len(batches), tokens=tokens, seconds=round(time.time() - t0, 3),
                         peak_memory_bytes=peak, modules=ordered, roles=_roles(ordered), plan=None)
    for (share, error), then in zip(retried, SHARES[1:], strict=False):
        result.notes.append(f"ran out of memory planning for {share:.0%} of the free GPU memory ({error[:100]}); "
                            f"probed again planning for {then:.0%}")
    if max_memory is not None and device.type != "cuda":
        result.notes.append(f"--max-memory caps GPU memory; on {device.type} it is not used")
    if len(passes) > 1:
        result.notes.append(f"{len(passes)} passes over the batches (layer groups) to fit the statistics in memory")
    if recomputed and layers:
        result.notes.append(f"{min(recomputed, layers)} of {layers} layers recompute their activations in the "
                            "backward pass (gradient checkpointing) to fit the statistics in memory")
    wide = sorted({d for m in modules for d in (m.in_features, m.out_features) if d > DENSE_MAX})
    if wide:
        result.notes.append(f"factors wider than {DENSE_MAX} ({', '.join(map(str, wide))}) are whitened by their "
                            "diagonal (per-channel scale) to bound memory")
    if result.snr < 0.5:
        result.notes.append(f"the gradient signal is weak against its noise (signal/noise {result.snr:.2f}): "
                            "probe more batches before trusting the ranking")
    return result

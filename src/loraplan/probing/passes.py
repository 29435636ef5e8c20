"""The passes over the batches: one forward and backward per batch with a layer group's statistics
attached, then that group's whitening and spectra, a layer at a time.

The model runs in eval mode (no dropout) with its weights frozen but those probed; its loss is
computed without fp32 logits (autograd/lm_loss.py) and activation outputs, gated products and norms'
fp32 upcasts are recomputed rather than kept (autograd/saved_tensors.py), with the plan-free
attention kernels. Layers can be recomputed in the backward pass (transformers' gradient
checkpointing, without training mode) when the memory plan asks. On a GPU a warm-up thread loads the
whitening's CUDA libraries and kernels while the model loads or the memory plan runs.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter

from .result import ModuleSignal
from .spectra import _finish, _signal
from .statistics import FOLDS, _Moment, _SharedInputs, _Stats
from .whitening import _Factorizer, _Whitener


def _probe_layers(net, by_name, group, batches, pad_id, device, fold_of, label, ready=None) -> dict[str, ModuleSignal]:
    """One pass over the batches with the statistics of `group`'s modules attached; their signals.
    Whitening goes a layer at a time: its factors, then its modules' products; on a GPU the next
    layer's factorizations run on a side stream meanwhile. The host waits for the side stream once
    per layer (were the factors positive definite?) and for the results once per pass. `ready` is
    called before the whitening starts (the warm-up is done)."""
    inputs = _SharedInputs()
    stats = {m.name: _Stats(by_name[m.name], m.kind == "conv1d", inputs) for m in group}
    for st in stats.values():
        st.attach()
    try:
        for i, mb in enumerate(batches):
            ids, labels, mask = mb.tensors(device, pad_id)
            inputs.start_batch(mb, ids.shape[1], device)
            loss = net(input_ids=ids, attention_mask=mask, labels=labels, **_no_cache(net),
                       num_items_in_batch=max(mb.supervised, 1)).loss
            loss.backward()
            inputs.end_batch()
            if i + 1 == len(batches) or fold_of[i + 1] != fold_of[i]:
                for st in stats.values():
                    st.end_fold(fold_of[i])
            if label:
                print(f"probe pass {label} batch {i + 1}/{len(batches)}: loss {loss.item():.4f}",
                      file=sys.stderr, flush=True)
    finally:
        for st in stats.values():
            st.detach()
    if ready is not None:
        ready()
    columns = Counter()  # how many vectors each input factor will whiten: FOLDS × out per reader
    for m in group:
        columns[id(stats[m.name].input)] += FOLDS * m.out_features

    def factors(members) -> list:  # (moment, columns) per factor of a layer, shared input factors once
        wanted = {}
        for m in members:
            st = stats[m.name]
            for moment, width in ((st.input, columns[id(st.input)]), (st.output, FOLDS * m.in_features)):
                if moment is not None and moment.matrix is not None:
                    wanted.setdefault(id(moment), (moment, width))
        return list(wanted.values())

    layers = _by_layer(group)
    half = by_name[group[0].name].weight.element_size() == 2  # bf16/fp16 weights: folds summed in it
    factorizer = _Factorizer(device, half)
    pending = []
    ticket = factorizer.start(factors(layers[0]))
    for k, members in enumerate(layers):
        current = ticket
        if k + 1 < len(layers):
            ticket = factorizer.start(factors(layers[k + 1]))
        whiteners = factorizer.finish(current)
        for m in members:
            st = stats[m.name]
            pending.append(_signal(m, st, whiteners.get(id(st.input)), whiteners.get(id(st.output))))
            st.folds, st.input, st.output = [None] * FOLDS, None, None  # free as we go
    return _finish(pending)


def _no_cache(net) -> dict:
    return {"use_cache": False} if hasattr(net.config, "use_cache") else {}


def _checkpointable(net) -> int:
    """How many modules transformers' gradient checkpointing would recompute (its decoder layers)."""
    if not getattr(net, "supports_gradient_checkpointing", False):
        return 0
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    count = len(_recomputable(net))
    net.gradient_checkpointing_disable()
    return count


def _recomputable(net) -> list:
    """The modules gradient checkpointing recomputes once enabled: transformers' decoder layers (the
    model above them carries the same flag, for older code paths)."""
    flagged = [m for m in net.modules() if getattr(m, "gradient_checkpointing", False) is True]
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return flagged
    return [m for m in flagged if isinstance(m, GradientCheckpointingLayer)] or flagged


@contextlib.contextmanager
def _checkpointed(net, layers: int):
    """transformers' gradient checkpointing for the first `layers` layers, without training mode: only
    those layers say `training` (what makes them checkpoint); their submodules stay in eval (no dropout)."""
    if layers <= 0 or not getattr(net, "supports_gradient_checkpointing", False):
        yield
        return
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    chosen = _recomputable(net)[:layers]
    for m in chosen:
        m.training = True
    try:
        yield
    finally:
        for m in chosen:
            m.training = False
        net.gradient_checkpointing_disable()


def _release(device) -> None:
    """Frees what a failed try left (tensors its traceback held, kept cycles) and the allocator's cache."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class _WarmUp:
    """A process's first whitening loads CUDA libraries and kernels on first use (cuSOLVER, cuBLAS's
    float64, TF32 and bf16 products, the pinned-memory pool) and the CPU's LAPACK, which would hold up
    a first call (benchmarks/probe/RESULTS.md, "The warm-up during loading"). A thread runs the
    whitening and the spectra once on a small made-up module, on a stream of its own: from `probe()`,
    while the data and the model load (`before_loading`, where the libraries load alongside the model,
    not alongside the passes, which they slowed); from `probe_batches` alone,
    while the memory plan and the passes run, where the loading slows them down instead (its
    eigenvalues set torch's CPU threads to one for that moment, as the probe's own do). Best effort:
    a failure here is left for the real whitening to meet and report."""

    def __init__(self, device, half: bool):
        import threading

        self.thread = threading.Thread(target=self._run, args=(device, half), name="loraplan-probe-warm-up",
                                       daemon=True)
        self.thread.start()

    @staticmethod
    def _run(device, half: bool) -> None:
        import types

        import torch

        try:
            cuda = device.type == "cuda"
            with torch.cuda.device(device) if cuda else contextlib.nullcontext(), \
                    torch.cuda.stream(torch.cuda.Stream(device)) if cuda else contextlib.nullcontext():
                generator = torch.Generator(device=device).manual_seed(0)
                dtype = torch.bfloat16 if half else torch.float32

                def noise(*shape):
                    return torch.randn(*shape, generator=generator, device=device).to(dtype)

                inputs, outputs = _Moment(), _Moment()  # 384 × 512: a 384-column C, past EXACT_MAX (Ritz steps)
                inputs.add(noise(2048, 512), 0)
                outputs.add(noise(2048, 384), 0)
                info = types.SimpleNamespace(name="warm-up", role="warm-up", layer=None)
                stats = types.SimpleNamespace(folds=[noise(384, 512) for _ in range(FOLDS)])
                # the input side by its inverse, the output side by triangular solves: both paths
                pending = _signal(info, stats, _Whitener(inputs, inputs.n, 4096, half=half),
                                  _Whitener(outputs, outputs.n, 0, half=half))
                _finish([pending])
        except Exception:  # noqa: BLE001, S110 - best effort (see above)
            pass

    def join(self) -> None:
        self.thread.join()

    @classmethod
    def before_loading(cls, dtype: str) -> _WarmUp | None:
        """Started before the model loads, where it will load onto a GPU (`dtype` as load_model takes it)."""
        import torch

        from ..model.loading import torch_dtype

        if not torch.cuda.is_available():
            return None
        return cls(torch.device("cuda", torch.cuda.current_device()), torch_dtype(dtype).itemsize == 2)


def _attention_kernels(device):
    """A few batches of as many shapes: cuDNN's attention would build a plan for each shape, which
    takes longer than the passes themselves, so the probe uses the plan-free kernels."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _by_layer(modules) -> list[list]:
    """The modules grouped by layer, layers in order of first appearance."""
    layers: dict = {}
    for m in modules:
        layers.setdefault(m.layer, []).append(m)
    return list(layers.values())

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

Noise: the batches are split into two halves with independent gradients M₁, M₂. ⟨M₁, M₂⟩ estimates
‖E[M]‖² without the noise energy that inflates ‖M‖² (more for bigger matrices); the cross-Gram of
M₁ and M₂ estimates the spectrum the same way, and its most negative eigenvalue gives the noise floor
below which directions are not counted. C is formed once per module (one product, as small as the
weight's smaller side). Up to EXACT_MAX columns it is decomposed exactly; beyond, from the Ritz
values of a 256-column subspace: 128 columns of subspace iteration (Halko, Martinsson & Tropp 2011),
which resolve the top of the spectrum, extended by a 128-column block Krylov space (Musco & Musco
2015), which reaches the floor at the edge of the dense noise bulk where subspace iteration does not.
On the real-data task's 384-column modules this reads the exact 90% ranks (10-52) within +1 and the
floor within 4%; subspace iteration alone put the floor up to 18% low and read the ranks up to +4,
the Krylov space alone cut the tail and read them up to 14 low, and a plain Gaussian compression
ΩᵀCΩ spreads the eigenvalues (Marchenko-Pastur) and read them 0.54-0.8× (benchmarks/probe/RESULTS.md).

Cost: one forward/backward per batch (per layer group when the statistics do not fit in memory;
on a GPU, as few layers recomputed in the backward pass as the memory left requires), its loss
computed without fp32 logits (lm_loss), activation outputs, gated products and norms' fp32 upcasts
recomputed rather than kept (autograd/saved_tensors.py: the same gradients, about a third less activation memory).
Factors are sums over the real tokens (padding excluded), from half-precision products with fp32
sums on a GPU, kept in half their space (symmetric).
Modules reading the same input (q/k/v, gate/up) share one input factor; whitening uses the inverse
Cholesky factor, not an eigendecomposition (same ⟨M₁, M₂⟩), inverted with TF32 products on a GPU;
factors wider than DENSE_MAX keep only their diagonal — a per-channel whitening, which is not
equivalent and is not what the planted tasks validate (there, whitening the MLP's hidden side by its
diagonal raised down_proj's share by 7-19 points); each fold's gradient is summed by autograd in the
weights' dtype, and bf16/fp16 folds are whitened by bf16 products (W rounded once: ‖W F Wᵀ - I‖ ~
1e-2). Nothing waits on the GPU inside a layer: a layer's factorizations run on a side stream while
the previous layer's products do. The Ritz steps of every C of the same width run batched at the
end of a pass, and their eigenvalues are taken on the CPU by a pool of threads.

Validated on planted tasks and one real-data task (benchmarks/probe/RESULTS.md), including where it
fails: the gradient at the base measures the first steps, not what an adapter can finally reach, and
the MLP (down_proj above all) can compensate at first order for changes planted in attention.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, field

from ..autograd.lm_loss import lean_causal_lm_loss
from ..autograd.saved_tensors import lean_saved_tensors
from ..errors import UsageError
from ..plan.lora_plan import LoraPlan, Reason

FOLDS = 2
SKETCH = 128  # columns resolving the top of a wide module's spectrum (subspace iteration)
POWER = 1  # its power steps
KRYLOV_BLOCK = 16  # columns of each block of the Krylov space that extends it to the spectrum's ends
KRYLOV_STEPS = 8  # its blocks: SKETCH + 128 Ritz values in all
EXACT_MAX = 256  # up to this many columns the cross-Gram is exact (its eigendecomposition is cheap)
ENERGY = 0.9  # rank = directions holding this share of a module's signal
COVER = 0.8  # the plan's targets hold this share of the total signal
DAMPING = 1e-2  # Tikhonov damping of each Kronecker factor, relative to its mean eigenvalue
DENSE_MAX = 8192  # wider factors are kept as their diagonal
INVERSE_BLOCK = 128  # triangular inverses: diagonal blocks at most this wide, merged by float64 products
RITZ_BYTES = 1 << 30  # cross-Grams in one batch of Ritz steps (all fold gradients are freed by then)
SHARES = (0.9, 0.75, 0.6)  # of the GPU's free memory, what the probe plans for; the next after running out of
# memory (the allocator's cache cut into pieces too small: 4.45 GiB of them on an 8B probe that did), the
# last with every layer recomputed


@dataclass(frozen=True)
class ModuleSignal:
    name: str
    role: str
    layer: int | None
    signal: float  # unbiased estimate of ‖E[M]‖², M the K-FAC-whitened gradient
    naive: float  # ‖M̄‖² (signal + noise)
    rank: int  # directions holding ENERGY of the signal (0: no signal above noise)
    spectrum: list[float]  # signal eigenvalues above the noise floor, largest first

    @property
    def noise_share(self) -> float:
        return 1.0 - self.signal / self.naive if self.naive > 0 else 1.0


@dataclass
class RoleSignal:
    role: str
    share: float  # of the total positive signal
    rank: int  # signal-weighted median over its modules
    modules: int
    per_layer: dict[int, float]  # layer -> share of this role's signal


@dataclass
class ProbeResult:
    model: str
    data: str
    batches: int
    tokens: int
    seconds: float
    peak_memory_bytes: int | None
    modules: list[ModuleSignal]
    roles: list[RoleSignal]
    plan: LoraPlan | None
    notes: list[str] = field(default_factory=list)

    @property
    def snr(self) -> float:
        """Total signal over total noise energy (below ~0.5 the ranking is not to be trusted)."""
        signal = sum(max(m.signal, 0.0) for m in self.modules)
        noise = sum(max(m.naive - m.signal, 0.0) for m in self.modules)
        return signal / noise if noise > 0 else math.inf

    def to_json(self) -> dict:
        """Also the `probe.json` a sweep folder may hold (docs/sweep-dir.md)."""
        layers = sorted({m.layer for m in self.modules if m.layer is not None})
        total = sum(max(m.signal, 0.0) for m in self.modules) or 1.0
        return {
            "format": 1,
            "model": self.model,
            "data": self.data,
            "batches": self.batches,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
            "method": "K-FAC-whitened gradient energy, split-half unbiased, cross-Gram spectrum",
            "energy": ENERGY,
            "snr": self.snr,
            "roles": [asdict(r) for r in self.roles],
            "importance": {r.role: {str(layer): sum(max(m.signal, 0.0) for m in self.modules
                                                    if m.role == r.role and m.layer == layer) / total
                                    for layer in layers} for r in self.roles},
            "modules": [{**asdict(m), "importance": max(m.signal, 0.0), "rank_estimate": m.rank}
                        for m in self.modules],
            "plan": self.plan.to_dict() if self.plan else None,
            "notes": self.notes,
        }


def probe(model: str, data: str, *, targets: str = "all-linear", batches: int = 8, batch_size: int = 8,
          max_length: int = 512, fmt: str = "auto", seed: int = 0, dtype: str = "auto",
          trust_remote_code: bool = False, progress: bool = False, max_memory: int | None = None) -> ProbeResult:
    """Probe MODEL on DATA: `loraplan probe` as a function."""
    from ..data.batches import training_steps
    from ..data.load import load_data
    from ..model.loading import load_model, load_structure, load_tokenizer

    if batches < 2 * FOLDS:
        raise UsageError(f"--batches must be at least {2 * FOLDS} (the noise estimate splits them)", "e.g. --batches 8")
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
    Out of memory all the same (the allocator's cache cut into pieces too small; `loraplan probe` sets
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
    float64, TF32 and bf16 products, the pinned-memory pool) and the CPU's LAPACK: about 1 s in a
    fresh process on the H100 (cuSOLVER's first factorization 0.48 s, the first products and spectra
    0.2 s each). A thread runs the whitening and the spectra once on a small made-up module, on a
    stream of its own: from `probe()`, while the data and the model load (`before_loading`: a first
    call 0.4-0.6 s faster than with the thread started with the passes); from `probe_batches` alone,
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


def _factor_bytes(dim: int, packed: bool = True) -> int:
    """fp32 bytes of a dim-wide factor: packed (a _Moment's) or whole (a whitening matrix); its
    diagonal beyond DENSE_MAX."""
    if dim > DENSE_MAX:
        return 4 * dim
    return 4 * (_packed_entries(dim) if packed else dim * dim)


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


class _Moment:
    """E[x xᵀ] of a stream of row vectors, summed in fp32: up to DENSE_MAX wide, the symmetric matrix
    in half its space; beyond, its diagonal (a 14336-wide matrix would be 0.8 GB per module).
    Halves h = ⌊n/2⌋ and k = n - h of x: the block below the diagonal, Σ x₂ᵀx₁ (k × h), is kept
    whole; the two diagonal blocks, symmetric, share a (k + 1) × k matrix: x₁ᵀx₁'s lower triangle one
    row down, x₂ᵀx₂'s upper triangle (the layout of LAPACK's rectangular full packed format). Three
    products of a quarter of n² each, where the whole matrix is one product of n² (a fourth of its
    flops saved); each diagonal block passes through a temporary of its size. `dense()` unpacks."""

    def __init__(self):
        self.matrix = None  # the packed matrix, or the diagonal
        self.width = 0
        self.n = 0
        self.batch = -1  # the last batch added

    def add(self, x, batch: int, real=None):
        """Adds batch `batch`'s rows, once: a checkpointed layer runs its forward (and hooks) twice.
        `real` = (positions, index): when x has a row per position of the padded batch, only the rows
        of real tokens count."""
        import torch

        if batch == self.batch:
            return
        self.batch = batch
        x = x.reshape(-1, x.shape[-1])
        if real is not None and x.shape[0] == real[0]:
            x = x.index_select(0, real[1])
        self.n += x.shape[0]
        self.width = n = x.shape[1]
        if self.diagonal:  # Σ x², summed in fp32 without an fp32 copy of x
            update = torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).square_()
            self.matrix = update if self.matrix is None else self.matrix.add_(update)
            return
        if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
            x = x.float()  # once, where the product will not take x as it is
        if self.matrix is None:
            self.matrix = torch.zeros(_packed_entries(n), dtype=torch.float32, device=x.device)
        below, shared = self._blocks()
        h = n // 2
        x1, x2 = x[:, :h], x[:, h:]
        _mm32(x2.T, x1, below)
        shared[1:h + 1, :h].add_(_mm32(x1.T, x1).tril_())
        shared[:n - h].add_(_mm32(x2.T, x2).triu_())

    @property
    def diagonal(self) -> bool:
        return self.width > DENSE_MAX

    def _blocks(self):
        """Views of the packed matrix: the block below the diagonal, the shared diagonal blocks."""
        n = self.width
        h, k = n // 2, n - n // 2
        return self.matrix[:k * h].view(k, h), self.matrix[k * h:].view(k + 1, k)

    def dense(self):
        """The factor in float64: the diagonal, or the whole symmetric matrix."""
        import torch

        if self.diagonal:
            return self.matrix.double()
        n = self.width
        h = n // 2
        below, shared = self._blocks()
        f = torch.empty(n, n, dtype=torch.float64, device=self.matrix.device)
        f[h:, :h] = below
        f[:h, h:] = below.T
        for block, triangle in ((f[:h, :h], shared[1:h + 1, :h].tril()), (f[h:, h:], shared[:n - h].triu())):
            torch.add(triangle, triangle.T, out=block)  # T + Tᵀ counts the diagonal twice
            block.diagonal().sub_(triangle.diagonal())
        return f


def _packed_entries(n: int) -> int:
    """Entries of a packed n × n symmetric matrix (_Moment): n(n + 1)/2, and n/2 more for an odd n."""
    h, k = n // 2, n - n // 2
    return k * h + (k + 1) * k


def _mm32(a, b, into=None):
    """a @ b with fp32 sums (in a's precision when that is wider), added in place to `into` when
    given: half-precision inputs multiply on the tensor cores without an fp32 copy (the products of
    bf16/fp16 numbers are exact in fp32; only the sums round)."""
    import torch

    if a.dtype in (torch.bfloat16, torch.float16):
        if a.is_cuda:
            try:
                if into is None:
                    return torch.mm(a, b, out_dtype=torch.float32)
                return torch.addmm(into, a, b, out_dtype=torch.float32, out=into)
            except (TypeError, RuntimeError):  # torch < 2.8: no out_dtype
                pass
        a, b = a.float(), b.float()
    return a @ b if into is None else into.addmm_(a, b)


class _SharedInputs:
    """Modules that read the same tensor object (q/k/v, gate/up) share one input factor: the first
    module to see a tensor adds it to its moment, the others point at that moment. Tensors are told apart by identity, through
    weak references: a freed tensor's id or memory may be reused by the next layer's input. Also
    where the current batch's real tokens are (padding is left out of every factor)."""

    def __init__(self):
        self.seen: dict = {}  # id(tensor) -> (weak reference, _Moment), for the current batch
        self.batch = 0
        self.real = None  # (positions, index of the real ones) for a padded batch

    def start_batch(self, mb, width: int, device):
        """The flat positions of `mb`'s tokens in its right-padded (rows × width) tensors."""
        import torch

        lengths = [len(x) for x in mb.input_ids]
        if all(n == width for n in lengths):
            self.real = None
            return
        index = torch.cat([torch.arange(n) + i * width for i, n in enumerate(lengths)])
        self.real = (len(lengths) * width, index.to(device, non_blocking=True))

    def read(self, x, own: _Moment | None) -> _Moment:
        entry = self.seen.get(id(x))
        if entry is not None and entry[0]() is x:
            return entry[1]
        moment = own or _Moment()
        moment.add(x.detach(), self.batch, self.real)
        self.seen[id(x)] = (weakref.ref(x), moment)
        return moment

    def end_batch(self):
        self.seen = {}
        self.batch += 1


class _Stats:
    """Per module: its input factor (perhaps shared), the second moment of the gradients at its
    outputs (the K-FAC factors), and the summed weight gradient of each fold."""

    def __init__(self, module, transposed: bool, inputs: _SharedInputs):
        self.module = module
        self.transposed = transposed  # transformers Conv1D stores the weight as (in, out)
        self.inputs = inputs
        self.input: _Moment | None = None
        self.output = _Moment()
        self.folds: list = [None] * FOLDS
        self.hook = None

    def attach(self):
        self.module.weight.requires_grad_(True)
        self.hook = self.module.register_forward_hook(self._forward)

    def detach(self):
        if self.hook is not None:
            self.hook.remove()
        self.module.weight.requires_grad_(False)
        self.module.weight.grad = None

    def _forward(self, module, inputs, output):
        import torch

        if not torch.is_grad_enabled():
            return
        self.input = self.inputs.read(inputs[0], self.input)
        output.register_hook(self._backward)

    def _backward(self, grad):
        self.output.add(grad.detach(), self.inputs.batch, self.inputs.real)

    def end_fold(self, fold: int):
        """The weight's .grad holds the sum over the fold's batches: keep it, start the next from zero."""
        grad = self.module.weight.grad
        self.module.weight.grad = None
        if grad is not None:
            self.folds[fold] = grad.detach().T if self.transposed else grad.detach()


class _Whitener:
    """Applies W with WᵀW = (F + λI)^-1, F a Kronecker factor, λ = DAMPING × its mean eigenvalue:
    W = L⁻¹ for the Cholesky factor L of a full F (float64), (diag F + λ)^-1/2 for a diagonal one.
    Any such W gives the same ⟨M₁, M₂⟩ and the same distribution of sketched spectra as the symmetric
    F^-1/2 — they differ by a rotation — and a Cholesky factor is many times cheaper than an
    eigendecomposition. Applied to `columns` vectors in all, it is inverted once (n³/3 float64 flops)
    and applied as a tensor-core product when they are at least a third of its width, or else applied
    by a float64 triangular solve (n² flops a vector). `half`: the inverse is kept in bf16, for
    half-precision gradients — W rounded once, shared by both folds: the metric F moves by the
    rounding (2⁻⁹ of W), not the noise, so ⟨M₁, M₂⟩ stays an unbiased estimate for it.
    The factorization is not waited for: `info` says (later, see _repair) whether F + λI was
    positive definite in float64 rounding; `boost` multiplies λ for a second try. `factor`: a
    _Moment, or the sum S itself (n × n, or its diagonal)."""

    def __init__(self, factor, n: int, columns: int = 0, boost: float = 1.0, half: bool = False):
        import torch

        self.factor, self.n, self.columns, self.half = factor, n, columns, half
        self.diagonal = self.cholesky = self.inverse = self.info = None
        # float64, a copy of its own (changed in place below)
        f = factor.dense() if isinstance(factor, _Moment) else factor.to(torch.float64, copy=True)
        if f.dim() == 1:
            f.div_(max(n, 1)).clamp_min_(0)
            self.diagonal = (f + _damping(f.mean())).rsqrt().float()
            return
        # F + λI = (S + nλI)/n for the sum S of n outer products: S + nλI is factored (nλ is the same
        # DAMPING of S's own mean eigenvalue), and √n goes into W (one float64 copy of S in all)
        f.diagonal().add_(boost * _damping(f.diagonal().clamp_min(0).mean()))
        self.width = f.shape[0]
        lower, self.info = torch.linalg.cholesky_ex(f)
        del f
        scale = math.sqrt(max(n, 1))
        if 3 * columns >= lower.shape[0]:
            # on a GPU the merges run in TF32: ‖W F Wᵀ - I‖ ~ 4e-4, 20× below what rounding W to bf16 does
            inverse = _lower_inverse(lower, merge=torch.float32 if lower.is_cuda else None)
            dtype = torch.bfloat16 if half else torch.float32
            self.inverse = torch.mul(inverse, scale, out=torch.empty_like(inverse, dtype=dtype))
        else:
            self.cholesky = lower.div_(scale)

    def left(self, g, inplace: bool = False):
        """W · g (`inplace`: a diagonal W may overwrite g). A bf16 inverse takes g in bf16 (rounded
        here if it is not) and gives fp32 sums. Every path gives a row-major result."""
        import torch

        if self.diagonal is not None:
            return g.mul_(self.diagonal[:, None]) if inplace else self.diagonal[:, None] * g
        if self.inverse is not None:
            if self.half:
                return _mm32(self.inverse, g.to(torch.bfloat16))
            return self.inverse @ g
        return self._solve(g, left=True)

    def right(self, g, inplace: bool = False):
        """g · Wᵀ"""
        import torch

        if self.diagonal is not None:
            return g.mul_(self.diagonal) if inplace else g * self.diagonal
        if self.inverse is not None:
            if self.half:
                return _mm32(g.to(torch.bfloat16), self.inverse.T)
            return g @ self.inverse.T  # contiguous, as g is
        return self._solve(g, left=False)

    def _solve(self, g, left: bool):
        """L⁻¹g (left) or gL⁻ᵀ by a float64 triangular solve, back in fp32 and row-major (a solve's
        result is column-major: as it is, it broke the views of the folds in _signal)."""
        import torch

        a = self.cholesky if left else self.cholesky.mT
        x = torch.linalg.solve_triangular(a, g.double(), upper=not left, left=left)
        return x.to(torch.float32, memory_format=torch.contiguous_format)

    def record_stream(self, stream):
        """Built on one CUDA stream, used on `stream`: its memory waits for that stream's use."""
        for t in (self.diagonal, self.cholesky, self.inverse):
            if t is not None:
                t.record_stream(stream)


class _Factorizer:
    """Builds a layer's whiteners. On a GPU it does so on a side stream, one layer ahead, so that the
    main stream never waits for the host between layers; the host waits for that stream alone, never
    for the products. (The two streams share the GPU: the float64 factorizations and the products
    take about the sum of their times together, so more factorization streams gain nothing.)"""

    def __init__(self, device, half: bool = False):
        import torch

        self.stream, self.half = None, half
        if device.type == "cuda":
            self.main = torch.cuda.current_stream(device)
            self.stream = torch.cuda.Stream(device)
            self.stream.wait_stream(self.main)  # the factors are complete

    def start(self, factors: list):
        """Starts the whiteners of `factors` [(moment, columns)]: a ticket for `finish`."""
        import torch

        def build() -> dict:
            return {id(moment): _Whitener(moment, moment.n, columns, half=self.half)
                    for moment, columns in factors}

        if self.stream is None:
            return build(), None, None
        with torch.cuda.stream(self.stream):
            whiteners = build()
            dense = [w.info for w in whiteners.values() if w.info is not None]
            infos = torch.empty(len(dense), dtype=torch.int32, pin_memory=True)
            if dense:
                infos.copy_(torch.stack(dense), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return whiteners, infos, done

    def finish(self, ticket) -> dict:
        """The whiteners, ready for use on the current stream (a failed factorization redone)."""
        whiteners, infos, done = ticket
        if done is None:
            _repair(whiteners)
            return whiteners
        done.synchronize()
        self.main.wait_event(done)
        for w in whiteners.values():
            w.record_stream(self.main)
        _repair(whiteners, infos.tolist())
        return whiteners


def _damping(mean):
    """λ for a factor of mean eigenvalue `mean`; never 0 (a factor of all zeros: an unused module)."""
    return DAMPING * mean + 1e-20


def _repair(whiteners: dict, infos: list[int] | None = None) -> None:
    """Redoes any factor that was not positive definite in float64 rounding, with 11× the damping.
    `infos`: the factorizations' status, in order, if already on the host (else one wait here)."""
    import torch

    dense = [(k, w) for k, w in whiteners.items() if w.info is not None]
    if not dense:
        return
    if infos is None:
        infos = torch.stack([w.info for _, w in dense]).tolist()
    for (key, w), failed in zip(dense, infos, strict=True):
        if failed:
            again = _Whitener(w.factor, w.n, w.columns, boost=11.0, half=w.half)
            if int(again.info):
                raise RuntimeError(f"a probe factor is not positive definite even damped (width {w.width})")
            whiteners[key] = again


def _lower_inverse(lower, block: int = INVERSE_BLOCK, merge=None):
    """L⁻¹ of a lower-triangular L, bottom up: the diagonal blocks (at most `block` wide) are inverted
    by one batched triangular solve, then the inverted blocks are merged in pairs, [[A, 0], [B, C]]⁻¹
    = [[A⁻¹, 0], [-C⁻¹BA⁻¹, C⁻¹]], every pair of a level by the same two batched products: a few dozen
    kernels in all, where a triangular solve of the whole runs hundreds of small ones. `merge`: the
    dtype of the merges' products and of the result (default L's); the diagonal blocks are always
    inverted in L's. L is padded with an identity to blocks × 2^levels (fewer than 2^levels extra
    rows). A column-major L (what Cholesky returns) is inverted as the row-major upper-triangular Lᵀ
    that its storage holds, and L⁻¹ comes back column-major, as the transpose of (Lᵀ)⁻¹: no copy
    either way."""
    import torch

    n = lower.shape[0]
    levels = math.ceil(math.log2(n / block)) if n > block else 0
    size = -(-n // (1 << levels))  # the diagonal blocks' width
    total = size << levels
    upper = total == n and not lower.is_contiguous() and lower.mT.is_contiguous()
    if upper:
        t = lower.mT
    elif total == n:
        t = lower.contiguous()  # the views below assume row-major storage
    else:
        t = torch.eye(total, dtype=lower.dtype, device=lower.device)
        t[:n, :n] = lower
    out = torch.zeros_like(t, dtype=merge or t.dtype)

    def blocks(x, width: int, off: bool, step: int):
        """Views of x's diagonal blocks of `width` (`off`: the blocks beside them, below for a lower
        x, above for an upper one), every `step`-th."""
        stride = width * (total + 1) * step
        offset = x.storage_offset() + ((width if upper else width * total) if off else 0)
        return x.as_strided((total // (width * step), width, width), (stride, total, 1), offset)

    blocks(out, size, False, 1).copy_(torch.linalg.solve_triangular(
        blocks(t, size, False, 1), torch.eye(size, dtype=lower.dtype, device=lower.device), upper=upper))
    t = t.to(out.dtype)  # a copy only when the merges are in another dtype
    width = size
    while width < total:
        inverses, beside = blocks(out, width, False, 1), blocks(t, width, True, 2)
        a, c = inverses[0::2], inverses[1::2]  # [[A, B], [0, C]]⁻¹ has -A⁻¹BC⁻¹ above for an upper t
        torch.neg(a @ (beside @ c) if upper else c @ (beside @ a), out=blocks(out, width, True, 2))
        width *= 2
    if upper:
        out = out.mT
    return out if total == n else out[:n, :n]


@dataclass
class _Pending:
    """A module's signal still on the device: ⟨M₁, M₂⟩, ‖M̄‖² and the cross-Gram C (fp32)."""

    info: object
    signal: object = None
    naive: object = None
    cross: object = None


def _signal(info, stats: _Stats, input_whitener: _Whitener | None, output_whitener: _Whitener | None) -> _Pending:
    """M = W_S · G · W_Aᵀ for both folds at once, laid out (out, FOLDS, in): the output side whitens
    an (out × FOLDS·in) matrix and the input side a (FOLDS·out × in) one, two plain products. Folds
    summed in half precision are whitened in bf16 on the tensor cores (fp32 sums): each product's
    rounding belongs to one fold, like the folds' own, and only adds noise that the cross product
    cancels; the whitening matrices are rounded once (see _Whitener)."""
    import torch

    if input_whitener is None or output_whitener is None or any(f is None for f in stats.folds):
        return _Pending(info)
    out, inp = stats.folds[0].shape
    half = stats.folds[0].dtype in (torch.bfloat16, torch.float16)
    m = torch.stack(stats.folds, dim=1)  # one copy, in the folds' precision
    m = m.to(torch.bfloat16) if half else m.float()
    m = output_whitener.left(m.view(out, FOLDS * inp), inplace=True)
    if half:
        m = m.to(torch.bfloat16)
    m = input_whitener.right(m.view(out * FOLDS, inp), inplace=True).view(out, FOLDS, inp)
    both = torch.linalg.vector_norm(m, dtype=torch.float32).square()  # ‖M₁‖² + ‖M₂‖²
    if half:
        m = m.to(torch.bfloat16)
    m1, m2 = m[:, 0], m[:, 1]
    if out < inp:  # the spectrum lives on the smaller side
        m1, m2 = m1.T, m2.T
    cross = _cross(m1, m2)
    del m, m1, m2
    signal = cross.diagonal().sum()  # ⟨M₁, M₂⟩ = tr(M₁ᵀM₂) = tr C
    return _Pending(info, signal, (both + 2 * signal) / 4, cross)  # naive: ‖(M₁ + M₂)/2‖²


def _cross(m1, m2):
    """C = (M₁ᵀM₂ + M₂ᵀM₁)/2 for the tall folds M₁, M₂: one product, as small as the weight's smaller
    side, with fp32 sums. bf16 folds multiply on the tensor cores: rounded whitened folds (see
    _signal) add only noise, each fold's own, which the cross product cancels, and bias nothing."""
    x = _mm32(m1.T, m2)
    return (x + x.T).mul_(0.5)


def _spectrum_matrices(crosses: list, sketches: dict):
    """Matrices whose eigenvalues are those of the cross-Grams C (n × n, the same n for all), in
    stacked chunks: C itself up to EXACT_MAX columns, else QᵀCQ for an orthonormal Q whose first SKETCH
    columns span C's dominant eigenvectors (subspace iteration, POWER power steps) and whose
    KRYLOV_STEPS blocks of KRYLOV_BLOCK columns extend it by a block Krylov space [CΩ, C²Ω, …] (the
    spectrum's ends, the noise floor's edge among them). The Ritz steps run on a batch of C at once,
    RITZ_BYTES of them at a time, each batch yielded as it is enqueued; `crosses` is emptied as they go
    (each C is freed once used)."""
    import torch

    n, top = crosses[0].shape[0], SKETCH + KRYLOV_BLOCK * KRYLOV_STEPS
    if n <= EXACT_MAX or n <= top:
        out = torch.stack(crosses)
        crosses.clear()
        yield out
        return
    device, dtype = crosses[0].device, crosses[0].dtype
    key = (n, device, dtype)
    if key not in sketches:  # one Gaussian start per width, the same for every module
        generator = torch.Generator(device=device).manual_seed(0)
        sketches[key] = torch.randn(n, SKETCH + KRYLOV_BLOCK, generator=generator, device=device, dtype=dtype)
    start = sketches[key]
    chunk = max(1, RITZ_BYTES // (4 * n * (n + 5 * top)))  # the Cs and their Ritz work
    while crosses:
        c = torch.stack(crosses[:chunk])
        del crosses[:chunk]
        q = c.new_empty(c.shape[0], n, top)
        z = start[:, :SKETCH]
        for _ in range(POWER + 1):
            z = _orthonormal(c @ z)
        q[..., :SKETCH] = z
        z = start[:, SKETCH:]
        for end in range(SKETCH + KRYLOV_BLOCK, top + 1, KRYLOV_BLOCK):
            z, done = c @ z, q[..., :end - KRYLOV_BLOCK]
            for _ in range(2):  # block Gram-Schmidt against the columns so far, twice for orthogonality
                z = z - done @ (done.transpose(1, 2) @ z)
            z = q[..., end - KRYLOV_BLOCK:end] = _orthonormal(z)
        ritz = q.transpose(1, 2) @ (c @ q)
        del c
        yield (ritz + ritz.transpose(1, 2)) / 2


def _orthonormal(y):
    """Orthonormal bases of the columns of y (..., n, k) by CholeskyQR in float64 (three batched
    kernels, no Householder sweep); a tiny ridge keeps them defined when C has fewer directions than
    y has columns."""
    import torch

    y = y.double()
    gram = y.transpose(-1, -2) @ y
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    diagonal.add_(1e-12 * diagonal.mean(-1, keepdim=True) + 1e-300)
    lower = torch.linalg.cholesky_ex(gram).L
    return torch.linalg.solve_triangular(lower, y.transpose(-1, -2), upper=False).transpose(-1, -2).float()


def _finish(pending: list[_Pending]) -> dict[str, ModuleSignal]:
    """Brings a pass's results back at once: the spectra's matrices batched by size, their
    eigenvalues on the CPU (on a GPU, while the next batch's Ritz steps run)."""
    import torch

    out = {p.info.name: ModuleSignal(p.info.name, p.info.role, p.info.layer, 0.0, 0.0, 0, [])
           for p in pending if p.cross is None}
    live = [p for p in pending if p.cross is not None]
    if not live:
        return out
    scalars = torch.stack([torch.stack([p.signal, p.naive]) for p in live]).double().cpu().tolist()
    spectra, sketches, sizes = {}, {}, [p.cross.shape[0] for p in live]
    with _Eigenvalues() as eigenvalues:
        for size in dict.fromkeys(sizes):
            same = [i for i, n in enumerate(sizes) if n == size]
            crosses = [live[i].cross for i in same]
            for i in same:
                live[i].cross = None
            for matrices in _spectrum_matrices(crosses, sketches):
                eigenvalues.add(same[:len(matrices)], matrices)
                del same[:len(matrices)]
        for index, values in eigenvalues.results():
            spectra.update(zip(index, zip(*_ranks(values), strict=True), strict=True))
    for i, p in enumerate(live):
        out[p.info.name] = ModuleSignal(p.info.name, p.info.role, p.info.layer, *scalars[i], *spectra[i])
    return out


class _Eigenvalues:
    """Eigenvalues, descending, of stacks of small symmetric matrices, labelled by an index list each,
    from a pool of CPU threads with one LAPACK thread each (many times faster on many small matrices
    than one at a time with every thread). From a GPU, each stack is copied to pinned memory without
    waiting and its matrices become tasks, one each, that wait for the copy: the GPU goes on with the
    next stack meanwhile. CPU stacks are decomposed at the end (the Ritz steps that made them wanted
    every thread, which the pool's one-thread setting would take away)."""

    def __enter__(self):
        import torch

        self.parts, self.pool, self.threads = [], None, torch.get_num_threads()
        self.quiet = contextlib.ExitStack()
        return self

    def _open(self):
        if self.pool is None:
            from concurrent.futures import ThreadPoolExecutor

            from ..adapter.analyze import one_thread

            self.quiet.enter_context(one_thread())
            self.pool = self.quiet.enter_context(ThreadPoolExecutor(max(1, self.threads)))
        return self.pool

    def add(self, index: list, matrices) -> None:
        import torch

        if not matrices.is_cuda:
            self.parts.append((index, matrices))
            return
        pool = self._open()
        host = torch.empty(matrices.shape, dtype=matrices.dtype, pin_memory=True)
        host.copy_(matrices, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def decompose(k: int):
            copied.synchronize()
            return torch.linalg.eigvalsh(host[k:k + 1].double()).flip(-1)

        self.parts.extend(([i], pool.submit(decompose, k)) for k, i in enumerate(index))

    def results(self):
        """(index, eigenvalues) pairs, in the order added."""
        import torch

        for index, part in self.parts:
            if isinstance(part, torch.Tensor):
                chunks = part.double().chunk(min(self.threads, len(part)))
                yield index, torch.cat(list(self._open().map(torch.linalg.eigvalsh, chunks))).flip(-1)
            else:
                yield index, part.result()

    def __exit__(self, *exc):
        self.quiet.close()


def _ranks(values) -> tuple[list[int], list[list[float]]]:
    """For each row of cross-Gram eigenvalues (descending): the directions holding ENERGY of the
    signal, after the noise floor (the most negative eigenvalue's magnitude) is taken off each; and
    the top of that spectrum (at most 32 values)."""
    import torch

    floor = (-values.min(-1, keepdim=True).values).clamp_min(0)
    kept = (values - floor).clamp_min(0)
    total = kept.sum(-1, keepdim=True)
    ranks = torch.where(total[:, 0] > 0, (kept.cumsum(-1) / total < ENERGY).sum(-1) + 1, 0).tolist()
    tops = [[round(v, 8) for v in row if v > 0] for row in kept[:, :32].tolist()]
    return ranks, tops


def _roles(signals: list[ModuleSignal]) -> list[RoleSignal]:
    total = sum(max(m.signal, 0.0) for m in signals) or 1.0
    out = []
    for role in dict.fromkeys(m.role for m in signals):
        members = [m for m in signals if m.role == role]
        share = sum(max(m.signal, 0.0) for m in members) / total
        layers = {}
        role_total = sum(max(m.signal, 0.0) for m in members) or 1.0
        for m in members:
            if m.layer is not None:
                layers[m.layer] = layers.get(m.layer, 0.0) + max(m.signal, 0.0) / role_total
        out.append(RoleSignal(role, share, _weighted_median([m.rank for m in members],
                                                           [max(m.signal, 0.0) for m in members]),
                              len(members), layers))
    return sorted(out, key=lambda r: -r.share)


def _weighted_median(values: list[int], weights: list[float]) -> int:
    pairs = sorted(zip(values, weights, strict=True))
    total = sum(w for _, w in pairs)
    if total <= 0:
        return sorted(values)[len(values) // 2] if values else 0
    acc = 0.0
    for v, w in pairs:
        acc += w
        if acc >= total / 2:
            return v
    return pairs[-1][0]


def plan_from_signals(result: ProbeResult, structure, examples: int | None = None) -> LoraPlan | None:
    """Targets: the fewest roles holding COVER of the signal. Rank: the next power of two at or above
    their rank estimates, capped by the dataset-size rule of thumb (seed 000)."""
    roles = [r for r in result.roles if r.share > 0]
    if not roles:
        return None
    chosen, acc = [], 0.0
    for r in roles:
        chosen.append(r)
        acc += r.share
        if acc >= COVER:
            break
    rank = max(1, max(r.rank for r in chosen))
    r = 1 << (rank - 1).bit_length()
    reasons = [
        Reason("targets", f"{', '.join(x.role for x in chosen)} hold {acc:.0%} of the whitened gradient signal "
                          f"({', '.join(f'{x.role} {x.share:.0%}' for x in roles[:6])})",
               "K-FAC natural-gradient energy (Martens & Grosse 2015)"),
        Reason("r", f"r={r}: {ENERGY:.0%} of each chosen module's signal lies in ≤{rank} directions "
                    f"(signal-weighted median: {', '.join(f'{x.role} {x.rank}' for x in chosen)})"),
    ]
    if examples is not None:
        cap = 8 if examples < 1000 else 16 if examples < 10000 else 32 if examples < 100000 else 64
        if r > cap:
            reasons.append(Reason("r", f"capped at r={cap} for {examples:,} examples (seed rule of thumb: "
                                       "a rank above what the data can fill fits noise)"))
            r = cap
    reasons.append(Reason("lora_alpha", f"alpha = r = {r}: the scale stays 1 whatever r is"))
    return LoraPlan(targets=",".join(x.role for x in chosen), r=r, use_rslora=r >= 16,
                    reasons=tuple(reasons))

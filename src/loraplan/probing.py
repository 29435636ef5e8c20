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
M₁ and M₂ (exact up to EXACT_MAX columns, in a random sketch beyond) estimates the spectrum the same
way, and its most negative eigenvalue gives the noise floor below which directions are not counted.

Cost: one forward/backward per batch (per layer group when the statistics do not fit in memory).
Modules reading the same input (q/k/v, gate/up) share one input factor; whitening uses the inverse
Cholesky factor, not an eigendecomposition (same ⟨M₁, M₂⟩); factors wider than DENSE_MAX keep only
their diagonal — a per-channel whitening, which is not equivalent and is not what the planted tasks
validate; each fold's gradient is summed by autograd in the weights' dtype.

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

from .errors import UsageError
from .plan import LoraPlan, Reason

FOLDS = 2
SKETCH = 64  # columns of the random sketch for the spectrum of wide modules
EXACT_MAX = 256  # up to this many columns the cross-Gram is exact (its eigendecomposition is cheap)
ENERGY = 0.9  # rank = directions holding this share of a module's signal
COVER = 0.8  # the plan's targets hold this share of the total signal
DAMPING = 1e-2  # Tikhonov damping of each Kronecker factor, relative to its mean eigenvalue
DENSE_MAX = 8192  # wider factors are kept as their diagonal


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
          trust_remote_code: bool = False, progress: bool = False) -> ProbeResult:
    """Probe MODEL on DATA: `loraplan probe` as a function."""
    from .ablation.batches import training_steps
    from .data import load_data
    from .sources import load_model, load_structure, load_tokenizer

    if batches < 2 * FOLDS:
        raise UsageError(f"--batches must be at least {2 * FOLDS} (the noise estimate splits them)", "e.g. --batches 8")
    structure = load_structure(model, trust_remote_code=trust_remote_code)
    modules = _candidates(structure, targets)
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    splits = load_data(data, tokenizer, fmt=fmt, max_length=max_length, seed=seed)
    steps = training_steps(splits.train, batches, batch_size, None, seed)
    net = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    result = probe_batches(net, structure, modules, [s[0] for s in steps], tokenizer.pad_token_id,
                           progress=progress)
    result.model, result.data = model, data
    result.plan = plan_from_signals(result, structure, examples=len(splits.train))
    return result


def _candidates(structure, targets: str):
    from .targets import resolve_targets

    resolved = resolve_targets(structure, targets)
    modules = [m for m in resolved.modules if m.kind in ("linear", "conv1d") and m.role != "lm_head"]
    if not modules:
        raise UsageError(f"'{targets}' selects no Linear layers to probe",
                         "the probe covers Linear/Conv1D weights (MoE expert parameters and embeddings are not probed)")
    return modules


def probe_batches(net, structure, modules, batches, pad_id: int, progress: bool = False,
                  memory_budget: int | None = None, checkpointing: bool | None = None) -> ProbeResult:
    """The probe proper, on a loaded model and a list of micro-batches. When the statistics of all
    layers do not fit in `memory_budget` bytes (default: on a GPU, what the activations of the longest
    batch leave free; 8 GiB on a CPU), layers are probed in groups, one pass over the batches per group.
    The batches split into FOLDS contiguous folds; each fold's gradient is summed where autograd puts
    it (in the weights' dtype). `checkpointing` (default: on a GPU, when the model supports it)
    recomputes each layer's activations in the backward pass, so the statistics get the memory the
    activations would have taken: one more forward per batch, fewer passes, a lower peak."""
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
    if checkpointing is None:
        checkpointing = device.type == "cuda"
    try:
        with _attention_kernels(device), _checkpointed(net, checkpointing):
            if memory_budget is None:
                memory_budget = _default_budget(net, modules, batches, pad_id, grad_bytes)
            passes = _passes(modules, memory_budget, grad_bytes)
            for k, group in enumerate(passes):
                signals.update(_probe_layers(net, by_name, group, batches, pad_id, device, fold_of,
                                             f"{k + 1}/{len(passes)}" if progress else None))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    tokens = sum(mb.tokens for mb in batches)
    ordered = [signals[m.name] for m in modules]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    result = ProbeResult(model="", data="", batches=len(batches), tokens=tokens, seconds=round(time.time() - t0, 3),
                         peak_memory_bytes=peak, modules=ordered, roles=_roles(ordered), plan=None)
    if len(passes) > 1:
        result.notes.append(f"{len(passes)} passes over the batches (layer groups) to fit the statistics in memory")
    wide = sorted({d for m in modules for d in (m.in_features, m.out_features) if d > DENSE_MAX})
    if wide:
        result.notes.append(f"factors wider than {DENSE_MAX} ({', '.join(map(str, wide))}) are whitened by their "
                            "diagonal (per-channel scale) to bound memory")
    if result.snr < 0.5:
        result.notes.append(f"the gradient signal is weak against its noise (signal/noise {result.snr:.2f}): "
                            "probe more batches before trusting the ranking")
    return result


def _probe_layers(net, by_name, group, batches, pad_id, device, fold_of, label) -> dict[str, ModuleSignal]:
    """One pass over the batches with the statistics of `group`'s modules attached; their signals."""
    inputs = _SharedInputs()
    signals = {}
    stats = {m.name: _Stats(by_name[m.name], m.kind == "conv1d", inputs) for m in group}
    for st in stats.values():
        st.attach()
    try:
        for i, mb in enumerate(batches):
            ids, labels, mask = mb.tensors(device, pad_id)
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
    whiteners: dict[int, _Whitener] = {}  # one per shared input factor
    columns = Counter()  # how many vectors each input factor will whiten: FOLDS × out per reader
    for m in group:
        columns[id(stats[m.name].input)] += FOLDS * m.out_features
    for m in group:
        st = stats[m.name]
        if st.input is not None and id(st.input) not in whiteners:
            whiteners[id(st.input)] = _Whitener(st.input.matrix, st.input.n, columns[id(st.input)])
        signals[m.name] = _signal(m, st, whiteners.get(id(st.input)))
        st.folds = [None] * FOLDS  # free as we go
    return signals


def _no_cache(net) -> dict:
    return {"use_cache": False} if hasattr(net.config, "use_cache") else {}


@contextlib.contextmanager
def _checkpointed(net, enabled: bool):
    """transformers' gradient checkpointing without training mode: only the checkpointed layers say
    `training` (what makes them checkpoint); their submodules stay in eval (no dropout)."""
    if not enabled or not getattr(net, "supports_gradient_checkpointing", False):
        yield
        return
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in net.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m in layers:
            m.training = False
        net.gradient_checkpointing_disable()


def _attention_kernels(device):
    """A few batches of as many shapes: cuDNN's attention would build a plan for each shape, which
    takes longer than the passes themselves, so the probe uses the plan-free kernels."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _factor_bytes(dim: int) -> int:
    return 4 * (dim * dim if dim <= DENSE_MAX else dim)


def _layer_bytes(group, grad_bytes: int) -> int:
    """Statistics of one layer: an input factor per distinct input (q/k/v read the same one, as do
    gate/up), an output factor and FOLDS fold gradients per module."""
    inputs = {(m.in_features, m.role in ("q", "k", "v"), m.role in ("gate", "up")) for m in group}
    size = sum(_factor_bytes(dim) for dim, *_ in inputs)
    return size + sum(_factor_bytes(m.out_features) + FOLDS * grad_bytes * m.in_features * m.out_features
                      for m in group)


def _whitening_bytes(group) -> int:
    """Temporaries of the whitening, one module at a time: the folds in fp32, their whitened copies,
    and a float64 factor with its Cholesky factor and inverse."""
    return max(4 * 3 * FOLDS * m.in_features * m.out_features
               + 24 * max(min(m.in_features, DENSE_MAX), min(m.out_features, DENSE_MAX)) ** 2 for m in group)


def _default_budget(net, modules, batches, pad_id: int, grad_bytes: int) -> int:
    """On a GPU: everything the probe's statistics may take. If all layers fit in half the free memory,
    that is it; otherwise the activations of the longest batch are measured (a forward and backward
    without statistics) and the statistics get what they leave, less a 10% margin."""
    import torch

    device = next(net.parameters()).device
    if device.type != "cuda":
        return 8 << 30
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # the allocator's cache
    if sum(_layer_bytes([m], grad_bytes) for m in modules) + _whitening_bytes(modules) <= free // 2:
        return free // 2
    longest = max(batches, key=lambda mb: len(mb.input_ids) * max(map(len, mb.input_ids)))  # padded size
    ids, labels, mask = longest.tensors(device, pad_id)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    embeddings = net.get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda module, args, output: output.requires_grad_())
    try:
        net(input_ids=ids, attention_mask=mask, labels=labels, **_no_cache(net)).loss.backward()
    finally:
        hook.remove()
    activations = torch.cuda.max_memory_allocated(device) - base
    torch.cuda.reset_peak_memory_stats(device)
    return max(int(0.9 * free) - activations, 0)


def _passes(modules, budget: int, grad_bytes: int) -> list[list]:
    """Whole layers per pass, as many as fit the budget (a layer alone always gets a pass)."""
    layers: dict = {}
    for m in modules:
        layers.setdefault(m.layer, []).append(m)
    passes, current, used = [], [], 0
    for group in layers.values():
        size = _layer_bytes(group, grad_bytes)
        if current and used + size + _whitening_bytes(current + group) > budget:
            passes.append(current)
            current, used = [], 0
        current.extend(group)
        used += size
    if current:
        passes.append(current)
    return passes


class _Moment:
    """E[x xᵀ] of a stream of row vectors, summed in fp32: the full matrix up to DENSE_MAX wide, its
    diagonal beyond (a 14336-wide matrix would be 0.8 GB per module)."""

    def __init__(self):
        self.matrix = None
        self.n = 0
        self.batch = -1  # the last batch added

    def add(self, x, batch: int):
        """Adds batch `batch`'s rows, once: a checkpointed layer runs its forward (and hooks) twice."""
        if batch == self.batch:
            return
        self.batch = batch
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[1] > DENSE_MAX:
            update = x.pow(2).sum(0)
            self.matrix = update if self.matrix is None else self.matrix.add_(update)
        else:
            self.matrix = x.T @ x if self.matrix is None else self.matrix.addmm_(x.T, x)
        self.n += x.shape[0]


class _SharedInputs:
    """Modules that read the same tensor object (q/k/v, gate/up) share one input factor: the first
    module to see a tensor adds it to its moment, the others point at that moment. Tensors are told apart by identity, through
    weak references: a freed tensor's id or memory may be reused by the next layer's input."""

    def __init__(self):
        self.seen: dict = {}  # id(tensor) -> (weak reference, _Moment), for the current batch
        self.batch = 0

    def read(self, x, own: _Moment | None) -> _Moment:
        entry = self.seen.get(id(x))
        if entry is not None and entry[0]() is x:
            return entry[1]
        moment = own or _Moment()
        moment.add(x.detach(), self.batch)
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
        self.output.add(grad.detach(), self.inputs.batch)

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
    eigendecomposition. Applied to `columns` vectors in all, it is inverted once and applied as a
    TF32 product when they are at least as many as its width (q/k/v's shared input, a narrow output
    of a wide module), or else applied by a float64 triangular solve (fewer flops than inverting)."""

    def __init__(self, matrix, n: int, columns: int = 0):
        import torch

        f = matrix.double() / max(n, 1)
        self.diagonal = self.cholesky = self.inverse = None
        if f.dim() == 1:
            self.diagonal = (f.clamp_min(0) + DAMPING * f.clamp_min(0).mean()).rsqrt().float()
            return
        damping = DAMPING * f.diagonal().clamp_min(0).mean()
        f.diagonal().add_(damping)
        cholesky, info = torch.linalg.cholesky_ex(f)
        if int(info):  # not positive definite in float64 rounding: damp further
            f.diagonal().add_(damping * 10)
            cholesky = torch.linalg.cholesky(f)
        if columns >= f.shape[0]:
            identity = torch.eye(f.shape[0], dtype=f.dtype, device=f.device)
            self.inverse = torch.linalg.solve_triangular(cholesky, identity, upper=False).float()
        else:
            self.cholesky = cholesky

    def left(self, g):
        """W · g (g may carry a leading batch dimension)"""
        import torch

        if self.diagonal is not None:
            return self.diagonal[:, None] * g
        if self.inverse is not None:
            return self.inverse @ g
        return torch.linalg.solve_triangular(self.cholesky, g.double(), upper=False).float()

    def right(self, g):
        """g · Wᵀ"""
        if self.diagonal is not None:
            return g * self.diagonal
        return self.left(g.transpose(-1, -2)).transpose(-1, -2)


def _signal(info, stats: _Stats, input_whitener: _Whitener | None) -> ModuleSignal:
    import torch

    if input_whitener is None or stats.output.matrix is None or any(f is None for f in stats.folds):
        return ModuleSignal(info.name, info.role, info.layer, 0.0, 0.0, 0, [])
    output_whitener = _Whitener(stats.output.matrix, stats.output.n, FOLDS * info.in_features)
    m1, m2 = input_whitener.right(output_whitener.left(torch.stack(stats.folds).float()))
    signal = float((m1 * m2).sum())
    naive = float(((m1 + m2) / 2).pow(2).sum())
    if m1.shape[0] < m1.shape[1]:  # the spectrum lives on the smaller side
        m1, m2 = m1.T, m2.T
    if m1.shape[1] <= EXACT_MAX:
        p1, p2 = m1, m2
    else:
        generator = torch.Generator(device=m1.device).manual_seed(0)
        omega = torch.randn(m1.shape[1], SKETCH, generator=generator, device=m1.device, dtype=m1.dtype)
        p1, p2 = m1 @ omega / math.sqrt(SKETCH), m2 @ omega / math.sqrt(SKETCH)
    cross = (p1.T @ p2 + p2.T @ p1).double() / 2
    eigenvalues = torch.linalg.eigvalsh(cross).flip(0)
    floor = max(-float(eigenvalues.min()), 0.0)
    kept = (eigenvalues - floor).clamp_min(0)
    total = float(kept.sum())
    rank = int((kept.cumsum(0) / total < ENERGY).sum()) + 1 if total > 0 else 0
    spectrum = [round(float(v), 8) for v in kept[kept > 0][:32]]
    return ModuleSignal(info.name, info.role, info.layer, signal, naive, rank, spectrum)


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

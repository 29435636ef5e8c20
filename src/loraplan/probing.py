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
M₁ and M₂ in a random sketch estimates the spectrum the same way, and its most negative eigenvalue
gives the noise floor below which directions are not counted.

Validated on planted tasks (benchmarks/probe/RESULTS.md), including where it fails: the gradient at
the base measures the first steps, not what an adapter can finally reach, and the MLP (down_proj
above all) can compensate at first order for changes planted in attention.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field

from .errors import UsageError
from .plan import LoraPlan, Reason

FOLDS = 2
SKETCH = 64  # columns of the random sketch for the spectrum
ENERGY = 0.9  # rank = directions holding this share of a module's signal
COVER = 0.8  # the plan's targets hold this share of the total signal
DAMPING = 1e-2  # Tikhonov damping of each Kronecker factor, relative to its mean eigenvalue


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
            "method": "K-FAC-whitened gradient energy, split-half unbiased, sketched spectrum",
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
                  memory_budget: int | None = None) -> ProbeResult:
    """The probe proper, on a loaded model and a list of micro-batches. The statistics of big models
    do not fit at once (a 14336-wide factor is 0.8 GB in fp32): layers are then probed in groups,
    one pass over the batches per group, within `memory_budget` bytes (default: a third of the free
    GPU memory, or 8 GiB on a CPU)."""
    import torch

    device = next(net.parameters()).device
    by_name = dict(net.named_modules())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    net.eval()  # no dropout: the gradient of the model as it is
    net.requires_grad_(False)
    passes = _passes(modules, memory_budget or _default_budget(device))
    signals: dict[str, ModuleSignal] = {}
    tokens = 0
    for k, group in enumerate(passes):
        stats = {m.name: _Stats(by_name[m.name], m.kind == "conv1d") for m in group}
        for st in stats.values():
            st.attach()
        try:
            for i, mb in enumerate(batches):
                ids, labels, mask = mb.tensors(device, pad_id)
                if k == 0:
                    tokens += int(mask.sum())
                loss = net(input_ids=ids, attention_mask=mask, labels=labels,
                           num_items_in_batch=max(mb.supervised, 1)).loss
                loss.backward()
                for st in stats.values():
                    st.end_batch(i % FOLDS)
                if progress:
                    print(f"probe pass {k + 1}/{len(passes)} batch {i + 1}/{len(batches)}: loss {loss.item():.4f}",
                          file=sys.stderr, flush=True)
        finally:
            for st in stats.values():
                st.detach()
        for m in group:
            signals[m.name] = _signal(m, stats[m.name])
        del stats
    ordered = [signals[m.name] for m in modules]
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    result = ProbeResult(model="", data="", batches=len(batches), tokens=tokens, seconds=round(time.time() - t0, 3),
                         peak_memory_bytes=peak, modules=ordered, roles=_roles(ordered), plan=None)
    if len(passes) > 1:
        result.notes.append(f"{len(passes)} passes over the batches (layer groups) to fit the statistics in memory")
    if result.snr < 0.5:
        result.notes.append(f"the gradient signal is weak against its noise (signal/noise {result.snr:.2f}): "
                            "probe more batches before trusting the ranking")
    return result


def _stats_bytes(m) -> int:
    # two fp32 Kronecker factors, two fp32 fold gradients, and the whitening temporaries
    return 4 * (2 * m.in_features ** 2 + 2 * m.out_features ** 2 + 4 * m.in_features * m.out_features)


def _default_budget(device) -> int:
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 3
    return 8 << 30


def _passes(modules, budget: int) -> list[list]:
    """Whole layers per pass, as many as fit the budget (a layer alone always gets a pass)."""
    layers: dict = {}
    for m in modules:
        layers.setdefault(m.layer, []).append(m)
    passes, current, used = [], [], 0
    for group in layers.values():
        size = sum(_stats_bytes(m) for m in group)
        if current and used + size > budget:
            passes.append(current)
            current, used = [], 0
        current.extend(group)
        used += size
    if current:
        passes.append(current)
    return passes


class _Stats:
    """Per module: the input and output-gradient second moments (the K-FAC factors) and the weight
    gradient of each fold."""

    def __init__(self, module, transposed: bool):
        self.module = module
        self.transposed = transposed  # transformers Conv1D stores the weight as (in, out)
        self.a = self.s = None
        self.n = 0
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
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        self.a = x.T @ x if self.a is None else self.a.addmm_(x.T, x)
        self.n += x.shape[0]
        output.register_hook(self._backward)

    def _backward(self, grad):
        g = grad.detach().reshape(-1, grad.shape[-1]).float()
        self.s = g.T @ g if self.s is None else self.s.addmm_(g.T, g)

    def end_batch(self, fold: int):
        grad = self.module.weight.grad
        if grad is None:
            return
        grad = grad.detach().float()
        if self.transposed:
            grad = grad.T
        self.folds[fold] = grad if self.folds[fold] is None else self.folds[fold].add_(grad)
        self.module.weight.grad = None


def _inverse_sqrt(matrix):
    """(F + λI)^-1/2 of a symmetric PSD factor, λ = DAMPING × its mean eigenvalue."""
    import torch

    eigenvalues, vectors = torch.linalg.eigh(matrix.double())
    damping = DAMPING * eigenvalues.clamp_min(0).mean()
    return ((vectors * (eigenvalues.clamp_min(0) + damping).rsqrt()) @ vectors.T).float()


def _signal(info, stats: _Stats) -> ModuleSignal:
    import torch

    if stats.a is None or stats.s is None or any(f is None for f in stats.folds):
        return ModuleSignal(info.name, info.role, info.layer, 0.0, 0.0, 0, [])
    left = _inverse_sqrt(stats.s / stats.n)
    right = _inverse_sqrt(stats.a / stats.n)
    m1, m2 = (left @ f @ right for f in stats.folds)
    signal = float((m1 * m2).sum())
    naive = float(((m1 + m2) / 2).pow(2).sum())
    generator = torch.Generator(device=m1.device).manual_seed(0)
    q = min(SKETCH, m1.shape[1])
    omega = torch.randn(m1.shape[1], q, generator=generator, device=m1.device) / math.sqrt(q)
    p1, p2 = m1 @ omega, m2 @ omega
    cross = (p1.T @ p2 + p2.T @ p1) / 2
    eigenvalues = torch.linalg.eigvalsh(cross.double()).flip(0)
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

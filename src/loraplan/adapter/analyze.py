"""What a trained adapter learned: the singular values of every ΔW = scaling·B·A, how many
directions it really uses, which modules moved, and how two adapters' subspaces overlap.

Never the dense d×k matrix: with B = Q_B R_B and Aᵀ = Q_A R_A (orthogonal × r×r),
ΔW = scaling · Q_B (R_B R_Aᵀ) Q_Aᵀ, so the SVD of the r×r core gives ΔW's singular values and,
through Q_B and Q_A, its singular vectors. The factors come from r×r Gram matrices (one matrix
product each), so the work per weight grows with (d + k)·r², never with d·k: a CPU is enough.

Per weight (per expert for MoE expert parameters):
- energy rank at p: the smallest k with Σ_{i≤k} σ_i² ≥ p·Σ σ_i² (the rank a truncation to p of
  the update's squared Frobenius norm needs; PEFT's convert_to_lora threshold);
- stable rank ‖ΔW‖_F² / σ_1² (Rudelson & Vershynin 2007);
- entropy effective rank exp(H(p)), p_i = σ_i / Σ σ_j (Roy & Vetterli 2007);
- with the base, ‖ΔW‖_F / ‖W‖_F: how far the weight moved.
Subspace similarity between adapters is the LoRA paper's (Hu et al. 2021, §7.2):
φ(A₁, A₂, i, j) = ‖U_{A₁}^{(i)ᵀ} U_{A₂}^{(j)}‖_F² / min(i, j), U_A the right-singular vectors of A.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError, listing
from ..model.roles import ROLES
from .folder import AdaptedWeight, Adapter, check_fits, read_adapter

ENERGY_LEVELS = (0.9, 0.95, 0.99)
# "uses k directions": the energy rank at 90% in 90% of the weights (a nearest-rank percentile),
# so that a few outlier modules do not decide the verdict for the whole adapter.
USAGE_ENERGY, USAGE_QUANTILE = 0.9, 0.9
# A role "carries most of the update" when its share of Σ‖ΔW‖_F² is at least this and at least
# 1.5× its share of the adapted weights (a role with half the weights holding half is no news).
CARRIES_SHARE, CARRIES_OVER = 0.4, 1.5
# Subspaces "partly overlap" when φ is at least this far from chance toward 1 ((φ − random)/(1 − random)),
# "overlap" past one half.
PARTLY_OVERLAP = 0.15
# A weight "barely moved" when ‖ΔW‖/‖W‖ is under a tenth of the adapter's median: relative to the
# adapter itself, because the absolute level depends on learning rate and steps.
BARELY_MOVED = 0.1


# -- the numerics -------------------------------------------------------------------------------


# Gram eigenvalues below this share of the largest are zero: float64 holds λ to ~1e-16·λ_max, so
# singular values under ~1e-7·σ_max of a factor are rounding (bf16/fp32 adapters store 3–7 digits).
GRAM_RTOL = 1e-14


@contextmanager
def one_thread():
    """Torch's CPU kernels on one thread while inside. The whole analysis is O(m·r²) work in many
    small calls (r×r eigh/SVD, m×r Gram products): one thread does an 8B r=64 adapter in ~5 s, while
    OpenMP workers spinning on a busy CPU made the same calls 5–100× slower in measurements. (The
    probe's eigenvalues use it too, one small matrix per worker thread.)"""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _eig_descending(gram):
    """(V, Λ^½, Λ^-½) of a batch of PSD Gram matrices, largest first; eigenvalues under GRAM_RTOL
    of the largest count as zero (their Λ^-½ is 0, so they drop out instead of blowing up)."""
    import torch

    lam, vec = torch.linalg.eigh(gram)
    lam, vec = lam.flip(-1).clamp_min(0), vec.flip(-1)
    keep = lam > lam[..., :1] * GRAM_RTOL
    root = torch.where(keep, lam.sqrt(), torch.zeros_like(lam))
    inverse = torch.where(keep, 1 / torch.where(keep, root, torch.ones_like(root)), torch.zeros_like(root))
    return vec, root, inverse


def orthogonal_factor(x, with_q: bool = True):
    """x = Q R for a batch of tall x (E, m, r): Q (E, m, r) with orthonormal (or zero) columns,
    R (E, r, r). From the r×r Gram matrix xᵀx = V Λ Vᵀ: R = Λ^½ Vᵀ and Q = x V Λ^-½ — one BLAS-3
    product instead of a Householder QR of the tall matrix, several times faster on a CPU. Q's
    columns are x's left singular vectors, largest first. Without `with_q`, Q is None."""
    vec, root, inverse = _eig_descending(x.transpose(-1, -2) @ x)
    r = root.unsqueeze(-1) * vec.transpose(-1, -2)
    return ((x @ vec) * inverse.unsqueeze(-2) if with_q else None), r


def delta_svd(b, a, scaling: float = 1.0, vectors: bool = True):
    """SVD of ΔW = scaling · B·A for a batch, without forming ΔW.

    b: (E, out, r), a: (E, r, in). With B = Q_B R_B and Aᵀ = Q_A R_A, ΔW = scaling·Q_B (R_B R_Aᵀ) Q_Aᵀ
    and the SVD of the r×r core gives all of it. Returns U (E, out, k), S (E, k) descending,
    V (E, in, k), k = min(r, out, in), ΔW_e = U_e diag(S_e) V_eᵀ; U and V are None without `vectors`.
    """
    import torch

    k = min(b.shape[-1], b.shape[-2], a.shape[-1])
    q_b, r_b = orthogonal_factor(b, vectors)
    q_a, r_a = orthogonal_factor(a.transpose(-1, -2), vectors)
    core = r_b @ r_a.transpose(-1, -2)
    if not vectors:
        return None, torch.linalg.svdvals(core)[..., :k] * abs(scaling), None
    u, s, vh = torch.linalg.svd(core)
    return (q_b @ u)[..., :k], s[..., :k] * abs(scaling), (q_a @ vh.transpose(-1, -2))[..., :k]


def right_singular_vectors(a):
    """V of A = U S Vᵀ for a batch a: (E, r, in) -> (E, in, min(r, in)), best direction first.
    (AAᵀ = U S² Uᵀ, so V = Aᵀ U S⁻¹: `orthogonal_factor` of Aᵀ.)"""
    q, _ = orthogonal_factor(a.transpose(-1, -2))
    return q[..., :min(a.shape[-2], a.shape[-1])]


def pair_overlaps(b1, a1, b2, a2):
    """U₁ᵀU₂ for two adapters' A row spaces (right-singular vectors, LoRA §7.2) and for their ΔW
    column spaces, from r×r Gram and cross-Gram products only: with Q = X V Λ^-½ for both,
    Q₁ᵀQ₂ = Λ₁^-½ V₁ᵀ (X₁ᵀX₂) V₂ Λ₂^-½ — the d×r singular vectors are never formed."""
    import torch

    va1, ra1, ia1 = _eig_descending(a1 @ a1.transpose(-1, -2))
    va2, ra2, ia2 = _eig_descending(a2 @ a2.transpose(-1, -2))
    vb1, rb1, ib1 = _eig_descending(b1.transpose(-1, -2) @ b1)
    vb2, rb2, ib2 = _eig_descending(b2.transpose(-1, -2) @ b2)

    def cross(v1, i1, product, v2, i2):
        return (i1.unsqueeze(-1) * v1.transpose(-1, -2)) @ product @ (v2 * i2.unsqueeze(-2))

    over_a = cross(va1, ia1, a1 @ a2.transpose(-1, -2), va2, ia2)
    over_b = cross(vb1, ib1, b1.transpose(-1, -2) @ b2, vb2, ib2)
    # ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ: its left singular vectors are Q_B times the core's
    core1 = (rb1.unsqueeze(-1) * vb1.transpose(-1, -2)) @ (va1 * ra1.unsqueeze(-2))
    core2 = (rb2.unsqueeze(-1) * vb2.transpose(-1, -2)) @ (va2 * ra2.unsqueeze(-2))
    u1, u2 = torch.linalg.svd(core1)[0], torch.linalg.svd(core2)[0]
    k1 = min(b1.shape[-1], b1.shape[-2], a1.shape[-1])
    k2 = min(b2.shape[-1], b2.shape[-2], a2.shape[-1])
    over_delta = u1.transpose(-1, -2) @ over_b @ u2
    return over_a[..., :min(a1.shape[-2:]), :min(a2.shape[-2:])], over_delta[..., :k1, :k2]


# Elements of B and A stacked into one batched call (float64: 512 MiB at most).
BATCH_BUDGET = 1 << 26


def batches(items, size, budget: int = BATCH_BUDGET):
    """Items of one shape in runs of at most `budget` elements: one batched linear-algebra call per
    run is many times faster than one per weight (above all for the r×r eigh/SVD calls, and on a
    busy CPU), and the runs bound the memory."""
    groups: dict = {}
    for item in items:
        groups.setdefault(size(item)[0], []).append(item)
    for group in groups.values():
        run, used = [], 0
        for item in group:
            run.append(item)
            used += size(item)[1]
            if used >= budget:
                yield run
                run, used = [], 0
        if run:
            yield run


def iter_delta_svd(weights: Sequence[AdaptedWeight], vectors: bool = True):
    """(weight, U, S, V) for every weight (per expert, S scaled), weights of one shape batched;
    U and V are None without `vectors`."""
    import torch

    def size(w):
        return (w.out_features, w.in_features, w.r), w.experts * w.r * (w.out_features + w.in_features)

    for run in batches(weights, size):
        with one_thread():
            factors = [w.factors() for w in run]
            u, s, v = delta_svd(torch.cat([f[0] for f in factors]), torch.cat([f[1] for f in factors]),
                                vectors=vectors)
        start = 0
        for w in run:
            part = slice(start, start + w.experts)
            start += w.experts
            yield w, u[part] if vectors else None, s[part] * abs(w.scaling), v[part] if vectors else None


def energy_rank(sigma: Sequence[float], p: float) -> int:
    """Smallest k with Σ_{i≤k} σ_i² ≥ p·Σσ² (0 for a zero matrix)."""
    energies = [s * s for s in sigma]
    total = sum(energies)
    if total <= 0:
        return 0
    running = 0.0
    for k, e in enumerate(energies, 1):
        running += e
        if running >= p * total * (1 - 1e-12):
            return k
    return len(energies)


def stable_rank(sigma: Sequence[float]) -> float:
    """‖ΔW‖_F² / σ_1² (Rudelson & Vershynin 2007); 0 for a zero matrix."""
    top = max(sigma, default=0.0)
    return sum(s * s for s in sigma) / (top * top) if top > 0 else 0.0


def entropy_rank(sigma: Sequence[float]) -> float:
    """exp of the entropy of p_i = σ_i / Σσ (Roy & Vetterli 2007); 0 for a zero matrix."""
    total = sum(sigma)
    if total <= 0:
        return 0.0
    return math.exp(-sum((s / total) * math.log(s / total) for s in sigma if s > 0))


def retained_energy(sigma: Sequence[float], k: int) -> float:
    """Share of Σσ² kept by the top k singular values (1 for a zero matrix)."""
    total = sum(s * s for s in sigma)
    return sum(s * s for s in sigma[:k]) / total if total > 0 else 1.0


def subspace_similarity(u1, u2, rows: Sequence[int], cols: Sequence[int]) -> list[list[float]]:
    """φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j) for i in rows, j in cols (LoRA §7.2);
    u1: (d, r1), u2: (d, r2) with orthonormal columns, best direction first."""
    return phi_grid(u1.transpose(-1, -2) @ u2, rows, cols).tolist()


def phi_grid(overlap, rows: Sequence[int], cols: Sequence[int]):
    """φ(i, j) for i in rows, j in cols from the overlaps U1ᵀU2 (…, r1, r2)."""
    import torch

    cumulative = (overlap ** 2).cumsum(-2).cumsum(-1)
    i = torch.tensor(rows) - 1
    j = torch.tensor(cols) - 1
    return cumulative[..., i[:, None], j[None, :]] / (torch.minimum(i[:, None], j[None, :]) + 1)


# -- one adapter --------------------------------------------------------------------------------


@dataclass
class WeightSpectrum:
    """The spectrum of one ΔW (one expert of a parameter target)."""

    name: str
    role: str
    layer: int | None
    kind: str
    shape: tuple[int, int]  # (out, in)
    r: int
    scaling: float
    sigma: list[float]
    expert: int | None = None
    relative_change: float | None = None  # ‖ΔW‖_F / ‖W‖_F, with the base
    magnitude: dict | None = None  # DoRA magnitude vector statistics

    @property
    def label(self) -> str:
        return self.name if self.expert is None else f"{self.name}[{self.expert}]"

    @property
    def energy(self) -> float:
        """‖ΔW‖_F²."""
        return sum(s * s for s in self.sigma)

    @property
    def norm(self) -> float:
        return math.sqrt(self.energy)

    def energy_rank(self, p: float) -> int:
        return energy_rank(self.sigma, p)

    @property
    def stable_rank(self) -> float:
        return stable_rank(self.sigma)

    @property
    def entropy_rank(self) -> float:
        return entropy_rank(self.sigma)

    def to_json(self) -> dict:
        return {
            "name": self.name, "expert": self.expert, "role": self.role, "layer": self.layer, "kind": self.kind,
            "shape": list(self.shape), "r": self.r, "scaling": self.scaling,
            "norm": self.norm, "relative_change": self.relative_change,
            "energy_rank": {str(p): self.energy_rank(p) for p in ENERGY_LEVELS},
            "stable_rank": self.stable_rank, "entropy_rank": self.entropy_rank,
            "singular_values": self.sigma, "dora_magnitude": self.magnitude,
        }


@dataclass
class GroupSummary:
    """Spectra of the weights of one role, or one layer."""

    key: str
    weights: int
    ranks: list[int]
    energy_rank: dict[float, float]  # median over the weights
    stable_rank: float  # median
    entropy_rank: float  # median
    share: float  # of the adapter's Σ‖ΔW‖_F²
    relative_change: float | None  # median ‖ΔW‖/‖W‖

    def to_json(self) -> dict:
        return {"key": self.key, "weights": self.weights, "ranks": self.ranks,
                "energy_rank_median": {str(p): v for p, v in self.energy_rank.items()},
                "stable_rank_median": self.stable_rank, "entropy_rank_median": self.entropy_rank,
                "energy_share": self.share, "relative_change_median": self.relative_change}


@dataclass
class Verdict:
    kind: str  # rank | carries | barely_moved | untrained | dora | similarity
    message: str
    evidence: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"kind": self.kind, "message": self.message, "evidence": self.evidence}


@dataclass
class WeightSimilarity:
    name: str
    role: str
    expert: int | None
    dim: int  # the input dimension the A subspaces live in
    out_dim: int
    r: tuple[int, int]
    rows: list[int]
    cols: list[int]
    phi: list[list[float]]  # LoRA §7.2 on A's right-singular vectors
    phi_delta: list[list[float]]  # the same on ΔW's column space (output side)
    delta_r: tuple[int, int]  # ranks of the two ΔW (≤ r, ≤ out)

    @property
    def top(self) -> float:
        return self.phi[0][0]

    @property
    def full(self) -> float:
        """φ(r1, r2): the share of the smaller subspace inside the larger one."""
        return self.phi[-1][-1]

    @property
    def delta_top(self) -> float:
        return self.phi_delta[0][0]

    @property
    def delta_full(self) -> float:
        return self.phi_delta[-1][-1]

    @property
    def random_full(self) -> float:
        """E[φ(r1, r2)] for independent random subspaces of the input space: E‖P_i Q_j‖_F² = i·j/d,
        so φ = i·j/(d·min(i, j)) = max(r1, r2)/d."""
        return min(1.0, max(self.r) / self.dim)

    @property
    def random_delta_full(self) -> float:
        """The same baseline in ΔW's output space."""
        return min(1.0, max(self.delta_r) / self.out_dim)

    def to_json(self) -> dict:
        return {"name": self.name, "expert": self.expert, "role": self.role, "r": list(self.r),
                "dim": self.dim, "i": self.rows, "j": self.cols, "phi_A": self.phi, "phi_delta_w": self.phi_delta,
                "random_phi_full": self.random_full, "random_phi_delta_full": self.random_delta_full}


@dataclass
class Comparison:
    other: str
    other_summary: str
    weights: list[WeightSimilarity]
    only_here: list[str]
    only_there: list[str]
    verdicts: list[Verdict]

    def by_role(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        order = list(ROLES)
        for role in sorted(dict.fromkeys(w.role for w in self.weights), key=lambda r: order.index(r)):
            group = [w for w in self.weights if w.role == role]
            out[role] = {
                "weights": len(group),
                "phi_top": statistics.fmean(w.top for w in group),
                "phi_full": statistics.fmean(w.full for w in group),
                "phi_delta_top": statistics.fmean(w.delta_top for w in group),
                "phi_delta_full": statistics.fmean(w.delta_full for w in group),
                "random_full": statistics.fmean(w.random_full for w in group),
                "random_delta_full": statistics.fmean(w.random_delta_full for w in group),
            }
        return out

    def to_json(self) -> dict:
        return {"other": self.other, "other_adapter": self.other_summary, "by_role": self.by_role(),
                "only_in_first": self.only_here, "only_in_other": self.only_there,
                "weights": [w.to_json() for w in self.weights], "verdicts": [v.to_json() for v in self.verdicts]}


@dataclass
class AnalysisResult:
    adapter: Adapter
    spectra: list[WeightSpectrum]
    by_role: list[GroupSummary]
    by_layer: list[GroupSummary]
    verdicts: list[Verdict]
    base: str | None = None
    comparison: Comparison | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        a = self.adapter
        return {
            "adapter": str(a.path), "base": self.base, "base_model_name_or_path": a.base_model,
            "r": a.r, "ranks": a.ranks, "lora_alpha": a.lora_alpha, "use_rslora": a.use_rslora,
            "use_dora": a.use_dora, "weights": len(a.weights), "lora_params": a.lora_params, "dtype": a.dtype,
            "verdicts": [v.to_json() for v in self.verdicts],
            "by_role": [g.to_json() for g in self.by_role],
            "by_layer": [g.to_json() for g in self.by_layer],
            "spectra": [s.to_json() for s in self.spectra],
            "comparison": self.comparison.to_json() if self.comparison else None,
            "notes": self.adapter.notes + self.notes,
        }


def analyze(adapter: str | os.PathLike, base: str | None = None, compare: str | os.PathLike | None = None,
            trust_remote_code: bool = False) -> AnalysisResult:
    """`loraplan analyze` as a function: the spectra, summaries and verdicts of one adapter."""
    structure = None
    if base is not None:
        from ..model.loading import load_structure

        structure = load_structure(base, trust_remote_code=trust_remote_code)
    ad = read_adapter(adapter, structure)
    if structure is not None:
        check_fits(ad, structure)
    norms = {}
    notes = []
    if base is not None and base.startswith("builtin:"):
        notes.append(f"{base} is a shape without weights: roles and fit are checked, ‖ΔW‖/‖W‖ needs a model folder")
    elif base is not None:
        norms = base_norms(base, ad, structure, trust_remote_code)
    found = {w.name: weight_spectra(w, s, norms.get(w.name))
             for w, _, s, _ in iter_delta_svd(ad.weights, vectors=False)}
    spectra = [s for w in ad.weights for s in found[w.name]]
    by_role = summarize(spectra, lambda s: s.role)
    by_layer = summarize(spectra, lambda s: "—" if s.layer is None else str(s.layer))
    result = AnalysisResult(ad, spectra, by_role, by_layer, [], base=base, notes=notes)
    result.verdicts = verdicts(ad, spectra, by_role)
    if compare is not None:
        other = read_adapter(compare, structure)
        result.comparison = compare_adapters(ad, other)
    return result


def weight_spectra(w: AdaptedWeight, s, base_norm=None) -> list[WeightSpectrum]:
    """One WeightSpectrum per expert of `w` from its singular values s (E, k).
    base_norm: (‖W_e‖_F per expert, W's row norms or None)."""
    out = []
    for e in range(w.experts):
        sigma = [float(x) for x in s[e]]
        rel = magnitude = None
        if base_norm is not None:
            frob, rows = base_norm
            rel = math.sqrt(sum(x * x for x in sigma)) / float(frob[e]) if float(frob[e]) > 0 else None
        if w.magnitude is not None:
            magnitude = _magnitude_stats(w.magnitude, base_norm[1] if base_norm is not None else None)
        out.append(WeightSpectrum(w.name, w.role, w.layer, w.kind, (w.out_features, w.in_features), w.r,
                                  w.scaling, sigma, e if w.experts > 1 else None, rel, magnitude))
    return out


def _magnitude_stats(m, row_norms) -> dict:
    """DoRA's magnitude m starts at ‖W‖ per output (Liu et al. 2024, eq. 2): its drift from there
    is what DoRA learned besides the direction."""
    m = m.double()
    stats = {"mean": float(m.mean()), "min": float(m.min()), "max": float(m.max())}
    if row_norms is not None and row_norms.numel() == m.numel():
        ref = row_norms.double().reshape(m.shape)
        stats["relative_change"] = float((m - ref).norm() / ref.norm()) if float(ref.norm()) > 0 else None
    return stats


def base_norms(base: str, adapter: Adapter, structure, trust_remote_code: bool = False) -> dict:
    """{name: (‖W_e‖_F per expert, DoRA row norms or None)} for the adapted weights of the base.

    Reads the tensors straight from the base's safetensors (memory-mapped, one at a time); a
    checkpoint whose names differ from the model's (converted MoE layouts) loads the model instead.
    """
    import torch

    wanted = {w.name: _param_name(w, structure) for w in adapter.weights}
    tensors = _safetensors_reader(base, list(wanted.values()))
    if tensors is None:
        from ..model.loading import load_model

        model = load_model(base, dtype="fp32", device="cpu", trust_remote_code=trust_remote_code)
        params = dict(model.named_parameters(remove_duplicate=False))
        tensors = {n: (lambda p=params[n]: p) for n in wanted.values() if n in params}
    out = {}
    with torch.no_grad():
        for w in adapter.weights:
            read = tensors.get(wanted[w.name])
            if read is None:
                continue
            t = read().double()
            frob = t.reshape(w.experts, -1).norm(dim=1)
            rows = None
            if w.magnitude is not None:
                # PEFT's DoRA weight norm: per output, over the inputs (lora/dora.py get_weight_norm);
                # transformers' Conv1D stores (in, out) and an embedding (vocab, dim)
                info = structure.by_name.get(w.name) if structure is not None else None
                matrix = t.reshape(t.shape[0], -1)
                transposed = info is not None and info.kind in ("conv1d", "embedding")
                rows = matrix.norm(dim=0) if transposed else matrix.norm(dim=1)
            out[w.name] = (frob, rows)
    return out


def _param_name(w: AdaptedWeight, structure) -> str:
    name = w.name if w.kind == "param" else f"{w.name}.weight"
    if structure is not None:
        return structure.tied.get(name, name)
    return name


def _safetensors_reader(base: str, names: list[str]) -> dict | None:
    """{name: a function reading that tensor} from a local safetensors checkpoint, or None when a name
    is missing (then the caller loads the model, which knows the checkpoint's renames)."""
    import json

    from safetensors import safe_open

    folder = Path(base).expanduser()
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        return None  # a Hub id: load_model finds it in the cache or downloads it
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    elif (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise UsageError(f"no safetensors weights in {folder}", "--base needs a model folder with model.safetensors "
                         "(loraplan reads safetensors only)")
    if any(n not in weight_map for n in names):
        return None

    def reader(name):
        def read():
            with safe_open(str(folder / weight_map[name]), framework="pt") as f:
                return f.get_tensor(name)
        return read

    return {n: reader(n) for n in names}


def summarize(spectra: list[WeightSpectrum], key) -> list[GroupSummary]:
    total = sum(s.energy for s in spectra) or 1.0
    groups: dict[str, list[WeightSpectrum]] = {}
    for s in spectra:
        groups.setdefault(key(s), []).append(s)
    out = []
    for k, group in groups.items():
        rel = [s.relative_change for s in group if s.relative_change is not None]
        out.append(GroupSummary(
            key=k, weights=len(group), ranks=sorted({s.r for s in group}),
            energy_rank={p: statistics.median(s.energy_rank(p) for s in group) for p in ENERGY_LEVELS},
            stable_rank=statistics.median(s.stable_rank for s in group),
            entropy_rank=statistics.median(s.entropy_rank for s in group),
            share=sum(s.energy for s in group) / total,
            relative_change=statistics.median(rel) if rel else None,
        ))
    if all(g.key.isdigit() or g.key == "—" for g in out):
        out.sort(key=lambda g: (not g.key.isdigit(), int(g.key) if g.key.isdigit() else 0))
    else:
        order = list(ROLES)
        out.sort(key=lambda g: order.index(g.key) if g.key in order else len(order))
    return out


def _quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile: the smallest value with at least q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _power_of_two_at_least(k: int) -> int:
    return 1 << max(0, (k - 1).bit_length())


def verdicts(adapter: Adapter, spectra: list[WeightSpectrum], by_role: list[GroupSummary]) -> list[Verdict]:
    out: list[Verdict] = []
    moved = [s for s in spectra if s.energy > 0]
    if not moved:
        return [Verdict("untrained", "every ΔW is zero (lora_B is all zeros): the adapter was never trained, "
                        "or its trained weights were not saved", {"weights": len(spectra)})]
    if len(moved) < len(spectra):
        zero = [s.label for s in spectra if s.energy == 0]
        out.append(Verdict("untrained", f"{len(zero)} of {len(spectra)} weights have ΔW = 0 (never updated): "
                           f"{listing(zero, 4)}", {"zero": zero}))
    r = max(adapter.ranks)
    used = [s.energy_rank(USAGE_ENERGY) for s in moved]
    k = int(_quantile(used, USAGE_QUANTILE))
    suggested = min(_power_of_two_at_least(k), r)
    evidence = {"energy": USAGE_ENERGY, "quantile": USAGE_QUANTILE, "directions": k, "r": r,
                "median_directions": statistics.median(used)}
    if suggested <= r // 2:
        kept = statistics.fmean(retained_energy(s.sigma, suggested) for s in moved)
        evidence.update(suggested_r=suggested, retained_energy_at_suggested=kept)
        out.append(Verdict("rank", f"the r={r} adapter uses ≤{k} directions ({USAGE_ENERGY:.0%} of the update "
                           f"energy) in {USAGE_QUANTILE:.0%} of its weights: r={suggested} would do (truncating to "
                           f"r={suggested} keeps {kept:.1%} of the energy on average: `loraplan compress {adapter.path} "
                           f"--rank {suggested} --out DIR`; retraining at r={suggested} is the real test)", evidence))
    elif statistics.median(used) >= 0.75 * r:
        # energy alone is no evidence of a missing rank: Adam spreads the update over directions the task
        # does not need too (a rank-32 adapter on a rank-4 planted change cut back to r=4 by SVD loses
        # no eval loss: benchmarks/truth/RESULTS.md); only a loss comparison tells
        out.append(Verdict("rank", f"the update spreads over most of its rank: median {statistics.median(used):g} of "
                           f"{r} directions hold {USAGE_ENERGY:.0%} of the energy. That alone does not show r is too "
                           f"low: compare eval loss after `loraplan compress {adapter.path} --rank {max(1, r // 2)}`, "
                           f"or sweep r={r} and r={2 * r} each at its own best learning rate", evidence))
    else:
        out.append(Verdict("rank", f"the r={r} adapter uses ≤{k} directions ({USAGE_ENERGY:.0%} of the energy) in "
                           f"{USAGE_QUANTILE:.0%} of its weights: the rank fits", evidence))
    if len(by_role) > 1:
        top = max(by_role, key=lambda g: g.share)
        weight_share = top.weights / len(spectra)
        if top.share >= CARRIES_SHARE and top.share >= CARRIES_OVER * weight_share:
            out.append(Verdict("carries", f"{top.key} carries {top.share:.0%} of the update (Σ‖ΔW‖²) with "
                               f"{weight_share:.0%} of the adapted weights",
                               {"role": top.key, "energy_share": top.share, "weight_share": weight_share}))
    out.extend(_barely_moved(spectra, by_role))
    dora = [s.magnitude for s in spectra if s.magnitude and s.magnitude.get("relative_change") is not None]
    if dora:
        mean = statistics.fmean(m["relative_change"] for m in dora)
        out.append(Verdict("dora", f"DoRA magnitudes moved {mean:.2%} from ‖W‖ per output on average "
                           f"(the directional update is the ΔW analysed here)", {"mean_relative_change": mean}))
    return out


def _barely_moved(spectra: list[WeightSpectrum], by_role: list[GroupSummary]) -> list[Verdict]:
    rel = [s.relative_change for s in spectra if s.relative_change is not None]
    if len(rel) < 2:
        return []
    median = statistics.median(rel)
    if median <= 0:
        return []
    out = []
    for g in by_role:
        if g.relative_change is not None and g.relative_change < BARELY_MOVED * median:
            out.append(Verdict("barely_moved", f"{g.key} barely moved: median ‖ΔW‖/‖W‖ {g.relative_change:.2g} vs "
                               f"{median:.2g} over the adapter; leaving {g.key} out of the targets would likely cost "
                               "little",
                               {"role": g.key, "relative_change": g.relative_change, "adapter_median": median}))
    roles_flagged = {v.evidence["role"] for v in out}
    lone = [s.label for s in spectra if s.relative_change is not None and s.role not in roles_flagged
            and s.relative_change < BARELY_MOVED * median]
    if lone:
        out.append(Verdict("barely_moved", f"{len(lone)} weight(s) barely moved (‖ΔW‖/‖W‖ under a tenth of the "
                           f"median {median:.2g}): {listing(lone, 4)}", {"weights": lone, "adapter_median": median}))
    return out


# -- two adapters -------------------------------------------------------------------------------


def _grid(r: int) -> list[int]:
    """1, 2, 4, … up to r, and r itself."""
    out = [1 << i for i in range(r.bit_length()) if 1 << i < r]
    return out + [r]


def compare_adapters(first: Adapter, other: Adapter) -> Comparison:
    """φ of LoRA §7.2 for every weight both adapters adapt (per expert), and on ΔW's column space."""
    theirs = {w.name: w for w in other.weights}
    common = [w for w in first.weights if w.name in theirs]
    if not common:
        raise UsageError(f"{other.path} adapts none of the weights {first.path} adapts",
                         "compare two adapters of the same base model with overlapping targets")
    for w in common:
        v = theirs[w.name]
        if (w.in_features, w.out_features, w.experts) != (v.in_features, v.out_features, v.experts):
            raise UsageError(f"'{w.name}' has different shapes in the two adapters",
                             "compare adapters of the same base model")
    out = []
    for w, v, over_a, over_delta in _iter_overlaps([(w, theirs[w.name]) for w in common]):
        rows, cols = _grid(over_a.shape[-2]), _grid(over_a.shape[-1])
        drows, dcols = _grid(over_delta.shape[-2]), _grid(over_delta.shape[-1])
        phi = phi_grid(over_a, rows, cols).tolist()
        phi_delta = phi_grid(over_delta, drows, dcols).tolist()
        for e in range(w.experts):
            out.append(WeightSimilarity(
                w.name, w.role, e if w.experts > 1 else None, w.in_features, w.out_features,
                tuple(over_a.shape[-2:]), rows, cols, phi[e], phi_delta[e], tuple(over_delta.shape[-2:])))
    here = {w.name for w in first.weights}
    comparison = Comparison(str(other.path), other.summary(), out, sorted(here - set(theirs)),
                            sorted(set(theirs) - here), [])
    comparison.verdicts = _similarity_verdicts(comparison)
    return comparison


def _excess(phi: float, random: float) -> float | None:
    """How far φ is from chance toward 1: (φ − random)/(1 − random); None when r ≥ d makes φ = 1."""
    return (phi - random) / (1 - random) if random < 1 - 1e-9 else None


def _iter_overlaps(pairs):
    """(w, v, overlaps of A subspaces, of ΔW column spaces) per pair of weights, batched by shape."""
    import torch

    def size(pair):
        w, v = pair
        return (w.out_features, w.in_features, w.r, v.r), w.experts * (w.r + v.r) * (w.out_features + w.in_features)

    for run in batches(pairs, size):
        with one_thread():
            f1 = [w.factors() for w, _ in run]
            f2 = [v.factors() for _, v in run]
            over_a, over_delta = pair_overlaps(torch.cat([f[0] for f in f1]), torch.cat([f[1] for f in f1]),
                                               torch.cat([f[0] for f in f2]), torch.cat([f[1] for f in f2]))
        start = 0
        for w, v in run:
            part = slice(start, start + w.experts)
            start += w.experts
            yield w, v, over_a[part], over_delta[part]


def _similarity_verdicts(c: Comparison) -> list[Verdict]:
    top = statistics.fmean(w.top for w in c.weights)
    full = statistics.fmean(w.full for w in c.weights)
    delta_full = statistics.fmean(w.delta_full for w in c.weights)
    baseline = statistics.fmean(w.random_full for w in c.weights)
    top_baseline = statistics.fmean(1 / w.dim for w in c.weights)
    small, large = sorted((max(w.r[0] for w in c.weights), max(w.r[1] for w in c.weights)))
    evidence = {"phi_top": top, "phi_full": full, "phi_delta_full": delta_full, "random_full": baseline,
                "random_top": top_baseline}
    excess_full, excess_top = _excess(full, baseline), _excess(top, top_baseline)
    if excess_full is None:
        text = (f"the rank of the larger adapter (r={large}) covers the whole input space of these weights, so "
                "φ is 1 by construction: compare on larger weights")
    elif excess_full > 0.5:
        text = (f"the two adapters learned overlapping subspaces: φ(r={small}, r={large}) = {full:.2f} on A "
                f"(random ≈ {baseline:.2g}), {delta_full:.2f} on ΔW's output space; top direction φ(1,1) = {top:.2f}")
        if small < large:
            text += f": the r={small} subspace lies largely inside the r={large} one"
    elif excess_top is not None and excess_top > 0.5:
        text = (f"only the top directions agree (φ(1,1) = {top:.2f}, random ≈ {top_baseline:.2g}); the rest of the "
                f"subspaces are close to chance (φ = {full:.2f}, random ≈ {baseline:.2g}) — as the LoRA paper found "
                "for r=8 vs r=64: the extra directions of a high rank are mostly noise")
    elif excess_full > PARTLY_OVERLAP:
        delta_top = statistics.fmean(w.delta_top for w in c.weights)
        text = (f"the subspaces partly overlap: φ(r={small}, r={large}) = {full:.2f} on A against {baseline:.2g} by "
                f"chance, {delta_full:.2f} on ΔW's output space; the top directions agree most (φ(1,1) = {top:.2f} on "
                f"A, {delta_top:.2f} on ΔW)")
    else:
        text = (f"the adapters' subspaces barely overlap (φ = {full:.2f} on A, {delta_full:.2f} on ΔW; random ≈ "
                f"{baseline:.2g}): different runs, data or targets learned different updates")
    return [Verdict("similarity", text, evidence)]

"""What the probe returns: each module's signal and rank, the roles they add up to, and the plan
read from them (the fewest roles holding COVER of the signal, at the rank their spectra need)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..plan.lora_plan import LoraPlan, Reason

ENERGY = 0.9  # rank = directions holding this share of a module's signal
COVER = 0.8  # the plan's targets hold this share of the total signal

# What the gradient at the base model cannot tell apart, measured on planted tasks from generators it
# was not tuned on (issue 24: 13 tasks; benchmarks/probe/RESULTS.md): up and gate rank first whatever
# was planted, so a change in attention is credited to the MLP; a change in down alone ranks down
# third; the rank estimate barely follows the planted rank. A plan read from it keeps both sides
# (`sweep --from-probe`: attention and mlp, ranks r/4 … 2r), and says so.
BLIND_SPOTS = (
    "attention vs MLP: a change that lives in attention (q, k, v, o) is credited to the MLP's up and gate "
    "(0 of 5 attention-planted tasks ranked first); the role ranking is not evidence against attention",
    "within the MLP: a change in down alone ranks behind up and gate",
    "rank: the estimate barely follows the needed rank (planted 1, 2, 8, 16 read as 9, 9, 8, 13)",
)
UNCERTAIN = ("targets: attention or mlp", "rank")


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
            "blind_spots": list(BLIND_SPOTS),
            "uncertain": list(UNCERTAIN),
            "notes": self.notes,
        }


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
    reasons.append(Reason("targets", "uncertain: the probe cannot tell a change in attention from one in the "
                                     "MLP, nor the rank it needs; `loraplan sweep --from-probe` tries attention, mlp "
                                     f"and both, at r={max(1, r // 4)}…{2 * r}"))
    return LoraPlan(targets=",".join(x.role for x in chosen), r=r, use_rslora=r >= 16,
                    reasons=tuple(reasons))

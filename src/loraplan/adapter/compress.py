"""Shrink a LoRA adapter by truncating the SVD of each ΔW: a valid PEFT adapter of lower rank.

The same truncation as PEFT's `convert_to_lora` (peft/tuners/lora/conversion.py, PEFT ≥ 0.19): the
top k singular triplets of each ΔW, k fixed (`rank`) or the smallest k holding a share of Σσ²
(`energy`, its threshold rule). `convert_to_lora` needs the base model loaded with the adapter and
takes a dense SVD of every ΔW; here the adapter file alone is enough (analysis.delta_svd works on
the r×r core), so the base model is never loaded.

Scale: each weight keeps its scaling s (alpha/r, or alpha/sqrt(r) with rsLoRA), so the new alpha is
s·k (s·sqrt(k)). `convert_to_lora` instead folds s into the weights and writes alpha = r (s = 1);
keeping s means training the compressed adapter further behaves like the original, whose learning
rate was tuned for that scale. The factors are balanced: B' = U_k √(Σ_k/s), A' = √(Σ_k/s) V_kᵀ.
Different ranks or alphas per weight go to `rank_pattern` / `alpha_pattern` (exact names).

DoRA: the magnitude vectors are kept and the directional update B·A is truncated; PEFT normalises
W + s·B'A' at run time, so the output approaches the original as k grows and equals it at full rank.
MoE expert parameters (lora.ParamWrapper): every expert is truncated to the module's rank, the
largest any of its experts needs, because PEFT stores one rank per parameter.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
from collections import Counter
from dataclasses import dataclass, field

from ..errors import UsageError
from ..files import prepare_output, publish, staging_folder
from .analyze import energy_rank, iter_delta_svd, retained_energy
from .folder import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdaptedWeight,
    companion_files,
    read_adapter,
)


@dataclass
class CompressedWeight:
    name: str
    role: str
    r_before: int
    r_after: int
    alpha_after: float
    retained: float  # share of Σ‖ΔW_e‖² kept, over all experts
    retained_min: float  # the worst expert (= retained for a plain weight)

    def to_json(self) -> dict:
        return dict(vars(self))


@dataclass
class CompressionResult:
    source: str
    out: str
    rank: int | None
    energy: float | None
    weights: list[CompressedWeight]
    r: int
    lora_alpha: float
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    files: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def retained(self) -> float:
        """Mean share of the update energy kept per weight."""
        return statistics.fmean(w.retained for w in self.weights)

    def to_json(self) -> dict:
        return {"source": self.source, "out": self.out, "rank": self.rank, "energy": self.energy,
                "r": self.r, "lora_alpha": self.lora_alpha, "retained_energy_mean": self.retained,
                "retained_energy_min": min(w.retained_min for w in self.weights),
                "params_before": self.params_before, "params_after": self.params_after,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after, "files": self.files,
                "weights": [w.to_json() for w in self.weights], "notes": self.notes}


def compress(adapter: str | os.PathLike, out: str | os.PathLike, rank: int | None = None,
             energy: float | None = None, overwrite: bool = False) -> CompressionResult:
    """`loraplan compress` as a function: write a lower-rank copy of ADAPTER to OUT."""
    _check_target(rank, energy)
    ad = read_adapter(adapter)
    folder = prepare_output(out, CONFIG_NAME, overwrite, inputs=(ad.path,))
    tensors = dict(ad.extra)
    rows: list[CompressedWeight] = []
    found = {}
    for w, u, s, v in iter_delta_svd(ad.weights):
        found[w.name] = truncate(w, u, s, v, rank, energy)
    for w in ad.weights:
        lora_a, lora_b, row = found[w.name]
        a_key, b_key = _keys(w)
        tensors[a_key], tensors[b_key] = lora_a, lora_b
        if w.magnitude is not None:
            tensors[f"{w.key}.lora_magnitude_vector"] = w.magnitude
        rows.append(row)
    config = compressed_config(ad.config, ad.weights, rows)
    notes = []
    if all(row.r_after == row.r_before for row in rows):
        notes.append(f"no weight has rank above {rank}: the adapter is re-factored (balanced SVD factors), not smaller"
                     if rank else "every weight needs its full rank at this energy: nothing was cut")
    if ad.use_dora:
        notes.append("DoRA: magnitude vectors kept as they are; only the directional update B·A is truncated")
    staging = staging_folder(folder)
    try:
        from safetensors.torch import save_file

        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for companion in companion_files(ad.path):
            shutil.copy2(companion, staging / companion.name)
        files = publish(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    before = ad.lora_params
    after = sum(row.r_after * _per_rank(w) + (w.magnitude.numel() if w.magnitude is not None else 0)
                for w, row in zip(ad.weights, rows, strict=True))
    return CompressionResult(str(ad.path), str(folder), rank, energy, rows, config["r"], config["lora_alpha"],
                             before, after, (ad.path / WEIGHTS_NAME).stat().st_size,
                             (folder / WEIGHTS_NAME).stat().st_size, files, notes)


def _check_target(rank, energy) -> None:
    if (rank is None) == (energy is None):
        raise UsageError("give --rank R or --energy P (one of them)", "e.g. --rank 8 or --energy 0.9")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise UsageError(f"--rank must be a positive integer, got {rank!r}", "e.g. --rank 8")
    if energy is not None and not (isinstance(energy, int | float) and 0 < energy <= 1):
        raise UsageError(f"--energy must be in (0, 1], got {energy!r}",
                         "the share of each ΔW's squared Frobenius norm to keep, e.g. --energy 0.9")


def truncate(w: AdaptedWeight, u, s, v, rank: int | None, energy: float | None):
    """(lora_A, lora_B, CompressedWeight) for one adapted weight from the SVD of its ΔW (scaled),
    its scaling unchanged."""
    available = s.shape[-1]
    if rank is not None:
        k = min(rank, available)
    else:
        k = max(1, max(energy_rank(s[e].tolist(), energy) for e in range(w.experts)))
    # k ≥ 1: PEFT needs a positive rank; a zero update stays zero
    root = (s[:, :k] / w.scaling).sqrt()
    b_new = u[:, :, :k] * root[:, None, :]
    a_new = (v[:, :, :k] * root[:, None, :]).transpose(-1, -2)
    lora_a, lora_b = w.stored(b_new, a_new)
    kept = [retained_energy(s[e].tolist(), k) for e in range(w.experts)]
    energies = (s ** 2).sum(-1)
    total = float(energies.sum())
    retained = float(sum(kept[e] * float(energies[e]) for e in range(w.experts)) / total) if total > 0 else 1.0
    alpha = w.scaling * (math.sqrt(k) if w.use_rslora else k)
    return lora_a, lora_b, CompressedWeight(w.name, w.role, w.r, k, alpha, retained, min(kept))


def _keys(w: AdaptedWeight) -> tuple[str, str]:
    if w.kind == "embedding":
        return f"{w.key}.lora_embedding_A", f"{w.key}.lora_embedding_B"
    return f"{w.key}.lora_A.weight", f"{w.key}.lora_B.weight"


def _per_rank(w: AdaptedWeight) -> int:
    return w.experts * (w.in_features + w.out_features)


def compressed_config(config: dict, weights: list[AdaptedWeight], rows: list[CompressedWeight]) -> dict:
    """The original adapter_config.json with the new r, lora_alpha, rank_pattern and alpha_pattern."""
    ranks = Counter(row.r_after for row in rows)
    r = max(ranks, key=lambda k: (ranks[k], k))
    alphas = Counter(_tidy(row.alpha_after) for row in rows if row.r_after == r)
    alpha = max(alphas, key=lambda a: (alphas[a], a))
    new = dict(config)
    new["r"] = r
    new["lora_alpha"] = alpha
    # exact names, escaped: PEFT matches each key as a regex against the end of the module name
    new["rank_pattern"] = {re.escape(row.name): row.r_after for row in rows if row.r_after != r}
    new["alpha_pattern"] = {re.escape(row.name): _tidy(row.alpha_after) for row in rows
                            if not math.isclose(row.alpha_after, alpha, rel_tol=1e-9)}
    return new


def _tidy(x: float) -> float | int:
    """12.000000000000002 -> 12, so the config reads as a person would write it."""
    rounded = round(x, 9)
    return int(rounded) if float(rounded).is_integer() else rounded

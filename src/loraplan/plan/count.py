"""Exact trainable-parameter counts, equal to PEFT's `get_nb_trainable_parameters()`.

Arithmetic on the module tree, never a PEFT wrap or a weight, so any config counts at once on a CPU.
Per adapted weight (peft/tuners/lora/layer.py):
- Linear / Conv1D: A is r×in, B is out×r            -> r·(in + out)
- Embedding: lora_embedding_A r×vocab, B dim×r       -> r·(vocab + dim)
- Conv: A is r×in×kernel, B is out×(r/groups) (1×1)  -> r·in·kernel + out·r/groups
- parameter (lora.ParamWrapper: MoE experts E×…, a router's weight): A is (r·E)×in, B is out×(r·E)
                                                     -> r·E·(in + out)
- DoRA adds a magnitude vector of `out` entries; `lora_bias` adds B's bias (`out`).
What PEFT refuses (DoRA, dropout or lora_bias on a ParamWrapper, a rank not divisible by a grouped
convolution's groups) is refused here with PEFT's own words.
Besides LoRA: `bias="all"` trains every parameter whose name holds "bias", `"lora_only"` the biases
of adapted layers; `modules_to_save` trains a full copy of each module (the original stays, so the
total grows too). Total = the model's unique parameters (tied weights once) + everything added.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import UsageError
from ..model.structure import ModelStructure, ModuleInfo
from ..model.targets import ResolvedTargets, frozen_moe_notes
from .alpha import plan_traps
from .lora_plan import LoraPlan, parameter_refusal

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class PatternCount:
    """The adapter parameters of one module pattern (e.g. `model.layers.*.self_attn.q_proj`)."""

    pattern: str
    role: str
    kind: str
    shape: str
    modules: int  # how many weights of this pattern are adapted
    rank: int | str  # an int, or "4–16" when rank_pattern varies it
    params: int  # LoRA parameters for all of them
    extra: int = 0  # of which DoRA magnitudes / lora_bias
    per_module: int = 0


@dataclass
class CountResult:
    model: str
    architecture: str
    plan: LoraPlan
    targets: ResolvedTargets
    patterns: list[PatternCount]
    per_layer: dict[int | None, int]
    lora_params: int
    bias_params: int
    saved_params: int  # modules_to_save copies
    base_params: int
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_params(self) -> int:
        return self.lora_params + self.bias_params + self.saved_params

    @property
    def total_params(self) -> int:
        return self.base_params + self.lora_params + self.saved_params

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.total_params if self.total_params else 0.0

    def adapter_bytes(self, dtype: str = "bf16") -> int:
        """Bytes of the saved tensors (adapter_model.safetensors holds them plus a small header)."""
        return self.trainable_params * DTYPE_BYTES[dtype]

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "architecture": self.architecture,
            "r": self.plan.r,
            "lora_alpha": self.plan.alpha,
            "use_dora": self.plan.use_dora,
            "use_rslora": self.plan.use_rslora,
            "targets": self.targets.spec,
            "target_modules": self.targets.target_modules,
            "target_parameters": self.targets.target_parameters,
            "layers_to_transform": list(self.targets.layers) if self.targets.layers is not None else None,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "base_params": self.base_params,
            "trainable_percent": self.trainable_percent,
            "lora_params": self.lora_params,
            "bias_params": self.bias_params,
            "modules_to_save_params": self.saved_params,
            "adapter_bytes": {d: self.adapter_bytes(d) for d in ("bf16", "fp32")},
            "modules": [vars(p) for p in self.patterns],
            "per_layer": {("none" if k is None else str(k)): v for k, v in self.per_layer.items()},
            "notes": self.notes,
        }


def lora_params_of(module: ModuleInfo, r: int, use_dora: bool = False, lora_bias: bool = False) -> tuple[int, int]:
    """(LoRA parameters, of which extra: DoRA magnitude + lora_bias) for one adapted weight."""
    if module.kind == "conv":
        if r % module.groups:
            raise UsageError(f"PEFT adapts {module.name} (groups={module.groups}) only at a rank divisible by "
                             f"{module.groups}, not r={r}", "leave that convolution out of the targets")
        params = r * module.in_features * module.kernel + module.out_features * r // module.groups
    else:
        params = r * module.experts * (module.in_features + module.out_features)
    extra = 0
    if use_dora and not module.is_parameter:
        extra += module.out_features
    if lora_bias and not module.is_parameter:
        extra += module.out_features
    return params + extra, extra


def rank_for(rank_pattern: dict[str, int], default: int, key: str) -> int:
    """PEFT's `rank_pattern` lookup (peft.utils.other.get_pattern_key): the first pattern that
    matches the end of the key wins."""
    for pattern, rank in rank_pattern.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return rank
    return default


def count_plan(structure: ModelStructure, plan: LoraPlan) -> CountResult:
    resolved = plan.resolve(structure)
    parameter_refusal(structure, plan, resolved)
    patterns: dict[str, list] = {}
    per_layer: dict[int | None, int] = {}
    lora_total = 0
    rank_pattern = {**dict(plan.rank_pattern), **resolved.rank_pattern(plan.r, plan.alpha)[0]}
    for m in resolved.modules:
        r = rank_for(rank_pattern, plan.r, m.name)
        params, extra = lora_params_of(m, r, plan.use_dora, plan.lora_bias)
        lora_total += params
        per_layer[m.layer] = per_layer.get(m.layer, 0) + params
        entry = patterns.setdefault(m.pattern, [m, 0, set(), 0, 0, set()])
        entry[1] += 1
        entry[2].add(r)
        entry[3] += params
        entry[4] += extra
        entry[5].add(params)
    rows = []
    for pattern, (m, n, ranks, params, extra, per) in patterns.items():
        rank = next(iter(ranks)) if len(ranks) == 1 else f"{min(ranks)}–{max(ranks)}"
        rows.append(PatternCount(pattern, m.role, m.kind, m.shape_text, n, rank, params, extra,
                                 next(iter(per)) if len(per) == 1 else 0))
    return CountResult(
        model=structure.source,
        architecture=structure.architecture,
        plan=plan,
        targets=resolved,
        patterns=rows,
        per_layer=dict(sorted(per_layer.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))),
        lora_params=lora_total,
        bias_params=_bias_params(structure, plan, resolved),
        saved_params=_saved_params(structure, plan),
        base_params=structure.total_params,
        notes=list(resolved.notes) + frozen_moe_notes(structure, resolved),
    )


def _bias_params(structure: ModelStructure, plan: LoraPlan, resolved: ResolvedTargets) -> int:
    if plan.bias == "all":
        # peft: every named parameter whose name contains "bias" becomes trainable
        return sum(n for name, n in structure.params.items() if "bias" in name)
    if plan.bias == "lora_only":
        return sum(m.bias for m in resolved.modules if not m.is_parameter)
    return 0


def _saved_params(structure: ModelStructure, plan: LoraPlan) -> int:
    """A trainable copy of every module whose name ends with a `modules_to_save` entry."""
    if not plan.modules_to_save:
        return 0
    names = [n for n in structure.module_names if any(n.endswith(s) for s in plan.modules_to_save)]
    if not names:
        raise UsageError(f"modules_to_save: no module ends with {', '.join(plan.modules_to_save)}",
                         "give module names such as lm_head, embed_tokens or score")
    outer = [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]
    sizes = {**structure.params, **{t: structure.params[c] for t, c in structure.tied.items()}}
    return sum(size for p, size in sizes.items() for n in outer if p.startswith(n + "."))


def count(model, targets: str | Sequence[str] = "all-linear", rank: int = 8, alpha: float | None = None,
          dora: bool = False, rslora: bool = False, layers: str | Sequence[int] | None = None,
          bias: str = "none", modules_to_save: Sequence[str] = (), rank_pattern: dict | None = None,
          lora_bias: bool = False, plan: LoraPlan | None = None,
          trust_remote_code: bool = False) -> CountResult:
    """Count the adapter LoRA would add to MODEL: `loraplan count` as a function."""
    from ..model.loading import load_structure

    structure = load_structure(model, trust_remote_code=trust_remote_code)
    if plan is None:
        if isinstance(layers, Sequence) and not isinstance(layers, str):
            layers = ",".join(str(x) for x in layers)
        plan = LoraPlan(targets=targets if isinstance(targets, str) else ",".join(targets), r=rank,
                        lora_alpha=alpha, use_dora=dora, use_rslora=rslora, layers=layers, bias=bias,
                        modules_to_save=tuple(modules_to_save), rank_pattern=rank_pattern or {},
                        lora_bias=lora_bias)
    return count_plan(structure, plan)


def rank_table(structure: ModelStructure, plan: LoraPlan, ranks: Sequence[int]) -> list[CountResult]:
    """One count per rank; each carries the alpha rule's warning when alpha/r changes across them."""
    results = [count_plan(structure, plan.replace(r=r)) for r in ranks]
    warnings = [f"{trap.message()}; leave lora_alpha unset (no --alpha) for alpha = r, or use rsLoRA (--rslora)"
                for trap in plan_traps(result.plan for result in results)]
    for result in results:
        result.notes.extend(warnings)
    return results


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_count(n: float) -> str:
    """12,345,678 -> '12.3M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{1 if n / size < 100 else 0}f}{unit}"
    return str(int(n))

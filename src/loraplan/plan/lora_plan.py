"""`LoraPlan`: one LoRA configuration — targets, rank, alpha policy, rsLoRA, DoRA, LoRA+, dropout —
in loraplan's target grammar, with the reason for each choice when a command chose it.

The same object is counted (`count`), sized (`memory`), recommended (`recommend`), exported
(`export`) and trained (`sweep`). `to_peft_kwargs` gives the exact `peft.LoraConfig` arguments
for one model; `from_mapping` reads PEFT, axolotl, LLaMA-Factory and torchtune spellings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import UsageError, did_you_mean

BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass(frozen=True)
class Reason:
    choice: str  # which field the reason is about: targets, r, lora_alpha, ...
    text: str
    source: str | None = None  # citation (paper, seed) where the rule comes from


@dataclass(frozen=True)
class LoraPlan:
    # a spec string; a tuple of items when an item (a `re:` with `{1,3}`) holds a comma itself
    targets: str | tuple[str, ...] = "all-linear"
    r: int = 8
    lora_alpha: float | None = None  # None: alpha = r (scaling 1, or sqrt(r) with rsLoRA)
    use_rslora: bool = False
    use_dora: bool = False
    loraplus_lr_ratio: float | None = None
    lora_dropout: float = 0.05
    bias: str = "none"
    layers: str | None = None  # "0-7,30,31"; None: every layer
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    lora_bias: bool = False
    task_type: str = "CAUSAL_LM"
    reasons: tuple[Reason, ...] = ()

    def __post_init__(self):
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        problems = []
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"r must be a positive integer, got {self.r!r}")
        if self.lora_alpha is not None and not (isinstance(self.lora_alpha, int | float) and self.lora_alpha > 0):
            problems.append(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_CHOICES:
            problems.append(f"bias must be one of {', '.join(BIAS_CHOICES)}, got {self.bias!r}")
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            problems.append(f"loraplus_lr_ratio must be positive, got {self.loraplus_lr_ratio!r}")
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def alpha(self) -> float:
        return float(self.r if self.lora_alpha is None else self.lora_alpha)

    @property
    def scaling(self) -> float:
        """The factor on B·A: alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def replace(self, **changes) -> LoraPlan:
        return replace(self, **changes)

    def resolve(self, structure):
        """The targets resolved for one model (`ResolvedTargets`)."""
        from ..model.targets import resolve_targets

        return resolve_targets(structure, self.targets, layers=self.layers, exclude=self.modules_to_save)

    def to_peft_kwargs(self, structure) -> dict[str, Any]:
        """Keyword arguments for `peft.LoraConfig` on this model."""
        resolved = self.resolve(structure)
        if self.use_dora and resolved.target_parameters:
            raise UsageError("PEFT cannot apply DoRA to MoE expert parameters (lora.ParamWrapper)",
                             "leave `experts` out of the targets or turn DoRA off")
        kwargs: dict[str, Any] = {
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0 if resolved.target_parameters else self.lora_dropout,
            "bias": self.bias,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "task_type": self.task_type,
            **resolved.peft_kwargs(),
        }
        fused_ranks, fused_alphas = resolved.rank_pattern(self.r, self.alpha)
        if self.rank_pattern or fused_ranks:
            kwargs["rank_pattern"] = {**dict(self.rank_pattern), **fused_ranks}
        if self.alpha_pattern or fused_alphas:
            kwargs["alpha_pattern"] = {**dict(self.alpha_pattern), **fused_alphas}
        if self.modules_to_save:
            kwargs["modules_to_save"] = list(self.modules_to_save)
        if self.lora_bias:
            kwargs["lora_bias"] = True
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rank_pattern"] = dict(self.rank_pattern)
        data["alpha_pattern"] = dict(self.alpha_pattern)
        data["modules_to_save"] = list(self.modules_to_save)
        data["reasons"] = [asdict(r) for r in self.reasons]
        return data

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "config") -> LoraPlan:
        """Read a plan from PEFT / axolotl / LLaMA-Factory / torchtune / loraplan keys."""
        return cls(**plan_fields(data, where))


# Ecosystem spellings -> LoraPlan fields. Values that need translating are handled below.
_SPELLINGS = {
    "r": "r", "rank": "r", "lora_r": "r", "lora_rank": "r",
    "lora_alpha": "lora_alpha", "alpha": "lora_alpha",
    "use_rslora": "use_rslora", "peft_use_rslora": "use_rslora", "rslora": "use_rslora",
    "use_dora": "use_dora", "peft_use_dora": "use_dora", "dora": "use_dora",
    "loraplus_lr_ratio": "loraplus_lr_ratio", "lora_dropout": "lora_dropout", "dropout": "lora_dropout",
    "bias": "bias", "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
    "lora_rank_pattern": "rank_pattern", "lora_alpha_pattern": "alpha_pattern",
    "modules_to_save": "modules_to_save", "lora_modules_to_save": "modules_to_save",
    "additional_target": "modules_to_save", "lora_bias": "lora_bias", "task_type": "task_type",
    "targets": "targets", "target_modules": "targets", "lora_target_modules": "targets",
    "lora_target": "targets", "target_parameters": "targets", "lora_target_parameters": "targets",
    "layers": "layers", "layers_to_transform": "layers", "peft_layers_to_transform": "layers",
}
# Keys that belong to these files but do not shape the adapter; accepted and ignored.
_IGNORED = {
    "peft_type", "base_model_name_or_path", "revision", "inference_mode", "fan_in_fan_out",
    "init_lora_weights", "layers_pattern", "auto_mapping", "megatron_config", "megatron_core",
    "loftq_config", "eva_config", "corda_config", "layer_replication", "runtime_config",
    "exclude_modules", "trainable_token_indices", "lora_target_linear", "reasons",
    "lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "_component_", "finetuning_type",
    "use_qalora", "qalora_group_size", "alora_invocation_tokens", "arrow_config", "ensure_weight_tying",
    "peft_version", "lora_ga_config", "kasa_config", "velora_config", "use_bdlora", "bdlora_config",
}
_TORCHTUNE_ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "output_proj": "o"}


def plan_fields(data: Mapping[str, Any], where: str = "config") -> dict[str, Any]:
    out: dict[str, Any] = {}
    unknown = []
    targets: list[str] = []
    for key, value in data.items():
        field_name = _SPELLINGS.get(key)
        if field_name == "targets":
            if value in (None, "", []):
                continue
            targets.extend([value] if isinstance(value, str) else [str(v) for v in value])
        elif field_name == "modules_to_save":
            if value:
                # LLaMA-Factory's additional_target is one comma-separated string
                items = value.split(",") if isinstance(value, str) else value
                out["modules_to_save"] = tuple(s.strip() for s in items if s.strip())
        elif field_name == "layers":
            if value is not None:
                out["layers"] = value if isinstance(value, str) else ",".join(
                    str(v) for v in ([value] if isinstance(value, int) else value))
        elif field_name == "r" and value is not None:
            out["r"] = int(value) if isinstance(value, float) and value.is_integer() else value
        elif field_name in ("rank_pattern", "alpha_pattern"):
            out[field_name] = dict(value or {})
        elif field_name:
            if field_name == "task_type" and value is None:
                continue
            out[field_name] = value
        elif key not in _IGNORED:
            unknown.append(key)
    # axolotl: lora_target_linear: true means every linear layer.
    if data.get("lora_target_linear"):
        targets.append("all-linear")
    # torchtune: lora_attn_modules + apply_lora_to_mlp + apply_lora_to_output.
    for name in data.get("lora_attn_modules") or ():
        targets.append(_TORCHTUNE_ROLES.get(name, name))
    if data.get("apply_lora_to_mlp"):
        targets.append("mlp")
    if data.get("apply_lora_to_output"):
        targets.append("lm_head")
    if unknown:
        hints = [h for h in (did_you_mean(k, _SPELLINGS) for k in unknown) if h]
        raise UsageError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}",
                         hints[0] if hints else "PEFT, axolotl, LLaMA-Factory and torchtune keys are read")
    if targets:
        # LLaMA-Factory writes `lora_target: all` for every linear layer.
        if targets == ["all"] and "lora_target" in data:
            targets = ["all-linear"]
        out["targets"] = join_targets(targets)
    if isinstance(out.get("bias"), str):
        out["bias"] = out["bias"].lower()
    return out


def join_targets(items: list[str]) -> str | tuple[str, ...]:
    """Target items as one spec string. The grammar reads a spec that starts with `re:` as a single
    regex, so a regex goes last (after the comma-separated names) and several regexes become one.
    A regex holding a comma (`{1,3}`) cannot sit in a comma-separated spec: the items stay a tuple."""
    items = list(dict.fromkeys(items))
    regexes = [i[3:] for i in items if i.startswith("re:")]
    names = [i for i in items if not i.startswith("re:")]
    if len(regexes) > 1:
        regexes = ["|".join(f"(?:{r})" for r in regexes)]
    out = names + [f"re:{r}" for r in regexes]
    return tuple(out) if any("," in i for i in out) else ",".join(out)

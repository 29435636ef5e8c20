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

from ..errors import UsageError, did_you_mean, listing

BIAS_CHOICES = ("none", "all", "lora_only")


class _DefaultDropout(float):
    """loraplan's default lora_dropout, 0.05, told apart from the same value chosen by hand: PEFT's
    lora.ParamWrapper (MoE experts, routers) refuses any dropout, so a plan that adapts parameters
    exports 0 in place of the default, and is refused, as PEFT would refuse it, with a chosen one."""

    def __repr__(self) -> str:
        return "0.05"


DEFAULT_DROPOUT = _DefaultDropout(0.05)


@dataclass(frozen=True)
class Reason:
    choice: str  # which field the reason is about: targets, r, lora_alpha, ...
    text: str
    source: str | None = None  # citation (paper, seed) where the rule comes from


def _positive_int(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return f"must be a positive integer, got {value!r}"
    return None


def _positive_or_none(value) -> str | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0):
        return f"must be a positive number, got {value!r}"
    return None


def _dropout(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        return f"must be a number in [0, 1), got {value!r}"
    return None


def _bias(value) -> str | None:
    return None if value in BIAS_CHOICES else f"must be one of {', '.join(BIAS_CHOICES)}, got {value!r}"


def _rank_pattern(value) -> str | None:
    bad = {k: v for k, v in dict(value).items() if _positive_int(v)}
    return f"must map module names to positive integers, got {bad!r}" if bad else None


# The checks of LoraPlan's fields: __post_init__ runs them all, the sweep's trial schema per field.
FIELD_RULES = {"r": _positive_int, "lora_alpha": _positive_or_none, "lora_dropout": _dropout, "bias": _bias,
               "loraplus_lr_ratio": _positive_or_none, "rank_pattern": _rank_pattern}


def field_problem(name: str, value) -> str | None:
    """What is wrong with `value` for LoraPlan's field `name` ("must be …"), or None."""
    rule = FIELD_RULES.get(name)
    return rule(value) if rule else None


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class LoraPlan:
    """One LoRA configuration. Each field's `help` metadata is its description everywhere it is
    shown (CLI flags, the sweep spec's schema, docs/sweep.md)."""

    # a spec string; a tuple of items when an item (a `re:` with `{1,3}`) holds a comma itself
    targets: str | tuple[str, ...] = field(default="all-linear", metadata=_help(
        "roles (q,k,v,o,gate,up,down,…), groups (attention, mlp, qv), presets (all-linear, all), module names "
        "or re:REGEX"))
    r: int = field(default=8, metadata=_help("LoRA rank r"))
    lora_alpha: float | None = field(default=None, metadata=_help(
        "lora_alpha; null: alpha = r (scale alpha/r = 1, or sqrt(r) with rsLoRA)"))
    use_rslora: bool = field(default=False, metadata=_help("rsLoRA: scale alpha/sqrt(r) instead of alpha/r"))
    use_dora: bool = field(default=False, metadata=_help("DoRA: a learned magnitude vector per output"))
    loraplus_lr_ratio: float | None = field(default=None, metadata=_help(
        "LoRA+: lora_B's learning rate over lora_A's (e.g. 16); null: one learning rate"))
    lora_dropout: float = field(default=DEFAULT_DROPOUT, metadata=_help("dropout on the LoRA path's input, in [0, 1)"))
    bias: str = field(default="none", metadata=_help("PEFT bias option: none, all or lora_only"))
    layers: str | None = field(default=None, metadata=_help(
        "only these layers, as PEFT's layers_to_transform: e.g. 0-7,30,31 or -8: for the last 8; null: every layer"))
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    lora_bias: bool = False
    task_type: str = "CAUSAL_LM"
    reasons: tuple[Reason, ...] = ()

    def __post_init__(self):
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        problems = [f"{name} {problem}" for name in FIELD_RULES
                    if (problem := field_problem(name, getattr(self, name)))]
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def alpha(self) -> float:
        return float(self.r if self.lora_alpha is None else self.lora_alpha)

    @property
    def scaling(self) -> float:
        """The factor on B·A: alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def dropout_given(self) -> bool:
        """A dropout chosen by hand (not loraplan's default)."""
        return self.lora_dropout > 0 and self.lora_dropout is not DEFAULT_DROPOUT

    def replace(self, **changes) -> LoraPlan:
        return replace(self, **changes)

    def resolve(self, structure):
        """The targets resolved for one model (`ResolvedTargets`)."""
        from ..model.targets import resolve_targets

        return resolve_targets(structure, self.targets, layers=self.layers, exclude=self.modules_to_save)

    def to_peft_kwargs(self, structure) -> dict[str, Any]:
        """Keyword arguments for `peft.LoraConfig` on this model."""
        resolved = self.resolve(structure)
        parameters = parameter_refusal(structure, self, resolved)
        kwargs: dict[str, Any] = {
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0 if parameters else float(self.lora_dropout),
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
        data["lora_dropout"] = float(self.lora_dropout)
        data["rank_pattern"] = dict(self.rank_pattern)
        data["alpha_pattern"] = dict(self.alpha_pattern)
        data["modules_to_save"] = list(self.modules_to_save)
        data["reasons"] = [asdict(r) for r in self.reasons]
        return data

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "config") -> LoraPlan:
        """Read a plan from PEFT / axolotl / LLaMA-Factory / torchtune / loraplan keys."""
        return cls(**plan_fields(data, where))


def parameter_refusal(structure, plan: LoraPlan, resolved) -> bool:
    """Whether the plan adapts parameters (PEFT's lora.ParamWrapper: MoE experts, routers); a
    UsageError with PEFT's own words (asked of the installed PEFT when the structure was built) for
    what ParamWrapper refuses: DoRA, a chosen dropout, lora_bias."""
    params = [m for m in resolved.modules if m.is_parameter]
    if not params:
        return False
    refusals = (structure.peft or {}).get("parameter_refusals") or {}
    asked = {"use_dora": plan.use_dora, "lora_bias": plan.lora_bias, "lora_dropout": plan.dropout_given}
    for setting, on in asked.items():
        if on and setting in refusals:
            what = listing(dict.fromkeys(m.pattern for m in params), 3)
            raise UsageError(f"{refusals[setting]} (PEFT adapts {what} through lora.ParamWrapper)",
                             f"turn {setting} off, or leave the parameters (experts, router) out of the targets")
    return True


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

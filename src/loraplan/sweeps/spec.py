"""The sweep spec: what to train (a grid or a list of LoRA configs) and how (steps, batch, LR).

YAML or flags, validated by pydantic with unknown keys rejected; every error is reported at once,
each unknown key with the nearest valid one. With neither a grid nor a trial list, the grid is the
seeds' six-config ablation (`SEED_GRID`).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import UsageError, nearest
from ..plan.lora_plan import LoraPlan

# The seeds' ablation grid (seed 000, "Full Ablation Study Script"): name, targets, r, alpha, rsLoRA, DoRA.
SEED_GRID = [
    ("baseline_qv_r8", "q,v", 8, 16, False, False),
    ("attention_all_r8", "q,k,v,o", 8, 16, False, False),
    ("attention_all_r16", "q,k,v,o", 16, 16, True, False),
    ("full_r16", "attention,mlp", 16, 16, True, False),
    ("full_r32", "attention,mlp", 32, 32, True, False),
    ("full_r16_dora", "attention,mlp", 16, 16, True, True),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingSettings(_Strict):
    max_steps: int = Field(100, gt=0, description="optimizer steps per trial")
    batch_size: int = Field(8, gt=0, description="examples per optimizer step")
    micro_batch_size: int | None = Field(None, gt=0, description="examples per forward pass (gradient accumulation)")
    learning_rate: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(25, gt=0, description="steps between eval passes (and one at the end)")
    max_eval_examples: int | None = Field(None, gt=0)
    seed: int = 0
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    grad_ckpt: bool = False
    quantization: Literal["4bit", "8bit"] | None = None
    max_grad_norm: float | None = Field(1.0, gt=0)
    engine: Literal["auto", "fast", "peft"] = Field(
        "auto", description="fast: loraplan's engine (bf16 adapter path, CUDA graphs); peft: transformers + PEFT "
                            "as they are; auto: fast on a CUDA GPU. Trials fast cannot run go to PEFT, and say so")


class DataSettings(_Strict):
    train: str | None = None
    eval: str | None = None
    format: Literal["auto", "text", "prompt_completion", "alpaca", "chat"] = "auto"
    max_length: int = Field(512, gt=1)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    max_examples: int | None = Field(None, gt=0)


class TrialSpec(_Strict):
    """One explicit LoRA config. `lora_alpha` null means alpha = r."""

    name: str | None = None
    targets: str
    r: int = Field(gt=0)
    lora_alpha: float | None = Field(None, gt=0)
    use_rslora: bool = False
    use_dora: bool = False
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    layers: str | None = None

    @field_validator("targets", mode="before")
    @classmethod
    def _targets_text(cls, value):
        return ",".join(map(str, value)) if isinstance(value, list) else value


class GridSpec(_Strict):
    """The cartesian product of these lists. `alpha` is a policy: "r", "2r" or a fixed number."""

    targets: list[str] = Field(min_length=1)
    r: list[int] = Field(min_length=1)
    alpha: list[str | float] = ["r"]
    rslora: list[bool] = [False]
    dora: list[bool] = [False]
    loraplus_lr_ratio: list[float | None] = [None]
    lora_dropout: float = Field(0.05, ge=0, lt=1)

    @field_validator("targets", mode="before")
    @classmethod
    def _targets_list(cls, value):
        if isinstance(value, str):
            return [value]
        return [",".join(map(str, v)) if isinstance(v, list) else v for v in value]

    @field_validator("r", "alpha", "rslora", "dora", "loraplus_lr_ratio", mode="before")
    @classmethod
    def _as_list(cls, value):
        return value if isinstance(value, list) else [value]

    @field_validator("r")
    @classmethod
    def _positive(cls, value):
        if any(v <= 0 for v in value):
            raise ValueError("ranks must be positive integers")
        return value

    @field_validator("alpha")
    @classmethod
    def _alpha_policy(cls, value):
        for v in value:
            if isinstance(v, str) and not re.fullmatch(r"(\d+(\.\d+)?)?r", v.strip()):
                raise ValueError(f"alpha policy {v!r}: use 'r', '2r' (alpha = 2·r) or a number")
            if not isinstance(v, str) and v <= 0:
                raise ValueError("a fixed alpha must be positive")
        return value


class HalvingSpec(_Strict):
    enabled: bool = False
    eta: int = Field(2, ge=2, description="keep the best 1/eta of the trials at each rung")
    rungs: int = Field(3, ge=2, description="evaluation points, the last at max_steps")


class SweepSpec(_Strict):
    model: str | None = None
    data: DataSettings = DataSettings()
    training: TrainingSettings = TrainingSettings()
    grid: GridSpec | None = None
    trials: list[TrialSpec] | None = None
    halving: HalvingSpec = HalvingSpec()
    trust_remote_code: bool = False


class Trial(BaseModel):
    """A named trial: its LoRA plan (the engine trains it, the ledger records it)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    plan: LoraPlan


def seed_grid() -> list[TrialSpec]:
    return [TrialSpec(name=n, targets=t, r=r, lora_alpha=a, use_rslora=rs, use_dora=d)
            for n, t, r, a, rs, d in SEED_GRID]


def _alpha_for(policy: str | float, r: int) -> float | None:
    if isinstance(policy, str):
        factor = policy.strip()[:-1]
        return None if factor in ("", "1") else float(factor) * r
    return float(policy)


def expand(spec: SweepSpec) -> list[Trial]:
    """The trials of a spec, with stable unique names."""
    specs: list[TrialSpec] = []
    if spec.grid is not None:
        g = spec.grid
        for targets, r, alpha, rs, dora, lp in itertools.product(
                g.targets, g.r, g.alpha, g.rslora, g.dora, g.loraplus_lr_ratio):
            specs.append(TrialSpec(targets=targets, r=r, lora_alpha=_alpha_for(alpha, r), use_rslora=rs,
                                   use_dora=dora, loraplus_lr_ratio=lp, lora_dropout=g.lora_dropout))
    specs.extend(spec.trials or [])
    if not specs:
        specs = seed_grid()
    trials, seen = [], set()
    for t in specs:
        name = t.name or trial_name(t)
        base, k = name, 2
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        plan = LoraPlan(targets=t.targets, r=t.r, lora_alpha=t.lora_alpha, use_rslora=t.use_rslora,
                        use_dora=t.use_dora, loraplus_lr_ratio=t.loraplus_lr_ratio, lora_dropout=t.lora_dropout,
                        layers=t.layers)
        trials.append(Trial(name=name, plan=plan))
    return trials


def trial_name(t: TrialSpec) -> str:
    targets = re.sub(r"[^A-Za-z0-9_+.-]+", "_", t.targets.replace(",", "+")).strip("_")
    name = f"{targets}_r{t.r}"
    if t.lora_alpha is not None:
        name += f"_a{t.lora_alpha:g}"
    if t.use_rslora:
        name += "_rslora"
    if t.use_dora:
        name += "_dora"
    if t.loraplus_lr_ratio:
        name += f"_lp{t.loraplus_lr_ratio:g}"
    if t.layers:
        name += f"_L{t.layers.replace(',', '+')}"
    return name


def alpha_warnings(trials: list[Trial]) -> list[str]:
    """The seeds' "alpha/rank ratio confusion": a fixed alpha while r varies, without rsLoRA."""
    by_alpha: dict[float, set[int]] = {}
    for t in trials:
        if t.plan.lora_alpha is not None and not t.plan.use_rslora:
            by_alpha.setdefault(t.plan.lora_alpha, set()).add(t.plan.r)
    return [f"lora_alpha is fixed at {a:g} while r varies ({', '.join(map(str, sorted(rs)))}) without rsLoRA: "
            "the scale alpha/r, and with it the effective learning rate, changes with r, so the ranks are "
            "not compared fairly (use alpha policy 'r' or '2r', or rsLoRA)"
            for a, rs in by_alpha.items() if len(rs) > 1]


# -- reading and reporting errors ---------------------------------------------------------------


def load_spec(path: str | Path | None, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read a YAML spec (or none), apply flag overrides (dotted keys), validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"no such sweep spec: {path}", "give a YAML file, e.g. examples/sweep.yaml")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UsageError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path} must hold a mapping of keys (model, data, training, grid, trials, halving)")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise UsageError(describe_errors(e, str(path) if path else "sweep spec"),
                         "see `loraplan sweep --help` and docs/sweep.md") from None


def _fields_at(loc: tuple) -> list[str]:
    model: type[BaseModel] | None = SweepSpec
    for part in loc[:-1]:
        if model is None or isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", ()) or (annotation,)]
        inner = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not inner:
            args = [a for c in candidates for a in getattr(c, "__args__", ())]
            inner = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        model = inner[0] if inner else None
    return list(model.model_fields) if model else []


def describe_errors(error: ValidationError, where: str) -> str:
    problems = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            hint = nearest(str(e["loc"][-1]), _fields_at(e["loc"]))
            problems.append(f"{loc}: unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        else:
            problems.append(f"{loc}: {e['msg']}")
    count = len(problems)
    return f"{where} has {count} problem{'s' if count > 1 else ''}: " + "; ".join(problems)


def parse_grid_flag(text: str) -> dict[str, list]:
    """`--grid "targets=qv;attention;attention,mlp r=8,16 dora=false,true"` -> grid fields."""
    grid: dict[str, list] = {}
    for part in text.split():
        key, sep, values = part.partition("=")
        if not sep or not values:
            raise UsageError(f"--grid: '{part}' is not KEY=VALUES", 'e.g. --grid "targets=qv;attention,mlp r=8,16"')
        key = {"rank": "r", "ranks": "r", "lora_alpha": "alpha"}.get(key, key)
        if key == "targets":
            grid[key] = [v.replace("+", ",") for v in values.split(";") if v]
            continue
        items = [v for v in re.split(r"[;,]", values) if v]
        if key in ("rslora", "dora"):
            grid[key] = [_boolean(v, key) for v in items]
        elif key == "r":
            grid[key] = [_integer(v) for v in items]
        elif key in ("alpha", "loraplus_lr_ratio"):
            grid[key] = [v if v.endswith("r") else (None if v == "none" else float(v)) for v in items]
        else:
            raise UsageError(f"--grid: unknown key '{key}'", "keys: targets, r, alpha, rslora, dora, loraplus_lr_ratio")
    return grid


def _boolean(v: str, key: str) -> bool:
    if v.lower() in ("true", "yes", "1", "on"):
        return True
    if v.lower() in ("false", "no", "0", "off"):
        return False
    raise UsageError(f"--grid: {key}={v} is not true/false")


def _integer(v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise UsageError(f"--grid: r={v} is not an integer") from None

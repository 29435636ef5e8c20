"""The sweep spec: what to train (a grid or a list of LoRA configs) and how (steps, batch, LR).

YAML or flags, validated by pydantic with unknown keys rejected; every error is reported at once,
each unknown key with the nearest valid one. With neither a grid nor a trial list, the grid is the
seeds' six-config ablation (`SEED_GRID`). The schema is the one definition of every key: its
default and description make the `loraplan sweep` flags and docs/sweep.md (`reference`); a
trial's LoRA fields are LoraPlan's own, checked by LoraPlan's rules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from ..errors import UsageError, nearest
from ..files import NAME_RULE, check_name, name_problem, safe_name
from ..plan.alpha import DEFAULT_POLICY, alpha_for, parse_policy, plan_traps
from ..plan.lora_plan import LoraPlan, field_problem

# The seeds' ablation grid (seed 000, "Full Ablation Study Script"): name, targets, r, alpha, rsLoRA, DoRA.
SEED_GRID = [
    ("baseline_qv_r8", "q,v", 8, 16, False, False),
    ("attention_all_r8", "q,k,v,o", 8, 16, False, False),
    ("attention_all_r16", "q,k,v,o", 16, 16, True, False),
    ("full_r16", "attention,mlp", 16, 16, True, False),
    ("full_r32", "attention,mlp", 32, 32, True, False),
    ("full_r16_dora", "attention,mlp", 16, 16, True, True),
]
# The LoraPlan fields a sweep trial sets (the rest keep LoraPlan's defaults).
TRIAL_FIELDS = ("targets", "r", "lora_alpha", "use_rslora", "use_dora", "loraplus_lr_ratio", "lora_dropout", "layers")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _plan_field(name: str, required: bool = False):
    """(type, Field) for LoraPlan's field `name`: its type, default and description."""
    spec = LoraPlan.__dataclass_fields__[name]
    if spec.default is dataclasses.MISSING:
        raise TypeError(f"LoraPlan.{name} has no plain default")
    kind = typing.get_type_hints(LoraPlan)[name]
    return kind, Field(... if required else spec.default, description=spec.metadata.get("help"))


def _check_plan_field(value, info):
    """A pydantic validator: LoraPlan's own rule for this field (for a list, for each item)."""
    for item in value if isinstance(value, list) else [value]:
        problem = field_problem(info.field_name, item)
        if problem:
            raise ValueError(problem)
    return value


class TrainingSettings(_Strict):
    max_steps: int = Field(100, gt=0, description="optimizer steps per trial")
    batch_size: int = Field(8, gt=0, description="examples per optimizer step")
    micro_batch_size: int | None = Field(None, gt=0, description="examples per forward pass, for gradient "
                                                                 "accumulation below batch_size (larger is an "
                                                                 "error); null: batch_size")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate of AdamW")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate schedule after "
                                                                                     "the warm-up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    eval_every: int = Field(25, gt=0, description="steps between eval passes, and one at the end")
    max_eval_examples: int | None = Field(None, gt=0, description="evaluate on at most this many examples; null: "
                                                                  "the whole eval set")
    seed: int = Field(0, description="seed of the adapters' initialization and the data order")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="compute dtype; auto: bf16 on a GPU "
                                                                               "that has it, else fp32")
    grad_ckpt: bool = Field(False, description="gradient checkpointing")
    quantization: Literal["4bit", "8bit"] | None = Field(None, description="a quantized base, 4bit for QLoRA "
                                                                           "(bitsandbytes, CUDA); null: none")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm; null: no clipping")
    lr_policy: Literal["per-config", "fixed"] = Field(
        "per-config", description="per-config: each config is trained at learning_rate × each of lr_factors up to "
                                  "lr_screen of its steps, keeps its best rate and goes on (the other rates stop as "
                                  "pruned), so configs are compared each at its own best rate; fixed: every config "
                                  "at learning_rate (then, with alpha = r, a higher rank wins a short run by "
                                  "learning faster)")
    lr_factors: list[float] = Field([1 / 3, 1.0, 3.0], min_length=1,
                                    description="per-config: the learning rates tried, as multiples of learning_rate")
    lr_screen: float = Field(0.25, gt=0, lt=1, description="per-config: the share of max_steps after which each config "
                                                           "keeps its best learning rate")
    budget_steps: int | None = Field(None, gt=0, description="the sweep's optimizer steps in all (every config and "
                                                             "learning rate); when set, max_steps is derived from it")
    engine: Literal["auto", "fast", "peft"] = Field(
        "auto", description="fast: loraplan's engine (bf16 adapter path, CUDA graphs); peft: transformers + PEFT "
                            "as they are; auto: fast on a CUDA GPU. Trials fast cannot run go to PEFT, and say so")

    @model_validator(mode="after")
    def _micro_within_batch(self):
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} is larger than batch_size {self.batch_size} "
                             "(a micro-batch is a part of a step's batch)")
        return self


    @field_validator("lr_factors")
    @classmethod
    def _positive_factors(cls, value):
        if any(f <= 0 for f in value):
            raise ValueError("every learning-rate factor must be > 0")
        return sorted(set(value))


class DataSettings(_Strict):
    train: str | None = Field(None, description="training data: .jsonl / .json / .csv / .parquet, a dataset folder "
                                                "or a Hub dataset id")
    eval: str | None = Field(None, description="eval data; null: hold out eval_fraction of train, fixed seed")
    format: Literal["auto", "text", "prompt_completion", "alpaca", "chat"] = Field(
        "auto", description="the rows' format, detected from their keys when auto")
    max_length: int = Field(512, gt=1, description="tokens per example; longer ones are truncated")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of train held out for eval when eval is null")
    max_examples: int | None = Field(None, gt=0, description="use only the first N training rows; null: all")


_TrialFields = create_model(
    "_TrialFields", __base__=_Strict,
    name=(str | None, Field(None, description=f"the trial's folder name ({NAME_RULE}; unique); null: made from "
                                              "its settings")),
    **{n: _plan_field(n, required=n in ("targets", "r")) for n in TRIAL_FIELDS})


class TrialSpec(_TrialFields):
    """One explicit LoRA config: LoraPlan's fields (and its checks) plus a name."""

    @field_validator("targets", mode="before")
    @classmethod
    def _targets_text(cls, value):
        return ",".join(map(str, value)) if isinstance(value, list) else value

    _plan_rules = field_validator(*TRIAL_FIELDS)(_check_plan_field)

    @field_validator("name", mode="before")
    @classmethod
    def _safe_name(cls, value):
        problem = None if value is None else name_problem(value)
        if problem:  # the name becomes trials/<name>/: never a path
            raise ValueError(f"trial name {problem}")
        return value

    def plan(self) -> LoraPlan:
        # a dropout left to the default stays loraplan's default (PEFT's ParamWrapper on MoE experts
        # takes none, so the plan drops it there; a dropout chosen by hand is the user's)
        fields = set(TRIAL_FIELDS) - ({"lora_dropout"} - self.model_fields_set)
        return LoraPlan(**self.model_dump(include=fields))


class GridSpec(_Strict):
    """The cartesian product of these lists."""

    targets: list[str] = Field(min_length=1, description="target sets, each in the --targets grammar")
    r: list[int] = Field(min_length=1, description="ranks")
    alpha: list[str | float] = Field([DEFAULT_POLICY], description="alpha policies: 'r' (alpha = r), '2r', or a "
                                                                   "number (a fixed alpha: warned when r varies)")
    rslora: list[bool] = Field([False], description="rsLoRA off and/or on")
    dora: list[bool] = Field([False], description="DoRA off and/or on")
    loraplus_lr_ratio: list[float | None] = Field([None], description="LoRA+ ratios; null: off")
    lora_dropout: float = _plan_field("lora_dropout")[1]

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

    _plan_rules = field_validator("r", "loraplus_lr_ratio", "lora_dropout")(_check_plan_field)

    @field_validator("alpha")
    @classmethod
    def _alpha_policy(cls, value):
        return [parse_policy(v) for v in value]


class HalvingSpec(_Strict):
    enabled: bool = Field(False, description="successive halving: stop the worst trials at each rung")
    eta: int = Field(2, ge=2, description="keep the best 1/eta of the trials at each rung")
    rungs: int = Field(3, ge=2, description="evaluation points, the last at max_steps")


class ExecutorSettings(_Strict):
    """Where the trials run (sweeps/executors.py). Not part of the spec's identity: a sweep started on
    one executor resumes on another."""

    kind: Literal["local", "ray"] = Field(
        "local", description="local: one worker process per GPU of this machine (in this process when there is "
                             "one GPU or none); ray: Ray actors on a cluster, the folder on storage they share")
    gpus: str | None = Field(None, description="local: the GPUs to use, e.g. 0,1 (one worker process each), or "
                                               "cpu:N for N CPU worker processes; null: every visible GPU")
    ray_address: str | None = Field(None, description="ray: the cluster to join (host:port or ray://host:port); "
                                                      "null: RAY_ADDRESS, else a local Ray started for the sweep")
    gpus_per_trial: float = Field(1.0, gt=0, description="ray: GPUs each worker reserves (0.5: two share a GPU); "
                                                         "on a cluster without GPUs, none")
    workers: int | None = Field(None, gt=0, description="ray: at most this many workers; null: as many as the "
                                                        "cluster's GPUs (or CPUs) allow, one per trial at most")

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_list(cls, value):
        if value is None:
            return value
        text = (",".join(map(str, value)) if isinstance(value, list) else str(value)).replace(" ", "")
        if re.fullmatch(r"cpu:[1-9]\d*", text) or re.fullmatch(r"\d+(,\d+)*", text):
            if "," in text and len(set(text.split(","))) != len(text.split(",")):
                raise ValueError(f"'{value}' names a GPU twice")
            return text
        raise ValueError(f"'{value}' is not a list of GPU indices such as 0,1 or cpu:N")


class SweepSpec(_Strict):
    model: str | None = Field(None, description="a model folder or Hub id (or MODEL on the command line)")
    data: DataSettings = Field(DataSettings(), description="the data")
    training: TrainingSettings = Field(TrainingSettings(), description="how each trial trains")
    grid: GridSpec | None = Field(None, description="a grid of configs; with neither grid nor trials, the seeds' "
                                                    "six configs (an empty `grid:` is an error)")
    trials: list[TrialSpec] | None = Field(None, description="explicit configs, added to the grid; names are "
                                                             "unique (a repeated name is an error)")

    @field_validator("grid", "trials", mode="before")
    @classmethod
    def _not_empty(cls, value, info):
        # an empty `grid:` or `trials: []` is a spec cut short, not a request for the seeds' grid
        if value is None or (isinstance(value, dict | list) and not value):
            raise ValueError(f"`{info.field_name}:` is empty: give its values, or leave the key out for the "
                             "seeds' six configs")
        return value
    halving: HalvingSpec = Field(HalvingSpec(), description="successive halving")
    executor: ExecutorSettings = Field(ExecutorSettings(), description="where the trials run")
    trust_remote_code: bool = Field(False, description="allow the model's own code (off by default: read the "
                                                       "code first)")


class Trial(BaseModel):
    """A named trial: its LoRA plan (the engine trains it, the ledger records it)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    plan: LoraPlan
    learning_rate: float | None = None  # None: training.learning_rate
    config: str | None = None  # the config this trial trains at one learning rate (None: itself)

    @property
    def adapter_name(self) -> str:
        """The name PEFT knows the trial's adapter by, derived from the trial's name: PEFT keys
        ModuleDicts with it (no '.', no '+'), and strips `.NAME` from state-dict keys when it saves,
        so a short name such as `q` would cut `.q_proj` keys. A prefix, the name's safe characters
        and a hash of the name keep it unique and unlike any module name."""
        digest = hashlib.sha1(self.name.encode()).hexdigest()[:8]
        return f"trial_{re.sub(r'[^A-Za-z0-9_]', '_', self.name)[:40]}_{digest}"


def seed_grid() -> list[TrialSpec]:
    return [TrialSpec(name=n, targets=t, r=r, lora_alpha=a, use_rslora=rs, use_dora=d)
            for n, t, r, a, rs, d in SEED_GRID]


def expand(spec: SweepSpec) -> list[Trial]:
    """The trials of a spec, with stable names; a name made twice (by the grid, the trial list or
    both) is an error, never silently renamed."""
    specs: list[TrialSpec] = []
    if spec.grid is not None:
        g = spec.grid
        # a dropout left to the default stays loraplan's default (PEFT's ParamWrapper on MoE experts
        # takes none, so the plan drops it there; a dropout chosen by hand is the user's)
        dropout = {"lora_dropout": g.lora_dropout} if "lora_dropout" in g.model_fields_set else {}
        for targets, r, alpha, rs, dora, lp in itertools.product(
                g.targets, g.r, g.alpha, g.rslora, g.dora, g.loraplus_lr_ratio):
            specs.append(TrialSpec(targets=targets, r=r, lora_alpha=alpha_for(alpha, r), use_rslora=rs,
                                   use_dora=dora, loraplus_lr_ratio=lp, **dropout))
    specs.extend(spec.trials or [])
    if not specs:
        specs = seed_grid()
    trials = [Trial(name=check_name(t.name or trial_name(t)), plan=t.plan()) for t in specs]
    names = [t.name for t in trials]
    repeated = list(dict.fromkeys(n for n in names if names.count(n) > 1))
    if repeated:
        raise UsageError("duplicate trial names: " + ", ".join(f"'{n}' ({names.count(n)}×)" for n in repeated),
                         "give each trial its own `name:`, or remove the repeated grid value")
    return trials


def trial_name(t: TrialSpec) -> str:
    name = f"{safe_name(t.targets.replace(',', '+'), 'targets')[:60]}_r{t.r}"
    if t.lora_alpha is not None:
        name += f"_a{t.lora_alpha:g}"
    if t.use_rslora:
        name += "_rslora"
    if t.use_dora:
        name += "_dora"
    if t.loraplus_lr_ratio:
        name += f"_lp{t.loraplus_lr_ratio:g}"
    if t.layers:
        name += f"_L{safe_name(t.layers.replace(',', '+'))}"
    return name


def alpha_warnings(trials: list[Trial]) -> list[str]:
    """The alpha rule (plan/alpha.py) over the trials: series whose alpha/r changes with r."""
    return [f"{trap.message()}; use alpha policy 'r' or '2r', or rsLoRA"
            for trap in plan_traps(t.plan for t in trials)]


def reference() -> str:
    """Every key of the spec with its default and meaning, as Markdown (docs/sweep.md holds it)."""
    lines = []
    sections = [("", SweepSpec)] + [(name, kind) for name, kind in (
        ("data", DataSettings), ("training", TrainingSettings), ("grid", GridSpec), ("trials[]", TrialSpec),
        ("halving", HalvingSpec), ("executor", ExecutorSettings))]
    for prefix, schema in sections:
        lines += ["", f"### `{prefix}`" if prefix else "### top level", "", "| key | default | meaning |",
                  "|---|---|---|"]
        for key, info in schema.model_fields.items():
            default = "required" if info.is_required() else _yaml_value(info.get_default(call_default_factory=True))
            text = (info.description or "").replace("|", "\\|")
            lines.append(f"| `{key}` | {default} | {text} |")
    return "\n".join(lines[1:]) + "\n"


def _yaml_value(value) -> str:
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, float):  # LoraPlan's DEFAULT_DROPOUT is a float subclass yaml would not know
        value = float(value)
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


# -- reading and reporting errors ---------------------------------------------------------------


def load_spec(path: str | Path | None, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read a YAML spec (or none), apply flag overrides (dotted keys), validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"no such sweep spec: {path}", "give a YAML file, e.g. examples/sweep.yaml")
        try:
            data = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            raise UsageError(f"{path} is not UTF-8 text (byte {e.start}): not a YAML sweep spec",
                             "give a YAML file, e.g. examples/sweep.yaml") from None
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
            problems.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}")
    count = len(problems)
    return f"{where} has {count} problem{'s' if count > 1 else ''}: " + "; ".join(problems)


def parse_grid_flag(text: str) -> dict[str, Any]:
    """`--grid "targets=qv;attention;attention,mlp r=8,16 dora=false,true"` -> grid fields."""
    grid: dict[str, Any] = {}
    for part in text.split():
        key, sep, values = part.partition("=")
        if not sep or not values:
            raise UsageError(f"--grid: '{part}' is not KEY=VALUES", 'e.g. --grid "targets=qv;attention,mlp r=8,16"')
        key = {"rank": "r", "ranks": "r", "lora_alpha": "alpha", "dropout": "lora_dropout"}.get(key, key)
        if key == "targets":
            grid[key] = [v.replace("+", ",") for v in values.split(";") if v]
            continue
        items = [v for v in re.split(r"[;,]", values) if v]
        if key in ("rslora", "dora"):
            grid[key] = [_boolean(v, key) for v in items]
        elif key == "r":
            grid[key] = [_integer(v) for v in items]
        elif key in ("alpha", "loraplus_lr_ratio"):
            grid[key] = [v if v.endswith("r") else (None if v == "none" else _number(v, key)) for v in items]
        elif key == "lora_dropout" and len(items) == 1:
            grid[key] = _number(items[0], key)
        else:
            raise UsageError(f"--grid: unknown key '{key}'" if key not in GridSpec.model_fields else
                             f"--grid: {key} takes one value", f"keys: {', '.join(GridSpec.model_fields)}")
    return grid


def _number(v: str, key: str) -> float:
    try:
        return float(v)
    except ValueError:
        raise UsageError(f"--grid: {key}={v} is not a number") from None


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

"""What a model looks like to LoRA, read off the real transformers class on the `meta` device.

`ModelStructure` lists every adaptable weight (`ModuleInfo`: Linear, transformers Conv1D,
Embedding, Conv, and the raw parameters PEFT reaches through `target_parameters`, such as fused
MoE experts), every named module with its class (PEFT matches `target_modules` against all of them,
containers included, and refuses those it cannot wrap), every unique parameter and the tied ones,
and PEFT's own answers for the model (peft_facts.py). It is plain data: counting, target
resolution and the memory estimate never import torch. Building it imports transformers and PEFT
once; the result is cached as JSON keyed by the config and the transformers and PEFT versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from importlib import metadata
from pathlib import Path

from ..errors import UsageError
from ..files import write_json

STRUCTURE_FORMAT = 2

# PEFT's own rule for the layer index of a key when `layers_pattern` is unset
# (peft.tuners.tuners_utils.check_target_module_exists): the first numbered segment.
_PEFT_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")
_INDEX_COMPONENT = re.compile(r"^\d+$")


@dataclass(frozen=True)
class ModuleInfo:
    """One weight LoRA can adapt. `param` is set for a parameter target (`target_parameters`)."""

    name: str  # the PEFT key: a module name, or "<module>.<param>" for a parameter target
    cls: str  # the module's class name
    kind: str  # linear | conv1d | embedding | conv | param
    in_features: int
    out_features: int
    experts: int = 1  # leading dimension of a 3-D parameter (fused MoE experts)
    kernel: int = 1  # product of a convolution's kernel sizes
    bias: int = 0  # numel of the module's bias (0 when it has none)
    groups: int = 1  # a convolution's groups (PEFT's lora_B is grouped too)
    role: str = "other"
    guess: str | None = None  # for role "other": what the path suggests
    block: str | None = None  # attention | mlp | ssm: what the groups of the same names select

    @property
    def is_parameter(self) -> bool:
        return self.kind == "param"

    @property
    def module_name(self) -> str:
        return self.name.rpartition(".")[0] if self.is_parameter else self.name

    @property
    def leaf(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def pattern(self) -> str:
        """`model.layers.*.mlp.up_proj`; a numbered leaf stays (CTRL's `ffn.0` and `ffn.2` differ)."""
        head, _, leaf = self.name.rpartition(".")
        return f"{pattern_of(head)}.{leaf}" if head and leaf.isdigit() else pattern_of(self.name)

    @property
    def layer(self) -> int | None:
        return peft_layer_index(self.name)

    @property
    def weight_numel(self) -> int:
        return self.experts * self.in_features * self.out_features * self.kernel

    @property
    def shape_text(self) -> str:
        text = f"{self.in_features}→{self.out_features}"
        return f"{self.experts}×{text}" if self.experts > 1 else text


@dataclass
class ModelStructure:
    model_type: str
    architecture: str
    config: dict = field(repr=False)
    modules: list[ModuleInfo] = field(repr=False)
    module_names: list[str] = field(repr=False)  # every named module, containers included
    params: dict[str, int] = field(repr=False)  # unique parameter name -> numel
    tied: dict[str, str] = field(repr=False)  # shared parameter name -> the name counted
    input_embeddings: str | None = None
    output_embeddings: str | None = None
    transformers_version: str = ""
    source: str = ""
    # PEFT's transformers-v5 rewrite of v4 MoE target names for this model type, if any:
    # {"renames": {"gate_proj": "gate_up_proj", ...}, "fused": {"gate_up_proj": ["gate_proj", "up_proj"]}}
    moe_renames: dict | None = None
    module_classes: dict[str, str] = field(default_factory=dict, repr=False)  # module name -> class
    # what the installed PEFT does on this model (peft_facts.ask_peft): its all-linear, the names
    # it refuses, what its ParamWrapper refuses
    peft: dict = field(default_factory=dict, repr=False)

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @cached_property
    def by_name(self) -> dict[str, ModuleInfo]:
        return {m.name: m for m in self.modules}

    @property
    def num_layers(self) -> int:
        layers = {m.layer for m in self.modules if m.layer is not None}
        return max(layers) + 1 if layers else 0

    @property
    def tied_embeddings(self) -> bool:
        out = self.output_embeddings
        return out is not None and f"{out}.weight" in self.tied

    def text_config(self) -> dict:
        """The language model's config (the top-level one, or `text_config` of a multimodal model)."""
        return self.config.get("text_config") or self.config

    # -- serialization: grouped by pattern so that a 405B model stays a few kilobytes --

    def to_json(self) -> dict:
        return {
            "format": STRUCTURE_FORMAT,
            "transformers": self.transformers_version,
            "model_type": self.model_type,
            "architecture": self.architecture,
            "input_embeddings": self.input_embeddings,
            "output_embeddings": self.output_embeddings,
            "tied": self.tied,
            "module_names": _group(self.module_names, lambda n: self.module_classes.get(n)),
            "params": _group(list(self.params), lambda n: self.params[n]),
            "adaptable": _group(
                [m.name for m in self.modules],
                lambda n: _module_fields(self.by_name[n]),
            ),
            "moe_renames": self.moe_renames,
            "peft": _peft_to_json(self.peft),
            "config": self.config,
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "") -> ModelStructure:
        from .roles import assign_roles

        names = _ungroup_values(data["module_names"])
        params = dict(_ungroup_values(data["params"]))
        raw = [
            ModuleInfo(name, *fields)
            for name, fields in _ungroup_values(data["adaptable"])
        ]
        structure = cls(
            model_type=data["model_type"],
            architecture=data["architecture"],
            config=data["config"],
            modules=raw,
            module_names=[n for n, _ in names],
            params=params,
            tied=data["tied"],
            input_embeddings=data["input_embeddings"],
            output_embeddings=data["output_embeddings"],
            transformers_version=data["transformers"],
            source=source,
            moe_renames=data.get("moe_renames"),
            module_classes={n: c for n, c in names if c},
            peft=_peft_from_json(data["peft"]),
        )
        structure.modules = assign_roles(structure)
        return structure


def _peft_to_json(peft: dict) -> dict:
    """A 405B model's all-linear is ~900 full names: stored grouped by pattern like the rest."""
    if not peft:
        return peft
    linear = dict(peft["all_linear"])
    if isinstance(linear["target_modules"], list):
        linear["target_modules"] = _group(linear["target_modules"], lambda n: None)
    return {**peft, "all_linear": linear}


def _peft_from_json(data: dict) -> dict:
    if not data:
        return data
    linear = dict(data["all_linear"])
    if isinstance(linear["target_modules"], list):
        linear["target_modules"] = [n for n, _ in _ungroup_values(linear["target_modules"])]
    return {**data, "all_linear": linear}


def _module_fields(m: ModuleInfo) -> list:
    return [m.cls, m.kind, m.in_features, m.out_features, m.experts, m.kernel, m.bias, m.groups]


def pattern_of(name: str) -> str:
    """`model.layers.3.self_attn.q_proj` -> `model.layers.*.self_attn.q_proj`."""
    return ".".join("*" if _INDEX_COMPONENT.match(p) else p for p in name.split("."))


def indices_of(name: str) -> list[int]:
    return [int(p) for p in name.split(".") if _INDEX_COMPONENT.match(p)]


def peft_layer_index(name: str) -> int | None:
    match = _PEFT_LAYER_INDEX.match(name)
    return int(match.group("idx")) if match else None


def _fill(pattern: str, indices: list[int]) -> str:
    it = iter(indices)
    return ".".join(str(next(it)) if p == "*" else p for p in pattern.split("."))


def _group(names: list[str], value) -> list:
    """[[pattern, value, [indices, ...]], ...] in first-seen order."""
    groups: dict[tuple, list] = {}
    for name in names:
        key = (pattern_of(name), json.dumps(value(name)))
        groups.setdefault(key, []).append(indices_of(name))
    return [[pattern, json.loads(v), idx] for (pattern, v), idx in groups.items()]


def _ungroup_values(groups: list) -> list[tuple[str, object]]:
    out = []
    for pattern, value, indices in groups:
        out.extend((_fill(pattern, idx), value) for idx in indices)
    return out


# -- building from transformers -----------------------------------------------------------------


def transformers_version() -> str:
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:  # pragma: no cover - a hard dependency
        return "unknown"


def structure_key(config: dict, architecture: str | None) -> str:
    from .peft_facts import peft_version

    blob = json.dumps(
        {"config": config, "architecture": architecture, "transformers": transformers_version(),
         "peft": peft_version(), "format": STRUCTURE_FORMAT},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cache_dirs() -> list[Path]:
    shipped = Path(__file__).parent / "builtin_structures"
    user = Path(os.environ.get("LORAPLAN_CACHE_DIR") or Path.home() / ".cache" / "loraplan") / "structures"
    return [shipped, user]


def cached_structure(key: str, source: str) -> ModelStructure | None:
    for folder in _cache_dirs():
        path = folder / f"{key}.json"
        if path.is_file():
            try:
                return ModelStructure.from_json(json.loads(path.read_text()), source=source)
            except (ValueError, KeyError, TypeError):
                continue  # a stale or damaged cache entry is rebuilt, never trusted
    return None


def store_structure(key: str, structure: ModelStructure, folder: Path | None = None) -> None:
    folder = folder or _cache_dirs()[1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / f"{key}.json", structure.to_json(), indent=None, durable=False)
    except OSError:
        pass  # the cache is an optimisation; a read-only home must not fail the command


def build_structure(config, architecture: str | None = None, trust_remote_code: bool = False,
                    source: str = "") -> ModelStructure:
    """Instantiate the model class for `config` on the meta device and read its structure."""
    model = instantiate_on_meta(config, architecture, trust_remote_code)
    return read_structure(model, source=source)


def model_class_for(config, architecture: str | None = None, trust_remote_code: bool = False):
    """The transformers class to build: the named one, the config's `architectures[0]`, or the
    first auto class (causal LM, seq2seq, masked LM, base model) that knows the config."""
    import transformers

    names = [architecture] if architecture else list(getattr(config, "architectures", None) or [])
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
        if architecture:
            raise UsageError(f"transformers has no model class '{architecture}'",
                             "give a class name such as LlamaForCausalLM, or leave --arch out")
    autos = ["AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForImageTextToText",
             "AutoModelForMaskedLM", "AutoModel"]
    for name in autos:
        auto = getattr(transformers, name, None)
        if auto is None:
            continue
        mapping = getattr(auto, "_model_mapping", None)
        if mapping is not None and type(config) in mapping:
            return auto
        if trust_remote_code and name in (getattr(config, "auto_map", None) or {}):
            return auto
    raise UsageError(f"transformers has no model class for model_type '{config.model_type}'",
                     "upgrade transformers, or pass --trust-remote-code for a model with its own code")


def instantiate_on_meta(config, architecture: str | None = None, trust_remote_code: bool = False):
    import torch
    import transformers

    cls = model_class_for(config, architecture, trust_remote_code)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            if cls.__name__.startswith("AutoModel"):
                return cls.from_config(config, trust_remote_code=trust_remote_code)
            return cls._from_config(config)
    finally:
        transformers.logging.set_verbosity(verbosity)


def read_structure(model, source: str = "") -> ModelStructure:
    """Read a structure off an instantiated model (meta or real weights; it is not changed)."""
    from .peft_facts import ask_peft, peft_moe_renames
    from .roles import assign_roles

    modules, names, classes = [], [], {}
    for name, module in model.named_modules():
        names.append(name)
        classes[name] = type(module).__name__
        modules.extend(_adaptable(name, module))
    params, tied, seen = {}, {}, {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in seen:
            tied[pname] = seen[key]
            continue
        seen[key] = pname
        params[pname] = _numel(p)
    config = model.config
    structure = ModelStructure(
        model_type=getattr(config, "model_type", "") or "",
        architecture=type(model).__name__,
        config=json.loads(config.to_json_string(use_diff=False)),
        modules=modules,
        module_names=[n for n in names if n],
        params=params,
        tied=tied,
        input_embeddings=_name_of(model, _safe(model, "get_input_embeddings")),
        output_embeddings=_name_of(model, _safe(model, "get_output_embeddings")),
        transformers_version=transformers_version(),
        source=source,
        moe_renames=peft_moe_renames(getattr(config, "model_type", "")),
        module_classes={n: c for n, c in classes.items() if n},
        peft=ask_peft(model),
    )
    structure.modules = assign_roles(structure)
    return structure


def _numel(p) -> int:
    # Under DeepSpeed ZeRO-3 the local tensor is empty; the real size is in ds_numel.
    return int(getattr(p, "ds_numel", 0) or p.numel())


def _safe(model, method):
    try:
        return getattr(model, method)()
    except (AttributeError, NotImplementedError, TypeError):
        return None


def _name_of(model, module) -> str | None:
    if module is None:
        return None
    return next((n for n, m in model.named_modules() if m is module), None)


def _adaptable(name: str, module) -> list[ModuleInfo]:
    import torch.nn as nn

    cls = type(module).__name__
    bias = getattr(module, "bias", None)
    bias_numel = int(bias.numel()) if isinstance(bias, nn.Parameter) else 0
    if isinstance(module, nn.Linear):
        return [ModuleInfo(name, cls, "linear", module.in_features, module.out_features, bias=bias_numel)]
    if isinstance(module, nn.Embedding):
        return [ModuleInfo(name, cls, "embedding", module.num_embeddings, module.embedding_dim)]
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        return [ModuleInfo(name, cls, "conv", module.in_channels, module.out_channels,
                           kernel=kernel, bias=bias_numel, groups=module.groups)]
    if _is_transformers_conv1d(module):
        in_features, out_features = module.weight.shape
        return [ModuleInfo(name, cls, "conv1d", int(in_features), int(out_features), bias=bias_numel)]
    if isinstance(module, nn.MultiheadAttention | nn.LayerNorm) or "Norm" in cls:
        return []
    out = []
    # Raw 2-D/3-D parameters on custom modules: fused MoE experts, routers. PEFT reaches them with
    # `target_parameters`; its lora.ParamWrapper reads a 3-D parameter as (experts, out, in)
    # unless the module says `is_transposed`.
    for pname, p in module.named_parameters(recurse=False):
        if "bias" in pname:
            continue  # expert biases (gpt-oss) are not low-rank targets
        shape = tuple(p.shape)
        if len(shape) == 3:
            experts, a, b = shape
            in_f, out_f = (a, b) if getattr(module, "is_transposed", False) else (b, a)
            out.append(ModuleInfo(f"{name}.{pname}", cls, "param", in_f, out_f, experts=experts))
        elif len(shape) == 2:
            out.append(ModuleInfo(f"{name}.{pname}", cls, "param", shape[1], shape[0]))
    return out


def _is_transformers_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")

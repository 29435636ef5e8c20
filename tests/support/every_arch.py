"""Every causal-LM architecture transformers knows, built tiny on the meta device, with PEFT's count.

Used by tests/test_every_architecture.py and by benchmarks/exactness/table.py (the per-version
table). A config starts from the model class's own defaults with at most two layers; the handful
of architectures whose defaults do not build get the few values they lack (OVERRIDES) — never a
shape that hides a difference — and keeps the fewest layers that still hold every kind of layer.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

LAYERS = 2
_LAYER_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers", "decoder_layers",
               "encoder_layers", "num_encoder_layers")

# Defaults that do not build in transformers 5.17-5.25: the missing values, nothing else.
OVERRIDES: dict[str, dict] = {
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {"attn_config": {"rope_theta": 10000.0}},
    "dots1": {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
    "gemma4_unified_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
    "hunyuan_v1_dense": {"head_dim": 128},
    "hunyuan_v1_moe": {"head_dim": 128},
    "lfm2_moe": {"num_hidden_layers": 2, "layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "ministral": {"head_dim": 128},
    "nemotron": {"num_key_value_heads": 8},
    "reformer": {"is_decoder": True},
    # hybrids whose default config has no attention layer at all: one, as every released checkpoint has
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]},
}
# Architectures that cannot be built here, with the reason (each is printed by the test).
UNBUILDABLE = {
    "gemma3n": "its causal-LM class is the multimodal Gemma3nForConditionalGeneration, whose vision tower needs "
               "timm (not a loraplan dependency); the text model is covered as gemma3n_text",
}


def architectures() -> dict[str, str]:
    """{model_type: class name} of transformers' causal-LM auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def model_class(model_type: str):
    import transformers

    return getattr(transformers, architectures()[model_type])


def _cut(config, layers: int):
    """CONFIG with at most LAYERS layers, per-layer lists and patterns cut to match."""
    import transformers

    subs = [config] + [v for v in vars(config).values() if isinstance(v, transformers.PretrainedConfig)]
    for sub in subs:
        for key in _LAYER_KEYS:
            n = getattr(sub, key, None)
            if not isinstance(n, int) or isinstance(n, bool) or n <= layers:
                continue
            try:
                setattr(sub, key, layers)
            except (NotImplementedError, AttributeError, ValueError):
                continue  # derived from other keys (prophetnet): those are cut instead
            for name, value in list(vars(sub).items()):
                per_layer = isinstance(value, list) or (isinstance(value, str) and "pattern" in name)
                if per_layer and len(value) == n and name not in _LAYER_KEYS:
                    setattr(sub, name, value[:layers])
    return config


def _build(config, model_type: str):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return model_class(model_type)._from_config(config)


def _kinds(model) -> set[tuple[str, str]]:
    """Every (name pattern, class) of the model: what a cut must keep (a hybrid's attention layers)."""
    from loraplan.model.structure import pattern_of

    return {(pattern_of(name), type(module).__name__) for name, module in model.named_modules()}


def _reloads(config) -> bool:
    """Whether the config survives config.json (a cut can leave per-layer keys behind)."""
    import json

    from transformers import PretrainedConfig

    data = PretrainedConfig._decode_special_floats(json.loads(config.to_json_string(use_diff=False)))
    try:
        type(config).from_dict({k: v for k, v in data.items() if k != "model_type"})
    except Exception:  # noqa: BLE001 - any failure means: do not use this cut
        return False
    return True


@cache
def tiny_config(model_type: str):
    """The class's default config with the fewest layers (2, 4, 8, 16) that keeps every kind of
    layer the default model has; the default itself when no cut does."""
    cls = model_class(model_type)
    full = cls.config_class(**OVERRIDES.get(model_type, {}))
    try:
        kinds = _kinds(_build(copy.deepcopy(full), model_type))
    except Exception:  # noqa: BLE001 - a default that only builds cut down: take the first cut that builds
        kinds = None
    for layers in (LAYERS, 4, 8, 16):
        config = _cut(copy.deepcopy(full), layers)
        try:
            if _reloads(config) and kinds in (None, _kinds(_build(copy.deepcopy(config), model_type))):
                return config
        except Exception:  # noqa: BLE001 - a cut the model does not accept
            continue
    return full


@cache
def meta_model(model_type: str):
    """The tiny model on the meta device (no memory); copy it before PEFT changes it."""
    return _build(copy.deepcopy(tiny_config(model_type)), model_type)


def peft_count(model_type: str, **lora_kwargs) -> tuple[int, int]:
    """PEFT's own get_nb_trainable_parameters() after get_peft_model with these LoraConfig
    arguments (strings reach PEFT as given); PEFT's exception propagates."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(meta_model(model_type))
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    return peft_model.get_nb_trainable_parameters()


# -- loraplan against PEFT ----------------------------------------------------------------------

SPECS = ("all-linear", "all-linear+dora", "attention", "mlp", "literal", "literal+dora")
R = 4


@dataclass(frozen=True)
class Outcome:
    """One comparison: `equal` (counts agree), `both refuse`, `mismatch`, `loraplan refuses` (PEFT
    counts), `peft refuses` (loraplan counts), `crash` (loraplan raised something but a UsageError)."""

    kind: str
    detail: str = ""

    @property
    def agrees(self) -> bool:
        return self.kind in ("equal", "both refuse")


@cache
def config_folder(model_type: str) -> str:
    """The tiny config written as a model folder (config.json only), as a user would point at it."""
    folder = Path(tempfile.mkdtemp(prefix=f"loraplan-{model_type}-"))
    config = copy.deepcopy(tiny_config(model_type))
    config.architectures = [architectures()[model_type]]
    config.save_pretrained(folder)
    return str(folder)


def literal_name(structure) -> str:
    """A module name taken from the model: the leaf of its first layer-stack Linear."""
    return next(m.leaf for m in structure.modules if m.kind in ("linear", "conv1d") and m.layer is not None)


def compare(model_type: str, spec: str) -> Outcome:
    """loraplan's `count` on the config folder against PEFT's own count on the meta model."""
    from loraplan.errors import UsageError
    from loraplan.model.loading import load_structure
    from loraplan.plan.count import count_plan
    from loraplan.plan.lora_plan import LoraPlan

    name, _, option = spec.partition("+")
    dora = option == "dora"
    ours = theirs = None
    try:  # transformers wrote this config.json itself: not reading it is a crash, whatever the error
        structure = load_structure(config_folder(model_type))
    except Exception as e:  # noqa: BLE001
        return Outcome("crash", f"reading the config: {type(e).__name__}: {e}")
    targets = literal_name(structure) if name == "literal" else name
    plan = LoraPlan(targets=targets, r=R, use_dora=dora)
    try:
        result = count_plan(structure, plan)
        ours = (result.trainable_params, result.total_params)
    except UsageError as e:
        ours = e
    except Exception as e:  # noqa: BLE001 - anything but a UsageError is a loraplan bug
        return Outcome("crash", f"{type(e).__name__}: {e}")
    if name in ("all-linear", "literal"):
        kwargs = {"target_modules": targets if name == "all-linear" else [targets]}  # as PEFT reads them
    elif isinstance(ours, Exception):
        return Outcome("loraplan refuses", ours.one_line())
    else:
        kwargs = plan.to_peft_kwargs(structure)
        kwargs.pop("task_type")
    kwargs.update(r=R, use_dora=dora, lora_alpha=kwargs.get("lora_alpha", R))
    try:
        theirs = peft_count(model_type, **kwargs)
    except Exception as e:  # noqa: BLE001 - PEFT's refusal, whatever its type
        theirs = e
    if isinstance(ours, Exception) and isinstance(theirs, Exception):
        return Outcome("both refuse", f"{ours.one_line()} | PEFT: {type(theirs).__name__}: {theirs}")
    if isinstance(ours, Exception):
        return Outcome("loraplan refuses", f"{ours.one_line()} | PEFT counts {theirs}")
    if isinstance(theirs, Exception):
        return Outcome("peft refuses", f"loraplan counts {ours} | PEFT: {type(theirs).__name__}: {theirs}")
    if ours != theirs:
        return Outcome("mismatch", f"loraplan {ours}, PEFT {theirs}")
    return Outcome("equal")

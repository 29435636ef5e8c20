"""What the installed PEFT itself does on one model, asked once when the model's structure is built.

The meaning of a LoRA target is PEFT's, and it moves between releases: with transformers 5, PEFT
0.21 reads `all-linear` on an MoE model as the attention projections *plus* the fused expert
parameters and the router (its transformers-v5 MoE conversion); it refuses Mamba's `out_proj` and
`conv1d`; its `lora.ParamWrapper` (expert parameters) refuses DoRA and dropout. So loraplan asks
PEFT instead of restating it: the preset is expanded by the functions PEFT's injection calls (its
MoE conversion, then its all-linear expansion), which leave in the config the concrete
`target_modules` / `target_parameters` / `rank_pattern` PEFT derived; the v4 MoE names PEFT
rewrites are its own tables; the names PEFT refuses and the settings its ParamWrapper refuses are
PEFT's own checks, called here.

Importing PEFT costs seconds, too slow for every `count`, so the answers are stored with the
structure (its cache key holds the PEFT version) and `targets.py` replays PEFT's name matching
(`check_target_module_exists`) over them.
"""

from __future__ import annotations

import copy
import warnings
from importlib import metadata

# Settings a LoRA config can carry that PEFT's ParamWrapper (parameters: MoE experts) may refuse.
PARAMETER_SETTINGS = {"use_dora": True, "lora_dropout": 0.1, "lora_bias": True}


def peft_version() -> str:
    try:
        return metadata.version("peft")
    except metadata.PackageNotFoundError:  # pragma: no cover - a hard dependency
        return "none"


def ask_peft(model) -> dict:
    """PEFT's answers for MODEL (any instantiated transformers model; it is not changed)."""
    return {
        "version": peft_version(),
        "all_linear": all_linear(model),
        "refused_names": refused_names(model),
        "parameter_refusals": parameter_refusals(),
    }


def all_linear(model) -> dict:
    """`target_modules="all-linear"` as PEFT reads it on MODEL: the config PEFT ends up with after
    its MoE conversion and the preset's expansion, with r = lora_alpha = 1 (so rank_pattern and
    alpha_pattern hold multipliers), or PEFT's refusal.

    The two steps are the functions `BaseTuner.inject_adapter` calls first, in its order; they only
    read the model (a 405B config takes milliseconds, not the seconds of building its adapters).
    Where this PEFT lacks them, the adapter is injected into a meta-device copy instead.
    """
    from peft import LoraConfig

    # PEFT leaves a classifier head out of all-linear for task_type SEQ_CLS (the head has no output embeddings)
    task_type = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else None
    config = LoraConfig(target_modules="all-linear", r=1, lora_alpha=1, task_type=task_type)
    error = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
        except ImportError:
            error = _inject(config, model)
        else:
            _convert_moe(config, model)
            _maybe_include_all_linear_layers(config, model)
    modules = config.target_modules
    return {
        "target_modules": modules if isinstance(modules, str) else sorted(modules or ()),
        "target_parameters": sorted(config.target_parameters or ()),
        "rank_pattern": dict(config.rank_pattern or {}),
        "alpha_pattern": dict(config.alpha_pattern or {}),
        "error": error,
    }


def _convert_moe(config, model) -> None:
    """PEFT's transformers-v5 MoE conversion of CONFIG (in place), where this PEFT and transformers have it."""
    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )
    except ImportError:  # transformers 4: nothing to convert
        return
    if hasattr(getattr(model, "config", None), "model_type"):
        convert_peft_config_for_transformers(config, model=model, conversions=get_model_conversion_mapping(model))


def _inject(config, model) -> str | None:
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(config, meta_copy(model))
    except (ValueError, TypeError, RuntimeError) as e:  # PEFT's refusal (e.g. Mamba's out_proj)
        return first_line(e)
    return None


def peft_moe_renames(model_type: str) -> dict | None:
    """PEFT's own table of v4 MoE names it rewrites on transformers v5 for this model type.

    With transformers >= 5, `get_peft_model` rewrites target names such as `gate_proj`/`up_proj`/
    `down_proj` (or Mixtral's `w1`/`w2`/`w3`) to the fused expert parameters, doubling rank and
    alpha where two were fused (peft/utils/transformers_weight_conversion.py). Read from PEFT so
    that loraplan follows the installed version.
    """
    try:
        from peft.utils.transformers_weight_conversion import (
            _MODEL_TO_CONVERSION_PATTERN,
            _MOE_FUSED_TARGETS,
            _MOE_TARGET_MODULE_MAPPING,
            get_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers 4, or a PEFT without the conversion
        return None
    try:
        if get_checkpoint_conversion_mapping(model_type) is None:
            return None
    except Exception:  # noqa: BLE001 - an unknown model type simply has no conversion
        return None
    base = _MODEL_TO_CONVERSION_PATTERN.get(model_type)
    renames = _MOE_TARGET_MODULE_MAPPING.get(base or "")
    fused = _MOE_FUSED_TARGETS.get(base or "")
    if not renames or not fused:
        return None
    return {"renames": dict(renames), "fused": {k: list(v) for k, v in fused.items()}}


def refused_names(model) -> dict[str, str]:
    """{module leaf name: PEFT's message} for the names PEFT refuses to adapt on this model type
    (`BaseTuner._check_target_module_compatiblity`: Mamba's `out_proj` and `conv1d`)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    check = getattr(LoraModel, "_check_target_module_compatiblity", None)
    if check is None:  # a PEFT without the check refuses nothing by name
        return {}
    config = LoraConfig(target_modules=["x"])
    out = {}
    for leaf in sorted({name.rpartition(".")[2] for name, _ in model.named_modules() if name}):
        try:
            check(None, config, model, leaf)
        except ValueError as e:
            out[leaf] = first_line(e)
    return out


def parameter_refusals() -> dict[str, str]:
    """{LoraConfig setting: PEFT's message} for what lora.ParamWrapper (a `target_parameters`
    weight, such as fused MoE experts) does not work with, asked of ParamWrapper itself."""
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for setting, value in PARAMETER_SETTINGS.items():
        holder = torch.nn.Module()
        holder.weight = torch.nn.Parameter(torch.empty(2, 4, 3, device="meta"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ParamWrapper(holder, "default", parameter_name="weight", r=1,
                             config=LoraConfig(target_parameters=["weight"], **{setting: value}))
        except ValueError as e:
            out[setting] = first_line(e)
    return out


def meta_copy(model):
    """A copy of MODEL on the meta device: PEFT may change it, the caller's model stays as it is."""
    import torch

    if all(p.device.type == "meta" for p in model.parameters()):
        return copy.deepcopy(model)
    try:
        with torch.device("meta"):
            return type(model)._from_config(model.config)
    except Exception:  # noqa: BLE001 - a model that cannot be rebuilt from its config is copied
        return copy.deepcopy(model).to("meta")


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

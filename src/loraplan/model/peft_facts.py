"""What the installed PEFT itself does on one model, asked once when the model's structure is built.

The meaning of a LoRA target is PEFT's, and it moves between releases: with transformers 5, PEFT
0.21 reads `all-linear` on an MoE model as the attention projections *plus* the fused expert
parameters and the router (its transformers-v5 MoE conversion); it refuses Mamba's `out_proj` and
`conv1d`; its `lora.ParamWrapper` (expert parameters) refuses DoRA and dropout. So loraplan asks
PEFT instead of restating it: the preset is expanded by PEFT's own `inject_adapter_in_model` on a
meta-device copy of the model (no memory), which leaves the concrete `target_modules` /
`target_parameters` / `rank_pattern` PEFT derived in the config; the names PEFT refuses and the
settings ParamWrapper refuses are PEFT's own checks, called here.

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
    alpha_pattern hold multipliers), or PEFT's refusal."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(target_modules="all-linear", r=1, lora_alpha=1)
    error = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            inject_adapter_in_model(config, meta_copy(model))
        except (ValueError, TypeError, RuntimeError) as e:  # PEFT's refusal (e.g. Mamba's out_proj)
            error = first_line(e)
    modules = config.target_modules
    return {
        "target_modules": modules if isinstance(modules, str) else sorted(modules or ()),
        "target_parameters": sorted(config.target_parameters or ()),
        "rank_pattern": dict(config.rank_pattern or {}),
        "alpha_pattern": dict(config.alpha_pattern or {}),
        "error": error,
    }


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

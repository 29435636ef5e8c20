"""A `LoraPlan` written the way each training tool reads it: PEFT (a Python snippet, or the JSON
for `LoraConfig(**json)`), axolotl YAML, LLaMA-Factory YAML and a torchtune recipe's `model:` section.

Every output is meant to be pasted as is: the YAMLs start with a comment naming the loraplan
command that made them, and a plan that a tool cannot express is refused with the reason instead
of being written approximately. With a model structure the names are the model's own (the plan's
roles resolved by the target grammar); without one the plan's targets must be module names.
What a format has no place for (LoRA+ in `LoraConfig` JSON) is returned by `unsaid` for the caller
to print. Each export is checked against the tool's own parser and model builder in
tests/test_tools_*.py.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from ..errors import UsageError, listing
from ..model.targets import KEYWORDS, TOOL_PRESETS, parse_layers, parse_spec
from .lora_plan import LoraPlan

FORMATS = ("peft", "peft-json", "axolotl", "llamafactory", "torchtune")

# The order a reader expects in a LoraConfig.
_PEFT_ORDER = ("r", "lora_alpha", "target_modules", "target_parameters", "layers_to_transform", "lora_dropout",
               "bias", "use_rslora", "use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "lora_bias",
               "task_type")
# PEFT's (Llama) names for the roles, used when there is no model to resolve roles against.
LLAMA_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
               "up": "up_proj", "down": "down_proj", "embed": "embed_tokens", "lm_head": "lm_head"}
_LLAMA_ROLES = {name: role for role, name in LLAMA_NAMES.items()}

# torchtune's LoRA builders for the built-in shapes they exist for (torchtune/models/*/_model_builders.py).
TORCHTUNE_BUILDERS = {
    "llama-3.2-1b": "torchtune.models.llama3_2.lora_llama3_2_1b",
    "llama-3.2-3b": "torchtune.models.llama3_2.lora_llama3_2_3b",
    "llama-3.1-8b": "torchtune.models.llama3_1.lora_llama3_1_8b",
    "llama-3.1-70b": "torchtune.models.llama3_1.lora_llama3_1_70b",
    "llama-3.1-405b": "torchtune.models.llama3_1.lora_llama3_1_405b",
    "qwen2.5-0.5b": "torchtune.models.qwen2_5.lora_qwen2_5_0_5b",
    "qwen2.5-1.5b": "torchtune.models.qwen2_5.lora_qwen2_5_1_5b_base",
    "qwen2.5-7b": "torchtune.models.qwen2_5.lora_qwen2_5_7b_base",
    "qwen2.5-72b": "torchtune.models.qwen2_5.lora_qwen2_5_72b_base",
    "qwen3-0.6b": "torchtune.models.qwen3.lora_qwen3_0_6b_base",
    "qwen3-8b": "torchtune.models.qwen3.lora_qwen3_8b_base",
    "gemma-2-2b": "torchtune.models.gemma2.lora_gemma2_2b",
    "gemma-2-9b": "torchtune.models.gemma2.lora_gemma2_9b",
    "phi-3-mini": "torchtune.models.phi3.lora_phi3_mini",
}
# HF model_type -> the torchtune.models package of its LoRA builders; torchtune has no builder for others.
TORCHTUNE_FAMILIES = {"llama": "llama3_1", "mistral": "mistral", "gemma": "gemma", "gemma2": "gemma2",
                      "phi3": "phi3", "qwen2": "qwen2_5", "qwen3": "qwen3"}
# Builders without an apply_lora_to_output argument (tied output layer).
_NO_OUTPUT_LORA = ("torchtune.models.gemma.", "torchtune.models.gemma2.")
# Builder packages that are in torchtune's main branch but not in its last release (0.6.1).
_TORCHTUNE_MAIN_ONLY = ("torchtune.models.qwen3.",)
_TORCHTUNE_ATTN = {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["output_proj"],
                   "qkv": ["q_proj", "k_proj", "v_proj"], "kv": ["k_proj", "v_proj"]}
_MLP = ("gate", "up", "down", "gate_up")


def export_plan(plan: LoraPlan, fmt: str, structure=None, *, command: str | None = None,
                quant: str | None = None, notes: Sequence[str] = (), warnings: Sequence[str] = ()) -> str:
    """PLAN as text in format FMT (one of FORMATS). `quant` ("4bit"/"8bit") adds the tool's
    quantized-base setting; `command` is named in the first line of the YAML and Python outputs,
    `warnings` and `notes` become comment lines under it (peft-json, plain JSON, has no comments:
    `unsaid` gives them back for the caller to print)."""
    writers = {"peft": _peft_code, "peft-json": _peft_json, "axolotl": _axolotl,
               "llamafactory": _llamafactory, "torchtune": _torchtune}
    if fmt not in writers:
        raise UsageError(f"unknown export format '{fmt}'", f"choose one of {', '.join(FORMATS)}")
    header = "\n".join([f"# {command or 'loraplan'}"] + [f"# warning: {w}" for w in warnings]
                       + [f"# note: {n}" for n in notes])
    return writers[fmt](plan, structure, quant, header)


def unsaid(plan: LoraPlan, fmt: str, notes: Sequence[str] = ()) -> list[str]:
    """What FMT has no place for in its file (of the plan and of NOTES), as sentences for the
    caller to print on stderr."""
    if fmt != "peft-json":
        return []
    out = list(notes)
    if plan.loraplus_lr_ratio:
        ratio = _number(plan.loraplus_lr_ratio)
        out.append(f"LoRA+ (loraplus_lr_ratio {ratio}) is not in this JSON: PEFT's LoraConfig has no LoRA+ key. Build the "
                f"optimizer with peft.optimizers.create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, "
                f"loraplus_lr_ratio={ratio}) and pass it as Trainer(..., optimizers=(optimizer, None)) "
                "(--format peft writes that code)")
    return out


def peft_config(plan: LoraPlan, structure=None) -> dict[str, Any]:
    """`peft.LoraConfig` keyword arguments: the model's own names with a structure, the plan's
    module names without one."""
    kwargs = plan.to_peft_kwargs(structure) if structure is not None else _peft_kwargs_by_name(plan)
    kwargs["lora_alpha"] = _number(kwargs["lora_alpha"])
    return {k: kwargs[k] for k in _PEFT_ORDER if k in kwargs}


def _peft_kwargs_by_name(plan: LoraPlan) -> dict[str, Any]:
    items = parse_spec(plan.targets)
    roles = [i for i in items if i.lower() in KEYWORDS + TOOL_PRESETS and i.lower() != "all-linear"]
    if roles:
        raise UsageError(f"targets {listing(roles)} name roles; without MODEL loraplan cannot turn them "
                         "into module names", "give MODEL, or module names such as q_proj,v_proj")
    regexes = [i for i in items if i.startswith("re:")]
    if regexes and len(items) > 1:
        raise UsageError("PEFT takes either one regex or a list of names as target_modules, not both",
                         "write the names into the regex")
    if regexes:
        target_modules: Any = regexes[0][3:]
    elif [i.lower() for i in items] == ["all-linear"]:
        target_modules = "all-linear"
    else:
        target_modules = items
    kwargs: dict[str, Any] = {
        "r": plan.r, "lora_alpha": plan.alpha, "target_modules": target_modules,
        "lora_dropout": float(plan.lora_dropout), "bias": plan.bias, "use_rslora": plan.use_rslora,
        "use_dora": plan.use_dora, "task_type": plan.task_type,
    }
    if plan.layers is not None:
        kwargs["layers_to_transform"] = parse_layers(plan.layers)
    if plan.modules_to_save:
        kwargs["modules_to_save"] = list(plan.modules_to_save)
    if plan.rank_pattern:
        kwargs["rank_pattern"] = dict(plan.rank_pattern)
    if plan.alpha_pattern:
        kwargs["alpha_pattern"] = dict(plan.alpha_pattern)
    if plan.lora_bias:
        kwargs["lora_bias"] = True
    return kwargs


def _py(value: Any) -> str:
    """A Python literal in the house style (double quotes); JSON spells strings, lists and str/int dicts alike."""
    if isinstance(value, bool) or not isinstance(value, str | list | dict):
        return repr(value)
    return json.dumps(value)


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def _refuse(tool: str, cfg: dict, plan: LoraPlan, keys: tuple[str, ...]) -> None:
    """UsageError naming the first setting of the plan that TOOL has no key for."""
    reasons = {
        "bias": f"bias={plan.bias}", "lora_bias": "lora_bias", "rank_pattern": "a per-module rank_pattern",
        "alpha_pattern": "a per-module alpha_pattern", "target_parameters": "MoE expert parameters (target_parameters)",
        "layers_to_transform": "a layer selection (layers_to_transform)", "modules_to_save": "modules_to_save",
    }
    for key in keys:
        value = cfg.get(key)
        if value and not (key == "bias" and value == "none"):
            raise UsageError(f"{tool} cannot express {reasons[key]}",
                             "use --format peft (PEFT takes every LoraConfig field), or change the plan")


def _saves_embeddings(cfg: dict, structure) -> bool:
    """Whether modules_to_save holds the input embeddings (new tokens: their rows must be trained)."""
    leaf = (structure.input_embeddings or "").rpartition(".")[2] if structure is not None else None
    names = {leaf} if leaf else {"embed_tokens", "embed_in", "wte", "word_embeddings", "embeddings"}
    return any(str(n).rpartition(".")[2] in names for n in cfg.get("modules_to_save") or ())


def _lora_on_embeddings(plan: LoraPlan, structure) -> bool:
    if structure is not None:
        return any(m.kind == "embedding" for m in plan.resolve(structure).modules)
    return any(i in ("embed", "all", "embed_tokens") for i in parse_spec(plan.targets))


def _yaml(header: str, body: dict, comments: list[str] = ()) -> str:
    import yaml

    lines = [header] + [f"# {c}" for c in comments]
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


# -- PEFT ---------------------------------------------------------------------------------------


def _peft_json(plan, structure, quant, header) -> str:
    # LoraConfig(**json): LoRA+ is an optimizer setting, not a LoraConfig field, so it is not here.
    return json.dumps(peft_config(plan, structure), indent=2) + "\n"


def _peft_code(plan, structure, quant, header) -> str:
    cfg = peft_config(plan, structure)
    args = "".join(f"    {k}={_py(v)},\n" for k, v in cfg.items())
    lines = [header, "import torch", "from peft import LoraConfig, get_peft_model", ""]
    if quant:
        bnb = ('BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, '
               'bnb_4bit_compute_dtype=torch.bfloat16)' if quant == "4bit" else "BitsAndBytesConfig(load_in_8bit=True)")
        lines += [f"# {quant} base: from_pretrained(..., quantization_config={bnb}),",
                  "# then model = peft.prepare_model_for_kbit_training(model)"]
    lines += ["# `model` is your base model, e.g. AutoModelForCausalLM.from_pretrained(...)"]
    if _saves_embeddings(cfg, structure):
        lines += ["# new tokens: add them to the tokenizer, then model.resize_token_embeddings(len(tokenizer)) before "
                  "get_peft_model; modules_to_save trains full copies of the embeddings and lm_head"]
    lines += [f"config = LoraConfig(\n{args})", "model = get_peft_model(model, config)",
              "model.print_trainable_parameters()"]
    if plan.loraplus_lr_ratio:
        ratio = _number(plan.loraplus_lr_ratio)
        # PEFT puts LoRA on an embedding at loraplus_lr_embedding (default 1e-6): give it the base rate instead
        embedding = ", loraplus_lr_embedding=2e-4" if _lora_on_embeddings(plan, structure) else ""
        lines += ["", f"# LoRA+ (Hayou et al. 2024): lora_B learns {ratio}x faster than lora_A; lr is lora_A's rate",
                  "from peft.optimizers import create_loraplus_optimizer", "",
                  "optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, "
                  f"loraplus_lr_ratio={ratio}{embedding})",
                  "# Trainer(..., optimizers=(optimizer, None)), or SFTTrainer(..., optimizers=(optimizer, None))"]
    return "\n".join(lines) + "\n"


# -- axolotl ------------------------------------------------------------------------------------
# LoraPlan -> axolotl (src/axolotl/utils/schemas/peft.py, loaders/adapter.py): r -> lora_r,
# alpha -> lora_alpha (an int there), dropout -> lora_dropout, names -> lora_target_modules (a list,
# or one regex string), PEFT's all-linear -> lora_target_linear, experts -> lora_target_parameters,
# layers -> peft_layers_to_transform, modules_to_save -> lora_modules_to_save, use_rslora ->
# peft_use_rslora, use_dora -> peft_use_dora, rank/alpha patterns -> lora_rank_pattern /
# lora_alpha_pattern (integers, axolotl >= 0.18), loraplus_lr_ratio as is. axolotl always passes
# bias="none" and no lora_bias; it picks task_type from the model class.


def axolotl_config(plan: LoraPlan, structure=None, quant: str | None = None) -> dict[str, Any]:
    cfg = peft_config(plan, structure)
    _refuse("axolotl", cfg, plan, ("bias", "lora_bias"))
    alphas = [cfg["lora_alpha"], *(cfg.get("alpha_pattern") or {}).values()]
    if not all(float(a).is_integer() for a in alphas):
        raise UsageError(f"axolotl's lora_alpha (and lora_alpha_pattern) take integers; the plan has "
                         f"{', '.join(f'{a:g}' for a in alphas if not float(a).is_integer())}",
                         "choose an integer alpha (--alpha)")
    out: dict[str, Any] = {"adapter": "qlora" if quant == "4bit" else "lora"}
    if quant:
        out["load_in_4bit" if quant == "4bit" else "load_in_8bit"] = True
    out.update(lora_r=cfg["r"], lora_alpha=int(cfg["lora_alpha"]), lora_dropout=cfg["lora_dropout"])
    if cfg["target_modules"] == "all-linear":
        out["lora_target_linear"] = True
    else:
        out["lora_target_modules"] = cfg["target_modules"]
    if cfg.get("target_parameters"):
        out["lora_target_parameters"] = cfg["target_parameters"]
    if cfg.get("layers_to_transform"):
        out["peft_layers_to_transform"] = cfg["layers_to_transform"]
    if cfg.get("modules_to_save"):
        out["lora_modules_to_save"] = cfg["modules_to_save"]
    if cfg.get("rank_pattern"):
        out["lora_rank_pattern"] = dict(cfg["rank_pattern"])
    if cfg.get("alpha_pattern"):
        out["lora_alpha_pattern"] = {k: int(v) for k, v in cfg["alpha_pattern"].items()}
    out.update(peft_use_rslora=cfg["use_rslora"], peft_use_dora=cfg["use_dora"])
    if plan.loraplus_lr_ratio:
        out["loraplus_lr_ratio"] = _number(plan.loraplus_lr_ratio)
    return out


def _axolotl(plan, structure, quant, header) -> str:
    body = axolotl_config(plan, structure, quant)
    comments = ["LoRA keys for an axolotl config: merge them into yours (base_model, datasets, ...)"]
    if body.get("lora_target_linear"):
        comments.append("lora_target_linear is axolotl's own 'every linear layer' (classes named *Linear*, lm_head "
                        "left out by name): PEFT's all-linear on Llama-like models, nothing on GPT-2's Conv1D; give "
                        "MODEL for the exact names")
    if body.get("lora_rank_pattern") or body.get("lora_alpha_pattern"):
        comments.append("lora_rank_pattern / lora_alpha_pattern need axolotl 0.18 or later")
    if _saves_embeddings(body | {"modules_to_save": body.get("lora_modules_to_save")}, structure):
        comments.append("new tokens: list them under `tokens:`; axolotl requires these lora_modules_to_save "
                        "(full copies of the embeddings and lm_head) when it adds tokens")
    if plan.loraplus_lr_ratio and _lora_on_embeddings(plan, structure):
        comments.append("LoRA+ trains an embedding adapter at loraplus_lr_embedding (1e-6 unless set): set it to your "
                        "learning_rate")
    return _yaml(header, body, comments)


# -- LLaMA-Factory ------------------------------------------------------------------------------
# LoraPlan -> LLaMA-Factory (src/llamafactory/hparams/finetuning_args.py, LoraArguments): r ->
# lora_rank, alpha -> lora_alpha (always written: its default is 2 * lora_rank), dropout ->
# lora_dropout, names -> lora_target (one comma-separated string; `all` = every linear layer but
# the output layer), modules_to_save -> additional_target (comma string), use_rslora, use_dora and
# loraplus_lr_ratio as is, 4-/8-bit base -> quantization_bit; new tokens (the embeddings in
# modules_to_save) -> resize_vocab, which LLaMA-Factory refuses on a quantized model. It has no key
# for a regex, MoE expert parameters, layers_to_transform, rank/alpha patterns, bias or lora_bias.


def llamafactory_config(plan: LoraPlan, structure=None, quant: str | None = None) -> dict[str, Any]:
    cfg = peft_config(plan, structure)
    _refuse("LLaMA-Factory", cfg, plan, ("bias", "lora_bias", "rank_pattern", "alpha_pattern", "target_parameters",
                                         "layers_to_transform"))
    targets = cfg["target_modules"]
    if isinstance(targets, str) and targets != "all-linear":
        raise UsageError("LLaMA-Factory's lora_target is a list of names, not a regex",
                         "target roles or module names, or use --format peft")
    out: dict[str, Any] = {"finetuning_type": "lora", "lora_rank": cfg["r"], "lora_alpha": cfg["lora_alpha"],
                           "lora_dropout": cfg["lora_dropout"],
                           "lora_target": "all" if targets == "all-linear" else ",".join(targets)}
    if cfg.get("modules_to_save"):
        out["additional_target"] = ",".join(cfg["modules_to_save"])
    if _saves_embeddings(cfg, structure):
        if quant:
            raise UsageError("LLaMA-Factory cannot train new tokens on a quantized base: it refuses resize_vocab with "
                             "quantization_bit", "leave out --quant, or use --format peft or axolotl")
        out["resize_vocab"] = True
    out.update(use_rslora=cfg["use_rslora"], use_dora=cfg["use_dora"])
    if plan.loraplus_lr_ratio:
        out["loraplus_lr_ratio"] = _number(plan.loraplus_lr_ratio)
    if quant:
        out["quantization_bit"] = 4 if quant == "4bit" else 8
    return out


def _llamafactory(plan, structure, quant, header) -> str:
    body = llamafactory_config(plan, structure, quant)
    comments = ["LoRA keys for a LLaMA-Factory training YAML: merge them into yours (model, dataset, ...)"]
    if body["lora_target"] == "all":
        comments.append("lora_target: all is LLaMA-Factory's own 'every linear layer' (classes named *Linear*, "
                        "modules named lm_head left out): PEFT's all-linear on Llama-like models, nothing on GPT-2's "
                        "Conv1D, and it adapts an output layer with another name (GPT-NeoX embed_out); give MODEL for "
                        "the exact names")
    if body.get("resize_vocab"):
        comments.append("new tokens: add them with add_tokens / add_special_tokens; resize_vocab grows the "
                        "embeddings and additional_target trains them in full")
    if plan.loraplus_lr_ratio and _lora_on_embeddings(plan, structure):
        comments.append("LoRA+ trains lora_embedding_B at loraplus_lr_embedding (1e-6 unless set): set it to your "
                        "learning_rate")
    return _yaml(header, body, comments)


# -- torchtune ----------------------------------------------------------------------------------
# LoraPlan -> torchtune's lora_* model builders (torchtune/models/<family>/_model_builders.py):
# attention roles -> lora_attn_modules (q_proj, k_proj, v_proj, output_proj; a fused qkv becomes
# the three), the whole MLP -> apply_lora_to_mlp, lm_head -> apply_lora_to_output, r -> lora_rank,
# alpha -> lora_alpha, dropout -> lora_dropout, use_dora as is, 4-bit base -> quantize_base (NF4).
# torchtune scales by alpha/r and has no rsLoRA flag, so rsLoRA's alpha/sqrt(r) is written as
# lora_alpha = alpha * sqrt(r): the same scale, the same training. It cannot adapt part of the MLP,
# embeddings, MoE experts, some layers only, and has no modules_to_save, patterns, bias or LoRA+.


def torchtune_config(plan: LoraPlan, structure=None, quant: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """(the `model:` section, comments to print above it)."""
    cfg = peft_config(plan, structure)
    if _saves_embeddings(cfg, structure):
        raise UsageError("torchtune's LoRA recipes cannot train new tokens: the embeddings stay frozen and there is "
                         "no modules_to_save", "use --format peft, axolotl or llamafactory")
    _refuse("torchtune", cfg, plan, ("bias", "lora_bias", "rank_pattern", "alpha_pattern", "target_parameters",
                                     "layers_to_transform", "modules_to_save"))
    roles, comments = _torchtune_roles(plan, structure)
    attn = [m for role in ("q", "k", "v", "qkv", "kv", "o") if role in roles for m in _TORCHTUNE_ATTN[role]]
    component = _torchtune_builder(structure)
    body: dict[str, Any] = {}
    if component:
        body["_component_"] = component
    else:
        family = TORCHTUNE_FAMILIES.get(structure.model_type, "llama3_1") if structure is not None else "llama3_1"
        comments.append(f"set model._component_ to torchtune's LoRA builder for your model "
                        f"(torchtune.models.{family}.lora_{family}_<size>)")
        if f"torchtune.models.{family}.".startswith(_TORCHTUNE_MAIN_ONLY):
            comments.append(f"torchtune.models.{family} is in torchtune's main branch, not in its 0.6.1 release")
    body["lora_attn_modules"] = list(dict.fromkeys(attn))
    body["apply_lora_to_mlp"] = any(r in roles for r in _MLP)
    output = "lm_head" in roles
    if component and component.startswith(_NO_OUTPUT_LORA):
        if output:
            raise UsageError(f"{component} has no apply_lora_to_output (tied output layer)",
                             "leave lm_head out of the targets")
    else:
        body["apply_lora_to_output"] = output
    alpha = float(cfg["lora_alpha"])
    if cfg["use_rslora"]:
        comments.append(f"rsLoRA: torchtune scales by alpha/r, so lora_alpha = {alpha:g} * sqrt({cfg['r']}) "
                        f"gives PEFT's alpha/sqrt(r) = {alpha / math.sqrt(cfg['r']):.4g}")
        alpha *= math.sqrt(cfg["r"])
    body.update(lora_rank=cfg["r"], lora_alpha=_number(round(alpha, 6)), lora_dropout=cfg["lora_dropout"],
                use_dora=cfg["use_dora"])
    if quant == "4bit":
        body["quantize_base"] = True
    elif quant == "8bit":
        comments.append("torchtune quantizes the base to NF4 only (quantize_base: true), not 8-bit")
    if plan.loraplus_lr_ratio:
        comments.append(f"LoRA+ (loraplus_lr_ratio {_number(plan.loraplus_lr_ratio)}): torchtune's recipes have no "
                        "option for it; lora_A and lora_B share one learning rate")
    if component and component.startswith(_TORCHTUNE_MAIN_ONLY):
        comments.append(f"{component.rpartition('.')[0]} is in torchtune's main branch, not in its 0.6.1 release: "
                        "install torchtune from source")
    if structure is not None:
        from .count import count_plan

        built, counted = torchtune_trainable(body, structure), count_plan(structure, plan).trainable_params
        if built == counted:
            comments.append(f"torchtune builds {built:,} trainable parameters from this, as loraplan count says")
        else:
            fused = _fused_leaves(plan, structure)
            why = (f"it splits the fused projections ({', '.join(fused)}) into one adapter per part" if fused
                   else "its modules are shaped unlike the Hugging Face model's")
            comments.append(f"torchtune builds {built:,} trainable parameters from this, not the {counted:,} loraplan "
                            f"count gives for the Hugging Face model: {why}")
    return body, comments


def torchtune_trainable(body: dict[str, Any], structure) -> int:
    """Trainable parameters of torchtune's LoRA builder with the `model:` section BODY, from the
    model's config: LoRALinear is r·(in + out), DoRALinear adds a magnitude of `out`
    (torchtune/modules/peft/lora.py, dora.py); q, k, v, output_proj, the MLP's w1, w2, w3 and the
    output layer each get their own adapter, on fused models (Phi-3) too."""
    c = structure.text_config()
    d, heads, layers = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
    kv = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or d // heads
    ffn = c["intermediate_size"]
    shapes = {"q_proj": (d, heads * head_dim), "k_proj": (d, kv * head_dim), "v_proj": (d, kv * head_dim),
              "output_proj": (heads * head_dim, d)}
    per_layer = [shapes[m] for m in body.get("lora_attn_modules") or ()]
    if body.get("apply_lora_to_mlp"):
        per_layer += [(d, ffn), (ffn, d), (d, ffn)]
    r, dora = body["lora_rank"], bool(body.get("use_dora"))

    def adapter(n_in: int, n_out: int) -> int:
        return r * (n_in + n_out) + (n_out if dora else 0)

    total = layers * sum(adapter(i, o) for i, o in per_layer)
    if body.get("apply_lora_to_output"):
        total += adapter(d, c["vocab_size"])
    return total


def _fused_leaves(plan: LoraPlan, structure) -> list[str]:
    return list(dict.fromkeys(m.leaf for m in plan.resolve(structure).modules if m.role in ("qkv", "kv", "gate_up")))


def _torchtune(plan, structure, quant, header) -> str:
    body, comments = torchtune_config(plan, structure, quant)
    return _yaml(header, {"model": body},
                 ["the model section of a torchtune LoRA recipe config (e.g. lora_finetune_single_device)"] + comments)


def _torchtune_roles(plan: LoraPlan, structure) -> tuple[set[str], list[str]]:
    comments: list[str] = []
    if structure is None:
        items = parse_spec(plan.targets)
        if [i.lower() for i in items] == ["all-linear"]:
            return {"q", "k", "v", "o", "gate", "up", "down"}, comments
        unknown = [i for i in items if i not in _LLAMA_ROLES]
        if unknown:
            raise UsageError(f"without MODEL loraplan cannot tell torchtune's role of {listing(unknown)}",
                             "give MODEL, or Llama names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                             "down_proj)")
        roles = {_LLAMA_ROLES[i] for i in items}
        model_mlp = {"gate", "up", "down"}
    else:
        if structure.model_type not in TORCHTUNE_FAMILIES:
            raise UsageError(f"torchtune has no LoRA model builder for {structure.model_type} "
                             f"({structure.architecture})",
                             f"torchtune builds {', '.join(sorted(TORCHTUNE_FAMILIES))} models; use --format peft, "
                             "axolotl or llamafactory")
        resolved = plan.resolve(structure)
        roles = {m.role for m in resolved.modules}
        for role in roles:
            every = sum(m.role == role for m in structure.modules)
            chosen = sum(m.role == role for m in resolved.modules)
            if chosen < every:
                raise UsageError(f"the targets adapt {chosen} of the {every} '{role}' weights; torchtune adapts "
                                 "every layer", "target whole roles, or use --format peft")
        model_mlp = {m.role for m in structure.modules if m.role in _MLP}
    bad = roles - set(_TORCHTUNE_ATTN) - set(_MLP) - {"lm_head"}
    if bad:
        raise UsageError(f"torchtune's LoRA builders cannot adapt {listing(sorted(bad))}",
                         "they adapt attention projections, the whole MLP and the output layer")
    mlp = roles & set(_MLP)
    if mlp and mlp != model_mlp:
        raise UsageError(f"torchtune applies LoRA to the whole MLP or none of it; the plan adapts only "
                         f"{listing(sorted(mlp))}", "target mlp (all of it) or no MLP role, or use --format peft")
    return roles, comments


def _torchtune_builder(structure) -> str | None:
    if structure is None:
        return None
    from ..model.builtin import BUILTIN_MODELS

    source = str(structure.source)
    if source.startswith("builtin:"):
        return TORCHTUNE_BUILDERS.get(source[len("builtin:"):].strip().lower())
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    config = structure.text_config()
    # Llama 3 and 3.1/3.2 share shapes; torchtune's llama3_1/llama3_2 builders use the "llama3" RoPE scaling.
    llama3_rope = "llama3" in str(config.get("rope_scaling") or config.get("rope_parameters") or "")
    for name, builder in TORCHTUNE_BUILDERS.items():
        known = BUILTIN_MODELS[name].config
        if all(config.get(k) == known.get(k) for k in keys) and (known["model_type"] != "llama" or llama3_rope):
            return builder
    return None

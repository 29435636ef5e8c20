"""Read a LoRA configuration the user already has into `LoraPlan` fields (`--from FILE`).

Understood: a PEFT adapter (`adapter_config.json` or the folder that holds it), an axolotl or
LLaMA-Factory training YAML (its 0.9 format and its v1 `peft_config:` format), a torchtune recipe
config (its `model:` LoRA builder arguments), and loraplan's own plans (`recommend --format json`, a
sweep trial's `plan.json`). Each tool's own defaults fill what the file leaves out, because that is
what the tool would train; a setting that changes what the tool trains and that a plan cannot hold
is an error naming it, never ignored. `read_training_settings` gives the file's quantization,
micro-batch, sequence length and gradient checkpointing (for `memory --from`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UsageError, listing
from .lora_plan import LoraPlan, join_targets, plan_fields

# Keys each tool reads for its LoRA adapter; the rest of a training config is not loraplan's business.
_AXOLOTL_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
                 "lora_modules_to_save", "peft_layers_to_transform", "peft_use_rslora", "peft_use_dora",
                 "loraplus_lr_ratio", "lora_rank_pattern", "lora_alpha_pattern")
# axolotl settings that change what is trained and that a LoraPlan cannot hold (axolotl
# loaders/adapter.py and train.py): refuse rather than count something else.
_AXOLOTL_UNSUPPORTED = {
    "peft_trainable_token_indices": "trains chosen embedding rows (PEFT trainable_token_indices)",
    "unfrozen_parameters": "unfreezes parameters by pattern after the adapter is built (and freezes the rest)",
    "peft_layer_replication": "replicates layers before adapting them",
    "lora_exclude_modules": "excludes modules from the targets (PEFT exclude_modules)",
    "peft_layers_pattern": "numbers layers by its own pattern (PEFT layers_pattern)",
}
_LLAMAFACTORY_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "additional_target",
                      "use_rslora", "use_dora", "loraplus_lr_ratio")
_LLAMAFACTORY_UNSUPPORTED = {
    "use_llama_pro": "adds expanded blocks and adapts only those (LLaMA Pro)",
    "use_galore": "trains with GaLore projections", "use_apollo": "trains with APOLLO", "use_badam": "trains with BAdam",
}
_TORCHTUNE_KEYS = ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank",
                   "lora_alpha", "lora_dropout", "use_dora")
_PEFT_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters", "bias",
              "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save",
              "layers_to_transform", "lora_bias", "task_type")
# PEFT settings that change what is trained but that a LoraPlan cannot hold (yet): refuse rather
# than count something else.
_PEFT_UNSUPPORTED = ("exclude_modules", "trainable_token_indices", "layer_replication")


def read_plan(path: str | Path) -> LoraPlan:
    """The LoRA plan in PATH (see the module docstring for the formats)."""
    return LoraPlan(**read_plan_fields(path))


def read_plan_fields(path: str | Path) -> dict[str, Any]:
    """`LoraPlan` keyword arguments from PATH, in loraplan's own spelling."""
    data, path = _load(Path(path).expanduser())
    where = str(path)
    kind = _kind(data)
    readers = {"peft": _peft_fields, "axolotl": _axolotl_fields, "llamafactory": _llamafactory_fields,
               "llamafactory-v1": _llamafactory_v1_fields,
               "torchtune": lambda d, w: _torchtune_fields(d["model"], w)}
    if kind == "loraplan":
        return plan_fields(data["plan"] if isinstance(data.get("plan"), dict) else data, where)
    if kind is None:
        raise UsageError(f"{where} has no LoRA settings",
                         "give a PEFT adapter_config.json or adapter folder, an axolotl or LLaMA-Factory YAML "
                         "(lora_r / lora_rank), or a torchtune config with a LoRA model builder")
    return readers[kind](data, where)


def read_training_settings(path: str | Path) -> dict[str, Any]:
    """What the training config in PATH says about memory: `quant` ("4bit"/"8bit"/"none"),
    `batch_size` (per device, per step), `seq_len`, `grad_ckpt`. Only what the file (or, for
    LLaMA-Factory, the tool's own default) decides; an adapter or a loraplan plan says nothing."""
    data, _ = _load(Path(path).expanduser())
    kind = _kind(data)
    out: dict[str, Any] = {}
    if kind == "axolotl":
        if data.get("load_in_4bit") or data.get("adapter") == "qlora":
            out["quant"] = "4bit"
        elif data.get("load_in_8bit"):
            out["quant"] = "8bit"
        out.update(_present(data, batch_size="micro_batch_size", seq_len="sequence_len"))
        if "gradient_checkpointing" in data:
            out["grad_ckpt"] = bool(data["gradient_checkpointing"])
    elif kind == "llamafactory":
        bits = data.get("quantization_bit")
        out["quant"] = {4: "4bit", 8: "8bit"}.get(bits, "none")
        # LLaMA-Factory's defaults: per_device_train_batch_size 8 (transformers), cutoff_len 2048, and
        # gradient checkpointing on unless disable_gradient_checkpointing (model/patcher.py)
        out["batch_size"] = data.get("per_device_train_batch_size") or 8
        out["seq_len"] = data.get("cutoff_len") or 2048
        out["grad_ckpt"] = not data.get("disable_gradient_checkpointing", False)
    elif kind == "llamafactory-v1":
        bits = (data.get("quant_config") or {}).get("quantization_bit")
        out["quant"] = {4: "4bit", 8: "8bit"}.get(bits, "none")
        out.update(_present(data, batch_size="micro_batch_size", seq_len="cutoff_len"))
    elif kind == "torchtune":
        model = data["model"]
        quantized = model.get("quantize_base") or "qlora_" in str(model.get("_component_", ""))
        out["quant"] = "4bit" if quantized else "none"
        out.update(_present(data, batch_size="batch_size"))
        out.update(_present(data.get("tokenizer") or {}, seq_len="max_seq_len"))
        if "enable_activation_checkpointing" in data:
            out["grad_ckpt"] = bool(data["enable_activation_checkpointing"])
    for key in ("batch_size", "seq_len"):
        if key in out and not (isinstance(out[key], int) and out[key] > 0):
            raise UsageError(f"{path}: {key.replace('_', ' ')} {out[key]!r} is not a positive integer", "fix the file")
    return out


def _present(data: dict, **keys: str) -> dict[str, Any]:
    return {ours: data[theirs] for ours, theirs in keys.items() if data.get(theirs) is not None}


def _kind(data: dict) -> str | None:
    """Which tool's file DATA is: peft, loraplan, torchtune, axolotl, llamafactory(-v1), or None."""
    if "peft_type" in data or ("r" in data and "target_modules" in data):
        return "peft"
    if isinstance(data.get("plan"), dict) or ("targets" in data and "r" in data):
        return "loraplan"  # recommend --format json, a sweep trial's plan.json, LoraPlan.to_dict()
    if isinstance(data.get("model"), dict) and "_component_" in data["model"]:
        return "torchtune"
    if "adapter" in data or any(k in data for k in ("lora_r", "lora_target_modules", "lora_target_linear")):
        return "axolotl"
    if isinstance(data.get("peft_config"), dict) and "name" in data["peft_config"]:
        return "llamafactory-v1"
    if (any(k in data for k in ("finetuning_type", "lora_rank", "lora_target", "adapter_name_or_path"))
            or ("model_name_or_path" in data and ("stage" in data or "template" in data))):
        return "llamafactory"  # its FinetuningArguments default to LoRA: the key may be absent
    return None


def _load(path: Path) -> tuple[dict, Path]:
    if path.is_dir():
        for name in ("adapter_config.json", "adapter/adapter_config.json", "plan.json"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise UsageError(f"no adapter_config.json in {path}",
                             "point at a PEFT adapter folder (save_pretrained output) or a config file")
    elif not path.exists():
        raise UsageError(f"no such file: {path}", "give an adapter_config.json, an adapter folder or a YAML")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or type(e).__name__}",
                         "give a text file: JSON or YAML") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                             "fix the file") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            raise UsageError(f"{path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}",
                             "fix the file") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} does not hold a mapping of settings",
                         "a PEFT, axolotl, LLaMA-Factory or torchtune config is a mapping")
    return data, path


def _peft_fields(data: dict, where: str) -> dict[str, Any]:
    peft_type = data.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise UsageError(f"{where} is a {peft_type} adapter, not LoRA", "loraplan plans LoRA adapters")
    used = [k for k in _PEFT_UNSUPPORTED if data.get(k)]
    if used:
        raise UsageError(f"{where} sets {', '.join(used)}, which loraplan cannot count yet",
                         "remove it from a copy of the file, or give --targets and --rank yourself")
    fields = {k: data[k] for k in _PEFT_KEYS if k in data}
    # PEFT reads a string target_modules as one regex matched against full names (or "all-linear").
    if isinstance(fields.get("target_modules"), str) and fields["target_modules"] != "all-linear":
        fields["target_modules"] = f"re:{fields['target_modules']}"
    if not fields.get("target_modules") and not fields.get("target_parameters"):
        raise UsageError(f"{where} has no target_modules",
                         "PEFT fills them in from the model type when empty: give --targets")
    return plan_fields(fields, where)


def _axolotl_fields(data: dict, where: str) -> dict[str, Any]:
    adapter = data.get("adapter")
    if adapter not in ("lora", "qlora"):
        found = f"adapter: {adapter}" if adapter else "no adapter key"
        raise UsageError(f"{where} has no LoRA settings ({found}: axolotl would train every weight)",
                         "axolotl trains LoRA with `adapter: lora` or `adapter: qlora`")
    if data.get("lora_model_dir"):
        # axolotl loads that adapter (PeftModel.from_pretrained) and trains it: its adapter_config.json governs
        return _trained_adapter(str(data["lora_model_dir"]), where, "lora_model_dir", "axolotl")
    used = [k for k in _AXOLOTL_UNSUPPORTED if data.get(k)]
    if used:
        raise UsageError(f"{where} sets {used[0]}: axolotl then {_AXOLOTL_UNSUPPORTED[used[0]]}, which loraplan "
                         "cannot count", "remove it from a copy of the file, or give --targets and --rank yourself")
    missing = [k for k in ("lora_r", "lora_alpha") if data.get(k) is None]
    if missing:
        raise UsageError(f"{where} sets adapter: {adapter} but no {' or '.join(missing)}",
                         "axolotl passes them to peft.LoraConfig; add them to the file")
    fields = {k: data[k] for k in _AXOLOTL_KEYS if k in data}
    fields.setdefault("lora_dropout", 0.0)  # axolotl's default
    named = fields.pop("lora_target_modules", None) or []
    targets: list[str] = []
    if isinstance(named, str):
        # alone, a string goes to PEFT as one regex; with lora_target_linear it joins the list as a name
        targets.append(named if data.get("lora_target_linear") else f"re:{named}")
    else:
        targets += [str(n) for n in named]
    if data.get("lora_target_linear"):
        targets.append("axolotl:linear")  # not PEFT's all-linear (see model/targets.py)
    params = fields.pop("lora_target_parameters", None) or []
    targets += [params] if isinstance(params, str) else [str(p) for p in params]
    if not targets:
        raise UsageError(f"{where} has no lora_target_modules and no lora_target_linear",
                         "add lora_target_linear: true or a lora_target_modules list")
    out = plan_fields(fields, where)
    out["targets"] = join_targets(targets)
    return out


def _llamafactory_fields(data: dict, where: str) -> dict[str, Any]:
    kind = data.get("finetuning_type", "lora")  # LLaMA-Factory's default
    if kind != "lora":
        raise UsageError(f"{where} has no LoRA settings (finetuning_type: {kind})",
                         "LLaMA-Factory trains LoRA with finetuning_type: lora")
    adapters = data.get("adapter_name_or_path")
    if adapters:
        paths = [p.strip() for p in adapters.split(",")] if isinstance(adapters, str) else [str(p) for p in adapters]
        if not data.get("do_train"):
            raise UsageError(f"{where} uses the trained adapter {paths[-1]} (adapter_name_or_path) and trains nothing "
                             "(no do_train)", f"count that adapter: --from {paths[-1]}")
        if not data.get("create_new_adapter"):
            # LLaMA-Factory resumes training the last adapter; its own adapter_config.json governs
            return _trained_adapter(paths[-1], where, "adapter_name_or_path", "LLaMA-Factory")
    elif not data.get("do_train") and any(data.get(k) for k in ("do_predict", "export_dir", "infer_backend")):
        raise UsageError(f"{where} is an inference, predict or export config: it trains nothing",
                         "give the training YAML (do_train: true)")
    used = [k for k in _LLAMAFACTORY_UNSUPPORTED if data.get(k)]
    if used:
        raise UsageError(f"{where} sets {used[0]}: LLaMA-Factory then {_LLAMAFACTORY_UNSUPPORTED[used[0]]}, which "
                         "loraplan cannot count", "remove it from a copy of the file")
    fields = {k: data[k] for k in _LLAMAFACTORY_KEYS if k in data}
    # LLaMA-Factory's LoraArguments defaults: rank 8, alpha 2 * rank, dropout 0, target "all".
    fields.setdefault("lora_rank", 8)
    if fields.get("lora_alpha") is None:
        fields["lora_alpha"] = 2 * fields["lora_rank"]
    fields.setdefault("lora_dropout", 0.0)
    target = fields.pop("lora_target", None) or "all"
    items = [t.strip() for t in target.split(",") if t.strip()] if isinstance(target, str) else [str(t) for t in target]
    if data.get("resize_vocab") and not fields.get("additional_target"):
        if data.get("quantization_bit"):
            raise UsageError(f"{where} sets resize_vocab with quantization_bit: LLaMA-Factory refuses to resize the "
                             "embeddings of a quantized model", "fix the file")
        # model/adapter.py: the resized input and output embeddings become modules_to_save (full copies)
        fields["additional_target"] = ["embed_tokens", "lm_head"]
    out = plan_fields(fields, where)
    out["targets"] = join_targets(["llamafactory:all" if i == "all" else i for i in items])
    return out


def _llamafactory_v1_fields(data: dict, where: str) -> dict[str, Any]:
    """LLaMA-Factory v1 (`peft_config: {name: lora, ...}`; v1/plugins/model_plugins/peft.py LoraParams)."""
    config = data["peft_config"]
    name = config.get("name")
    if name != "lora":
        raise UsageError(f"{where} has no LoRA settings (peft_config name: {name})",
                         "LLaMA-Factory v1 trains LoRA with peft_config: {name: lora}")
    if config.get("adapter_name_or_path"):
        paths = config["adapter_name_or_path"]
        path = paths if isinstance(paths, str) else paths[0]
        if config.get("export_dir"):
            raise UsageError(f"{where} merges the trained adapter {path} and exports it: it trains nothing",
                             f"count that adapter: --from {path}")
        return _trained_adapter(path, where, "peft_config.adapter_name_or_path", "LLaMA-Factory")
    # LoraParams defaults: r 8, alpha 16, dropout 0.05, target_modules "all"
    fields = {"r": config.get("r", 8), "lora_alpha": config.get("lora_alpha", 16),
              "lora_dropout": config.get("lora_dropout", 0.05),
              **{k: config[k] for k in ("use_rslora", "use_dora", "modules_to_save") if k in config}}
    target = config.get("target_modules", "all")
    items = ["llamafactory-v1:all"] if target == "all" else [target] if isinstance(target, str) else list(target)
    out = plan_fields(fields, where)
    out["targets"] = join_targets([str(i) for i in items])
    return out


def _trained_adapter(path: str, where: str, key: str, tool: str) -> dict[str, Any]:
    """The adapter a config loads and trains on: its adapter_config.json, when it is a local folder."""
    folder = (Path(where).parent / path) if not Path(path).expanduser().is_absolute() else Path(path).expanduser()
    for candidate in (Path(path).expanduser(), folder):
        if (candidate / "adapter_config.json").is_file():
            return read_plan_fields(candidate)
    raise UsageError(f"{where} trains the saved adapter {path} ({key}): {tool} takes its settings from that "
                     "adapter's adapter_config.json, not from this file",
                     f"give --from {path} (the adapter folder) where it is on this machine")


def _torchtune_fields(model: dict, where: str) -> dict[str, Any]:
    component = str(model.get("_component_", ""))
    if "lora" not in component.rpartition(".")[2]:
        raise UsageError(f"{where}: model._component_ {component or '(none)'} is not a LoRA builder",
                         "torchtune LoRA builders are named lora_*, e.g. torchtune.models.llama3_1.lora_llama3_1_8b")
    if any(f".{family}." in component for family in ("phi3", "phi4")):
        raise UsageError(f"{where}: {component} splits Phi's fused qkv_proj and gate_up_proj into separate q, k, v "
                         "and w1, w3 adapters, which PEFT on the Hugging Face model cannot build, so loraplan cannot "
                         "count it as a PEFT adapter",
                         "count the Hugging Face equivalent with --targets qkv,o,gate_up,down (one adapter per fused "
                         "weight, fewer parameters than torchtune's)")
    fields = {k: model[k] for k in _TORCHTUNE_KEYS if k in model}
    # torchtune's lora_* builder defaults: rank 8, alpha 16, dropout 0.
    fields.setdefault("lora_rank", 8)
    fields.setdefault("lora_alpha", 16)
    fields.setdefault("lora_dropout", 0.0)
    choices = ("q_proj", "k_proj", "v_proj", "output_proj")
    unknown = [m for m in fields.get("lora_attn_modules") or () if m not in choices]
    if unknown:
        raise UsageError(f"{where}: unknown lora_attn_modules {listing(unknown)}",
                         "torchtune's choices are q_proj, k_proj, v_proj, output_proj")
    if not (fields.get("lora_attn_modules") or fields.get("apply_lora_to_mlp") or fields.get("apply_lora_to_output")):
        raise UsageError(f"{where}: the LoRA builder adapts nothing",
                         "set lora_attn_modules, apply_lora_to_mlp or apply_lora_to_output")
    return plan_fields(fields, where)

"""Read a LoRA configuration the user already has into `LoraPlan` fields (`--from FILE`).

Understood: a PEFT adapter (`adapter_config.json` or the folder that holds it), an axolotl or
LLaMA-Factory training YAML, a torchtune recipe config (its `model:` LoRA builder arguments), and
loraplan's own plans (`recommend --format json`, a sweep trial's `plan.json`). Each tool's own
defaults fill what the file leaves out, because that is what the tool would train.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UsageError, listing
from .lora_plan import LoraPlan, plan_fields

# Keys each tool reads for its LoRA adapter; the rest of a training config is not loraplan's business.
_AXOLOTL_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
                 "lora_target_parameters", "lora_modules_to_save", "peft_layers_to_transform",
                 "peft_use_rslora", "peft_use_dora", "loraplus_lr_ratio")
_LLAMAFACTORY_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "additional_target",
                      "use_rslora", "use_dora", "loraplus_lr_ratio")
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
    path = Path(path).expanduser()
    data, path = _load(path)
    where = str(path)
    if "peft_type" in data or ("r" in data and "target_modules" in data):
        return _peft_fields(data, where)
    if isinstance(data.get("plan"), dict):  # recommend --format json, sweep trials/<name>/plan.json
        return plan_fields(data["plan"], where)
    if "targets" in data and "r" in data:  # LoraPlan.to_dict()
        return plan_fields(data, where)
    if isinstance(data.get("model"), dict) and any(k in data["model"] for k in _TORCHTUNE_KEYS):
        return _torchtune_fields(data["model"], where)
    if "adapter" in data or any(k in data for k in ("lora_r", "lora_target_modules", "lora_target_linear")):
        return _axolotl_fields(data, where)
    if "finetuning_type" in data or any(k in data for k in ("lora_rank", "lora_target")):
        return _llamafactory_fields(data, where)
    raise UsageError(f"{where} has no LoRA settings",
                     "give a PEFT adapter_config.json or adapter folder, an axolotl or LLaMA-Factory YAML "
                     "(lora_r / lora_rank), or a torchtune config with a LoRA model builder")


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
    missing = [k for k in ("lora_r", "lora_alpha") if data.get(k) is None]
    if missing:
        raise UsageError(f"{where} sets adapter: {adapter} but no {' or '.join(missing)}",
                         "axolotl passes them to peft.LoraConfig; add them to the file")
    fields = {k: data[k] for k in _AXOLOTL_KEYS if k in data}
    fields.setdefault("lora_dropout", 0.0)  # axolotl's default
    if isinstance(fields.get("lora_target_modules"), str):  # passed to PEFT as one regex
        fields["lora_target_modules"] = f"re:{fields['lora_target_modules']}"
    if not (fields.get("lora_target_modules") or fields.get("lora_target_linear")
            or fields.get("lora_target_parameters")):
        raise UsageError(f"{where} has no lora_target_modules and no lora_target_linear",
                         "add lora_target_linear: true or a lora_target_modules list")
    return plan_fields(fields, where)


def _llamafactory_fields(data: dict, where: str) -> dict[str, Any]:
    kind = data.get("finetuning_type", "lora")
    if kind != "lora":
        raise UsageError(f"{where} has no LoRA settings (finetuning_type: {kind})",
                         "LLaMA-Factory trains LoRA with finetuning_type: lora")
    fields = {k: data[k] for k in _LLAMAFACTORY_KEYS if k in data}
    # LLaMA-Factory's LoraArguments defaults: rank 8, alpha 2 * rank, dropout 0, target "all".
    fields.setdefault("lora_rank", 8)
    if fields.get("lora_alpha") is None:
        fields["lora_alpha"] = 2 * fields["lora_rank"]
    fields.setdefault("lora_dropout", 0.0)
    fields.setdefault("lora_target", "all")
    if isinstance(fields["lora_target"], str):
        fields["lora_target"] = [t.strip() for t in fields["lora_target"].split(",") if t.strip()]
    return plan_fields(fields, where)


def _torchtune_fields(model: dict, where: str) -> dict[str, Any]:
    component = str(model.get("_component_", ""))
    if "lora" not in component.rpartition(".")[2]:
        raise UsageError(f"{where}: model._component_ {component or '(none)'} is not a LoRA builder",
                         "torchtune LoRA builders are named lora_*, e.g. torchtune.models.llama3_1.lora_llama3_1_8b")
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

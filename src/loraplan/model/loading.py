"""Where a model's config comes from: `builtin:NAME`, a local directory or `config.json`, or a Hub id.

`load_structure(MODEL)` is the entry point every command uses. Only the config is read (from the
local Hugging Face cache when offline); no weights. `trust_remote_code` stays off unless asked.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError, did_you_mean
from .builtin import BUILTIN_MODELS, builtin_for_hub_id, get_builtin
from .structure import (
    ModelStructure,
    build_structure,
    cached_structure,
    store_structure,
    structure_key,
)

BUILTIN_PREFIX = "builtin:"


def read_config_dict(model: str, trust_remote_code: bool = False, revision: str | None = None
                     ) -> tuple[dict, Path | None]:
    """The raw config dict of MODEL and, for a local or downloaded repo, its folder."""
    if model.startswith(BUILTIN_PREFIX):
        return dict(get_builtin(model[len(BUILTIN_PREFIX):]).config), None
    path = Path(model).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise UsageError(f"no config.json in {path}",
                             "point at a model folder saved with save_pretrained, or at its config.json")
        return _read_json(config_path), path
    if path.is_file():
        return _read_json(path), path.parent
    if _looks_like_path(model):
        raise UsageError(f"no such file or folder: {model}",
                         "give a model folder, a config.json, a Hub id (org/name) or builtin:NAME")
    return _hub_config(model, revision), None


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or model.endswith(".json") or model.count("/") > 1


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a text file", "give the model's config.json") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                         "fix the file or download it again") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} does not hold a JSON object", "a model's config.json is an object")
    if "model_type" not in data and "architectures" not in data:
        raise UsageError(f"{path} has no 'model_type'", "is this a transformers config.json?")
    return data


def _hub_config(model_id: str, revision: str | None) -> dict:
    if not model_id or any(c.isspace() for c in model_id):
        raise UsageError(f"'{model_id}' is not a model folder, a config.json, a Hub id or builtin:NAME",
                         "examples: ./my-model, meta-llama/Llama-3.1-8B, builtin:llama-3.1-8b")
    from huggingface_hub import hf_hub_download

    from ..hub import offline

    local = offline()
    try:
        path = hf_hub_download(model_id, "config.json", revision=revision, local_files_only=local)
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; all mean "can't have it"
        builtin = builtin_for_hub_id(model_id)
        hint = (f"offline? use builtin:{builtin.name}" if builtin else
                "check the id, your network or HF_HUB_OFFLINE, and `hf auth login` for gated models")
        where = "the local cache (offline: no network to the Hub)" if local else "the Hub or the local cache"
        raise UsageError(f"could not get config.json of '{model_id}' from {where} ({type(e).__name__})",
                         hint) from None
    return _read_json(Path(path))


def make_config(raw: dict, folder: Path | None = None, trust_remote_code: bool = False):
    """A transformers config object from a raw config dict, read as transformers reads config.json
    (`from_pretrained`): its special floats too, which transformers 5 writes as
    `{"__float__": "Infinity"}` (Mamba-2's time_step_limit)."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    decode = getattr(PretrainedConfig, "_decode_special_floats", None)  # transformers >= 5
    raw = decode(raw) if decode is not None else raw
    model_type = raw.get("model_type")
    if model_type in CONFIG_MAPPING:
        data = {k: v for k, v in raw.items() if k != "model_type"}
        try:
            return CONFIG_MAPPING[model_type].from_dict(data)
        except Exception as e:  # noqa: BLE001 - TypeError, ValueError, and transformers 5's StrictDataclassError
            if not isinstance(e, TypeError | ValueError) and type(e).__name__ not in _CONFIG_ERRORS:
                raise
            raise UsageError(f"config for model_type '{model_type}' is invalid: {_last_line(e)}",
                             "compare it with the model's published config.json") from None
    if raw.get("auto_map"):
        if not trust_remote_code:
            raise UsageError(f"model_type '{model_type}' needs the model's own code (auto_map in config.json)",
                             "read that code, then pass --trust-remote-code")
        if folder is None:
            raise UsageError("remote code needs the model's folder or Hub id, not a bare config",
                             "download the repository and pass its folder")
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    hint = did_you_mean(str(model_type), CONFIG_MAPPING_NAMES) or "upgrade transformers?"
    raise UsageError(f"unknown model_type '{model_type}' for transformers", hint)


# transformers 5 validates a config's fields and architecture (huggingface_hub strict dataclasses)
_CONFIG_ERRORS = ("StrictDataclassError", "StrictDataclassFieldValidationError", "StrictDataclassClassValidationError")


def _last_line(e: Exception) -> str:
    """The cause a validation error ends with ("ValueError: The hidden size (66) is not a multiple …")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def load_structure(model: str, *, trust_remote_code: bool = False, revision: str | None = None,
                   architecture: str | None = None) -> ModelStructure:
    """The module structure of MODEL (cached; instant after the first time)."""
    if isinstance(model, ModelStructure):
        return model
    raw, folder = read_config_dict(model, trust_remote_code=trust_remote_code, revision=revision)
    key = structure_key(raw, architecture)
    cached = cached_structure(key, source=model)
    if cached is not None:
        return cached
    config = make_config(raw, folder, trust_remote_code=trust_remote_code)
    structure = build_structure(config, architecture, trust_remote_code, source=model)
    store_structure(key, structure)
    return structure


DTYPES = ("auto", "bf16", "fp16", "fp32")


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    except KeyError:
        raise UsageError(f"unknown dtype '{name}'", f"choose one of {', '.join(DTYPES)}") from None


def load_model(model: str, *, dtype: str = "auto", device: str | None = None, trust_remote_code: bool = False,
               quantization: str | None = None, random_init: bool = False, revision: str | None = None):
    """The model with its weights (safetensors only, never pickle), ready for PEFT.

    `random_init` builds it from the config alone (benchmarks, `builtin:` shapes). `quantization`
    is "4bit" (NF4 with double quantization, bf16 compute, as QLoRA) or "8bit" (bitsandbytes).
    """
    import torch
    import transformers

    raw, folder = read_config_dict(model, trust_remote_code=trust_remote_code, revision=revision)
    config = make_config(raw, folder, trust_remote_code=trust_remote_code)
    dtype_ = torch_dtype(dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from .structure import model_class_for

    cls = model_class_for(config, None, trust_remote_code)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        if random_init or model.startswith(BUILTIN_PREFIX):
            if not random_init:
                raise UsageError(f"{model} is a shape without weights",
                                 "give a model folder or Hub id (or random_init=True for a benchmark)")
            with torch.device(device):
                built = (cls.from_config(config, dtype=dtype_, trust_remote_code=trust_remote_code)
                         if cls.__name__.startswith("AutoModel") else cls._from_config(config, dtype=dtype_))
            return built
        source = str(folder) if folder is not None and (Path(model).exists()) else model
        kwargs = dict(dtype=dtype_, use_safetensors=True, trust_remote_code=trust_remote_code, revision=revision)
        if quantization:
            kwargs["quantization_config"] = quantization_config(quantization, dtype_)
            kwargs["device_map"] = {"": 0}
        elif device != "cpu":
            kwargs["device_map"] = {"": device}
        try:
            loaded = cls.from_pretrained(source, **kwargs)
        except OSError as e:
            raise UsageError(f"could not load the weights of {model}: {str(e).splitlines()[0]}",
                             "loraplan reads safetensors weights only (no .bin pickles)") from None
        except Exception as e:  # noqa: BLE001 - safetensors' own error type lives in its Rust module
            files = ", ".join(sorted(p.name for p in folder.glob("*.safetensors"))) if folder else "safetensors"
            if type(e).__name__ == "SafetensorError":
                raise UsageError(f"the weights of {model} ({files}) are damaged or not safetensors: "
                                 f"{str(e).splitlines()[0]}", "download or save the model again") from None
            if isinstance(e, RuntimeError) and ("mismatched_sizes" in str(e) or "size mismatch" in str(e)):
                raise UsageError(f"the weights of {model} ({files}) have other shapes than its config.json "
                                 "describes", "the config and the weights come from different models: "
                                 "download or save the model again") from None
            raise
        return loaded
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()


def quantization_config(quantization: str, compute_dtype):
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError(f"{quantization} quantization needs bitsandbytes",
                         "pip install 'loraplan[qlora]' on a CUDA machine") from None
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UsageError(f"unknown quantization '{quantization}'", "choose 4bit or 8bit")


def load_tokenizer(model: str, trust_remote_code: bool = False, revision: str | None = None):
    """The model's tokenizer, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    if model.startswith(BUILTIN_PREFIX):
        raise UsageError(f"{model} is a shape without a tokenizer", "give a model folder or Hub id")
    path = Path(model).expanduser()
    source = str(path if path.is_dir() else path.parent) if path.exists() else model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load a tokenizer for {model}: {str(e).splitlines()[0]}",
                         "the model folder needs tokenizer.json (or the files save_pretrained writes)") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def write_builtin_structures(folder=None) -> list[str]:
    """Pre-build the structure of every built-in model for the installed transformers version, so
    `inspect`/`count` on a `builtin:` shape need no transformers import (package data)."""
    folder = Path(folder) if folder else Path(__file__).parent / "builtin_structures"
    for stale in folder.glob("*.json"):
        stale.unlink()
    keys = []
    for entry in BUILTIN_MODELS.values():
        key = structure_key(entry.config, None)
        structure = build_structure(make_config(dict(entry.config)), source=f"builtin:{entry.name}")
        store_structure(key, structure, folder)
        keys.append(key)
    return keys


if __name__ == "__main__":  # python -m loraplan.model.loading: refresh the shipped structures
    print(f"wrote {len(write_builtin_structures())} structures")

"""Ship an adapter: merge it into its base model and save a standalone safetensors model.

Pre-flight first (litgpt's validate): the adapter is read and checked against the base's structure
from the meta device — every adapted weight exists with the shapes of lora_A and lora_B — before
any weight is loaded, so a wrong pair fails in a second naming the first mismatch. Then PEFT's
`merge_and_unload`, and a check that the merged model gives the logits of base + adapter on a few
tokens (within a tolerance set by the dtype) before anything is written.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RunError, UsageError
from ..files import prepare_output, publish, staging_folder
from .folder import check_fits, read_adapter

# Largest |merged − base+adapter| logit difference accepted, relative to the largest |logit|.
# fp32 merges agree to rounding; fp16/bf16 round W + ΔW to 11/8 significant bits once per weight,
# and those errors add up over the layers (bf16's unit roundoff is 2⁻⁸ ≈ 0.4%).
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
CHECK_TOKENS = 16
_CONFIG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass
class MergeResult:
    model: str
    adapter: str
    out: str
    dtype: str
    weights: int
    max_abs_diff: float
    tolerance: float
    adapter_effect: float  # max |base+adapter − base| logit: how much the adapter changes the output
    files: list[str]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(vars(self))


def merge(model: str, adapter: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
          overwrite: bool = False, trust_remote_code: bool = False) -> MergeResult:
    """`loraplan merge` as a function: OUT gets the merged model (safetensors) and the tokenizer."""
    from ..model.loading import DTYPES, load_structure, read_config_dict

    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}'", f"choose one of {', '.join(DTYPES)}")
    structure = load_structure(model, trust_remote_code=trust_remote_code)
    ad = read_adapter(adapter, structure)
    check_fits(ad, structure)
    if model.startswith("builtin:"):
        raise UsageError(f"{model} is a shape without weights",
                         "merge into the model folder or Hub id it was trained on")
    folder = prepare_output(out, "config.json", overwrite, inputs=(model, ad.path))
    dtype = dtype or _checkpoint_dtype(read_config_dict(model, trust_remote_code)[0])
    notes = list(ad.notes)
    if ad.base_model and not _same_model(ad.base_model, model):
        notes.append(f"the adapter names {ad.base_model} as its base; its shapes fit {model}")
    import torch

    from ..model.loading import load_model

    base = load_model(model, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    base.eval()
    tokenizer, tokenizer_note = _tokenizer(ad.path, model, trust_remote_code)
    if tokenizer_note:
        notes.append(tokenizer_note)
    ids = _check_ids(base)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base_logits = base(input_ids=ids).logits.float()
        peft_model = _with_adapter(base, ad)
        adapted = peft_model(input_ids=ids).logits.float()
        merged = peft_model.merge_and_unload(safe_merge=True)
        merged_logits = merged(input_ids=ids).logits.float()
    notes.extend(_peft_notes(caught))
    diff = float((merged_logits - adapted).abs().max())
    effect = float((adapted - base_logits).abs().max())
    scale = max(1.0, float(adapted.abs().max()))
    tolerance = TOLERANCE.get(dtype if dtype != "auto" else "fp32", TOLERANCE["fp32"]) * scale
    if not diff <= tolerance:
        raise RunError(f"the merged model's logits differ from base + adapter by {diff:.3g} (tolerance {tolerance:.3g} "
                       f"in {dtype}); nothing was written",
                       "merge in fp32 (--dtype fp32) and report the model and adapter if it persists")
    if effect == 0:
        notes.append("the adapter does not change the logits at all (lora_B is zero: an untrained adapter?)")
    staging = staging_folder(folder)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        merged.save_pretrained(str(staging))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        _check_saved(staging)
        files = publish(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return MergeResult(model, str(ad.path), str(folder), dtype, len(ad.weights), diff, tolerance, effect, files, notes)


def _same_model(a: str, b: str) -> bool:
    """The same Hub id, or the same local folder however it is spelled."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _peft_notes(caught) -> list[str]:
    """PEFT's warnings while loading and merging (tied embeddings untied, …), as one-line notes."""
    seen = dict.fromkeys(str(w.message).split(". ")[0].strip() for w in caught
                         if issubclass(w.category, UserWarning) and "peft" in str(w.filename))
    return [f"PEFT: {text}" for text in seen if text]


def _checkpoint_dtype(config: dict) -> str:
    """The base checkpoint's own dtype (config `dtype`/`torch_dtype`), so the merged model matches it."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return _CONFIG_DTYPES.get(name, "fp32")


def _tokenizer(adapter_dir: Path, model: str, trust_remote_code: bool):
    """The run's tokenizer when saved with the adapter (it may add tokens), else the base's."""
    from ..model.loading import load_tokenizer

    for source, where in ((adapter_dir, "the adapter folder"), (model, "the base model")):
        if source == adapter_dir and not any(Path(adapter_dir).glob("tokenizer*")):
            continue
        try:
            return load_tokenizer(str(source), trust_remote_code=trust_remote_code), None
        except UsageError:
            continue
    return None, "no tokenizer in the adapter folder or the base model: the merged folder has none"


def _check_ids(model):
    """A fixed batch of token ids from the model's vocabulary (the check needs no tokenizer)."""
    import torch

    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, CHECK_TOKENS), generator=generator)


def _with_adapter(base, ad):
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(base, str(ad.path), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as e:
        raise RunError(f"PEFT could not load the adapter onto the base: {str(e).splitlines()[0][:200]}",
                       "run `loraplan analyze ADAPTER --base MODEL` to see what does not fit") from None
    loaded = sum(1 for n, _ in peft_model.named_parameters()
                 if n.endswith(("lora_A.default.weight", "lora_embedding_A.default")))
    if loaded < len(ad.weights):
        raise RunError(f"PEFT attached {loaded} of the adapter's {len(ad.weights)} LoRA weights",
                       "the adapter's target_modules do not select every weight it holds; check adapter_config.json")
    peft_model.eval()
    return peft_model


def _check_saved(folder: Path) -> None:
    if not any(folder.glob("*.safetensors")):
        raise RunError(f"save_pretrained wrote no safetensors file into {folder}", "check the transformers version")

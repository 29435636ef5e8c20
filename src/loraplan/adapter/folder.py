"""A PEFT LoRA adapter folder: its config, and one `AdaptedWeight` per adapted weight.

Reads any standard adapter (loraplan's sweep, PEFT's `save_pretrained`, axolotl, TRL, Unsloth).
Tensors come from `adapter_model.safetensors` only, never the pickle `adapter_model.bin`. The key
layout PEFT 0.21 writes (peft/utils/save_and_load.py), after the `base_model.model.` prefix:

    <module>.lora_A.weight (r, in)            <module>.lora_B.weight (out, r)     [lora_B.bias (out)]
    <module>.lora_embedding_A (r, vocab)      <module>.lora_embedding_B (dim, r)
    <module>.lora_magnitude_vector (out)      DoRA
    <module>(.base_layer)*.lora_A.weight (r·E, in), lora_B.weight (out, r·E)
                                              lora.ParamWrapper (`target_parameters`, E experts);
                                              wrappers of one module nest, the first registered
                                              parameter innermost (most `.base_layer`s)

Every other tensor (modules_to_save copies, saved embedding base layers, lora biases, trainable
tokens) is kept as it is, so a rewritten adapter (compress) carries it over.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import UsageError, listing, nearest
from ..model.roles import role_of
from ..model.structure import ModelStructure, ModuleInfo, peft_layer_index
from ..plan.count import rank_for

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig.lora_alpha's default, for configs that leave it out

_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.default)?(?:\.(?P<tail>weight|bias))?$")
_NESTING = re.compile(r"((?:\.base_layer)*)$")
# Output projections to the vocabulary, for naming a role when no base model is given
# (roles.role_of reads it off the structure's `output_embeddings`).
_OUTPUT_LEAVES = ("lm_head", "embed_out")
# Files besides the weights that a trainer saves next to an adapter and that belong with it.
_COMPANION_FILES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template\..*|"
                              r"vocab\..*|merges\.txt|spiece\.model|README\.md)$")


@dataclass(frozen=True)
class AdaptedWeight:
    """One adapted weight: ΔW = scaling · B·A, per expert for a 3-D parameter."""

    name: str  # the PEFT key: a module name, or "<module>.<param>" for a parameter target
    kind: str  # linear | embedding | conv | param
    lora_A: object = field(repr=False)  # torch.Tensor, as stored
    lora_B: object = field(repr=False)
    r: int  # rank (per expert)
    alpha: float
    use_rslora: bool
    experts: int = 1
    magnitude: object = field(default=None, repr=False)  # DoRA magnitude vector (out,)
    key: str = ""  # the stored key before `.lora_A` (keeps `base_layer` nesting), prefix included
    role: str = "other"
    guess: str | None = None
    name_certain: bool = True  # False: a nested parameter named by convention, not from the base

    @property
    def scaling(self) -> float:
        """alpha/r, or alpha/sqrt(r) with rsLoRA (Kalajdzievski 2023), as PEFT's LoraLayer.update_layer."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def in_features(self) -> int:
        return int(math.prod(self.lora_A.shape[1:]))

    @property
    def out_features(self) -> int:
        return int(self.lora_B.shape[0])

    @property
    def layer(self) -> int | None:
        return peft_layer_index(self.name)

    @property
    def params(self) -> int:
        extra = 0 if self.magnitude is None else self.magnitude.numel()
        return self.lora_A.numel() + self.lora_B.numel() + extra

    def factors(self, dtype=None):
        """(B, A) as (E, out, r) and (E, r, in) so that ΔW_e = scaling · B_e A_e (out × in).

        For an embedding, "in" is the vocabulary (PEFT's delta is the transpose, same spectrum).
        A parameter target stores A as (r·E, in) with expert e in rows e·r…e·r+r−1, and B as
        (out, r·E) with expert e in columns e, e+E, … (peft lora.ParamWrapper.get_delta_weight).
        """
        import torch

        dtype = dtype or torch.float64
        a = self.lora_A.to(dtype).reshape(self.lora_A.shape[0], -1)
        b = self.lora_B.to(dtype).reshape(self.lora_B.shape[0], -1)
        e = self.experts
        a = a.reshape(e, self.r, a.shape[-1])
        b = b.reshape(b.shape[0], self.r, e).permute(2, 0, 1) if e > 1 else b.unsqueeze(0)
        return b, a

    def stored(self, b, a) -> tuple:
        """The inverse of `factors`: (lora_A, lora_B) in the stored layout and dtype, for rank b.shape[-1]."""
        r = b.shape[-1]
        e = self.experts
        lora_a = a.reshape(e * r, *self.lora_A.shape[1:])
        lora_b = (b.permute(1, 2, 0) if e > 1 else b[0]).reshape(self.out_features, e * r)
        lora_b = lora_b.reshape(self.out_features, e * r, *self.lora_B.shape[2:])
        return lora_a.to(self.lora_A.dtype).contiguous(), lora_b.to(self.lora_B.dtype).contiguous()


@dataclass
class Adapter:
    path: Path
    config: dict
    weights: list[AdaptedWeight]
    extra: dict = field(repr=False)  # stored key -> tensor, kept as-is
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)

    @property
    def r(self) -> int:
        return int(self.config["r"])

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha") or PEFT_DEFAULT_ALPHA)

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def ranks(self) -> list[int]:
        return sorted({w.r for w in self.weights})

    @property
    def lora_params(self) -> int:
        return sum(w.params for w in self.weights)

    def summary(self) -> str:
        """`r=16 · alpha=32 (scale 2) · rsLoRA · DoRA · 224 weights`."""
        ranks = self.ranks
        r = f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}–{ranks[-1]}"
        scales = sorted({round(w.scaling, 6) for w in self.weights})
        scale = f"{scales[0]:g}" if len(scales) == 1 else f"{scales[0]:g}–{scales[-1]:g}"
        kind = "alpha/sqrt(r)" if self.use_rslora else "alpha/r"
        flags = (" · rsLoRA" if self.use_rslora else "") + (" · DoRA" if self.use_dora else "")
        return f"{r} · alpha={self.lora_alpha:g} ({kind} = {scale}){flags} · {len(self.weights)} weights"


def read_adapter(path: str | os.PathLike, structure: ModelStructure | None = None) -> Adapter:
    """Read a PEFT LoRA adapter folder (or a loraplan trial folder holding `adapter/`).

    With `structure` (the base model's), nested parameter targets are named exactly and roles come
    from the base; without it roles come from the module names and nesting follows convention.
    """
    folder = adapter_folder(path)
    config = _read_config(folder)
    tensors = _read_tensors(folder)
    weights, extra = _parse(tensors, config, folder, structure)
    dtypes = Counter(str(w.lora_A.dtype).removeprefix("torch.") for w in weights)
    adapter = Adapter(folder, config, weights, extra, dtype=dtypes.most_common(1)[0][0])
    adapter.weights = _with_roles(adapter.weights, structure)
    if any(not w.name_certain for w in adapter.weights):
        adapter.notes.append("several parameters of one module are adapted (nested lora.ParamWrapper); "
                             "their names follow transformers' registration order: pass the base model for exact names")
    return adapter


def adapter_folder(path: str | os.PathLike) -> Path:
    folder = Path(path).expanduser()
    if folder.is_file() and folder.name == CONFIG_NAME:
        folder = folder.parent
    if not folder.exists():
        raise UsageError(f"no such folder: {folder}", "give the folder that holds adapter_config.json")
    if not folder.is_dir():
        raise UsageError(f"{folder} is a file, not an adapter folder", "give the folder that holds adapter_config.json")
    if not (folder / CONFIG_NAME).is_file() and (folder / "adapter" / CONFIG_NAME).is_file():
        return folder / "adapter"  # a loraplan trial folder
    if not (folder / CONFIG_NAME).is_file():
        if (folder / "config.json").is_file():
            raise UsageError(f"{folder} holds a model (config.json), not a LoRA adapter",
                             "give the adapter folder saved by PeftModel.save_pretrained (adapter_config.json)")
        checkpoints = sorted(folder.glob("checkpoint-*/" + CONFIG_NAME))
        hint = (f"a trainer output folder? its checkpoints hold adapters, e.g. {checkpoints[-1].parent}"
                if checkpoints else "give the folder saved by PeftModel.save_pretrained")
        raise UsageError(f"no {CONFIG_NAME} in {folder}", hint)
    return folder


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({type(e).__name__})",
                         "the adapter folder is damaged: save it again") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path} does not hold a JSON object", "the adapter folder is damaged: save it again")
    peft_type = str(config.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise UsageError(f"{folder} is a {peft_type} adapter; loraplan reads LoRA adapters",
                         "LoRA, rsLoRA and DoRA adapters (peft_type LORA) are supported")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise UsageError(f"{path}: 'r' must be a positive integer, got {r!r}", "the adapter config is damaged")
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise UsageError(f"{path}: 'lora_alpha' must be a positive number, got {alpha!r}",
                         "the adapter config is damaged")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise UsageError(f"{path}: '{key}' must be an object", "the adapter config is damaged")
    return config


def _read_tensors(folder: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        if (folder / PICKLE_NAME).is_file():
            raise UsageError(
                f"{folder} has only {PICKLE_NAME}; loraplan reads safetensors only "
                "(a .bin is a pickle that can run code)",
                "convert it once where you trust the file: python -c \"import torch; from safetensors.torch "
                "import save_file; save_file(torch.load('adapter_model.bin', weights_only=True), "
                "'adapter_model.safetensors')\"")
        raise UsageError(f"no {WEIGHTS_NAME} in {folder}", "the adapter folder is incomplete: save it again")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]})",
                         "truncated download or copy? save or download it again") from None
    if not tensors:
        raise UsageError(f"{path} holds no tensors", "the adapter was saved before any LoRA layer existed")
    return tensors


def _parse(tensors: dict, config: dict, folder: Path, structure: ModelStructure | None):
    parts: dict[tuple[str, int], dict] = {}
    extra: dict = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if not match or match["tail"] == "bias":
            extra[key] = tensor
            continue
        module = match["module"]
        nesting = _NESTING.search(module)[1]
        entry = parts.setdefault((module[:len(module) - len(nesting)], nesting.count(".base_layer")), {})
        entry[match["part"].replace("lora_embedding_", "lora_")] = (tensor, key[:match.start("part") - 1])
        entry["embedding"] = entry.get("embedding", False) or match["part"].startswith("lora_embedding")
    params = _parameter_targets(config)
    names = _param_names(parts, params, structure, config.get("target_modules"))
    weights = []
    r_default, alpha_default = int(config["r"]), float(config.get("lora_alpha") or PEFT_DEFAULT_ALPHA)
    for (module, depth), entry in sorted(parts.items()):
        where = module.removeprefix(PREFIX)
        for part in ("lora_A", "lora_B"):
            if part not in entry:
                other = "lora_B" if part == "lora_A" else "lora_A"
                raise UsageError(f"incomplete adapter: '{where}' has {other} but no {part} in {folder / WEIGHTS_NAME}",
                                 "the file is damaged or was edited: save the adapter again")
        (a, key), (b, _) = entry["lora_A"], entry["lora_B"]
        magnitude = entry.get("lora_magnitude_vector", (None,))[0]
        name, certain = names.get((module, depth), (where, True))
        is_param = (module, depth) in names
        r = rank_for(config.get("rank_pattern") or {}, r_default, name)
        alpha = float(rank_for(config.get("alpha_pattern") or {}, alpha_default, name))
        rows = a.shape[0]
        if b.ndim < 2 or a.ndim < 2 or b.shape[1] != rows:
            raise UsageError(f"'{where}': lora_A is {tuple(a.shape)} and lora_B is {tuple(b.shape)}, which do not "
                             "multiply", "the adapter file is damaged: save it again")
        experts = rows // r if is_param and rows % r == 0 else 1
        if rows != r * experts:
            raise UsageError(f"'{name}': {CONFIG_NAME} gives rank {r} but lora_A has {rows} rows",
                             "the config and the weights come from different runs: save the adapter again")
        if magnitude is not None and magnitude.numel() != b.shape[0] and not entry["embedding"]:
            raise UsageError(f"'{where}': the DoRA magnitude has {magnitude.numel()} entries for {b.shape[0]} outputs",
                             "the adapter file is damaged: save it again")
        kind = "embedding" if entry["embedding"] else "param" if is_param else "conv" if a.ndim > 2 else "linear"
        weights.append(AdaptedWeight(name, kind, a, b, r, alpha, bool(config.get("use_rslora")), experts,
                                     magnitude, key, name_certain=certain))
    if not weights:
        raise UsageError(f"{folder / WEIGHTS_NAME} holds no LoRA weights (no lora_A/lora_B keys)",
                         "is this a LoRA adapter saved by PEFT?")
    return weights, extra


def _parameter_targets(config: dict) -> list[str]:
    targets = config.get("target_parameters") or []
    return [targets] if isinstance(targets, str) else list(targets)


def _param_names(parts: dict, targets: list[str], structure: ModelStructure | None, target_modules=None
                 ) -> dict[tuple[str, int], tuple[str, bool]]:
    """The parameter each lora.ParamWrapper adapts: (stored module, depth) -> (PEFT key, certain).

    PEFT adapts `<module>.<param>` when it equals a target or ends with "." + the target
    (tuners_utils.BaseTuner._inject_parameters), so a bare name (`down_proj`, as PEFT's own
    `all-linear` conversion saves it) reaches every module with that parameter."""
    if not targets:
        return {}
    depths: dict[str, list[int]] = {}
    for module, depth in parts:
        depths.setdefault(module, []).append(depth)
    out = {}
    for module, found in depths.items():
        name = module.removeprefix(PREFIX)
        if structure is not None:
            # the base says which parameters the module has; its registration order is PEFT's nesting
            candidates = [m.leaf for m in structure.modules if m.is_parameter and m.module_name == name
                          and _parameter_matches(m.name, targets)]
            certain = len(candidates) == len(found)
        else:
            qualified, bare = [], []
            for target in targets:
                owner, _, param = target.rpartition(".")
                if not owner:
                    bare.append(param)
                elif (name == owner or name.endswith("." + owner)) and param not in qualified:
                    qualified.append(param)
            candidates = qualified or ([] if len(found) == 1 and _is_module_target(name, target_modules)
                                       else list(dict.fromkeys(bare)))
            # transformers registers the input projections (gate_up_proj, w1, w3) before down_proj / w2
            candidates.sort(key=lambda p: "down" in p or p == "w2")
            certain = len(candidates) == 1 and len(found) == 1
        if not candidates:
            continue
        for i, depth in enumerate(sorted(found, reverse=True)):
            param = candidates[i] if i < len(candidates) else f"param{i}"
            out[(module, depth)] = (f"{name}.{param}", certain)
    return out


def _parameter_matches(key: str, targets: list[str]) -> bool:
    return any(key == t or key.endswith("." + t) for t in targets)


def _is_module_target(name: str, target_modules) -> bool:
    """Whether PEFT's `target_modules` selects the module (check_target_module_exists): a string is a
    regex matched in full, a list matches a name or a name's end."""
    if not target_modules:
        return False
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _with_roles(weights: list[AdaptedWeight], structure: ModelStructure | None) -> list[AdaptedWeight]:
    known = structure.by_name if structure is not None else {}
    stand_in = _stand_in_structure(weights)
    out = []
    for w in weights:
        info = known.get(w.name)
        if info is not None:
            role, guess = info.role, info.guess
        else:
            role, guess = role_of(_module_info(w), stand_in)[:2]  # (role, guess[, block])
        out.append(replace(w, role=role, guess=guess))
    return out


def _module_info(w: AdaptedWeight) -> ModuleInfo:
    return ModuleInfo(w.name, "", w.kind, w.in_features, w.out_features, experts=w.experts)


def _stand_in_structure(weights: list[AdaptedWeight]) -> ModelStructure:
    """What role_of needs from a base model, read off the adapter alone."""
    embeddings = [w.name for w in weights if w.kind == "embedding"]
    outputs = [w.name for w in weights if w.name.rpartition(".")[2] in _OUTPUT_LEAVES]
    infos = [_module_info(w) for w in weights]
    return ModelStructure(model_type="", architecture="adapter", config={}, modules=infos,
                          module_names=[m.name for m in infos], params={}, tied={},
                          input_embeddings=embeddings[0] if len(embeddings) == 1 else None,
                          output_embeddings=outputs[0] if outputs else None)


# -- fitting a base model -----------------------------------------------------------------------


def check_fits(adapter: Adapter, structure: ModelStructure) -> None:
    """Every adapted weight exists in the base with the shapes of lora_A and lora_B; the first
    mismatch is a UsageError that names it."""
    trained_on = f" (it was trained on {adapter.base_model})" if adapter.base_model else ""
    for w in adapter.weights:
        info = structure.by_name.get(w.name)
        if info is None:
            suggestion = nearest(w.name, structure.by_name, cutoff=0.8)
            hint = f"closest in the base: '{suggestion[0]}'" if suggestion else \
                f"the base's adaptable names look like {listing([m.name for m in structure.modules[:3]])}"
            raise UsageError(f"the adapter adapts '{w.name}', which {structure.architecture} does not have{trained_on}",
                             f"{hint}; merge it into the model it was trained on")
        base_in = info.in_features * info.kernel
        if (w.kind == "embedding") != (info.kind == "embedding") or (w.kind == "param") != info.is_parameter:
            raise UsageError(f"'{w.name}' is a {w.kind} in the adapter but a {info.kind} in {structure.architecture}",
                             f"this adapter does not fit the base{trained_on}")
        if (w.in_features, w.out_features, w.experts) != (base_in, info.out_features, info.experts):
            ours = f"{w.in_features}→{w.out_features}" + (f" × {w.experts} experts" if w.experts > 1 else "")
            theirs = f"{base_in}→{info.out_features}" + (f" × {info.experts} experts" if info.experts > 1 else "")
            raise UsageError(f"'{w.name}' is {ours} in the adapter but {theirs} in {structure.architecture}",
                             f"this adapter does not fit the base{trained_on}")
    sizes = {**structure.params, **{t: structure.params.get(c, 0) for t, c in structure.tied.items()}}
    for key, tensor in adapter.extra.items():
        name = key.removeprefix(PREFIX).replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        if name in sizes and sizes[name] != tensor.numel():
            raise UsageError(f"the adapter saves '{name}' with {tensor.numel():,} values but the base's has "
                             f"{sizes[name]:,}", "the vocabulary was resized for training: call model."
                             "resize_token_embeddings(len(tokenizer)) on the base first, with the run's tokenizer")


def companion_files(folder: Path) -> list[Path]:
    """Tokenizer files and the model card saved next to an adapter."""
    return [p for p in sorted(folder.iterdir()) if p.is_file() and _COMPANION_FILES.match(p.name)]

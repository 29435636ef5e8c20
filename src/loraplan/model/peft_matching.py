"""Which weights PEFT adapts for one set of `LoraConfig` targeting arguments, and what it refuses.

A replay of `BaseTuner.inject_adapter`'s selection over a `ModelStructure`, in PEFT's order:
1. `all-linear` becomes the concrete arguments PEFT itself derived on this model (peft_facts.py);
   otherwise the transformers-v5 MoE conversion (peft/utils/transformers_weight_conversion.py:
   `_convert_peft_config_moe`) rewrites v4 expert names (`gate_proj`, `w1`, `gate`…) to the fused
   expert parameters, a regex first reduced to the leaf names it matches;
2. every named module is matched (`check_target_module_exists`: a string is one `re.fullmatch`; a
   list entry matches the name or a dotted suffix of it, then `layers_to_transform` by the first
   numbered segment; `modules_to_save` excludes); a matched module PEFT cannot wrap, or whose name
   PEFT refuses on this model type (Mamba's `out_proj`), fails the whole call;
3. `target_parameters` match `module.param` keys (the key or a dotted suffix), each wrapped by a
   `lora.ParamWrapper`, which refuses a module already adapted through `target_modules`.
Pure Python over stored names, so `count` on a 405B config needs neither torch nor PEFT; the
test against every transformers architecture (tests/test_every_architecture.py) holds it to PEFT.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import UsageError, listing
from .structure import ModelStructure, ModuleInfo, peft_layer_index

ALL_LINEAR = "all-linear"
_KINDS = "Linear, Embedding, Conv1d/2d/3d, transformers' Conv1D"


@dataclass(frozen=True)
class Selection:
    """What PEFT adapts, with the arguments as PEFT holds them after its own rewriting."""

    modules: tuple[ModuleInfo, ...]  # adapted modules and parameters, in model order
    target_modules: list[str] | str
    target_parameters: list[str]
    # rank/alpha multipliers PEFT adds itself ({rank_pattern key: factor}): gate_up_proj at 2r when
    # the v4 halves gate_proj + up_proj were named
    rank_factors: dict[str, int] = field(default_factory=dict)
    alpha_factors: dict[str, float] = field(default_factory=dict)


def is_all_linear(target_modules) -> bool:
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def peft_selection(structure: ModelStructure, target_modules: Sequence[str] | str,
                   target_parameters: Iterable[str] = (), layers: Sequence[int] | None = None,
                   modules_to_save: Sequence[str] = ()) -> Selection:
    """The weights `peft.LoraConfig(target_modules=…, target_parameters=…, layers_to_transform=…,
    modules_to_save=…)` adapts on STRUCTURE; a UsageError with PEFT's reason where PEFT raises."""
    linear = (structure.peft or {}).get("all_linear") or {}
    if is_all_linear(target_modules):
        if not linear:
            raise UsageError(f"no record of what PEFT's all-linear selects on {structure.architecture}",
                             "clear ~/.cache/loraplan/structures and run again")
        modules: list[str] | str = list(linear["target_modules"])
        params = sorted(set(target_parameters) | set(linear["target_parameters"]))
        ranks, alphas = dict(linear["rank_pattern"]), dict(linear["alpha_pattern"])
    else:
        modules, params, ranks, alphas = convert_moe_targets(structure, target_modules, target_parameters,
                                                             modules_to_save)
    refused = (structure.peft or {}).get("refused_names") or {}
    wrapped: dict[str, ModuleInfo] = {}
    matcher = _module_matcher(modules, layers)
    for key in structure.module_names:
        if _excluded(key, modules_to_save) or not matcher(key):
            continue
        _check_name(key, refused)
        info = structure.by_name.get(key)
        if info is None or info.is_parameter:
            raise UsageError(f"{key} ({structure.module_classes.get(key, 'a container')}) is not a layer LoRA can "
                             f"adapt, and PEFT refuses a target name that matches one (it wraps {_KINDS})",
                             _not_layer_hint(structure, key))
        wrapped[key] = info
    adapted_params = _match_parameters(structure, params, wrapped, refused)
    chosen = [m for m in structure.modules if m.name in wrapped or m.name in adapted_params]
    chosen += [m for name, m in adapted_params.items() if name not in structure.by_name]
    if not chosen and isinstance(modules, str):
        example = next((m.name for m in structure.modules if m.kind == "linear"), "")
        raise UsageError(f"re:{modules} matches no adaptable module",
                         f"PEFT matches it against whole module names, such as '{example}'")
    if not chosen:
        raise UsageError(f"PEFT finds no module to adapt for target_modules={_show(modules)}"
                         + (f", target_parameters={params}" if params else "")
                         + (f" in layers {list(layers)}" if layers is not None else ""),
                         "check the names with `loraplan inspect MODEL`")
    if is_all_linear(target_modules) and linear.get("error"):
        # PEFT refused its own preset for a reason the replay above did not meet: its word stands
        raise UsageError(f"PEFT refuses all-linear on {structure.architecture}: {linear['error']}",
                         "name the modules to adapt instead")
    return Selection(tuple(chosen), modules, params, ranks, alphas)


def _show(modules) -> str:
    return repr(modules) if isinstance(modules, str) else repr(sorted(modules))


def _module_matcher(target_modules, layers: Sequence[int] | None):
    """PEFT's check_target_module_exists for one config (without the exclusions)."""
    if isinstance(target_modules, str):
        rx = re.compile(target_modules)
        return lambda key: rx.fullmatch(key) is not None
    names = set(target_modules)
    by_leaf: dict[str, list[str]] = {}  # a suffix can only match keys with its last segment
    for t in names:
        by_leaf.setdefault(t.rpartition(".")[2], []).append("." + t)
    wanted = set(layers) if layers is not None else None

    def match(key: str) -> bool:
        if key in names:
            return True  # a whole name matches in every layer: PEFT checks layers for suffixes only
        if not any(key.endswith(s) for s in by_leaf.get(key.rpartition(".")[2], ())):
            return False
        if wanted is None:
            return True
        index = peft_layer_index(key)
        return index is not None and index in wanted

    return match


def _excluded(key: str, modules_to_save: Sequence[str]) -> bool:
    # peft: adapters never go inside a modules_to_save module; the entry is used as a regex, unescaped
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save)


def _check_name(key: str, refused: dict[str, str]) -> None:
    leaf = key.rpartition(".")[2]
    if leaf in refused:
        raise UsageError(f"PEFT refuses '{leaf}' on this model type: {refused[leaf]}",
                         f"leave {leaf} out of the targets")


def _not_layer_hint(structure: ModelStructure, key: str) -> str:
    inside = [m.leaf for m in structure.modules if not m.is_parameter and m.name.startswith(key + ".")]
    if inside:
        return f"name the layers inside it instead: {listing(dict.fromkeys(inside), 8)}"
    return "name a Linear layer instead (`loraplan inspect MODEL` lists them)"


def _match_parameters(structure: ModelStructure, targets: Sequence[str], wrapped: dict[str, ModuleInfo],
                      refused: dict[str, str]) -> dict[str, ModuleInfo]:
    """peft BaseTuner._inject_parameters: each `module.param` key equal to a target or ending in
    `.target` is wrapped by a lora.ParamWrapper."""
    if not targets:
        return {}
    names = set(targets)
    suffixes = tuple("." + t for t in names)
    out: dict[str, ModuleInfo] = {}
    for key in all_parameter_names(structure):
        if key not in names and not key.endswith(suffixes):
            continue
        owner = key.rpartition(".")[0]
        if not owner:
            raise UsageError(f"PEFT cannot adapt the top-level parameter '{key}'", "target a parameter of a submodule")
        if owner in wrapped:
            raise UsageError(f"PEFT cannot adapt the parameter {key}: its module {owner} is already adapted through "
                             "target_modules", "target the module or its parameter, not both")
        _check_name(owner, refused)
        info = parameter_info(structure, key)
        if info is None:
            raise UsageError(f"PEFT's lora.ParamWrapper adapts 2-D and 3-D parameters; {key} is not one",
                             "target a weight matrix or fused expert parameter")
        out[key] = info
    return out


def all_parameter_names(structure: ModelStructure) -> list[str]:
    """Every `module.param` key, shared (tied) parameters under each of their names."""
    return list(structure.params) + [n for n in structure.tied if n not in structure.params]


def parameter_info(structure: ModelStructure, key: str) -> ModuleInfo | None:
    """The weight behind a `target_parameters` key: a stored parameter, or a Linear's/Embedding's
    own `weight` (2-D, so ParamWrapper can wrap it too)."""
    info = structure.by_name.get(key)
    if info is not None:
        return info if info.is_parameter else None
    owner, _, leaf = key.rpartition(".")
    module = structure.by_name.get(owner)
    if leaf != "weight" or module is None or module.is_parameter or module.kind == "conv":
        return None
    return ModuleInfo(key, module.cls, "param", module.in_features, module.out_features)


# -- PEFT's transformers-v5 MoE conversion ------------------------------------------------------


def convert_moe_targets(structure: ModelStructure, target_modules, target_parameters: Iterable[str],
                        modules_to_save: Sequence[str] = ()) -> tuple[list[str] | str, list[str], dict, dict]:
    """(target_modules, target_parameters, rank factors, alpha factors) after PEFT rewrites v4 MoE
    names on a transformers-v5 model (unchanged where the model type has no conversion)."""
    renames = (structure.moe_renames or {}).get("renames") or {}
    fused = (structure.moe_renames or {}).get("fused") or {}
    params = list(target_parameters)
    if not renames or not fused:
        return target_modules, params, {}, {}
    targets: Iterable[str]
    if isinstance(target_modules, str):
        leaves = _regex_leaves(structure, target_modules, renames, modules_to_save)
        if not leaves:
            return target_modules, params, {}, {}
        targets = leaves
    else:
        targets = target_modules
    new_params = set(params)
    remaining: set[str] = set()
    present: dict[str, set[str]] = {new: set() for new in fused}
    for target in targets:
        for old, new in renames.items():
            if target == old or target.endswith("." + old):
                new_params.add(new)
                if new in fused:
                    present.setdefault(new, set()).add(old)
                break
        else:
            remaining.add(target)
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for new, halves in fused.items():
        named = present.get(new, set())
        if 0 < len(named) < len(halves):
            missing = ", ".join(sorted(set(halves) - named))
            raise UsageError(f"{', '.join(sorted(named))} is fused into {new} on this model, and PEFT cannot "
                             f"convert it without {missing}", f"also target {missing}, or target 'experts'")
        if len(named) == len(halves) > 1:
            ranks[rf".*\.{re.escape(new)}"] = len(halves)
            alphas[rf".*\.{re.escape(new)}"] = float(len(halves))
    return sorted(remaining), sorted(new_params), ranks, alphas


def _regex_leaves(structure: ModelStructure, pattern: str, renames: dict[str, str],
                  modules_to_save: Sequence[str]) -> set[str]:
    """peft `_resolve_string_target_modules`: the leaf names of the module and parameter keys a regex
    matches, plus each v4 name whose reconstructed key (`<experts module>.gate_proj`) it matches."""
    rx = re.compile(pattern)

    def hit(key: str) -> bool:
        return not _excluded(key, modules_to_save) and rx.fullmatch(key) is not None

    keys = list(structure.module_names) + list(structure.params)
    matched = {k.rpartition(".")[2] for k in keys if hit(k)}
    containers: dict[str, list[str]] = {}
    for name in structure.params:
        owner, _, leaf = name.rpartition(".")
        containers.setdefault(leaf, []).append(owner)
    for old, new in renames.items():
        if old not in matched and any(hit(f"{owner}.{old}") for owner in containers.get(new, ())):
            matched.add(old)
    return matched

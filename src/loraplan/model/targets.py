"""The target grammar, resolved to PEFT's `target_modules` / `target_parameters` for one model.

One grammar everywhere (CLI, YAML, Python): comma-separated items, each one of
- a role: q k v o qkv kv gate up down gate_up embed lm_head experts router;
- a group: `attention` (every attention projection), `mlp` (every MLP projection, MoE experts
  included), `qv`;
- a preset: `all-linear` (PEFT's meaning: every Linear/Conv1D but the output layer) or `all`
  (all-linear + embed + lm_head); a training tool's own "every linear layer", which is not PEFT's:
  `axolotl:linear` (`lora_target_linear: true`), `llamafactory:all`, `llamafactory-v1:all`
  (`lora_target: all` in LLaMA-Factory 0.9 and its v1 configs);
- a module name or suffix (`q_proj`, `self_attn.o_proj`, `mlp.experts.down_proj`) or `re:REGEX`
  (matched against full module names, as PEFT does with a string).

Every item must match something: PEFT only fails when *nothing* matches, so a typo next to a good
name silently trains fewer modules. Here it is an error naming the nearest real name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import UsageError, listing, nearest
from .roles import ATTENTION_ROLES, FUSED_INTO, MLP_ROLES, ROLES
from .structure import ModelStructure, ModuleInfo

GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION_ROLES,
    "mlp": MLP_ROLES,
    "qv": ("q", "v"),
}
PRESETS = ("all-linear", "all")
KEYWORDS = tuple(r for r in ROLES if r != "other") + tuple(GROUPS) + PRESETS
TOOL_PRESETS = ("axolotl:linear", "llamafactory:all", "llamafactory-v1:all")
_ALIASES = {"attn": "attention", "ffn": "mlp", "all_linear": "all-linear"}


@dataclass(frozen=True)
class ResolvedTargets:
    """A target spec resolved against one model: the weights selected and PEFT's arguments."""

    spec: str
    modules: tuple[ModuleInfo, ...]
    target_modules: list[str] | str  # PEFT `target_modules`: suffixes, or one regex string
    target_parameters: list[str]  # PEFT `target_parameters` (MoE experts, routers)
    layers: tuple[int, ...] | None = None  # PEFT `layers_to_transform`
    notes: tuple[str, ...] = field(default=())
    # rank/alpha multipliers PEFT applies to fused expert parameters named by their v4 halves
    # (`gate_proj,up_proj` on a v5 MoE -> `gate_up_proj` at 2r, 2·alpha): {param leaf: factor}
    fused_factors: tuple[tuple[str, int], ...] = field(default=())

    def rank_pattern(self, r: int, alpha: float) -> tuple[dict[str, int], dict[str, float]]:
        ranks = {rf".*\.{re.escape(leaf)}": r * k for leaf, k in self.fused_factors}
        alphas = {rf".*\.{re.escape(leaf)}": alpha * k for leaf, k in self.fused_factors}
        return ranks, alphas

    @property
    def roles(self) -> list[str]:
        return list(dict.fromkeys(m.role for m in self.modules))

    def peft_kwargs(self) -> dict:
        """Arguments for `peft.LoraConfig` that select exactly these weights."""
        kwargs: dict = {"target_modules": self.target_modules}
        if self.target_parameters:
            kwargs["target_parameters"] = list(self.target_parameters)
        if self.layers is not None and isinstance(self.target_modules, list):
            kwargs["layers_to_transform"] = list(self.layers)
        return kwargs


def parse_spec(spec: str | Sequence[str]) -> list[str]:
    """`"q, v"` or `["q_proj", "v_proj"]` -> a list of items (a `re:` item may hold commas only
    when given as a list element)."""
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(",")] if not spec.strip().startswith("re:") else [spec.strip()]
    else:
        items = [str(s).strip() for s in spec]
    items = [i for i in items if i]
    if not items:
        raise UsageError("no targets given", "e.g. --targets attention,mlp or --targets q_proj,v_proj")
    return items


def spec_text(spec: str | Sequence[str]) -> str:
    return spec if isinstance(spec, str) else ",".join(spec)


def resolve_targets(model, targets: str | Sequence[str], layers: Iterable[int] | str | None = None,
                    exclude: Iterable[str] = ()) -> ResolvedTargets:
    """Resolve a target spec for MODEL (a structure, or anything `load_structure` takes)."""
    from .loading import load_structure

    structure = model if isinstance(model, ModelStructure) else load_structure(model)
    items = parse_spec(targets)
    notes: list[str] = []
    legacy: set[str] = set()
    selected: dict[str, ModuleInfo] = {}
    for item in items:
        for m in _select(structure, item, notes, legacy):
            selected[m.name] = m
    _drop_renamed(structure, selected, notes)
    excluded = [m for m in selected.values() if _matches_any(m.module_name, exclude)]
    for m in excluded:
        del selected[m.name]
    chosen = [m for m in structure.modules if m.name in selected]
    if not chosen:
        raise UsageError(f"'{spec_text(targets)}' leaves nothing to adapt on {structure.architecture}",
                         "; ".join(notes) or "choose other targets")
    layer_list = parse_layers(layers, structure) if layers is not None else None
    target_modules, target_parameters = peft_arguments(structure, chosen, layer_list)
    if layer_list is not None:
        outside = [m for m in chosen if not m.is_parameter and m.layer is None]
        if outside:
            notes.append(f"layers_to_transform drops weights outside the layer stack "
                         f"({listing(dict.fromkeys(m.pattern for m in outside))}), as PEFT does")
        chosen = [m for m in chosen if m.layer is not None and m.layer in layer_list]
        if not chosen:
            raise UsageError(f"no target weights in layers {format_layers(layer_list)}",
                             f"the model has layers 0-{structure.num_layers - 1}")
    return ResolvedTargets(
        spec=spec_text(targets),
        modules=tuple(chosen),
        target_modules=target_modules,
        target_parameters=target_parameters,
        layers=tuple(layer_list) if layer_list is not None else None,
        notes=tuple(notes),
        fused_factors=_fused_factors(structure, legacy, chosen),
    )


def _drop_renamed(structure: ModelStructure, selected: dict[str, ModuleInfo], notes: list[str]) -> None:
    """Modules PEFT cannot reach by name on this model: it rewrites every target ending in a v4
    MoE name (`gate_proj`, `w1`…) to the fused expert parameter, dense layers of that name too."""
    renames = (structure.moe_renames or {}).get("renames") or {}
    dropped = [m for m in selected.values() if not m.is_parameter and m.leaf in renames]
    for m in dropped:
        del selected[m.name]
    if dropped:
        names = listing(dict.fromkeys(m.pattern for m in dropped), 6)
        notes.append(f"left out {names}: on {structure.model_type} PEFT rewrites the names "
                     f"{', '.join(sorted({m.leaf for m in dropped}))} to the MoE expert parameters, so "
                     "layers with those names cannot be adapted by name")


def _fused_factors(structure: ModelStructure, legacy: set[str], chosen) -> tuple[tuple[str, int], ...]:
    fused = (structure.moe_renames or {}).get("fused") or {}
    out = []
    for leaf, halves in fused.items():
        if len(halves) > 1 and set(halves) <= legacy and any(m.leaf == leaf for m in chosen):
            out.append((leaf, len(halves)))
        elif set(halves) & legacy and not set(halves) <= legacy:
            missing = ", ".join(sorted(set(halves) - legacy))
            raise UsageError(f"{', '.join(sorted(set(halves) & legacy))} is fused into {leaf} on this model",
                             f"also target {missing}, or target 'experts'")
    return tuple(out)


def _matches_any(name: str, items: Iterable[str]) -> bool:
    # PEFT's modules_to_save exclusion: (^|.*\.)ITEM($|\..*)
    return any(re.match(rf"(^|.*\.){re.escape(i)}($|\..*)", name) for i in items)


def _select(structure: ModelStructure, item: str, notes: list[str], legacy: set[str]) -> list[ModuleInfo]:
    key = item.lower()
    key = _ALIASES.get(key, key)
    if key.startswith("re:"):
        return _select_regex(structure, item[3:])
    if key in TOOL_PRESETS:
        return _select_tool_linear(structure, key, notes)
    if key == "all-linear":
        out = [m for m in structure.modules
               if m.kind in ("linear", "conv1d") and m.name != structure.output_embeddings]
        if any(m.role == "experts" for m in structure.modules):
            notes.append("all-linear (PEFT's meaning) leaves MoE expert weights out: they are "
                         "parameters, not Linear layers; add `experts` to adapt them")
        return out
    if key == "all":
        roles = ("embed", "lm_head")
        return _select(structure, "all-linear", notes, legacy) + [m for m in structure.modules if m.role in roles]
    if key in GROUPS:
        roles = GROUPS[key]
        out = [m for m in structure.modules if m.role in roles]
        if not out:
            raise _missing_roles(structure, item, roles)
        if key == "qv" and not all(any(m.role == r for m in out) for r in ("q", "v")):
            raise _missing_roles(structure, item, ("q", "v"))
        return out
    if key in ROLES and key != "other":
        out = [m for m in structure.modules if m.role == key]
        if not out:
            literal = _select_literal(structure, item)
            if literal:
                return literal
            raise _missing_roles(structure, item, (key,))
        return out
    renamed = _select_renamed(structure, item)
    out = [] if renamed else _select_literal(structure, item)
    if out:
        return out
    out = renamed
    if out:
        legacy.add(item.rpartition(".")[2])
        notes.append(f"'{item}' names the v4 layout; on this model PEFT maps it to "
                     f"{out[0].pattern} (the fused MoE experts)")
        return out
    raise _unknown_name(structure, item)


def _select_tool_linear(structure: ModelStructure, key: str, notes: list[str]) -> list[ModuleInfo]:
    """A tool's "every linear layer": the leaf names of the modules whose class is called *Linear*
    (so not GPT-2's Conv1D), the output layer left out by *name*; PEFT then adapts every module
    whose name ends in one of those leaves. axolotl 0.21: loaders/adapter.py find_all_linear_names
    (the output name from get_linear_embedding_layers: lm_head); LLaMA-Factory 0.9: model_utils/misc.py
    find_all_linear_modules; its v1: plugins/model_plugins/peft.py _find_all_linear_modules."""
    modules = [m for m in structure.modules if not m.is_parameter]
    if key == "axolotl:linear":
        leaves = {m.leaf for m in modules if m.kind == "linear" or "Linear" in m.cls} - {"lm_head"}
        tool = "axolotl's lora_target_linear"
    else:
        forbidden = {"lm_head"} | {"chatglm": {"output_layer"}, "internlm2": {"output"}}.get(structure.model_type, set())
        if key == "llamafactory-v1:all":
            forbidden = {"lm_head", "output_layer", "output", "score", "classifier"}
        leaves = {m.leaf for m in modules if "Linear" in m.cls and "Embedding" not in m.cls
                  and not any(f in m.name for f in forbidden)}
        tool = "LLaMA-Factory's lora_target: all"
    out = [m for m in modules if m.leaf in leaves]
    if not out:
        kinds = sorted({m.cls for m in modules if m.name != structure.output_embeddings})
        notes.append(f"{tool} takes the classes named *Linear* but the output layer, and "
                     f"{structure.architecture} has none (its layers: {', '.join(kinds)}), so the tool stops with "
                     "PEFT's 'no target modules' error")
    return out


def _select_renamed(structure: ModelStructure, item: str) -> list[ModuleInfo]:
    renames = (structure.moe_renames or {}).get("renames") or {}
    new = renames.get(item.rpartition(".")[2])
    if new is None:
        return []
    return [m for m in structure.modules if m.is_parameter and _suffix_match(m.name, new)]


def _select_literal(structure: ModelStructure, item: str) -> list[ModuleInfo]:
    """PEFT's list matching: the name itself or a dotted suffix of it."""
    modules = [m for m in structure.modules if not m.is_parameter and _suffix_match(m.name, item)]
    if modules:
        return modules
    return [m for m in structure.modules if m.is_parameter and _suffix_match(m.name, item)]


def _suffix_match(name: str, item: str) -> bool:
    return name == item or name.endswith("." + item)


def _select_regex(structure: ModelStructure, pattern: str) -> list[ModuleInfo]:
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UsageError(f"bad regular expression re:{pattern}: {e}", "PEFT matches it against full module names") from None
    out = [m for m in structure.modules if rx.fullmatch(m.name)]
    if not out:
        example = next((m.name for m in structure.modules if m.kind == "linear"), "")
        raise UsageError(f"re:{pattern} matches no adaptable module",
                         f"it must match a whole name, such as '{example}'")
    return out


def _missing_roles(structure: ModelStructure, item: str, roles: Sequence[str]) -> UsageError:
    present = [r for r in ROLES if any(m.role == r for m in structure.modules)]
    arch = structure.architecture
    for role in roles:
        if any(m.role == role for m in structure.modules):
            continue
        for fused in FUSED_INTO.get(role, ()):
            holders = [m for m in structure.modules if m.role == fused]
            if holders:
                leaf = holders[0].leaf
                return UsageError(
                    f"'{item}': {arch} has no separate {role} projection; it is fused into '{leaf}' (role {fused})",
                    f"target '{fused}' (or 'attention'/'mlp') to adapt {leaf}")
    if "experts" in present and set(roles) & {"gate", "up", "down"}:
        return UsageError(f"'{item}': {arch} has no dense MLP {'/'.join(roles)} projection; its MLP is MoE experts",
                          "target 'experts' (or 'mlp'); the router is role 'router'")
    return UsageError(f"'{item}': {arch} has no {'/'.join(roles)} weights",
                      f"roles this model has: {', '.join(r for r in present if r != 'other')}")


def _unknown_name(structure: ModelStructure, item: str) -> UsageError:
    leaves = list(dict.fromkeys(m.leaf for m in structure.modules))
    containers = [n for n in structure.module_names if _suffix_match(n, item)]
    if containers:
        children = [m.leaf for m in structure.modules if m.name.startswith(containers[0] + ".")]
        inside = f"; LoRA adapts the layers inside it: {listing(dict.fromkeys(children))}" if children else ""
        return UsageError(f"'{item}' is not a layer LoRA can adapt (a container or norm){inside}",
                          "name its projections, or use a role such as attention or mlp")
    suggestion = nearest(item, leaves + list(KEYWORDS))
    hint = f"did you mean '{suggestion[0]}'? " if suggestion else ""
    return UsageError(f"no module named '{item}' in {structure.architecture}",
                      f"{hint}its adaptable names: {listing(leaves, 16)}; roles: {', '.join(KEYWORDS)}")


# -- the PEFT arguments -------------------------------------------------------------------------


def peft_arguments(structure: ModelStructure, chosen: Sequence[ModuleInfo],
                   layers: Sequence[int] | None) -> tuple[list[str] | str, list[str]]:
    """(target_modules, target_parameters) that make PEFT select exactly `chosen`.

    List form when every chosen module has a digit-free suffix that matches no other module
    (PEFT also tries every container name); one regex otherwise. Parameters get explicit keys
    when layers are restricted, because PEFT applies `layers_to_transform` to modules only.
    """
    module_targets = [m for m in chosen if not m.is_parameter]
    param_targets = [m for m in chosen if m.is_parameter]
    wanted = {m.name for m in module_targets}
    suffixes = _unique_suffixes([m.name for m in module_targets], wanted, structure.module_names)
    if suffixes is None:
        kept = [m for m in module_targets if layers is None or m.layer in layers]
        target_modules: list[str] | str = _regex_for(kept, structure)
    else:
        target_modules = suffixes
    if layers is not None:
        params = [m.name for m in param_targets if m.layer in layers]
    else:
        all_params = list(structure.params) + list(structure.tied)
        wanted_params = {m.name for m in param_targets}
        params = _unique_suffixes([m.name for m in param_targets], wanted_params, all_params) or [
            m.name for m in param_targets]
    return target_modules, params


def _unique_suffixes(names: Sequence[str], wanted: set[str], universe: Sequence[str]) -> list[str] | None:
    out: list[str] = []
    covered: set[str] = set()
    by_leaf: dict[str, list[str]] = {}
    for n in universe:
        by_leaf.setdefault(n.rpartition(".")[2], []).append(n)
    for name in names:
        if name in covered:
            continue
        parts = name.split(".")
        found = None
        for k in range(1, len(parts) + 1):
            tail = parts[-k:]
            if any(p.isdigit() for p in tail):
                break
            suffix = ".".join(tail)
            hits = [n for n in by_leaf.get(parts[-1], ()) if _suffix_match(n, suffix)]
            if all(h in wanted for h in hits):
                found = suffix
                covered.update(hits)
                break
        if found is None:
            return None
        if found not in out:
            out.append(found)
    return out


def _regex_for(modules: Sequence[ModuleInfo], structure: ModelStructure) -> str:
    by_pattern: dict[str, list[tuple[int, ...]]] = {}
    for m in modules:
        by_pattern.setdefault(m.pattern, []).append(tuple(int(p) for p in m.name.split(".") if p.isdigit()))
    all_indices: dict[str, set[tuple[int, ...]]] = {}
    for m in structure.modules:
        all_indices.setdefault(m.pattern, set()).add(tuple(int(p) for p in m.name.split(".") if p.isdigit()))
    parts = []
    for pattern, indices in by_pattern.items():
        if set(indices) == all_indices[pattern]:
            parts.append(re.escape(pattern).replace(r"\*", r"\d+"))
        else:
            parts.extend(re.escape(".".join(_fill_indices(pattern, idx))) for idx in indices)
    return _factor(parts)


def _factor(parts: list[str]) -> str:
    """`stem.N.x|stem.N.y` -> `stem.N.(?:x|y)` (N the layer-index pattern): the shared stem written once."""
    if len(parts) == 1:
        return parts[0]
    stems = {p.rpartition(r"\d+\.")[0] for p in parts}
    if len(stems) == 1 and all(r"\d+\." in p for p in parts):
        stem = stems.pop() + r"\d+\."
        return stem + "(?:" + "|".join(p[len(stem):] for p in parts) + ")"
    return "(?:" + "|".join(parts) + ")"


def _fill_indices(pattern: str, indices: tuple[int, ...]) -> list[str]:
    it = iter(indices)
    return [str(next(it)) if p == "*" else p for p in pattern.split(".")]


# -- layers -------------------------------------------------------------------------------------


def parse_layers(layers: Iterable[int] | str, structure: ModelStructure | None = None) -> list[int]:
    """`"0-3,30,31"`, `"-4:"` (the last four) or a list of ints -> a sorted list of layer indices."""
    n = structure.num_layers if structure is not None else None
    if isinstance(layers, str):
        out: set[int] = set()
        for part in (p.strip() for p in layers.split(",")):
            if not part:
                continue
            try:
                if ":" in part:
                    if n is None:
                        raise ValueError
                    start, _, stop = part.partition(":")
                    out.update(range(n)[slice(int(start) if start else None, int(stop) if stop else None)])
                elif re.fullmatch(r"\d+-\d+", part):
                    lo, hi = map(int, part.split("-"))
                    out.update(range(lo, hi + 1))
                else:
                    out.add(int(part))
            except ValueError:
                raise UsageError(f"bad layer range '{part}'", "use e.g. 0-7,30,31 or -4: for the last four") from None
        result = sorted(out)
    else:
        result = sorted({int(x) for x in layers})
    if not result:
        raise UsageError("empty layer selection", "use e.g. --layers 0-7")
    if n is not None and (result[0] < 0 or result[-1] >= n):
        raise UsageError(f"layer {result[-1] if result[-1] >= n else result[0]} is out of range",
                         f"{structure.architecture} has layers 0-{n - 1}")
    return result


def format_layers(layers: Sequence[int]) -> str:
    """[0,1,2,3,7] -> '0-3,7'."""
    out, start, prev = [], None, None
    for x in sorted(layers):
        if start is None:
            start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = prev = x
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(out)

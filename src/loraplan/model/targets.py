"""The target grammar, resolved to PEFT's `target_modules` / `target_parameters` for one model.

One grammar everywhere (CLI, YAML, Python): comma-separated items, each one of
- a role: q k v o qkv kv gate up down gate_up experts router embed lm_head, and the state-space
  mixer's ssm_in ssm_x ssm_dt ssm_out ssm_conv;
- a group: `attention` (every weight of the attention blocks), `mlp` (every weight of the MLP
  blocks, MoE experts included, the router not), `ssm` (the Mamba-style mixers' projections PEFT
  can adapt), `qv`;
- a preset: `all-linear` (PEFT's own: handed to PEFT as the string it reads, so on an MoE model it
  includes the fused experts and the router, as PEFT's transformers-v5 conversion does) or `all`
  (all-linear + embed + lm_head); a training tool's own "every linear layer", which is not PEFT's:
  `axolotl:linear` (`lora_target_linear: true`), `llamafactory:all`, `llamafactory-v1:all`
  (`lora_target: all` in LLaMA-Factory 0.9 and its v1 configs);
- a module name or suffix (`q_proj`, `self_attn.o_proj`), read as PEFT reads it, or a parameter
  name (`mlp.experts.down_proj`, for `target_parameters`), or `re:REGEX` (matched against full
  module names, as PEFT does with a string).
A role word that is also a module name in the model (`lm_head` twice in BLT, ALBERT's `ffn`,
Mixtral's router `gate`) is the module name, as in PEFT; a note says when the role would differ.

What PEFT then adapts is decided by a replay of PEFT's own selection (peft_matching.py) over
answers PEFT gave for this model (peft_facts.py), so the counts are PEFT's, refusals included.
Every item must match something: PEFT only fails when *nothing* matches, so a typo next to a good
name silently trains fewer modules. Here it is an error naming the nearest real name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import UsageError, listing, nearest
from .peft_matching import ALL_LINEAR, is_all_linear, peft_selection
from .roles import ATTENTION_ROLES, FUSED_INTO, MLP_ROLES, ROLES, SSM_ROLES
from .structure import ModelStructure, ModuleInfo

GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ATTENTION_ROLES,
    "mlp": MLP_ROLES,
    "ssm": SSM_ROLES,
    "qv": ("q", "v"),
}
BLOCK_GROUPS = ("attention", "mlp", "ssm")  # groups that take every weight of their block
PRESETS = ("all-linear", "all")
KEYWORDS = tuple(r for r in ROLES if r != "other") + tuple(GROUPS) + PRESETS
TOOL_PRESETS = ("axolotl:linear", "llamafactory:all", "llamafactory-v1:all")
_ALIASES = {"attn": "attention", "ffn": "mlp", "all_linear": "all-linear"}
_GROUP_KINDS = ("linear", "conv1d")  # a group takes layers (and MoE experts), never convolutions


@dataclass(frozen=True)
class ResolvedTargets:
    """A target spec resolved against one model: the weights PEFT adapts and PEFT's arguments."""

    spec: str
    modules: tuple[ModuleInfo, ...]
    target_modules: list[str] | str  # PEFT `target_modules`: names/suffixes, one regex, or "all-linear"
    target_parameters: list[str]  # PEFT `target_parameters` (MoE experts, routers)
    layers: tuple[int, ...] | None = None  # PEFT `layers_to_transform`
    notes: tuple[str, ...] = field(default=())
    # rank/alpha multipliers PEFT applies itself ({rank_pattern key: factor}): the fused expert
    # `gate_up_proj` at 2r and 2·alpha when the v4 halves `gate_proj,up_proj` (or all-linear) name it
    fused_factors: tuple[tuple[str, int], ...] = field(default=())

    def rank_pattern(self, r: int, alpha: float) -> tuple[dict[str, int], dict[str, float]]:
        ranks = {key: r * k for key, k in self.fused_factors}
        alphas = {key: alpha * k for key, k in self.fused_factors}
        return ranks, alphas

    @property
    def roles(self) -> list[str]:
        return list(dict.fromkeys(m.role for m in self.modules))

    def peft_kwargs(self) -> dict:
        """Arguments for `peft.LoraConfig` that select exactly these weights."""
        kwargs: dict = {"target_modules": self.target_modules}
        if self.target_parameters:
            kwargs["target_parameters"] = list(self.target_parameters)
        if self.layers is not None and _takes_layers(self.target_modules):
            kwargs["layers_to_transform"] = list(self.layers)
        return kwargs


def _takes_layers(target_modules) -> bool:
    """PEFT applies layers_to_transform to a list of names (and to all-linear, which it expands to one)."""
    return not isinstance(target_modules, str) or is_all_linear(target_modules)


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


def _keyword(item: str) -> str:
    key = item.lower()
    return _ALIASES.get(key, key)


def resolve_targets(model, targets: str | Sequence[str], layers: Iterable[int] | str | None = None,
                    exclude: Iterable[str] = ()) -> ResolvedTargets:
    """Resolve a target spec for MODEL (a structure, or anything `load_structure` takes);
    `exclude` are the `modules_to_save` (PEFT adapts nothing inside them)."""
    from .loading import load_structure

    structure = model if isinstance(model, ModelStructure) else load_structure(model)
    items = parse_spec(targets)
    exclude = tuple(exclude)
    layer_list = parse_layers(layers, structure) if layers is not None else None
    notes: list[str] = []
    if len(items) == 1 and _keyword(items[0]) == ALL_LINEAR and layer_list is None:
        target_modules: list[str] | str = ALL_LINEAR  # PEFT's own preset, as PEFT reads it
        target_parameters: list[str] = []
        intended = None
        factors: dict[str, int] = {}
    elif len(items) == 1 and items[0].startswith("re:") and layer_list is None:  # PEFT reads a regex as is
        target_modules, target_parameters, intended, factors = _compile(items[0][3:]), [], None, {}
    else:
        target_modules, target_parameters, intended, factors = _request(structure, items, layer_list, exclude,
                                                                        notes)
    try:
        selection = peft_selection(structure, target_modules, target_parameters,
                                   layer_list if _takes_layers(target_modules) else None, exclude)
    except UsageError as e:
        if is_all_linear(target_modules):
            raise UsageError(e.message, f"PEFT refuses its own all-linear here; name the layers instead, "
                             f"e.g. --targets {_suggest_groups(structure)}") from None
        raise
    chosen = list(selection.modules)
    if intended is not None:
        notes.extend(_differences(intended, chosen, layer_list))
    if is_all_linear(target_modules):
        notes.extend(_all_linear_notes(structure, selection))
    factors = {**factors, **selection.rank_factors}
    return ResolvedTargets(
        spec=spec_text(targets),
        modules=tuple(chosen),
        target_modules=target_modules,
        target_parameters=list(target_parameters),
        layers=tuple(layer_list) if layer_list is not None else None,
        notes=tuple(dict.fromkeys(notes)),
        fused_factors=tuple(factors.items()),
    )


def _compile(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise UsageError(f"bad regular expression re:{pattern}: {e}",
                         "PEFT matches it against full module names") from None
    return pattern


@dataclass
class _Picks:
    literals: list[str] = field(default_factory=list)  # module names, passed to PEFT as written
    parameters: list[str] = field(default_factory=list)  # parameter names (target_parameters)
    modules: dict[str, ModuleInfo] = field(default_factory=dict)  # from roles, groups, presets, regexes
    factors: dict[str, int] = field(default_factory=dict)


def _request(structure: ModelStructure, items: list[str], layers: list[int] | None, exclude: tuple[str, ...],
             notes: list[str]) -> tuple[list[str] | str, list[str], list[ModuleInfo], dict[str, int]]:
    """PEFT arguments for a spec of several items: names as written where PEFT reads them as meant,
    generated names for roles, groups and regexes; and the weights the spec means."""
    picks = _Picks()
    for item in items:
        _pick(structure, item, picks, notes)
    dropped = _drop_renamed(structure, picks.modules, notes)
    if dropped and not (picks.modules or picks.literals or picks.parameters):
        raise UsageError(f"'{','.join(items)}' selects only {listing(dict.fromkeys(m.pattern for m in dropped), 4)}, "
                         f"which PEFT cannot reach by name on {structure.model_type}: it rewrites "
                         f"{', '.join(sorted({m.leaf for m in dropped}))} to the MoE expert parameters",
                         "target 'experts' for the MoE layers")
    generated = [m for m in structure.modules if m.name in picks.modules] + [
        m for name, m in picks.modules.items() if name not in structure.by_name]
    literal = None
    if picks.literals or picks.parameters:
        literal = peft_selection(structure, picks.literals, picks.parameters, layers, exclude)
        picks.factors.update(literal.rank_factors)
    if layers is not None:
        # PEFT keeps a name equal to a whole module name in every layer (lm_head) and applies
        # layers_to_transform to no target_parameters: the arguments name only what is in the layers
        outside = [m for m in generated if m.layer is None]
        if outside:
            notes.append(f"layers_to_transform leaves out weights outside the layer stack "
                         f"({listing(dict.fromkeys(m.pattern for m in outside))}), as PEFT does")
        generated = [m for m in generated if m.layer is not None]
        if not any(m.layer in layers for m in generated) and literal is None:
            raise UsageError(f"no target weights in layers {format_layers(layers)}",
                             f"{structure.architecture} has layers 0-{structure.num_layers - 1}")
    literal_modules = [m for m in literal.modules if not m.is_parameter] if literal else []
    literal_params = [m for m in literal.modules if m.is_parameter] if literal else []
    if layers is not None:
        literal_params = [m for m in literal_params if m.layer in layers]
    names, params = peft_arguments(structure, generated, layers)
    literals = picks.literals
    if isinstance(names, str) and literals:  # one regex cannot sit in a list: the names join it
        generated += [m for m in literal_modules if m.name not in picks.modules]
        names, params = peft_arguments(structure, generated, layers)
        literals = []
    target_modules: list[str] | str = names if isinstance(names, str) else list(dict.fromkeys(literals + names))
    literal_param_names = [m.name for m in literal_params] if layers is not None else picks.parameters
    target_parameters = list(dict.fromkeys(literal_param_names + params))
    in_layers = [m for m in generated if layers is None or m.layer in layers]
    intended = {m.name: m for m in in_layers + literal_modules + literal_params}
    wanted = [m for m in structure.modules if m.name in intended] + [
        m for name, m in intended.items() if name not in structure.by_name]
    wanted = [m for m in wanted if not _excluded(m, exclude)]
    return target_modules, target_parameters, wanted, picks.factors


def _excluded(m: ModuleInfo, exclude: tuple[str, ...]) -> bool:
    return not m.is_parameter and any(re.match(rf"(^|.*\.){e}($|\..*)", m.name) for e in exclude)


def _pick(structure: ModelStructure, item: str, picks: _Picks, notes: list[str]) -> None:
    key = _keyword(item)
    if item.startswith("re:"):
        selection = peft_selection(structure, _compile(item[3:]))
        picks.modules.update((m.name, m) for m in selection.modules)
        picks.factors.update(selection.rank_factors)
        return
    if key in (ALL_LINEAR, "all"):
        selection = peft_selection(structure, ALL_LINEAR)
        picks.modules.update((m.name, m) for m in selection.modules)
        picks.factors.update(selection.rank_factors)
        if key == "all":
            picks.modules.update((m.name, m) for m in structure.modules if m.role in ("embed", "lm_head"))
        return
    if key in TOOL_PRESETS:
        picks.literals.extend(_tool_linear_leaves(structure, item, key))
        return
    if key in KEYWORDS or item.lower() in _ALIASES:
        literal = _literal_reading(structure, item)
        if literal is not None:
            picks.literals.append(item)
            note = _keyword_note(structure, item, key, literal)
            if note:
                notes.append(note)
            return
        picks.modules.update((m.name, m) for m in _role_modules(structure, item, key, notes))
        return
    if _names_modules(structure, item):
        picks.literals.append(item)
        note = _renamed_note(structure, item)
        if note:
            notes.append(note)
    elif any(m.is_parameter and _suffix_match(m.name, item) for m in structure.modules):
        picks.parameters.append(item)
    else:
        raise _unknown_name(structure, item)


def _tool_linear_leaves(structure: ModelStructure, item: str, key: str) -> list[str]:
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
    if not leaves:
        kinds = sorted({m.cls for m in modules if m.name != structure.output_embeddings})
        raise UsageError(f"'{item}' leaves nothing to adapt on {structure.architecture}",
                         f"{tool} takes the classes named *Linear* but the output layer, and "
                         f"{structure.architecture} has none (its layers: {', '.join(kinds)}), so the tool stops "
                         "with PEFT's 'no target modules' error")
    return sorted(leaves)


def _names_modules(structure: ModelStructure, item: str) -> bool:
    """Whether PEFT's reading of the name `item` reaches something: a module of that name or suffix,
    or a v4 MoE name PEFT rewrites to the fused experts on this model."""
    renames = (structure.moe_renames or {}).get("renames") or {}
    if any(item == old or item.endswith("." + old) for old in renames):
        return True
    return any(_suffix_match(n, item) for n in structure.module_names)


def _renamed_note(structure: ModelStructure, item: str) -> str | None:
    renames = (structure.moe_renames or {}).get("renames") or {}
    new = next((new for old, new in renames.items() if item == old or item.endswith("." + old)), None)
    if new is None:
        return None
    what = "the MoE router" if new.endswith(".weight") else "the fused MoE experts"
    return (f"'{item}' names the v4 layout; on {structure.model_type} PEFT maps it to the parameter {new} "
            f"({what}), layers of that name included")


def _literal_reading(structure: ModelStructure, item: str):
    """PEFT's selection for `target_modules=[item]`, if PEFT accepts it and it selects something."""
    if not _names_modules(structure, item):
        return None
    try:
        return peft_selection(structure, [item])
    except UsageError:
        return None


def _keyword_note(structure: ModelStructure, item: str, key: str, literal) -> str | None:
    try:
        as_role = {m.name for m in _role_modules(structure, item, key, [])}
    except UsageError:
        as_role = set()
    if as_role == {m.name for m in literal.modules}:
        return None
    shown = listing(dict.fromkeys(m.pattern for m in literal.modules), 4)
    meaning = ROLES.get(key) or f"the group {key}"
    return (f"'{item}' is a module name in {structure.architecture}, so it means what PEFT reads: {shown}; "
            f"not loraplan's '{key}' ({meaning})")


def _role_modules(structure: ModelStructure, item: str, key: str, notes: list[str]) -> list[ModuleInfo]:
    if key in BLOCK_GROUPS:
        out = [m for m in structure.modules if m.block == key and m.role != "router"
               and (m.kind in _GROUP_KINDS or m.role == "experts")]
        if key == "ssm":
            out = _drop_refused(structure, out, notes)
        if not out:
            raise _missing_roles(structure, item, GROUPS[key])
        return out
    if key == "qv":
        out = [m for m in structure.modules if m.role in ("q", "v")]
        if not all(any(m.role == r for m in out) for r in ("q", "v")):
            raise _missing_roles(structure, item, ("q", "v"))
        return out
    if key in ROLES:
        out = [m for m in structure.modules if m.role == key]
        if not out:
            raise _missing_roles(structure, item, (key,))
        return out
    raise _unknown_name(structure, item)  # pragma: no cover - KEYWORDS are roles, groups or presets


def _drop_refused(structure: ModelStructure, modules: list[ModuleInfo], notes: list[str]) -> list[ModuleInfo]:
    refused = (structure.peft or {}).get("refused_names") or {}
    dropped = [m for m in modules if m.leaf in refused]
    if dropped:
        leaves = sorted({m.leaf for m in dropped})
        notes.append(f"left out {', '.join(leaves)}: PEFT refuses {'them' if len(leaves) > 1 else 'it'} on "
                     f"{structure.model_type} models ({refused[leaves[0]].split(']')[-1].strip().split('.')[0]})")
    return [m for m in modules if m.leaf not in refused]


def _drop_renamed(structure: ModelStructure, selected: dict[str, ModuleInfo], notes: list[str]) -> list[ModuleInfo]:
    """Layers PEFT cannot reach by name on this model: it rewrites every target ending in a v4 MoE
    name (`gate_proj`, `w1`…) to the fused expert parameter, dense layers of that name too."""
    renames = (structure.moe_renames or {}).get("renames") or {}
    dropped = [m for m in selected.values() if not m.is_parameter and m.leaf in renames]
    for m in dropped:
        del selected[m.name]
    if dropped:
        names = listing(dict.fromkeys(m.pattern for m in dropped), 6)
        notes.append(f"left out {names}: on {structure.model_type} PEFT rewrites the names "
                     f"{', '.join(sorted({m.leaf for m in dropped}))} to the MoE expert parameters, so "
                     "layers with those names cannot be adapted by name")
    return dropped


def _differences(intended: list[ModuleInfo], chosen: list[ModuleInfo], layers: list[int] | None) -> list[str]:
    """Where PEFT's reading of the arguments differs from what the spec means (a safety net: the
    arguments are built to agree, but a v4 MoE name PEFT converts to target_parameters escapes
    layers_to_transform)."""
    want, got = {m.name for m in intended}, {m.name for m in chosen}
    out = []
    extra = [m for m in chosen if m.name not in want]
    if extra and layers is not None and all(m.is_parameter for m in extra):
        out.append(f"PEFT applies layers_to_transform to no target_parameters: it adapts "
                   f"{listing(dict.fromkeys(m.pattern for m in extra), 6)} in every layer (counted)")
    elif extra:
        out.append(f"PEFT also adapts {listing(dict.fromkeys(m.pattern for m in extra), 6)} with these "
                   "arguments (counted)")
    if want - got:
        missing = [m.pattern for m in intended if m.name not in got]
        out.append(f"PEFT does not adapt {listing(dict.fromkeys(missing), 6)} with these arguments (not counted)")
    return out


def _all_linear_notes(structure: ModelStructure, selection) -> list[str]:
    params = [m for m in selection.modules if m.is_parameter]
    if not params:
        return []
    factors = {re.sub(r"^\.\*\\\.", "", k).replace("\\", ""): v for k, v in selection.rank_factors.items()}
    shown = ", ".join(f"{p}" + (f" (at {factors[p]}r)" if p in factors else "") for p in selection.target_parameters)
    return [f"PEFT reads all-linear on {structure.architecture} as the Linear layers plus target_parameters "
            f"{shown}: the MoE experts and the router (its transformers-v5 MoE conversion)"]


def _suggest_groups(structure: ModelStructure) -> str:
    blocks = [g for g in BLOCK_GROUPS if any(m.block == g for m in structure.modules)]
    return ",".join(blocks) or "q_proj,v_proj"


def _suffix_match(name: str, item: str) -> bool:
    return name == item or name.endswith("." + item)


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
    if any(m.block == "ssm" for m in structure.modules) and set(roles) & set(ATTENTION_ROLES + MLP_ROLES):
        what = "attention" if set(roles) & set(ATTENTION_ROLES) else "MLP"
        return UsageError(f"'{item}': {arch} has no {what} weights; its layers are state-space (Mamba-style) mixers",
                          f"target 'ssm' (the mixer projections PEFT can adapt) or the ssm_* roles; roles this "
                          f"model has: {', '.join(r for r in present if r != 'other')}")
    others = [m for m in structure.modules if m.role == "other" and m.kind in _GROUP_KINDS + ("param",)]
    hint = f"roles this model has: {', '.join(r for r in present if r != 'other')}"
    if others:
        hint += f"; weights without a role, by name: {listing(dict.fromkeys(m.leaf for m in others), 8)}"
    return UsageError(f"'{item}': {arch} has no {'/'.join(roles)} weights", hint)


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
        # PEFT's MoE conversion reads a regex as the leaf names it matches (every layer): full names then
        target_modules: list[str] | str = [m.name for m in kept] if structure.moe_renames else _regex_for(kept, structure)
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
    """One regex whose full matches among all the model's module names are exactly MODULES: per
    name pattern, numbered segments as \\d+ where that selects nothing else (a ReLU in the same
    Sequential, a layer outside the selection), the numbers themselves where it would."""
    wanted = {m.name for m in modules}
    names = structure.module_names
    by_pattern: dict[str, list[ModuleInfo]] = {}
    for m in modules:
        by_pattern.setdefault(m.pattern, []).append(m)
    parts = []
    for pattern, members in by_pattern.items():
        segments = pattern.split(".")
        values: list[set[str]] = [set() for _ in segments]
        for m in members:
            for i, part in enumerate(m.name.split(".")):
                values[i].add(part)
        loose = r"\.".join(r"\d+" if s == "*" else re.escape(s) for s in segments)
        exact = r"\.".join(_alternation(values[i]) if s == "*" else re.escape(s) for i, s in enumerate(segments))
        for candidate in (loose, exact):
            rx = re.compile(candidate)
            if {n for n in names if rx.fullmatch(n)} <= wanted:
                parts.append(candidate)
                break
        else:  # pragma: no cover - `exact` only matches names built from the members' own parts
            parts.extend(re.escape(m.name) for m in members)
    return _factor(parts)


def _alternation(values: set[str]) -> str:
    ordered = sorted(values, key=lambda v: (len(v), v))
    return ordered[0] if len(ordered) == 1 else "(?:" + "|".join(ordered) + ")"


def _factor(parts: list[str]) -> str:
    """`stem.N.x|stem.N.y` -> `stem.N.(?:x|y)` (N the layer-index pattern): the shared stem written once."""
    if len(parts) == 1:
        return parts[0]
    stems = {p.rpartition(r"\d+\.")[0] for p in parts}
    if len(stems) == 1 and all(r"\d+\." in p for p in parts):
        stem = stems.pop() + r"\d+\."
        return stem + "(?:" + "|".join(p[len(stem):] for p in parts) + ")"
    return "(?:" + "|".join(parts) + ")"


# -- what a plan leaves frozen --------------------------------------------------------------------


def frozen_moe_notes(structure: ModelStructure, resolved: ResolvedTargets) -> list[str]:
    """Warnings for an MoE model whose experts or router the targets leave frozen, with the share
    of the model's parameters they hold (PEFT's and Unsloth's most reported MoE surprise)."""
    out = []
    total = structure.total_params or 1
    chosen = {m.name for m in resolved.modules}
    for role, what in (("experts", "the MoE experts stay"), ("router", "the MoE router stays")):
        weights = [m for m in structure.modules if m.role == role]
        if not weights or any(m.name in chosen for m in weights):
            continue
        size = sum(m.weight_numel for m in weights)
        share = 100.0 * size / total
        out.append(f"{what} frozen: {size:,} parameters, {share:.{2 if share >= 0.01 else 4}f}% of the model "
                   f"(add '{role}' to the targets to adapt {'them' if role == 'experts' else 'it'})")
    return out


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


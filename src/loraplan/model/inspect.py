"""`loraplan inspect`: every adaptable module of a model, grouped by pattern, with its role, shape
and the exact name to put in PEFT's `target_modules`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UsageError
from .roles import ROLES
from .structure import ModelStructure, ModuleInfo
from .targets import GROUPS, format_layers, peft_arguments, resolve_targets


@dataclass(frozen=True)
class ModuleGroup:
    pattern: str
    role: str
    guess: str | None
    cls: str
    kind: str
    in_features: int
    out_features: int
    experts: int
    count: int
    params: int  # weights (and biases) of all modules in the group
    peft_name: str  # what selects exactly this group in target_modules / target_parameters
    layers: str  # "0-31", or "" outside the layer stack
    tied: bool = False
    shape: str = ""  # "in→out", "E×in→out" for experts


@dataclass
class Inspection:
    structure: ModelStructure
    groups: list[ModuleGroup]
    roles: dict[str, list[str]]  # role or group -> PEFT names
    notes: list[str] = field(default_factory=list)
    moe: dict | None = None  # experts (count, per-expert shapes, fused layout) and router, for an MoE model

    @property
    def total_params(self) -> int:
        return self.structure.total_params

    def to_json(self) -> dict:
        s = self.structure
        return {
            "model": s.source,
            "architecture": s.architecture,
            "model_type": s.model_type,
            "total_params": s.total_params,
            "num_layers": s.num_layers,
            "tied_embeddings": s.tied_embeddings,
            "modules": [vars(g) for g in self.groups],
            "target_modules_by_role": self.roles,
            "moe": self.moe,
            "notes": self.notes,
        }


def inspect(model, trust_remote_code: bool = False) -> Inspection:
    """The adaptable modules of MODEL: `loraplan inspect` as a function."""
    from .loading import load_structure

    structure = load_structure(model, trust_remote_code=trust_remote_code)
    return inspect_structure(structure)


def inspect_structure(structure: ModelStructure) -> Inspection:
    by_pattern: dict[str, list[ModuleInfo]] = {}
    for m in structure.modules:
        by_pattern.setdefault(m.pattern, []).append(m)
    groups = []
    for pattern, members in by_pattern.items():
        first = members[0]
        names, params = peft_arguments(structure, members, None)
        peft_name = params[0] if first.is_parameter and params else (
            names if isinstance(names, str) else ", ".join(names))
        layers = sorted({m.layer for m in members if m.layer is not None})
        weight = sum(m.weight_numel + m.bias for m in members)
        tied = any(f"{m.name}.weight" in structure.tied for m in members)
        groups.append(ModuleGroup(
            pattern=pattern, role=first.role, guess=first.guess, cls=first.cls, kind=first.kind,
            in_features=first.in_features, out_features=first.out_features, experts=first.experts,
            count=len(members), params=0 if tied else weight, peft_name=peft_name,
            layers=format_layers(layers) if layers else "", tied=tied, shape=first.shape_text))
    roles: dict[str, list[str]] = {}
    present = {m.role for m in structure.modules}
    for key in [r for r in ROLES if r in present and r != "other"] + list(GROUPS) + ["all-linear"]:
        try:
            resolved = resolve_targets(structure, key)
        except UsageError:
            continue
        names, params = resolved.target_modules, resolved.target_parameters
        if key == "all-linear":  # what PEFT reads the preset as on this model, in names
            names, params = peft_arguments(structure, resolved.modules, None)
        roles[key] = ([names] if isinstance(names, str) else list(names)) + list(params)
    notes = []
    moe = moe_layout(structure)
    if moe:
        notes.extend(moe_lines(moe))
    if structure.tied_embeddings:
        notes.append(f"{structure.output_embeddings} shares its weight with {structure.input_embeddings} "
                     "(tied embeddings): counted once")
    if structure.moe_renames:
        renamed = ", ".join(structure.moe_renames["renames"])
        notes.append(f"PEFT rewrites the v4 names {renamed} to the fused expert parameters (and `gate` to the "
                     "router's weight) on this model, layers of those names included")
    return Inspection(structure=structure, groups=groups, roles=roles, notes=notes, moe=moe)


def moe_layout(structure: ModelStructure) -> dict | None:
    """The experts (per pattern: count per layer, layers, per-expert shape, fused layout) and the
    routers of an MoE model; None for a dense one."""
    experts = [m for m in structure.modules if m.role == "experts"]
    if not experts:
        return None
    by_pattern: dict[str, list[ModuleInfo]] = {}
    for m in experts:
        by_pattern.setdefault(m.pattern, []).append(m)
    fused = (structure.moe_renames or {}).get("fused") or {}
    weights = []
    for pattern, members in by_pattern.items():
        m = members[0]
        halves = fused.get(m.leaf) or (["gate", "up"] if m.guess == "gate_up" else [])
        weights.append({
            "pattern": pattern, "experts": m.experts, "layers": len(members),
            "in_features": m.in_features, "out_features": m.out_features,
            "fused": list(halves), "params": sum(x.weight_numel for x in members),
            "peft": "target_parameters",
        })
    routers = []
    for pattern in dict.fromkeys(m.pattern for m in structure.modules if m.role == "router"):
        members = [m for m in structure.modules if m.role == "router" and m.pattern == pattern]
        m = members[0]
        routers.append({"pattern": pattern, "class": m.cls, "in_features": m.in_features,
                        "out_features": m.out_features, "layers": len(members),
                        "peft": "target_parameters" if m.is_parameter else "target_modules"})
    total = structure.total_params or 1
    return {"weights": weights, "routers": routers,
            "expert_share": sum(w["params"] for w in weights) / total}


def moe_lines(moe: dict) -> list[str]:
    """One line per expert weight and router, for the human output."""
    out = []
    for w in moe["weights"]:
        fused = ""
        if len(w["fused"]) > 1:
            part = w["out_features"] // len(w["fused"])
            fused = f" ({' and '.join(w['fused'])} fused along the output: {len(w['fused'])}×{part})"
        out.append(f"MoE experts {w['pattern']}: {w['experts']} experts × {w['layers']} layers, per expert "
                   f"{w['in_features']}→{w['out_features']}{fused}; one 3-D parameter per layer, adapted "
                   "through PEFT's target_parameters (lora.ParamWrapper: rank r per expert, no DoRA, no dropout)")
    for r in moe["routers"]:
        how = "a parameter (target_parameters)" if r["peft"] == "target_parameters" else "a Linear (target_modules)"
        out.append(f"MoE router {r['pattern']} ({r['class']}): {r['in_features']}→{r['out_features']} in "
                   f"{r['layers']} layers, {how}")
    out.append(f"the experts hold {100 * moe['expert_share']:.1f}% of the model's parameters")
    return out

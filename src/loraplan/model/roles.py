"""The role of every adaptable weight: q, k, v, o, qkv, gate, up, down, gate_up, embed, lm_head,
experts, router — or `other` with a guess.

Families name the same projection differently (`q_proj`, `query`, `q`, `Wqkv`, `c_attn`,
`query_key_value`, `dense`, `c_proj`, `wo`…), and one name can mean two roles (GPT-2's `c_proj` is
the attention output in `attn` and the MLP down projection in `mlp`; BERT has three kinds of
`dense`). Roles come from the leaf name read in the context of its parents, plus a few tail rules
for the ambiguous names. Unknown families still get roles wherever their names follow a known
convention, and `other` with a guess from the path otherwise.
"""

from __future__ import annotations

import re
from dataclasses import replace

ROLES: dict[str, str] = {
    "q": "attention query projection",
    "k": "attention key projection",
    "v": "attention value projection",
    "kv": "fused key/value projection",
    "qkv": "fused query/key/value projection",
    "o": "attention output projection",
    "gate": "MLP gate projection",
    "up": "MLP up projection",
    "down": "MLP down projection",
    "gate_up": "fused MLP gate/up projection",
    "experts": "MoE expert weights (parameters)",
    "router": "MoE router",
    "embed": "input token embeddings",
    "lm_head": "output projection to the vocabulary",
    "other": "not recognised",
}

ATTENTION_ROLES = ("q", "k", "v", "kv", "qkv", "o")
MLP_ROLES = ("gate", "up", "down", "gate_up", "experts")

# Which fused role holds each split role, for the "it is fused" message.
FUSED_INTO = {"q": ("qkv",), "k": ("qkv", "kv"), "v": ("qkv", "kv"), "gate": ("gate_up",), "up": ("gate_up",)}

# Tail rules for names whose role depends on more than the leaf (checked first, in order).
_TAIL_RULES: list[tuple[re.Pattern, str, str | None]] = [
    (re.compile(r"attention\.output\.dense$"), "o", None),  # BERT family
    (re.compile(r"(^|\.)intermediate\.dense$"), "up", None),
    (re.compile(r"(^|\.)output\.dense$"), "down", None),
    (re.compile(r"predictions\.transform\.dense$"), "other", "head transform"),
    (re.compile(r"(^|\.)pooler\.dense$"), "other", "pooler"),
    (re.compile(r"shared_expert_gate$"), "router", None),  # Qwen-MoE: gates the shared expert
]

_ATTENTION_LEAVES = {
    "q": {"q_proj", "query", "q", "wq", "query_proj", "q_a_proj", "q_b_proj", "q_lin"},
    "k": {"k_proj", "key", "k", "wk", "key_proj", "k_lin"},
    "v": {"v_proj", "value", "v", "wv", "value_proj", "v_lin"},
    "kv": {"kv_proj", "kv_a_proj_with_mqa", "kv_b_proj", "wkv"},
    "qkv": {"qkv_proj", "query_key_value", "wqkv", "c_attn", "qkv", "in_proj", "w_pack"},
    "o": {"o_proj", "out_proj", "o", "wo", "dense", "c_proj", "proj", "out_lin", "output_proj"},
}
_MLP_LEAVES = {
    "gate": {"gate_proj", "w1", "wi_0"},
    "up": {"up_proj", "w3", "wi_1", "wi", "c_fc", "fc1", "dense_h_to_4h", "fc_in", "lin1"},
    "down": {"down_proj", "w2", "wo", "fc2", "dense_4h_to_h", "c_proj", "fc_out", "lin2"},
    "gate_up": {"gate_up_proj", "w13", "gate_up"},
}
_UNAMBIGUOUS = {
    leaf: role
    for table in (_ATTENTION_LEAVES, _MLP_LEAVES)
    for role, leaves in table.items()
    for leaf in leaves
    if leaf not in {"o", "wo", "dense", "c_proj", "proj", "w1", "w2", "w3", "wi", "q", "k", "v"}
}

_ATTENTION_CONTEXT = re.compile(r"attn|attention|self_attention|selfattention|encdecattention|mixer", re.I)
_MLP_CONTEXT = re.compile(r"mlp|ffn|feed_?forward|densereludense|intermediate|expert|moe", re.I)
_ROUTER_CLASS = re.compile(r"router|gate", re.I)


def _context(name: str) -> str | None:
    """'attention' or 'mlp': the nearest parent that says which block the weight sits in."""
    for part in reversed(name.split(".")[:-1]):
        if _ATTENTION_CONTEXT.search(part):
            return "attention"
        if _MLP_CONTEXT.search(part):
            return "mlp"
    return None


def role_of(module, structure) -> tuple[str, str | None]:
    """(role, guess) for one adaptable weight (a `ModuleInfo`) of `structure` (a `ModelStructure`).
    structure.py calls this while it builds one, so this module imports nothing from it."""
    name = module.name
    if module.kind == "embedding":
        if name == structure.input_embeddings or _tied_to(structure, name, structure.input_embeddings):
            return "embed", None
        return "other", "position/type embedding" if "embed" in name or "bias" in name else "embedding"
    if name == structure.output_embeddings:
        return "lm_head", None
    if module.kind == "param":
        owner = module.module_name
        if module.experts > 1 or _MLP_CONTEXT.search(owner.rpartition(".")[2]):
            return "experts", _leaf_role(module.leaf, "mlp")
        if _ROUTER_CLASS.search(module.cls) or owner.endswith((".gate", ".router")):
            return "router", None
        return "other", _context(name) or "parameter"
    if module.kind == "conv":
        return "other", "convolution (vision/audio)"
    for rule, role, guess in _TAIL_RULES:
        if rule.search(name):
            return role, guess
    leaf = module.leaf.lower()
    context = _context(name)
    if leaf in ("gate", "router") and context == "mlp" and module.out_features < module.in_features:
        return "router", None  # a Linear MoE router (older Mixtral layout, block_sparse_moe.gate)
    role = _leaf_role(leaf, context) or _UNAMBIGUOUS.get(leaf)
    if role:
        return role, None
    return "other", context or _guess_from_path(name)


def _leaf_role(leaf: str, context: str | None) -> str | None:
    leaf = leaf.lower()
    table = {"attention": _ATTENTION_LEAVES, "mlp": _MLP_LEAVES}.get(context or "")
    if table is None:
        return None
    for role, leaves in table.items():
        if leaf in leaves:
            return role
    return None


def _tied_to(structure, name: str, other: str | None) -> bool:
    """Whether two modules share one weight tensor (T5's `encoder.embed_tokens` and `shared`)."""
    if other is None:
        return False
    canonical = structure.tied.get
    mine, theirs = f"{name}.weight", f"{other}.weight"
    return canonical(mine, mine) == canonical(theirs, theirs)


def _guess_from_path(name: str) -> str:
    lowered = name.lower()
    for word, guess in (("vision", "vision tower"), ("visual", "vision tower"), ("audio", "audio tower"),
                        ("projector", "multimodal projector"), ("head", "head"), ("classifier", "head"),
                        ("score", "head"), ("pooler", "pooler")):
        if word in lowered:
            return guess
    return "unknown"


def assign_roles(structure) -> list:
    out = []
    for m in structure.modules:
        role, guess = role_of(m, structure)
        out.append(replace(m, role=role, guess=guess))
    return out

"""The role of every adaptable weight — q, k, v, o, qkv, gate, up, down, gate_up, experts, router,
the state-space mixer's ssm_* projections, embed, lm_head, or `other` with a guess — and the block
it sits in (attention, mlp, ssm).

Families name the same projection differently (`q_proj`, `query`, `q`, `Wqkv`, `c_attn`,
`query_key_value`, `dense`, `c_proj`, `wo`…), and one name can mean two roles (GPT-2's `c_proj` is
the attention output in `attn` and the MLP down projection in `mlp`; BERT has three kinds of
`dense`; RWKV's `key` is a key in the time mix and an up projection in the channel mix). Roles come
from the leaf name read in the context of its parents (their names, and their classes for Mamba-style
mixers), plus a few tail rules for the ambiguous names. Unknown families still get roles wherever
their names follow a known convention, and `other` with a guess from the path otherwise.
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
    "ssm_in": "state-space mixer input projection (Mamba in_proj)",
    "ssm_x": "state-space mixer x projection (Mamba x_proj: dt, B, C)",
    "ssm_dt": "state-space mixer time-step projection (Mamba dt_proj)",
    "ssm_out": "state-space mixer output projection (Mamba out_proj)",
    "ssm_conv": "state-space mixer convolution (Mamba conv1d)",
    "embed": "input token embeddings",
    "lm_head": "output projection to the vocabulary",
    "other": "not recognised",
}

ATTENTION_ROLES = ("q", "k", "v", "kv", "qkv", "o")
MLP_ROLES = ("gate", "up", "down", "gate_up", "experts")
SSM_ROLES = ("ssm_in", "ssm_x", "ssm_dt", "ssm_out", "ssm_conv")

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
    "q": {"q_proj", "query", "q", "wq", "query_proj", "q_a_proj", "q_b_proj", "q_lin", "project_q", "receptance"},
    "k": {"k_proj", "key", "k", "wk", "key_proj", "k_lin", "project_k"},
    "v": {"v_proj", "value", "v", "wv", "value_proj", "v_lin", "project_v"},
    "kv": {"kv_proj", "kv_a_proj_with_mqa", "kv_b_proj", "wkv"},
    "qkv": {"qkv_proj", "query_key_value", "wqkv", "c_attn", "qkv", "in_proj", "w_pack", "in_proj_qkvz"},
    "o": {"o_proj", "out_proj", "o", "wo", "dense", "c_proj", "proj", "out_lin", "output_proj", "attention_out",
          "output"},
}
_MLP_LEAVES = {
    "gate": {"gate_proj", "w1", "wi_0", "w_0", "proj_up_gate", "receptance"},
    "up": {"up_proj", "w3", "wi_1", "wi", "c_fc", "fc1", "dense_h_to_4h", "fc_in", "lin1", "w_1", "proj_up", "ffn",
           "intermediate", "layer_1", "key"},  # ALBERT: ffn, ffn_output
    "down": {"down_proj", "w2", "wo", "fc2", "dense_4h_to_h", "c_proj", "fc_out", "lin2", "w_out", "proj_down",
             "ffn_output", "output_linear", "output", "layer_2", "value"},
    "gate_up": {"gate_up_proj", "w13", "gate_up", "input_linear"},
}
_SSM_LEAVES = {
    "ssm_in": {"in_proj", "linear_x", "linear_y"},
    "ssm_x": {"x_proj"},
    "ssm_dt": {"dt_proj"},
    "ssm_out": {"out_proj", "linear_out"},
    "ssm_conv": {"conv1d", "conv_1d", "conv"},
}
# Leaves whose role needs the block they sit in: never read without one.
_NEEDS_CONTEXT = {"o", "wo", "dense", "c_proj", "proj", "w1", "w2", "w3", "wi", "q", "k", "v", "key", "value",
                  "receptance", "output", "intermediate", "w_0", "w_1", "in_proj", "out_proj"}
_UNAMBIGUOUS = {
    leaf: role
    for table in (_ATTENTION_LEAVES, _MLP_LEAVES)
    for role, leaves in table.items()
    for leaf in leaves
    if leaf not in _NEEDS_CONTEXT
}

_ATTENTION_CONTEXT = re.compile(r"attn|attention|self_att|selfattention|encdecattention|lstm", re.I)
_MLP_CONTEXT = re.compile(r"mlp|ffn|^ff$|feed_?forward|densereludense|intermediate|expert|moe", re.I)
# Mamba-style mixers and their recurrent cousins, by class (their attribute is often a bare `mixer`)
_SSM_CLASS = re.compile(r"Mamba|Mixer$|RecurrentBlock|ShortConv")
_EXPERTS = re.compile(r"expert", re.I)
_ROUTER_CLASS = re.compile(r"router|gate", re.I)
_WRAPPER_LEAVES = {"linear"}  # a Linear held inside a named wrapper (Moshi's q_proj.linear)


def _context(name: str, classes: dict[str, str]) -> str | None:
    """'attention', 'mlp' or 'ssm': the nearest parent that says which block the weight sits in."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent, part = ".".join(parts[:i]), parts[i - 1]
        if _SSM_CLASS.search(classes.get(parent, "")):
            return "ssm"
        if _ATTENTION_CONTEXT.search(part):
            return "attention"
        if _MLP_CONTEXT.search(part):
            return "mlp"
    return None


def role_of(module, structure) -> tuple[str, str | None]:
    """(role, guess) for one adaptable weight (a `ModuleInfo`) of `structure` (a `ModelStructure`)."""
    role, guess, _ = classify(module, structure)
    return role, guess


def classify(module, structure) -> tuple[str, str | None, str | None]:
    """(role, guess, block) for one adaptable weight (a `ModuleInfo`) of `structure` (a
    `ModelStructure`). structure.py calls this while it builds one, so this module imports nothing
    from it. `block` (attention, mlp, ssm or None) is what the groups `attention`, `mlp` and `ssm`
    select."""
    name = module.name
    classes = structure.module_classes
    if module.kind == "embedding":
        if name == structure.input_embeddings or _tied_to(structure, name, structure.input_embeddings):
            return "embed", None, None
        return "other", "position/type embedding" if "embed" in name or "bias" in name else "embedding", None
    if name == structure.output_embeddings:
        return "lm_head", None, None
    context = _context(name, classes)
    if module.kind == "param":
        owner = module.module_name
        if _EXPERTS.search(owner.rpartition(".")[2]) or _EXPERTS.search(module.cls):
            return "experts", _leaf_role(module.leaf, "mlp"), "mlp"
        if _ROUTER_CLASS.search(module.cls) or owner.endswith((".gate", ".router")):
            return "router", None, None
        if module.experts > 1:
            return "other", f"{context or 'a'} parameter, 3-D but not MoE experts", None
        return "other", context or "parameter", None
    leaf = module.leaf.lower()
    if leaf in _WRAPPER_LEAVES and "." in name:
        leaf = name.split(".")[-2].lower()
    if context == "ssm":
        role = _leaf_role(leaf, "ssm")
        return (role, None, "ssm") if role else ("other", "state-space mixer", "ssm")
    if module.kind == "conv":
        return "other", "convolution (vision/audio)", None
    for rule, role, guess in _TAIL_RULES:
        if rule.search(name):
            return role, guess, _block(role, context)
    if leaf in ("gate", "router") and context == "mlp" and module.out_features < module.in_features:
        return "router", None, None  # a Linear MoE router (older Mixtral layout, block_sparse_moe.gate)
    if leaf.isdigit() and context == "mlp":
        return _sequential_role(module, structure), None, "mlp"  # CTRL: ffn = Sequential(Linear, ReLU, Linear)
    if leaf == "dense" and context == "mlp":
        role = "up" if module.out_features > module.in_features else "down"  # Reformer's feed_forward.dense
        return role, None, "mlp"
    role = _leaf_role(leaf, context) if context else _UNAMBIGUOUS.get(leaf)
    if role:
        return role, None, _block(role, context)
    if context in ("attention", "mlp"):
        return "other", f"{context} ({leaf})", context
    return "other", _guess_from_path(name), None


def _block(role: str, context: str | None) -> str | None:
    if role in ATTENTION_ROLES:
        return "attention"
    if role in MLP_ROLES:
        return "mlp"
    return context


def _leaf_role(leaf: str, context: str | None) -> str | None:
    leaf = leaf.lower()
    table = {"attention": _ATTENTION_LEAVES, "mlp": _MLP_LEAVES, "ssm": _SSM_LEAVES}.get(context or "")
    if table is None:
        return None
    for role, leaves in table.items():
        if leaf in leaves:
            return role
    return None


def _sequential_role(module, structure) -> str:
    """In an `nn.Sequential` MLP, the first Linear is the up projection and the last the down one."""
    parent = module.name.rpartition(".")[0]
    siblings = sorted(int(m.leaf) for m in structure.modules
                      if m.leaf.isdigit() and m.name.rpartition(".")[0] == parent and m.kind in ("linear", "conv1d"))
    index = int(module.leaf)
    if len(siblings) > 1 and index == siblings[0]:
        return "up"
    if len(siblings) > 1 and index == siblings[-1]:
        return "down"
    return "other"


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
        role, guess, block = classify(m, structure)
        out.append(replace(m, role=role, guess=guess, block=block))
    return out

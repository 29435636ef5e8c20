"""The target grammar: roles, groups, presets, names, regex, layers, and its errors."""

import pytest
from support.tiny import make_model

from loraplan.errors import UsageError
from loraplan.model.structure import read_structure
from loraplan.model.targets import (
    format_layers,
    parse_layers,
    parse_spec,
    resolve_targets,
)


@pytest.fixture(scope="module")
def structures():
    return {f: read_structure(make_model(f)) for f in
            ("llama", "gpt2", "phi3", "gpt_neox", "bert", "t5", "mixtral", "qwen2_moe", "mpt", "opt")}


def names(structures, family, spec, **kw):
    return resolve_targets(structures[family], spec, **kw).target_modules


def test_roles_translate_to_each_family_names(structures):
    assert names(structures, "llama", "attention") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert names(structures, "llama", "mlp") == ["gate_proj", "up_proj", "down_proj"]
    assert names(structures, "gpt2", "attention") == ["c_attn", "attn.c_proj"]
    assert names(structures, "gpt2", "mlp") == ["c_fc", "mlp.c_proj"]
    assert names(structures, "gpt_neox", "attention") == ["query_key_value", "dense"]
    assert names(structures, "phi3", "attention,mlp") == ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"]
    assert names(structures, "mpt", "qkv,o") == ["Wqkv", "out_proj"]
    assert names(structures, "opt", "mlp") == ["fc1", "fc2"]
    assert names(structures, "bert", "attention") == ["query", "key", "value", "attention.output.dense"]
    # `output.dense` is also the end of `attention.output.dense`: only a regex selects the MLP one
    assert names(structures, "bert", "up,down") == r"bert\.encoder\.layer\.\d+\.(?:intermediate\.dense|output\.dense)"
    assert names(structures, "t5", "q,v") == ["q", "v"]
    assert names(structures, "t5", "mlp") == ["wi", "wo"]


def test_presets_follow_peft(structures):
    llama = resolve_targets(structures["llama"], "all-linear")
    assert "lm_head" not in llama.target_modules and len(llama.modules) == 14
    everything = resolve_targets(structures["llama"], "all")
    assert everything.target_modules[0] == "embed_tokens" and "lm_head" in everything.target_modules


def test_moe_experts_are_parameters(structures):
    mix = resolve_targets(structures["mixtral"], "experts")
    assert mix.target_modules == [] and mix.target_parameters == ["gate_up_proj", "down_proj"]
    qmoe = resolve_targets(structures["qwen2_moe"], "mlp")
    assert qmoe.target_modules == ["gate_proj", "up_proj", "down_proj"]  # the shared expert
    assert qmoe.target_parameters == ["gate_up_proj", "down_proj"]
    assert resolve_targets(structures["mixtral"], "router").target_parameters == ["gate.weight"]
    note = resolve_targets(structures["mixtral"], "all-linear").notes
    assert any("experts" in n for n in note)


def test_literal_names_suffixes_and_regex(structures):
    # names reach PEFT as written (PEFT's reading is the meaning)
    assert names(structures, "llama", "q_proj,self_attn.o_proj") == ["q_proj", "self_attn.o_proj"]
    r = resolve_targets(structures["llama"], r"re:model\.layers\.1\.self_attn\.(q|v)_proj")
    assert [m.name for m in r.modules] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert isinstance(r.target_modules, str)  # one layer only: PEFT needs a regex


def test_layers_restrict_and_drop_outside_weights(structures):
    r = resolve_targets(structures["llama"], "all", layers="1")
    assert r.layers == (1,) and {m.layer for m in r.modules} == {1}
    assert any("outside the layer stack" in n for n in r.notes)
    assert parse_layers("0-1", structures["llama"]) == [0, 1]
    assert parse_layers([3, 1, 1]) == [1, 3]
    assert parse_layers("-1:", structures["llama"]) == [1]
    assert format_layers([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"


@pytest.mark.parametrize("family,spec,message", [
    ("llama", "q_prj", "did you mean 'q_proj'"),
    ("llama", "q_proj,v_prj", "no module named 'v_prj'"),
    ("phi3", "q", "fused into 'qkv_proj'"),
    ("phi3", "qv", "fused into 'qkv_proj'"),
    ("gpt2", "gate", "has no gate"),
    ("mixtral", "down", "MoE experts"),
    ("llama", "experts", "has no experts"),
    ("llama", "self_attn", "not a layer LoRA can adapt"),
    ("llama", "input_layernorm", "not a layer LoRA can adapt"),
    ("llama", "re:foo.*", "matches no adaptable module"),
    ("llama", "re:(", "bad regular expression"),
])
def test_bad_targets_are_one_clear_error(structures, family, spec, message):
    with pytest.raises(UsageError) as info:
        resolve_targets(structures[family], spec)
    assert message in info.value.one_line()


def test_empty_and_out_of_range(structures):
    with pytest.raises(UsageError, match="no targets"):
        parse_spec(" , ")
    with pytest.raises(UsageError, match="out of range"):
        resolve_targets(structures["llama"], "q", layers="5")
    with pytest.raises(UsageError, match="bad layer range"):
        parse_layers("a-b", structures["llama"])


def test_config_with_special_floats_loads_through_transformers(tmp_path):
    """transformers 5 writes Mamba-2's time_step_limit (0, inf) as {"__float__": "Infinity"}."""
    from transformers import Mamba2Config

    from loraplan.model.loading import load_structure

    config = Mamba2Config(hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, vocab_size=128,
                          state_size=8, n_groups=1, expand=2, architectures=["Mamba2ForCausalLM"])
    config.save_pretrained(tmp_path)
    assert "__float__" in (tmp_path / "config.json").read_text()
    structure = load_structure(str(tmp_path))
    assert {m.role for m in structure.modules if m.block == "ssm"} >= {"ssm_in", "ssm_out"}


def test_inspect_shows_experts_and_router(structures):
    from loraplan.model.inspect import inspect_structure

    qwen = read_structure(make_model("qwen3_moe"))
    moe = inspect_structure(qwen).moe
    gate_up = next(w for w in moe["weights"] if w["pattern"].endswith("gate_up_proj"))
    assert (gate_up["experts"], gate_up["in_features"], gate_up["out_features"]) == (4, 64, 64)
    assert gate_up["fused"] == ["gate_proj", "up_proj"] and gate_up["peft"] == "target_parameters"
    assert moe["routers"][0]["pattern"].endswith("mlp.gate.weight")
    assert any("4 experts × 2 layers" in n for n in inspect_structure(qwen).notes)
    assert inspect_structure(structures["llama"]).moe is None


def test_albert_ffn_roles_and_its_name_as_peft_reads_it():
    import torch
    from transformers import AlbertConfig, AlbertForMaskedLM

    config = AlbertConfig(hidden_size=64, embedding_size=32, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, vocab_size=128)
    with torch.device("meta"):
        structure = read_structure(AlbertForMaskedLM(config))
    mlp = resolve_targets(structure, "mlp")
    assert sorted(m.leaf for m in mlp.modules) == ["ffn", "ffn_output"]
    ffn = resolve_targets(structure, "ffn")  # a real Linear named ffn: PEFT's reading, not the mlp alias
    assert [m.leaf for m in ffn.modules] == ["ffn"] and any("module name" in n for n in ffn.notes)

"""`count` equals PEFT's get_nb_trainable_parameters() after get_peft_model, family by family."""

import copy
import warnings

import pytest
from peft import LoraConfig, get_peft_model
from support.tiny import FAMILIES, make_model

from loraplan.errors import UsageError
from loraplan.model.structure import read_structure
from loraplan.plan.count import count_plan
from loraplan.plan.lora_plan import LoraPlan

SPECS = ["all-linear", "attention", "mlp", "qv", "all", "attention,mlp", "embed,lm_head", "experts",
         "q,o,down", "gate_proj,up_proj,down_proj", "router"]


def peft_counts(base, plan, structure):
    kwargs = plan.to_peft_kwargs(structure)
    kwargs.pop("task_type")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))
    return model.get_nb_trainable_parameters()


# the encoder-decoders build twice the modules: the slow part of the table
@pytest.fixture(scope="module", params=[pytest.param(f, marks=pytest.mark.slow) if f.startswith("t5") else f
                                        for f in sorted(FAMILIES)])
def family(request):
    base = make_model(request.param)
    return request.param, base, read_structure(base, source=request.param)


def test_every_target_spec_rank_and_dora_matches_peft(family):
    name, base, structure = family
    checked = 0
    for spec in SPECS:
        for r, dora in ((4, False), (8, True)):
            plan = LoraPlan(targets=spec, r=r, use_dora=dora)
            try:
                ours = count_plan(structure, plan)
            except UsageError:
                continue  # a role this family lacks: covered by the error tests
            assert (ours.trainable_params, ours.total_params) == peft_counts(base, plan, structure), (name, spec, r, dora)
            checked += 1
    assert checked >= 6, f"{name}: too few specs applied"


EXTRAS = [
    dict(targets="attention", r=4, layers="1"),
    dict(targets="q,v", r=4, bias="all"),
    dict(targets="q,o", r=4, bias="lora_only"),
    dict(targets="q,v", r=4, modules_to_save=("lm_head",)),
    dict(targets="all-linear", r=4, rank_pattern={"v_proj": 8, "down_proj": 2}),
    dict(targets="q,v", r=4, lora_bias=True),
    dict(targets="re:.*\\.1\\.self_attn\\.(q|v)_proj", r=4),
    dict(targets="self_attn.o_proj,mlp.down_proj", r=8),
    dict(targets="all", r=4, modules_to_save=("lm_head",)),
    dict(targets="attention,mlp", r=16, use_rslora=True, lora_alpha=16),
]


@pytest.mark.parametrize("family_name", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("extra", EXTRAS, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_layers_bias_saved_modules_patterns_match_peft(family_name, extra):
    base = make_model(family_name)
    structure = read_structure(base)
    plan = LoraPlan(**extra)
    ours = count_plan(structure, plan)
    assert (ours.trainable_params, ours.total_params) == peft_counts(base, plan, structure)


def test_gpt2_layers_and_bias_match_peft():
    base = make_model("gpt2")
    structure = read_structure(base)
    for extra in (dict(targets="attention", r=4, layers="0"), dict(targets="mlp", r=8, bias="lora_only"),
                  dict(targets="attention,mlp", r=4, use_dora=True, bias="all")):
        plan = LoraPlan(**extra)
        ours = count_plan(structure, plan)
        assert (ours.trainable_params, ours.total_params) == peft_counts(base, plan, structure), extra


def test_v4_moe_names_follow_peft_rewrite_on_qwen3_moe():
    """transformers 5 fuses the experts; PEFT rewrites v4 names (gate_proj+up_proj -> gate_up_proj
    at 2r). loraplan counts what PEFT then trains, and says so."""
    base = make_model("qwen3_moe")
    structure = read_structure(base)
    plan = LoraPlan(targets="gate_proj,up_proj,down_proj", r=4, lora_dropout=0.0)
    ours = count_plan(structure, plan)
    assert any("v4 layout" in n for n in ours.notes)
    assert (ours.trainable_params, ours.total_params) == peft_counts(base, plan, structure)
    with pytest.raises(UsageError, match="fused into gate_up_proj"):
        count_plan(structure, LoraPlan(targets="gate_proj", r=4))


def test_deepseek_dense_mlp_names_are_left_out_with_a_note():
    base = make_model("deepseek_v3")
    structure = read_structure(base)
    plan = LoraPlan(targets="mlp", r=4)
    ours = count_plan(structure, plan)
    assert any("cannot be adapted by name" in n for n in ours.notes)
    assert (ours.trainable_params, ours.total_params) == peft_counts(base, plan, structure)


def _peft_raw(base, **kwargs):
    """PEFT's own count for LoraConfig arguments given as written (strings reach PEFT unchanged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs)).get_nb_trainable_parameters()


@pytest.mark.parametrize("family_name", ["mixtral", "qwen3_moe"])
def test_all_linear_on_moe_is_peft_reading_experts_and_router_included(family_name):
    """PEFT's all-linear on a transformers-v5 MoE model trains the fused experts (gate_up_proj at 2r)
    and the router; loraplan hands PEFT the string and counts the same."""
    base = make_model(family_name)
    structure = read_structure(base)
    ours = count_plan(structure, LoraPlan(targets="all-linear", r=4))
    assert ours.targets.target_modules == "all-linear"
    assert {m.role for m in ours.targets.modules} >= {"q", "experts", "router"}
    assert (ours.trainable_params, ours.total_params) == _peft_raw(base, target_modules="all-linear", r=4)
    assert any("target_parameters" in n and "2r" in n for n in ours.notes)
    # PEFT's lora.ParamWrapper refuses DoRA; loraplan says so in PEFT's words
    with pytest.raises(UsageError, match="ParamWrapper does not work with use_dora=True"):
        count_plan(structure, LoraPlan(targets="all-linear", r=4, use_dora=True))
    with pytest.raises(ValueError, match="use_dora"):
        _peft_raw(base, target_modules="all-linear", r=4, use_dora=True)


def test_dropout_on_experts_refused_when_chosen_and_zero_by_default():
    base = make_model("qwen3_moe")
    structure = read_structure(base)
    with pytest.raises(UsageError, match="lora_dropout != 0"):
        count_plan(structure, LoraPlan(targets="experts", r=4, lora_dropout=0.1))
    kwargs = LoraPlan(targets="experts", r=4).to_peft_kwargs(structure)  # loraplan's default dropout
    assert kwargs["lora_dropout"] == 0.0
    assert LoraPlan(targets="attention", r=4).to_peft_kwargs(structure)["lora_dropout"] == 0.05


def test_frozen_experts_and_router_are_called_out_with_their_share():
    structure = read_structure(make_model("qwen3_moe"))
    notes = count_plan(structure, LoraPlan(targets="attention", r=4)).notes
    experts = next(n for n in notes if n.startswith("the MoE experts stay frozen"))
    size = sum(m.weight_numel for m in structure.modules if m.role == "experts")
    assert f"{size:,} parameters" in experts and "%" in experts
    assert any(n.startswith("the MoE router stays frozen") for n in notes)
    assert not any("frozen" in n for n in count_plan(structure, LoraPlan(targets="all-linear", r=4)).notes)


def test_role_word_that_names_a_module_is_read_as_peft_reads_it():
    """`gate` on Mixtral names the router (PEFT maps it to gate.weight); a note says the role differs."""
    base = make_model("mixtral")
    structure = read_structure(base)
    ours = count_plan(structure, LoraPlan(targets="gate", r=4))
    assert {m.role for m in ours.targets.modules} == {"router"}
    assert any("module name" in n for n in ours.notes)
    assert (ours.trainable_params, ours.total_params) == _peft_raw(base, target_modules=["gate"], r=4)


def test_mamba_mixer_roles_and_peft_refusals():
    base = make_model("mamba")
    structure = read_structure(base)
    roles = {m.leaf: m.role for m in structure.modules}
    assert (roles["in_proj"], roles["x_proj"], roles["dt_proj"], roles["out_proj"]) == (
        "ssm_in", "ssm_x", "ssm_dt", "ssm_out")
    # PEFT refuses out_proj and conv1d on Mamba, so its own all-linear: loraplan agrees, in one line
    with pytest.raises(UsageError, match="incompatible with Mamba") as info:
        count_plan(structure, LoraPlan(targets="all-linear", r=4))
    assert "ssm" in info.value.hint
    with pytest.raises(ValueError, match="incompatible with Mamba"):
        _peft_raw(base, target_modules="all-linear", r=4)
    with pytest.raises(UsageError, match="refuses 'out_proj'"):
        count_plan(structure, LoraPlan(targets="ssm_out", r=4))
    ssm = count_plan(structure, LoraPlan(targets="ssm", r=4))
    assert {m.leaf for m in ssm.targets.modules} == {"in_proj", "x_proj", "dt_proj"}
    assert any("PEFT refuses" in n for n in ssm.notes)
    assert (ssm.trainable_params, ssm.total_params) == peft_counts(base, LoraPlan(targets="ssm", r=4), structure)


def test_sequential_mlp_roles_and_a_regex_that_skips_the_relu():
    """CTRL's ffn is Sequential(Linear, ReLU, Linear): up and down by position, and the names PEFT
    gets select the two Linears only (a loose regex would also match the ReLU, which PEFT refuses)."""
    base = make_model("ctrl")
    structure = read_structure(base)
    plan = LoraPlan(targets="mlp", r=4)
    ours = count_plan(structure, plan)
    assert sorted(m.role for m in ours.targets.modules) == ["down", "down", "up", "up"]
    assert (ours.trainable_params, ours.total_params) == peft_counts(base, plan, structure)
    plan = LoraPlan(targets="up", r=4, layers="1")
    assert count_plan(structure, plan).trainable_params == peft_counts(base, plan, structure)[0]


@pytest.mark.parametrize("spec", ["attention", "all", "experts,q"])
def test_layer_selection_on_moe_stays_in_the_layers(spec):
    """PEFT's MoE conversion reads a regex as leaf names (every layer) and applies layers_to_transform
    to no target_parameters: loraplan's arguments keep a layer selection anyway."""
    base = make_model("qwen3_moe")
    structure = read_structure(base)
    plan = LoraPlan(targets=spec, r=4, layers="1", lora_dropout=0.0)
    ours = count_plan(structure, plan)
    assert {m.layer for m in ours.targets.modules} == {1}
    assert not any("PEFT also adapts" in n or "every layer" in n for n in ours.notes)
    assert (ours.trainable_params, ours.total_params) == peft_counts(base, plan, structure)

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

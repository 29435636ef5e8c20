"""Built-in shapes: the real transformers class on the meta device gives the publisher's totals, and
the seeds' worked examples come out exact (where the seeds' own arithmetic is off, the exact figure)."""

import json

import pytest

from loraplan.model.builtin import BUILTIN_MODELS
from loraplan.model.loading import load_structure, make_config
from loraplan.model.structure import (
    build_structure,
    structure_key,
    transformers_version,
)
from loraplan.plan.count import count


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_builtin_total_params_equal_the_published_figure(name):
    entry = BUILTIN_MODELS[name]
    structure = build_structure(make_config(dict(entry.config)))
    assert structure.total_params == entry.total_params


def test_seed_worked_examples_llama_3_1_8b():
    model = "builtin:llama-3.1-8b"
    # the seed prints 20,971,520 for q,k,v,o at r=16; k_proj and v_proj are 4096->1024 (GQA)
    assert count(model, targets="q,k,v,o", rank=16).trainable_params == 13_631_488
    assert count(model, targets="q_proj,k_proj,v_proj,o_proj", rank=16).trainable_params == 13_631_488
    seven = count(model, targets="attention,mlp", rank=16)
    assert seven.trainable_params == 41_943_040
    # the seed's r=16 table: gate_proj is 4096x14336 -> 16*(4096+14336) = 294,912 (not 295,936)
    gate = next(p for p in seven.patterns if p.role == "gate")
    assert gate.per_module == 294_912
    assert count(model, targets="attention,mlp", rank=64).trainable_params == 167_772_160
    one_q = count(model, targets="q_proj", rank=8)
    assert one_q.patterns[0].per_module == 65_536
    assert count(model, targets="q,k,v,o", rank=16).total_params == 8_030_261_248 + 13_631_488


def test_shipped_structures_match_a_fresh_build():
    """The package ships pre-built structures for the builtins (instant inspect/count); they must
    be exactly what transformers builds today."""
    from pathlib import Path

    import loraplan

    folder = Path(loraplan.__file__).parent / "model" / "builtin_structures"
    for name in ("llama-3.1-8b", "gpt2", "mixtral-8x7b", "phi-3-mini"):
        entry = BUILTIN_MODELS[name]
        path = folder / f"{structure_key(entry.config, None)}.json"
        if not path.exists():
            pytest.skip(f"no shipped structure for transformers {transformers_version()} "
                        "(run `python -m loraplan.model.loading` to refresh)")
        fresh = build_structure(make_config(dict(entry.config))).to_json()
        assert json.loads(path.read_text()) == json.loads(json.dumps(fresh))


def test_structure_round_trips_through_json():
    s = load_structure("builtin:qwen3-30b-a3b")
    from loraplan.model.structure import ModelStructure

    again = ModelStructure.from_json(json.loads(json.dumps(s.to_json())))
    assert again.modules == s.modules and again.params == s.params and again.tied == s.tied

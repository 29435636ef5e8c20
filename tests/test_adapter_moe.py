"""Expert adapters as PEFT saves them for `target_modules="all-linear"` on transformers-5 MoE models:
bare `target_parameters` (`down_proj`, `gate_up_proj`, `gate.weight`), gate_up at 2r through a regex
`rank_pattern`, a 2-D router. `analyze` reads them per expert (spectra equal to PEFT's own ΔW),
`compress` writes a smaller adapter PEFT loads (the best rank-k ΔW per expert), `merge` writes a model
whose logits equal base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
from support.adapters import peft_deltas
from support.tiny import make_model, save_tiny_model

from loraplan.adapter.analyze import analyze, compare_adapters
from loraplan.adapter.compress import compress
from loraplan.adapter.folder import read_adapter
from loraplan.adapter.merge import merge
from loraplan.model.loading import load_structure

FAMILIES = ["qwen3_moe", "mixtral"]
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def save_all_linear(folder, family, r=4, seed=0):
    """PEFT's own `all-linear` adapter on the tiny MoE model, lora_B random (a trained-looking ΔW)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(make_model(family), LoraConfig(r=r, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(str(folder))
    return peft_model


def loaded(family, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(make_model(family), str(adapter))


@pytest.fixture(params=FAMILIES)
def moe_adapter(request, tmp_path):
    family = request.param
    peft_model = save_all_linear(tmp_path / "adapter", family)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "gate_up_proj" in config["target_parameters"]  # bare names, as PEFT's conversion writes them
    return family, tmp_path, peft_deltas(peft_model)


def test_read_names_ranks_and_roles_with_and_without_the_base(moe_adapter):
    family, tmp_path, deltas = moe_adapter
    save_tiny_model(tmp_path / "base", family)
    structure = load_structure(str(tmp_path / "base"))
    for base in (None, structure):
        adapter = read_adapter(tmp_path / "adapter", structure=base)
        by_name = {w.name: w for w in adapter.weights}
        assert set(by_name) == set(deltas)
        for name, w in by_name.items():
            assert w.experts == deltas[name].shape[0]
            assert (w.out_features, w.in_features) == tuple(deltas[name].shape[1:])
        experts = [w for w in adapter.weights if w.role == "experts"]
        assert {w.name.rpartition(".")[2]: w.r for w in experts} == {"gate_up_proj": 8, "down_proj": 4}
        assert all(w.experts == 4 and w.kind == "param" for w in experts)
        assert [w.role for w in adapter.weights if w.name.endswith("mlp.gate.weight")] == ["router", "router"]


def test_spectra_per_expert_equal_pefts_delta_weights(moe_adapter):
    family, tmp_path, deltas = moe_adapter
    save_tiny_model(tmp_path / "base", family)
    for base in (None, str(tmp_path / "base")):
        result = analyze(tmp_path / "adapter", base=base)
        experts = [s for s in result.spectra if s.expert is not None]
        assert len(experts) == 2 * 2 * 4  # layers × (gate_up, down) × experts
        for s in result.spectra:
            dense = deltas[s.name][s.expert or 0]
            expected = torch.linalg.svdvals(dense)[:len(s.sigma)]
            torch.testing.assert_close(torch.tensor(s.sigma, dtype=torch.float64), expected, rtol=1e-5, atol=1e-7)
        if base is not None:
            assert all(s.relative_change is not None and s.relative_change > 0 for s in result.spectra)
    roles = {g.key for g in result.by_role}
    assert {"experts", "router", "q"} <= roles


@pytest.mark.slow
def test_compressed_expert_adapter_loads_in_peft_with_the_best_rank_k_delta(moe_adapter):
    family, tmp_path, deltas = moe_adapter
    result = compress(tmp_path / "adapter", tmp_path / "r2", rank=2)
    assert result.params_after < result.params_before
    config = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["rank_pattern"] == {}
    compressed = peft_deltas(loaded(family, tmp_path / "r2"))
    assert set(compressed) == set(deltas)
    for name, delta in deltas.items():
        u, s, vh = torch.linalg.svd(delta)
        best = u[..., :2] @ torch.diag_embed(s[..., :2]) @ vh[..., :2, :]
        torch.testing.assert_close(compressed[name], best, rtol=1e-4, atol=1e-6)
    # at full rank the compressed adapter is the same adapter, re-factored
    compress(tmp_path / "adapter", tmp_path / "full", rank=8)
    with torch.no_grad():
        reference = loaded(family, tmp_path / "adapter")(input_ids=IDS).logits
        same = loaded(family, tmp_path / "full")(input_ids=IDS).logits
    torch.testing.assert_close(same, reference, rtol=1e-5, atol=1e-5)
    comparison = compare_adapters(read_adapter(tmp_path / "adapter"), read_adapter(tmp_path / "r2"))
    assert {w.expert for w in comparison.weights if w.role == "experts"} == {0, 1, 2, 3}
    assert all(w.phi[-1][-1] == pytest.approx(1.0, abs=1e-6) for w in comparison.weights)  # r2 ⊂ original


@pytest.mark.slow
def test_merged_moe_model_equals_base_plus_adapter(moe_adapter):
    from transformers import AutoModelForCausalLM

    family, tmp_path, _ = moe_adapter
    save_tiny_model(tmp_path / "base", family)
    result = merge(str(tmp_path / "base"), tmp_path / "adapter", tmp_path / "merged")
    assert result.max_abs_diff <= result.tolerance and result.adapter_effect > 0
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)(input_ids=IDS).logits
        reference = loaded(family, tmp_path / "adapter")(input_ids=IDS).logits
        base = make_model(family)(input_ids=IDS).logits
    torch.testing.assert_close(merged, reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged, base, atol=1e-3)

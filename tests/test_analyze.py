"""`loraplan analyze`: spectra of ΔW = scale·B·A against dense SVDs and PEFT's own delta weights,
planted ranks, the LoRA §7.2 subspace similarity, and the errors a user meets with damaged folders."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support.adapters import peft_deltas, save_adapter
from support.cli import one_line_error, run_cli
from support.tiny import make_model, save_tiny_model

from loraplan.adapter.analyze import (
    analyze,
    delta_svd,
    energy_rank,
    entropy_rank,
    right_singular_vectors,
    stable_rank,
    subspace_similarity,
)
from loraplan.adapter.folder import read_adapter

# -- numerics -----------------------------------------------------------------------------------


@pytest.mark.parametrize("out_f,in_f,r,experts", [(48, 40, 8, 1), (6, 40, 8, 1), (48, 5, 8, 1), (20, 30, 4, 3)])
def test_delta_svd_matches_dense_svd(out_f, in_f, r, experts):
    gen = torch.Generator().manual_seed(1)
    b = torch.randn(experts, out_f, r, generator=gen, dtype=torch.float64)
    a = torch.randn(experts, r, in_f, generator=gen, dtype=torch.float64)
    u, s, v = delta_svd(b, a, 0.5)
    dense = 0.5 * b @ a
    expected = torch.linalg.svdvals(dense)[:, :s.shape[-1]]
    assert s.shape[-1] == min(out_f, in_f, r)
    top = float(expected.max())
    torch.testing.assert_close(s, expected, rtol=1e-9, atol=1e-9 * top)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ v.transpose(-1, -2), dense, rtol=1e-8, atol=1e-8 * top)
    eye = torch.eye(s.shape[-1], dtype=torch.float64).expand(experts, -1, -1)
    torch.testing.assert_close(u.transpose(-1, -2) @ u, eye, atol=1e-8, rtol=0)
    torch.testing.assert_close(v.transpose(-1, -2) @ v, eye, atol=1e-8, rtol=0)


def test_delta_svd_of_rank_deficient_and_zero_factors():
    gen = torch.Generator().manual_seed(4)
    b = torch.randn(1, 50, 2, generator=gen, dtype=torch.float64) @ torch.randn(1, 2, 8, generator=gen,
                                                                                 dtype=torch.float64)
    a = torch.randn(1, 8, 40, generator=gen, dtype=torch.float64)
    _, s, _ = delta_svd(b, a)
    expected = torch.linalg.svdvals(b @ a)[:, :8]
    assert float(s[0, 2]) < 1e-7 * float(s[0, 0])
    torch.testing.assert_close(s[:, :2], expected[:, :2], rtol=1e-9, atol=0)
    u, s, v = delta_svd(torch.zeros(1, 50, 8, dtype=torch.float64), a)
    assert float(s.abs().max()) == 0 and float(u.abs().max()) == 0


def test_right_singular_vectors_match_svd():
    a = torch.randn(1, 6, 30, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    v = right_singular_vectors(a)[0]
    _, _, vh = torch.linalg.svd(a[0], full_matrices=False)
    # singular vectors are defined up to sign
    torch.testing.assert_close((v.T @ vh.T).abs(), torch.eye(6, dtype=torch.float64), atol=1e-9, rtol=0)


def test_rank_measures_on_known_spectra():
    assert energy_rank([2.0, 1.0, 0.0], 0.8) == 1  # 4/5 = 0.8 exactly
    assert energy_rank([2.0, 1.0, 0.0], 0.9) == 2
    assert energy_rank([0.0, 0.0], 0.9) == 0
    assert stable_rank([2.0, 1.0]) == pytest.approx(5 / 4)
    p = [2 / 3, 1 / 3]
    assert entropy_rank([2.0, 1.0]) == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))
    assert entropy_rank([1.0] * 7) == pytest.approx(7.0)
    assert stable_rank([0.0]) == 0 and entropy_rank([0.0]) == 0


# -- adapters: spectra equal PEFT's ΔW -----------------------------------------------------------


@pytest.mark.parametrize("family,config", [
    ("llama", {}),
    ("llama", {"use_rslora": True, "lora_alpha": 32}),
    ("gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True}),
    ("llama", {"target_modules": ["embed_tokens", "q_proj"]}),
])
def test_spectra_equal_svd_of_peft_delta_weight(tmp_path, family, config):
    peft_model = save_adapter(tmp_path / "a", family, r=8, **config)
    deltas = peft_deltas(peft_model)
    result = analyze(tmp_path / "a")
    assert {s.name for s in result.spectra} == set(deltas)
    for s in result.spectra:
        expected = torch.linalg.svdvals(deltas[s.name][0])[:len(s.sigma)]
        torch.testing.assert_close(torch.tensor(s.sigma, dtype=torch.float64), expected, rtol=1e-5, atol=1e-7)


def test_moe_expert_parameters_are_analysed_per_expert(tmp_path):
    config = {"target_modules": ["q_proj"], "target_parameters": ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],
              "rank_pattern": {r"model\.layers\.0\.mlp\.experts\.down_proj": 2}}
    peft_model = save_adapter(tmp_path / "moe", "qwen3_moe", r=4, **config)
    deltas = peft_deltas(peft_model)
    save_tiny_model(tmp_path / "base", "qwen3_moe")
    for base in (None, str(tmp_path / "base")):
        result = analyze(tmp_path / "moe", base=base)
        experts = [s for s in result.spectra if s.expert is not None]
        assert len(experts) == 2 * 2 * 4  # 2 layers × 2 parameters × 4 experts
        for s in experts:
            dense = deltas[s.name][s.expert]
            expected = torch.linalg.svdvals(dense)[:len(s.sigma)]
            torch.testing.assert_close(torch.tensor(s.sigma, dtype=torch.float64), expected, rtol=1e-5, atol=1e-7)
            assert s.role == "experts"
        ranks = {(s.name, s.r) for s in experts}
        assert ("model.layers.0.mlp.experts.down_proj", 2) in ranks
        assert ("model.layers.1.mlp.experts.down_proj", 4) in ranks
    named = read_adapter(tmp_path / "moe", structure=None)
    assert not all(w.name_certain for w in named.weights)


def test_planted_rank_three_analyses_as_rank_three(tmp_path):
    save_adapter(tmp_path / "a", r=8, planted=3, lora_alpha=16)
    result = analyze(tmp_path / "a")
    assert len(result.spectra) == 14
    for s in result.spectra:
        assert s.energy_rank(0.99) == 3, s.name
        assert s.sigma[3] < 1e-5 * s.sigma[0]
    rank = next(v for v in result.verdicts if v.kind == "rank")
    assert rank.evidence["directions"] == 3
    assert rank.evidence["suggested_r"] == 4
    assert "r=4 would do" in rank.message
    assert {g.key for g in result.by_role} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert sum(g.share for g in result.by_role) == pytest.approx(1.0)


def test_full_rank_adapter_gets_no_smaller_rank_advice(tmp_path):
    save_adapter(tmp_path / "a", r=8, planted=None)
    rank = next(v for v in analyze(tmp_path / "a").verdicts if v.kind == "rank")
    assert "would do" not in rank.message
    assert rank.evidence["directions"] >= 5


def test_untrained_adapter_says_so(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "a"))
    result = analyze(tmp_path / "a")
    assert [v.kind for v in result.verdicts] == ["untrained"]


def test_relative_change_and_barely_moved_with_base(tmp_path):
    peft_model = save_adapter(tmp_path / "a", r=4, planted=2, scale_by={"k_proj": 1e-3})
    save_tiny_model(tmp_path / "base", "llama")
    deltas = peft_deltas(peft_model)
    base = make_model("llama")
    weights = dict(base.named_parameters())
    result = analyze(tmp_path / "a", base=str(tmp_path / "base"))
    for s in result.spectra:
        expected = float(deltas[s.name].norm() / weights[s.name + ".weight"].detach().double().norm())
        assert s.relative_change == pytest.approx(expected, rel=1e-5)
    barely = [v for v in result.verdicts if v.kind == "barely_moved"]
    assert [v.evidence.get("role") for v in barely] == ["k"]


@pytest.mark.parametrize("family,config", [
    ("llama", {"target_modules": ["q_proj", "down_proj"]}),
    ("gpt2", {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),  # Conv1D stores (in, out)
])
def test_dora_magnitudes_are_reported(tmp_path, family, config):
    save_adapter(tmp_path / "a", family, r=4, planted=2, use_dora=True, **config)
    save_tiny_model(tmp_path / "base", family)
    result = analyze(tmp_path / "a", base=str(tmp_path / "base"))
    for s in result.spectra:
        # save_adapter multiplies PEFT's initial magnitude (‖W‖ per output row) by 1.1
        assert s.magnitude["relative_change"] == pytest.approx(0.1, rel=1e-4)
    assert any(v.kind == "dora" for v in result.verdicts)


# -- subspace similarity (LoRA §7.2) ------------------------------------------------------------


def test_phi_of_an_adapter_with_itself_is_one(tmp_path):
    save_adapter(tmp_path / "a", r=8)
    result = analyze(tmp_path / "a", compare=tmp_path / "a")
    for w in result.comparison.weights:
        for row in w.phi + w.phi_delta:
            assert all(x == pytest.approx(1.0, abs=1e-9) for x in row)


def test_phi_of_independent_random_subspaces_is_chance():
    # E‖U_iᵀ U_j‖_F² = i·j/d for independent random subspaces, so φ = i·j/(d·min(i, j))
    d, r1, r2 = 256, 8, 32
    rows, cols = [1, 4, 8], [1, 8, 32]
    totals = torch.zeros(len(rows), len(cols), dtype=torch.float64)
    trials = 40
    gen = torch.Generator().manual_seed(3)
    for _ in range(trials):
        a1 = torch.randn(1, r1, d, generator=gen, dtype=torch.float64)
        a2 = torch.randn(1, r2, d, generator=gen, dtype=torch.float64)
        phi = subspace_similarity(right_singular_vectors(a1)[0], right_singular_vectors(a2)[0], rows, cols)
        totals += torch.tensor(phi)
    mean = totals / trials
    for a, i in enumerate(rows):
        for b, j in enumerate(cols):
            assert mean[a, b] * min(i, j) == pytest.approx(i * j / d, rel=0.25, abs=2e-3), (i, j)


def test_compare_r8_with_r32_of_one_planted_update(tmp_path):
    # both adapters' A rows lie near one planted plane: their top-2 subspaces coincide (φ(2,2) ≈ 1)
    # and the rest is chance, as in the LoRA paper's r=8 vs r=64 figure
    from peft import LoraConfig, get_peft_model

    gen = torch.Generator().manual_seed(5)
    planes = {}
    for r in (8, 32):
        model = get_peft_model(make_model("llama"), LoraConfig(r=r, target_modules=["q_proj", "v_proj"]))
        for name, p in model.named_parameters():
            key = name.split(".lora_")[0]
            if "lora_A" in name:
                plane = planes.setdefault(key, torch.linalg.qr(torch.randn(p.shape[1], 2, generator=gen))[0].T)
                p.data = 10 * torch.randn(r, 2, generator=gen) @ plane + 0.01 * torch.randn(r, p.shape[1], generator=gen)
            elif "lora_B" in name:
                p.data = torch.randn(p.shape[0], r, generator=gen) * 0.05
        model.save_pretrained(str(tmp_path / f"r{r}"))
    result = analyze(tmp_path / "r8", compare=tmp_path / "r32")
    assert len(result.comparison.weights) == 4
    for w in result.comparison.weights:
        assert w.r == (8, 32) and w.rows == [1, 2, 4, 8] and w.cols == [1, 2, 4, 8, 16, 32]
        assert w.phi[1][1] == pytest.approx(1.0, abs=1e-3)  # φ(2, 2)
        assert w.phi[3][5] < 0.75  # φ(8, 32): the other 6 directions of r=8 are not in r=32's more than chance
    assert result.comparison.verdicts[0].kind == "similarity"


# -- the command ----------------------------------------------------------------------------------


def test_cli_human_and_json(tmp_path, capsys):
    save_adapter(tmp_path / "a", r=8, planted=3)
    save_tiny_model(tmp_path / "base", "llama")
    code, out, err = run_cli(["analyze", str(tmp_path / "a"), "--base", str(tmp_path / "base"), "--all"], capsys)
    assert code == 0, err
    assert "medians per role" in out and "medians per layer" in out
    assert "r=4 would do" in out
    assert "model.layers.1.mlp.down_proj" in out  # --all lists every weight
    code, out, err = run_cli(["analyze", str(tmp_path / "a"), "--compare", str(tmp_path / "a"), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["r"] == 8 and data["weights"] == 14
    assert data["spectra"][0]["energy_rank"]["0.99"] == 3
    assert data["comparison"]["by_role"]["q"]["phi_full"] == pytest.approx(1.0)


def test_trial_folder_is_read_through_its_adapter(tmp_path, capsys):
    save_adapter(tmp_path / "trials" / "full_r8" / "adapter", r=8, planted=3)
    code, out, _ = run_cli(["analyze", str(tmp_path / "trials" / "full_r8"), "--json"], capsys)
    assert code == 0 and json.loads(out)["adapter"].endswith("adapter")


def test_bad_adapter_folders_are_one_line_errors(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    save_adapter(tmp_path / "good", r=4, target_modules=["q_proj"])
    good = tmp_path / "good"
    one_line_error(capsys, ["analyze", str(tmp_path / "missing")], "no such folder")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["analyze", str(tmp_path / "empty")], "no adapter_config.json")
    save_tiny_model(tmp_path / "model", "llama")
    one_line_error(capsys, ["analyze", str(tmp_path / "model")], "holds a model")

    pickle_only = tmp_path / "pickle"
    pickle_only.mkdir()
    (pickle_only / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (pickle_only / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    one_line_error(capsys, ["analyze", str(pickle_only)], "safetensors only", "save_file")

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    data = (good / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(capsys, ["analyze", str(truncated)], "not a readable safetensors file")

    broken = tmp_path / "broken_json"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{\"r\": 4,")
    (broken / "adapter_model.safetensors").write_bytes(data)
    one_line_error(capsys, ["analyze", str(broken)], "not valid JSON")

    no_b = tmp_path / "no_b"
    no_b.mkdir()
    (no_b / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    tensors = {k: v for k, v in load_file(str(good / "adapter_model.safetensors")).items() if "lora_B" not in k}
    save_file(tensors, str(no_b / "adapter_model.safetensors"))
    one_line_error(capsys, ["analyze", str(no_b)], "incomplete adapter", "no lora_B")

    wrong_r = tmp_path / "wrong_r"
    wrong_r.mkdir()
    config = json.loads((good / "adapter_config.json").read_text())
    (wrong_r / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    (wrong_r / "adapter_model.safetensors").write_bytes(data)
    one_line_error(capsys, ["analyze", str(wrong_r)], "rank 16", "4 rows")

    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    (ia3 / "adapter_model.safetensors").write_bytes(data)
    one_line_error(capsys, ["analyze", str(ia3)], "IA3 adapter")


def test_base_that_does_not_fit_isone_line_error(tmp_path, capsys):
    save_adapter(tmp_path / "a", r=4, target_modules=["q_proj", "down_proj"])
    save_tiny_model(tmp_path / "gpt2", "gpt2")
    one_line_error(capsys, ["analyze", str(tmp_path / "a"), "--base", str(tmp_path / "gpt2")],
                    "model.layers.0.mlp.down_proj", "GPT2LMHeadModel")

"""`loraplan compress`: SVD truncation into a valid PEFT adapter — the best rank-k ΔW, the scale kept,
outputs that approach the original's as the rank grows and equal it at full rank."""

from __future__ import annotations

import json

import pytest
import torch
from support.adapters import peft_deltas, save_adapter
from support.cli import one_line_error, run_cli
from support.tiny import make_model, make_tokenizer

from loraplan.adapter.compress import compress
from loraplan.adapter.folder import read_adapter

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(family, adapter, seed=0):
    from peft import PeftModel

    model = PeftModel.from_pretrained(make_model(family, seed=seed), str(adapter))
    with torch.no_grad():
        return model(input_ids=IDS).logits.double()


def loaded_deltas(family, adapter):
    from peft import PeftModel

    return peft_deltas(PeftModel.from_pretrained(make_model(family), str(adapter)))


def test_truncation_is_the_best_rank_k_approximation(tmp_path):
    original = peft_deltas(save_adapter(tmp_path / "a", r=8, lora_alpha=16))
    result = compress(tmp_path / "a", tmp_path / "r3", rank=3)
    compressed = loaded_deltas("llama", tmp_path / "r3")
    assert set(compressed) == set(original)
    for name, delta in original.items():
        u, s, vh = torch.linalg.svd(delta[0])
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        torch.testing.assert_close(compressed[name][0], best, rtol=1e-4, atol=1e-6)
        row = next(w for w in result.weights if w.name == name)
        assert row.r_before == 8 and row.r_after == 3
        assert row.retained == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-6)


def test_outputs_approach_the_original_and_match_at_full_rank(tmp_path):
    save_adapter(tmp_path / "a", r=8, lora_alpha=16, decay=0.6)
    reference = logits("llama", tmp_path / "a")
    errors = []
    for k in (1, 2, 4, 8):
        compress(tmp_path / "a", tmp_path / f"r{k}", rank=k)
        difference = logits("llama", tmp_path / f"r{k}") - reference
        errors.append(float(difference.pow(2).mean().sqrt()))
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[3] < 1e-6  # full rank: the same adapter, re-factored


@pytest.mark.parametrize("config", [{"lora_alpha": 16}, {"lora_alpha": 32, "use_rslora": True}])
def test_scale_is_kept(tmp_path, config):
    save_adapter(tmp_path / "a", r=8, **config)
    compress(tmp_path / "a", tmp_path / "r2", rank=2)
    old = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    new = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    root = (lambda r: r ** 0.5) if config.get("use_rslora") else (lambda r: r)
    assert new["r"] == 2
    assert new["lora_alpha"] / root(2) == pytest.approx(old["lora_alpha"] / root(8))
    assert new["use_rslora"] == old["use_rslora"] and new["target_modules"] == old["target_modules"]


def test_energy_gives_a_rank_per_weight(tmp_path):
    # q_proj planted at rank 2, v_proj at rank 5: --energy 0.999 finds each
    save_adapter(tmp_path / "q", r=8, planted=2, target_modules=["q_proj", "v_proj"], seed=1, lora_alpha=16)
    save_adapter(tmp_path / "v", r=8, planted=5, target_modules=["q_proj", "v_proj"], seed=2, lora_alpha=16)
    from safetensors.torch import load_file, save_file

    q, v = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("q", "v"))
    mixed = {k: (q if "q_proj" in k else v)[k] for k in q}
    save_file(mixed, str(tmp_path / "q" / "adapter_model.safetensors"))
    original = logits("llama", tmp_path / "q")
    result = compress(tmp_path / "q", tmp_path / "e", energy=0.999999)
    ranks = {w.name.rsplit(".", 1)[1]: w.r_after for w in result.weights}
    assert ranks == {"q_proj": 2, "v_proj": 5}
    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert sorted(config["rank_pattern"].values()) + [config["r"]] in ([2, 2, 5], [5, 5, 2])
    from peft import PeftModel

    model = PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "e"))
    layer = model.base_model.model.model.layers[1].self_attn
    assert layer.q_proj.r["default"] == 2 and layer.v_proj.r["default"] == 5
    # the scale stayed alpha/r of the original for each weight
    assert layer.q_proj.scaling["default"] == pytest.approx(2.0)
    assert layer.v_proj.scaling["default"] == pytest.approx(2.0)
    assert float((logits("llama", tmp_path / "e") - original).abs().max()) < 1e-5


def test_dora_keeps_its_magnitudes(tmp_path):
    save_adapter(tmp_path / "a", r=8, use_dora=True, target_modules=["q_proj", "down_proj"])
    reference = logits("llama", tmp_path / "a")
    full = compress(tmp_path / "a", tmp_path / "full", rank=8)
    compress(tmp_path / "a", tmp_path / "low", rank=2)
    assert any("DoRA" in n for n in full.notes)
    assert json.loads((tmp_path / "low" / "adapter_config.json").read_text())["use_dora"] is True
    kept = read_adapter(tmp_path / "low")
    for w, o in zip(kept.weights, read_adapter(tmp_path / "a").weights, strict=True):
        assert torch.equal(w.magnitude, o.magnitude)
    assert float((logits("llama", tmp_path / "full") - reference).abs().max()) < 1e-5
    assert float((logits("llama", tmp_path / "low") - reference).abs().max()) > 1e-4


def test_moe_experts_embeddings_and_saved_modules(tmp_path):
    config = {"target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
    save_adapter(tmp_path / "moe", "qwen3_moe", r=4, **config)
    reference = logits("qwen3_moe", tmp_path / "moe")
    compress(tmp_path / "moe", tmp_path / "moe4", rank=4)
    assert float((logits("qwen3_moe", tmp_path / "moe4") - reference).abs().max()) < 1e-5
    compress(tmp_path / "moe", tmp_path / "moe2", rank=2)
    assert float((logits("qwen3_moe", tmp_path / "moe2") - reference).abs().max()) > 1e-5

    save_adapter(tmp_path / "emb", r=8, target_modules=["embed_tokens", "v_proj"], modules_to_save=["lm_head"])
    reference = logits("llama", tmp_path / "emb")
    compress(tmp_path / "emb", tmp_path / "emb8", rank=8)
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "emb8" / "adapter_model.safetensors")))
    assert set(load_file(str(tmp_path / "emb" / "adapter_model.safetensors"))) == keys
    assert float((logits("llama", tmp_path / "emb8") - reference).abs().max()) < 1e-5


def test_cli_writes_an_adapter_with_its_tokenizer(tmp_path, capsys):
    save_adapter(tmp_path / "a", r=8, planted=3)
    make_tokenizer().save_pretrained(str(tmp_path / "a"))
    code, out, err = run_cli(["compress", str(tmp_path / "a"), "--energy", "0.99", "--out", str(tmp_path / "c")],
                             capsys)
    assert code == 0, err
    assert "r=3" in out and "energy kept" in out
    written = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(written)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.")]  # no staging folder left
    code, out, err = run_cli(["compress", str(tmp_path / "a"), "--rank", "2", "--out", str(tmp_path / "c"),
                              "--overwrite", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["r"] == 2 and data["params_after"] * 4 == data["params_before"]
    assert data["retained_energy_min"] < 1.0


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    save_adapter(tmp_path / "a", r=4, target_modules=["q_proj"])
    a = str(tmp_path / "a")
    one_line_error(capsys, ["compress", a, "--out", str(tmp_path / "x")], "--rank")
    one_line_error(capsys, ["compress", a, "--rank", "2", "--energy", "0.9", "--out", str(tmp_path / "x")],
                    "not allowed with")
    one_line_error(capsys, ["compress", a, "--energy", "90", "--out", str(tmp_path / "x")], "(0, 1]")
    one_line_error(capsys, ["compress", a, "--rank", "0", "--out", str(tmp_path / "x")], "positive integer")
    one_line_error(capsys, ["compress", a, "--rank", "2", "--out", a], "input")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    one_line_error(capsys, ["compress", a, "--rank", "2", "--out", str(tmp_path / "busy")], "not empty")
    one_line_error(capsys, ["compress", a, "--rank", "2", "--out", str(tmp_path / "busy"), "--overwrite"],
                    "not overwriting")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"

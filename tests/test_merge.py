"""`loraplan merge`: the fit check before any weight loads, the merged safetensors model equal to
base + adapter, its dtype and tokenizer, and the one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from support.adapters import save_adapter
from support.cli import one_line_error, run_cli
from support.tiny import FAMILIES, make_model, save_tiny_model

from loraplan.adapter import merge as merging
from loraplan.adapter.merge import merge
from loraplan.errors import RunError

IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))


def reference_logits(family, adapter):
    from peft import PeftModel

    model = PeftModel.from_pretrained(make_model(family), str(adapter))
    with torch.no_grad():
        return model(input_ids=IDS).logits


def saved_logits(folder, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("family,config", [
    ("llama", {"lora_alpha": 16}),
    ("llama", {"use_dora": True, "target_modules": ["q_proj", "down_proj"]}),
    ("qwen3_moe", {"target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj",
                                                                        "mlp.experts.down_proj"]}),
])
def test_merged_model_equals_base_plus_adapter(tmp_path, family, config):
    save_tiny_model(tmp_path / "base", family)
    save_adapter(tmp_path / "a", family, r=8, **config)
    result = merge(str(tmp_path / "base"), tmp_path / "a", tmp_path / "merged")
    assert result.dtype == "fp32" and result.max_abs_diff <= result.tolerance and result.adapter_effect > 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(result.files)
    assert not list((tmp_path / "merged").glob("*.bin")) and not (tmp_path / "merged" / "adapter_config.json").exists()
    torch.testing.assert_close(saved_logits(tmp_path / "merged"), reference_logits(family, tmp_path / "a"),
                               rtol=1e-4, atol=1e-4)


def test_bf16_merge_and_the_cli(tmp_path, capsys):
    save_tiny_model(tmp_path / "base", "llama")
    save_adapter(tmp_path / "a", r=4, lora_alpha=8)
    code, out, err = run_cli(["merge", str(tmp_path / "base"), str(tmp_path / "a"), "--out", str(tmp_path / "m"),
                              "--dtype", "bf16", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["dtype"] == "bf16" and data["weights"] == 14
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    merged = saved_logits(tmp_path / "m", torch.bfloat16)
    reference = reference_logits("llama", tmp_path / "a")
    assert float((merged - reference).abs().max()) < 0.1 * float(reference.abs().max())
    code, out, err = run_cli(["merge", str(tmp_path / "base"), str(tmp_path / "a"), "--out", str(tmp_path / "m"),
                              "--overwrite"], capsys)
    assert code == 0, err
    assert "logits check" in out and "max |merged − (base + adapter)|" in out


def test_an_adapter_that_does_not_fit_fails_before_loading(tmp_path, capsys, monkeypatch):
    save_adapter(tmp_path / "a", r=4, target_modules=["q_proj", "down_proj"])
    narrow = dict(FAMILIES["llama"], intermediate_size=96)
    (tmp_path / "narrow").mkdir()
    (tmp_path / "narrow" / "config.json").write_text(json.dumps(narrow))  # no weights: the check needs none

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the fit check")

    monkeypatch.setattr("loraplan.model.loading.load_model", no_loading)
    line = one_line_error(capsys, ["merge", str(tmp_path / "narrow"), str(tmp_path / "a"), "--out",
                                    str(tmp_path / "m")], "model.layers.0.mlp.down_proj", "128→64", "96→64")
    assert "does not fit" in line
    assert not (tmp_path / "m").exists()
    save_tiny_model(tmp_path / "gpt2", "gpt2")
    one_line_error(capsys, ["merge", str(tmp_path / "gpt2"), str(tmp_path / "a"), "--out", str(tmp_path / "m")],
                    "does not have")


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    save_tiny_model(tmp_path / "base", "llama")
    save_adapter(tmp_path / "a", r=4, target_modules=["q_proj"])
    base, a = str(tmp_path / "base"), str(tmp_path / "a")
    one_line_error(capsys, ["merge", base, str(tmp_path / "nothing"), "--out", str(tmp_path / "m")], "no such folder")
    one_line_error(capsys, ["merge", str(tmp_path / "nowhere"), a, "--out", str(tmp_path / "m")], "no such file")
    one_line_error(capsys, ["merge", base, a, "--out", base], "input")
    one_line_error(capsys, ["merge", base, a, "--out", str(tmp_path / "m"), "--dtype", "int8"], "invalid choice")
    one_line_error(capsys, ["merge", "builtin:llama-3.1-8b", a, "--out", str(tmp_path / "m")])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    one_line_error(capsys, ["merge", base, a, "--out", str(tmp_path / "busy"), "--overwrite"], "not overwriting")
    assert not (tmp_path / "m").exists()


def test_a_failed_logits_check_writes_nothing(tmp_path, monkeypatch):
    save_tiny_model(tmp_path / "base", "llama")
    save_adapter(tmp_path / "a", r=4, target_modules=["q_proj"])
    monkeypatch.setattr(merging, "TOLERANCE", {"fp32": -1.0})
    with pytest.raises(RunError, match="differ from base"):
        merge(str(tmp_path / "base"), tmp_path / "a", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]

"""loraplan's LLaMA-Factory exports and LLaMA-Factory's own example configs, checked with LLaMA-Factory
itself (0.9.5): `get_train_args` parses the training YAML, `init_adapter` builds the adapter on a tiny
model, and its trainable parameters equal `loraplan count --from` on the same file; the v1 format
through its `get_lora_model`.

LLaMA-Factory 0.9.5 pins transformers<=5.6, peft<=0.18.1 and trl<=0.24; it is installed without its
dependencies beside loraplan's (transformers 5.17, peft 0.21, trl 1.16), with its version check off.
Two shims, both outside what is tested: trl 1.x no longer has AutoModelForCausalLMWithValueHead (only
LLaMA-Factory's reward/PPO stages use it), and transformers 5 dropped TrainingArguments.warmup_ratio,
which the examples set (it only shapes the learning-rate schedule)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from support.tiny import make_model, write_config
from support.tools import require

from loraplan.cli import main
from loraplan.errors import UsageError
from loraplan.plan.read_config import read_plan_fields

os.environ["DISABLE_VERSION_CHECK"] = "1"
trl = require("trl")
if not hasattr(trl, "AutoModelForCausalLMWithValueHead"):
    trl.AutoModelForCausalLMWithValueHead = type("AutoModelForCausalLMWithValueHead", (), {})
hparams = require("llamafactory.hparams", "llamafactory")
adapter = require("llamafactory.model.adapter", "llamafactory")
pytestmark = pytest.mark.tools

FIXTURES = Path(__file__).parent / "fixtures" / "llamafactory"
TRAIN = FIXTURES / "qwen3_lora_sft.yaml"


def training_yaml(tmp_path, model_dir, lora: dict, base: Path = TRAIN) -> Path:
    """LLaMA-Factory's own training example with its model replaced by a tiny one and LORA merged in."""
    data = yaml.safe_load(base.read_text())
    data.pop("warmup_ratio", None)
    data.update(model_name_or_path=str(model_dir), output_dir=str(tmp_path / "out"), bf16=False, use_cpu=True)
    data.update(lora)
    path = tmp_path / f"lf-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def built(path: Path, family: str, new_tokens: int = 0) -> int:
    """Trainable parameters of the adapter LLaMA-Factory builds from the YAML at PATH."""
    data = yaml.safe_load(path.read_text())
    model_args, _, _, finetuning_args, _ = hparams.get_train_args(data)
    model = make_model(family)
    if new_tokens:  # what its patcher does after add_tokens: resize_embedding_layer
        model.resize_token_embeddings(model.config.vocab_size + new_tokens)
    peft_model = adapter.init_adapter(model.config, model, model_args, finetuning_args, is_trainable=True)
    return peft_model.get_nb_trainable_parameters()[0]


def counted(model_dir, path, capsys) -> int:
    assert main(["count", str(model_dir), "--from", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["trainable_params"]


@pytest.mark.parametrize("family, args", [
    ("llama", ["--task", "code", "--examples", "20000"]),
    ("llama", ["--task", "chat", "--examples", "5000", "--dora"]),
    ("gpt_neox", ["--task", "domain_adaptation", "--examples", "50000"]),
    ("phi3", ["--task", "format_only", "--examples", "500"]),
])
def test_export_builds_what_loraplan_counts(family, args, tmp_path, capsys):
    folder = write_config(family, tmp_path / family)
    assert main(["recommend", folder, *args, "--format", "llamafactory"]) == 0
    lora = yaml.safe_load(capsys.readouterr().out)
    path = training_yaml(tmp_path, folder, lora)
    assert built(path, family) == counted(folder, path, capsys)


def test_new_tokens_export_resizes_and_trains_what_loraplan_counts(tmp_path, capsys):
    tokens = 30  # more rows than the tiny vocab of 128
    folder = tmp_path / "llama"
    config = json.loads(Path(write_config("llama", folder)).joinpath("config.json").read_text())
    config["vocab_size"] += tokens  # the resized model loraplan sizes
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["recommend", str(folder), "--task", "code", "--examples", "20000", "--new-tokens",
                 "--format", "llamafactory"]) == 0
    text = capsys.readouterr().out
    lora = yaml.safe_load(text)
    assert lora["resize_vocab"] is True and lora["additional_target"] == "embed_tokens,lm_head"
    assert "trainable_token_indices" in text  # the note reaches the file
    path = training_yaml(tmp_path, folder, lora)
    expected = counted(folder, path, capsys)
    assert built(path, "llama", new_tokens=tokens) == expected


def test_llamafactory_refuses_resize_vocab_on_a_quantized_model(tmp_path):
    # why `--new-tokens --quant 4bit --format llamafactory` is refused
    path = training_yaml(tmp_path, write_config("llama", tmp_path / "llama"), {"resize_vocab": True,
                                                                               "quantization_bit": 4})
    with pytest.raises(ValueError, match="Cannot resize embedding layers of a quantized model"):
        hparams.get_train_args(yaml.safe_load(path.read_text()))
    with pytest.raises(UsageError, match="refuses to resize"):
        read_plan_fields(path)


@pytest.mark.parametrize("fixture", ["qwen3_lora_sft.yaml", "loraplus_llama3_lora_sft.yaml",
                                     "qwen3_lora_sft_otfq.yaml"])
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_its_examples_read_as_it_builds_them(fixture, family, tmp_path, capsys):
    folder = write_config(family, tmp_path / family)
    lora = {"quantization_bit": None} if "otfq" in fixture else {}  # no bitsandbytes on a CPU machine
    path = training_yaml(tmp_path, folder, lora, FIXTURES / fixture)
    assert built(path, family) == counted(folder, path, capsys)


def test_its_all_on_gpt2_finds_nothing_and_loraplan_says_so(tmp_path, capsys):
    folder = write_config("gpt2", tmp_path / "gpt2")
    path = training_yaml(tmp_path, folder, {})
    with pytest.raises(ValueError, match="target_modules"):  # PEFT's NoMatchingPeftModuleError
        built(path, "gpt2")
    assert main(["count", folder, "--from", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no target modules" in err and "Conv1D" in err


def test_without_finetuning_type_it_trains_lora(tmp_path, capsys):
    folder = write_config("llama", tmp_path / "llama")
    data = yaml.safe_load(TRAIN.read_text())
    for key in ("finetuning_type", "lora_rank", "lora_target"):
        data.pop(key)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(data))
    path = training_yaml(tmp_path, folder, {}, base)
    assert built(path, "llama") == counted(folder, path, capsys)


def test_v1_format_reads_as_its_lora_plugin_builds_it(tmp_path, capsys):
    from llamafactory.v1.plugins.model_plugins.peft import get_lora_model

    for family in ("llama", "gpt_neox"):
        folder = write_config(family, tmp_path / family)
        path = FIXTURES / "v1_train_lora_sft.yaml"
        config = yaml.safe_load(path.read_text())["peft_config"]
        model = get_lora_model(make_model(family), dict(config), is_train=True)
        capsys.readouterr()  # it prints print_trainable_parameters()
        assert model.get_nb_trainable_parameters()[0] == counted(folder, path, capsys)


def test_a_config_that_resumes_an_adapter_is_read_from_that_adapter(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    folder = write_config("llama", tmp_path / "llama")
    get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    path = training_yaml(tmp_path, folder, {"adapter_name_or_path": str(tmp_path / "a")})
    assert built(path, "llama") == counted(folder, path, capsys) == 4 * (64 + 64) * 2

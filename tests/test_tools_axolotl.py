"""loraplan's axolotl exports and axolotl's own example configs, checked with axolotl itself (0.21):
the export, merged into axolotl's example config, passes `validate_config` / `normalize_config` and
its model checks (`check_model_config`: new tokens need lora_modules_to_save), and `load_lora` builds
on a tiny model exactly the trainable parameters `loraplan count --from` gives for the same file.

axolotl 0.21 needs Python >= 3.12 and pins transformers 5.20.1 / peft 0.21.2: it lives in a venv of
its own (`make tools-axolotl`, about 5 GB with PyPI's CUDA build of torch), where this file runs with
loraplan installed beside it; everywhere else it skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from support.tiny import make_model, save_tiny_model, write_config
from support.tools import require

from loraplan.cli import main

require("axolotl.utils.config", "axolotl")
from axolotl.loaders.adapter import load_lora  # noqa: E402
from axolotl.loaders.utils import check_model_config  # noqa: E402
from axolotl.utils.config import normalize_config, validate_config  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402

pytestmark = pytest.mark.tools
FIXTURES = Path(__file__).parent / "fixtures" / "axolotl"
EXAMPLE = FIXTURES / "llama-3-lora-1b.yml"


def axolotl_yaml(tmp_path, model_dir, lora: dict, base: Path = EXAMPLE) -> Path:
    """axolotl's own example with its base model replaced by a tiny one and its LoRA keys by LORA."""
    data = yaml.safe_load(base.read_text())
    for key in [k for k in data if k.startswith(("lora_", "peft_"))]:
        del data[key]
    data.update(base_model=str(model_dir), tokenizer_config=str(model_dir), output_dir=str(tmp_path / "out"))
    data.update(lora)
    path = tmp_path / f"axolotl-{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def built(path: Path, family: str, new_tokens: int = 0) -> int:
    from transformers import AutoConfig

    cfg = validate_config(DictDefault(yaml.safe_load(path.read_text())))
    normalize_config(cfg)
    check_model_config(cfg, AutoConfig.from_pretrained(cfg.base_model))
    model = make_model(family)
    if new_tokens:
        model.resize_token_embeddings(model.config.vocab_size + new_tokens)
    peft_model, _ = load_lora(model, cfg)
    return peft_model.get_nb_trainable_parameters()[0]


def counted(model_dir, path, capsys) -> int:
    capsys.readouterr()
    assert main(["count", str(model_dir), "--from", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["trainable_params"]


@pytest.mark.parametrize("family, args", [
    ("llama", ["--task", "code", "--examples", "20000"]),
    ("llama", ["--task", "chat", "--examples", "5000", "--dora", "--quant", "4bit"]),
    ("gpt_neox", ["--task", "domain_adaptation", "--examples", "50000"]),
    ("phi3", ["--task", "format_only", "--examples", "500"]),
])
def test_export_validates_and_builds_what_loraplan_counts(family, args, tmp_path, capsys):
    folder = save_tiny_model(tmp_path / family, family)
    assert main(["recommend", folder, *args, "--format", "axolotl"]) == 0
    path = axolotl_yaml(tmp_path, folder, yaml.safe_load(capsys.readouterr().out))
    assert built(path, family) == counted(folder, path, capsys)


def test_new_tokens_export_is_accepted_and_trains_what_loraplan_counts(tmp_path, capsys):
    tokens = [f"<new{i}>" for i in range(30)]
    folder = Path(save_tiny_model(tmp_path / "llama", "llama"))
    assert main(["recommend", str(folder), "--task", "code", "--examples", "20000", "--new-tokens",
                 "--format", "axolotl"]) == 0
    text = capsys.readouterr().out
    assert "trainable_token_indices" in text  # the note reaches the file
    lora = yaml.safe_load(text)
    path = axolotl_yaml(tmp_path, folder, {**lora, "tokens": tokens})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] += len(tokens)  # loraplan sizes the resized model
    (folder / "config.json").write_text(json.dumps(config))
    expected = counted(folder, path, capsys)
    assert built(path, "llama", new_tokens=len(tokens)) == expected
    # without lora_modules_to_save axolotl refuses to add tokens
    del lora["lora_modules_to_save"]
    with pytest.raises(ValueError, match="lora_modules_to_save"):
        built(axolotl_yaml(tmp_path, folder, {**lora, "tokens": tokens}), "llama", new_tokens=len(tokens))


def test_rank_and_alpha_patterns_export_and_read(tmp_path, capsys):
    folder = save_tiny_model(tmp_path / "llama", "llama")
    from loraplan.plan.export import axolotl_config
    from loraplan.plan.lora_plan import LoraPlan

    lora = axolotl_config(LoraPlan(targets="q_proj,v_proj", r=8, rank_pattern={"q_proj": 16},
                                   alpha_pattern={"q_proj": 32}))
    assert lora["lora_rank_pattern"] == {"q_proj": 16} and lora["lora_alpha_pattern"] == {"q_proj": 32}
    path = axolotl_yaml(tmp_path, folder, lora)
    assert built(path, "llama") == counted(folder, path, capsys) == 2 * (16 * 128 + 8 * 96)


@pytest.mark.parametrize("fixture, family", [("llama-3-qlora.yml", "llama"), ("llama-3-lora-1b.yml", "llama"),
                                             ("phi-lora-3.5.yaml", "phi3"), ("llama-3-qlora.yml", "gpt_neox")])
def test_its_examples_read_as_it_builds_them(fixture, family, tmp_path, capsys):
    folder = save_tiny_model(tmp_path / family, family)
    data = yaml.safe_load((FIXTURES / fixture).read_text())
    data.update(base_model=folder, tokenizer_config=folder, load_in_4bit=False, load_in_8bit=False,
                adapter="lora")  # no bitsandbytes kernels on a CPU machine
    path = tmp_path / fixture
    path.write_text(yaml.safe_dump(data))
    assert built(path, family) == counted(folder, path, capsys)


def test_its_target_linear_on_gpt2_finds_nothing_and_loraplan_says_so(tmp_path, capsys):
    folder = write_config("gpt2", tmp_path / "gpt2")
    path = axolotl_yaml(tmp_path, folder, {"adapter": "lora", "lora_r": 8, "lora_alpha": 8,
                                           "lora_target_linear": True})
    with pytest.raises(ValueError, match="target_modules"):
        peft_model, _ = load_lora(make_model("gpt2"), DictDefault(yaml.safe_load(path.read_text())))
    assert main(["count", folder, "--from", str(path)]) == 2
    assert "no target modules" in capsys.readouterr().err

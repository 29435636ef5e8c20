"""loraplan's torchtune exports and torchtune's own recipe configs, checked with torchtune itself:
the export, put in place of the `model:` section of torchtune's example recipe, passes torchtune's
`tune validate` (torchtune.config.validate), and its LoRA builder, run on the meta device, makes
exactly the trainable parameters the export's comment states (loraplan's count, except on Phi-3,
whose fused projections torchtune splits: the comment says so). torchtune's own configs read
through `--from` count what its builders make.

Run against the installed torchtune: 0.6.1 (the release) or main. torchtune 0.6.1 needs torchao
<= 0.14 and PEFT 0.21 refuses torchao < 0.16 once imported, so `make tools` keeps 0.6.1 in a folder
of its own and runs this file a second time with it first on PYTHONPATH; main needs torchvision,
whose PyPI build does not load beside the CPU torch, so a stand-in module takes its place (the
text-model builders never call it)."""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import pytest
import yaml
from support.tools import require, version

from loraplan.cli import main
from loraplan.errors import UsageError
from loraplan.model.loading import load_structure
from loraplan.plan.count import count_plan
from loraplan.plan.export import torchtune_trainable
from loraplan.plan.read_config import read_plan



def _placeholder(attr: str):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return type(attr, (), {})


try:
    import torchvision  # noqa: F401
except Exception:  # not installed, or PyPI's build beside the CPU torch ('torchvision::nms does not exist')
    for name in ("torchvision", "torchvision.io", "torchvision.transforms", "torchvision.transforms.v2",
                 "torchvision.transforms.v2.functional", "torchvision.transforms._functional_tensor"):
        stub = types.ModuleType(name)
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
        stub.__getattr__ = _placeholder
        sys.modules[name] = stub
torch = require("torch")
torchtune = require("torchtune")
from torchtune.config import validate  # noqa: E402
from torchtune.modules.peft import get_adapter_params  # noqa: E402

pytestmark = pytest.mark.tools
FIXTURES = Path(__file__).parent / "fixtures" / "torchtune"
RELEASE = version("torchtune").split("+")[0]
# builtin model -> torchtune's own recipe config for it (tests/fixtures/torchtune)
RECIPES = {
    "llama-3.2-1b": "llama3_2_1B_lora_single_device.yaml",
    "llama-3.1-8b": "llama3_1_8B_qlora_single_device.yaml",
    "qwen2.5-0.5b": "qwen2_5_0.5B_lora_single_device.yaml",
    "phi-3-mini": "phi3_mini_lora_single_device.yaml",
    "qwen3-0.6b": "qwen3_0.6B_lora_single_device.yaml",
}


def builder(component: str):
    module, _, name = component.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def built(model_section: dict) -> int:
    """Adapter parameters of torchtune's LoRA builder for MODEL_SECTION, built on the meta device."""
    kwargs = {k: v for k, v in model_section.items() if k != "_component_"}
    with torch.device("meta"):
        model = builder(model_section["_component_"])(**kwargs)
    return sum(p.numel() for p in get_adapter_params(model).values())


@pytest.mark.parametrize("model", list(RECIPES))
@pytest.mark.parametrize("task", [["--task", "code", "--examples", "20000"], ["--task", "chat", "--examples", "5000"],
                                  ["--task", "format_only", "--examples", "500", "--dora"]])
def test_export_validates_and_builds_what_its_comment_says(model, task, capsys, tmp_path):
    assert main(["recommend", f"builtin:{model}", *task, "--format", "torchtune"]) == 0
    text = capsys.readouterr().out
    section = yaml.safe_load(text)["model"]
    if builder(section["_component_"]) is None:
        # the export says which torchtune has it
        assert "main branch, not in its 0.6.1 release" in text, f"{section['_component_']} missing in {RELEASE}"
        return
    from omegaconf import OmegaConf

    recipe = yaml.safe_load((FIXTURES / RECIPES[model]).read_text())
    recipe["model"] = section
    validate(OmegaConf.create(recipe))  # raises ConfigError on a key the builder does not take
    trainable = built(section)
    structure = load_structure(f"builtin:{model}")
    assert trainable == torchtune_trainable(section, structure)
    assert f"torchtune builds {trainable:,} trainable parameters" in text
    from loraplan.plan.recommend import recommend

    counted = count_plan(structure, recommend(task[1], int(task[3]), model=f"builtin:{model}",
                                              dora="--dora" in task)).trainable_params
    path = tmp_path / "tt.yaml"
    path.write_text(text)
    if model == "phi-3-mini":  # torchtune splits qkv_proj and gate_up_proj: more, and the comment says how many
        assert trainable > counted and f"not the {counted:,} loraplan count gives" in text
        with pytest.raises(UsageError, match="splits Phi's fused qkv_proj and gate_up_proj"):
            read_plan(path)  # and read back it is refused: no PEFT adapter on the HF model is that
    else:
        assert trainable == counted == count_plan(structure, read_plan(path)).trainable_params


@pytest.mark.parametrize("model", [m for m in RECIPES if m != "phi-3-mini"])
def test_its_recipes_read_as_its_builders_build_them(model, capsys):
    path = FIXTURES / RECIPES[model]
    section = yaml.safe_load(path.read_text())["model"]
    if builder(section["_component_"]) is None:
        pytest.skip(f"{section['_component_']} is not in torchtune {RELEASE}")
    assert main(["count", f"builtin:{model}", "--from", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] == built(section)


def test_its_phi3_recipe_is_refused_with_the_reason(capsys):
    path = FIXTURES / RECIPES["phi-3-mini"]
    assert main(["count", "builtin:phi-3-mini", "--from", str(path)]) == 2
    assert "splits Phi's fused qkv_proj and gate_up_proj" in capsys.readouterr().err

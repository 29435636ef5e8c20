"""Exporters, checked with the real library where it is installed (PEFT), the YAMLs parsed and read
back through `--from`; and `--from` on real PEFT adapters and each tool's YAML."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from support.cli import run_cli
from support.tiny import make_model, write_config

from loraplan.errors import UsageError
from loraplan.model.loading import load_structure
from loraplan.plan.export import (
    axolotl_config,
    export_plan,
    llamafactory_config,
    peft_config,
    torchtune_config,
)
from loraplan.plan.lora_plan import LoraPlan
from loraplan.plan.read_config import read_plan, read_plan_fields
from loraplan.plan.recommend import make_recommendation, recommend


@pytest.fixture(scope="module")
def structures(tiny):
    return {f: load_structure(tiny[f]) for f in ("llama", "gpt2", "phi3")}


def peft_trainable(model, config: dict):
    """What PEFT trains: (trainable parameter count, names of the adapted modules)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(**config))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    adapted = {n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in peft_model.named_parameters()
               if ".lora_A." in n}
    return trainable, adapted


# -- PEFT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, task, n", [
    ("llama", "domain_adaptation", 50_000), ("llama", "format_only", 500), ("gpt2", "instruction_following", 5_000),
    ("gpt2", "format_only", 500), ("phi3", "code", 20_000),
])
def test_peft_json_trains_what_loraplan_counts(tiny, family, task, n, capsys):
    code, out, _ = run_cli(["recommend", tiny[family], "--task", task, "--examples", str(n), "--format", "peft-json"],
                           capsys)
    assert code == 0
    config = json.loads(out)
    result = make_recommendation(task, n, model=tiny[family])
    trainable, adapted = peft_trainable(make_model(family), config)
    assert trainable == result.count.trainable_params
    assert adapted == {m.name for m in result.count.targets.modules}


def test_peft_json_without_a_model_is_a_loraconfig():
    from peft import LoraConfig

    config = LoraConfig(**json.loads(export_plan(recommend("domain_adaptation", 50_000, "high"), "peft-json")))
    assert (config.r, config.lora_alpha, config.use_rslora) == (64, 64, True)
    assert config.target_modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_peft_python_snippet_runs(tiny):
    plan = recommend("code", 20_000, model=tiny["llama"])
    code = export_plan(plan, "peft", load_structure(tiny["llama"]), command="loraplan recommend X")
    assert code.startswith("# loraplan recommend X\n")
    namespace = {"model": make_model("llama")}
    exec(compile(code, "<peft snippet>", "exec"), namespace)
    assert type(namespace["model"]).__name__ == "PeftModelForCausalLM"
    lrs = sorted({g["lr"] for g in namespace["optimizer"].param_groups if g["params"]})
    assert lrs == pytest.approx([2e-4, 16 * 2e-4])


# -- axolotl / LLaMA-Factory / torchtune --------------------------------------------------------


def test_axolotl_yaml(capsys, tmp_path):
    code, out, _ = run_cli(["recommend", "--task", "domain_adaptation", "--examples", "50000", "--complexity", "high",
                            "--format", "axolotl"], capsys)
    assert code == 0
    first = out.splitlines()[0]
    assert first == ("# loraplan recommend --task domain_adaptation --examples 50000 --complexity high "
                     "--format axolotl")
    data = yaml.safe_load(out)
    assert data == {
        "adapter": "lora", "lora_r": 64, "lora_alpha": 64, "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "peft_use_rslora": True, "peft_use_dora": False, "loraplus_lr_ratio": 16,
    }
    path = tmp_path / "axolotl.yaml"
    path.write_text(out)
    back = read_plan(path)
    original = recommend("domain_adaptation", 50_000, "high")
    assert peft_config(back) == peft_config(original)
    assert back.loraplus_lr_ratio == 16


def yaml_fields(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return read_plan_fields(path)


def test_axolotl_all_linear_quant_and_modules_to_save(tmp_path):
    plan = LoraPlan(targets="all-linear", r=16, use_rslora=True, modules_to_save=("lm_head",), layers="0-3")
    data = axolotl_config(plan, quant="4bit")
    assert data["adapter"] == "qlora" and data["load_in_4bit"] is True
    assert data["lora_target_linear"] is True and "lora_target_modules" not in data
    assert data["lora_modules_to_save"] == ["lm_head"] and data["peft_layers_to_transform"] == [0, 1, 2, 3]
    back = yaml_fields(tmp_path, data)
    # read back as axolotl's own "every linear layer", which is PEFT's all-linear on Llama-like models only
    assert back["targets"] == "axolotl:linear" and back["modules_to_save"] == ("lm_head",) and back["layers"] == "0,1,2,3"


def test_llamafactory_yaml(tiny, capsys, tmp_path):
    code, out, _ = run_cli(["recommend", tiny["llama"], "--task", "code", "--examples", "20000", "--new-tokens",
                            "--format", "llamafactory"], capsys)
    assert code == 0 and out.startswith("# loraplan recommend ")
    data = yaml.safe_load(out)
    assert data["finetuning_type"] == "lora"
    assert (data["lora_rank"], data["lora_alpha"], data["use_rslora"], data["use_dora"]) == (64, 64, True, False)
    assert set(data["lora_target"].split(",")) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}
    # new tokens: LLaMA-Factory resizes and trains the embeddings in full (additional_target)
    assert data["additional_target"] == "embed_tokens,lm_head" and data["resize_vocab"] is True
    assert data["loraplus_lr_ratio"] == 16
    path = tmp_path / "lf.yaml"
    path.write_text(out)
    code, counted, _ = run_cli(["count", tiny["llama"], "--from", str(path), "--json"], capsys)
    result = make_recommendation("code", 20_000, model=tiny["llama"], new_tokens=True)
    assert json.loads(counted)["trainable_params"] == result.count.trainable_params
    assert llamafactory_config(LoraPlan(targets="all-linear"))["lora_target"] == "all"


def test_llamafactory_defaults_when_read(tmp_path):
    fields = yaml_fields(tmp_path, {"stage": "sft", "finetuning_type": "lora", "lora_rank": 16,
                                         "lora_target": "q_proj,v_proj", "model_name_or_path": "x"})
    # LLaMA-Factory: alpha defaults to 2 * rank, dropout to 0
    assert (fields["r"], fields["lora_alpha"], fields["lora_dropout"]) == (16, 32, 0.0)
    assert fields["targets"] == "q_proj,v_proj"
    assert yaml_fields(tmp_path, {"finetuning_type": "lora"})["targets"] == "llamafactory:all"


def test_torchtune_yaml(capsys, tmp_path, structures):
    code, out, _ = run_cli(["recommend", "builtin:llama-3.1-8b", "--task", "domain_adaptation", "--examples", "50000",
                            "--complexity", "high", "--format", "torchtune"], capsys)
    assert code == 0 and out.startswith("# loraplan recommend builtin:llama-3.1-8b ")
    model = yaml.safe_load(out)["model"]
    assert model["_component_"] == "torchtune.models.llama3_1.lora_llama3_1_8b"
    assert model["lora_attn_modules"] == ["q_proj", "k_proj", "v_proj", "output_proj"]
    assert model["apply_lora_to_mlp"] is True and model["apply_lora_to_output"] is False
    # rsLoRA folded into alpha: torchtune's alpha/r equals PEFT's alpha/sqrt(r)
    assert model["lora_rank"] == 64 and model["lora_alpha"] / 64 == pytest.approx(64 / math.sqrt(64))
    path = tmp_path / "tt.yaml"
    path.write_text(out)
    back = read_plan(path)
    original = recommend("domain_adaptation", 50_000, "high")
    assert back.scaling == pytest.approx(original.scaling) and back.r == original.r
    llama = structures["llama"]
    assert back.resolve(llama).target_modules == original.resolve(llama).target_modules


@pytest.mark.parametrize("targets, words", [
    ("q,v,down", "whole MLP"), ("q,v,embed", "cannot adapt embed"),
])
def test_torchtune_refuses_what_it_cannot_express(structures, targets, words):
    with pytest.raises(UsageError, match=words):
        torchtune_config(LoraPlan(targets=targets), structures["llama"])


def test_torchtune_fused_and_tied(structures):
    body, comments = torchtune_config(LoraPlan(targets="qkv,o"), structures["phi3"])
    assert body["lora_attn_modules"] == ["q_proj", "k_proj", "v_proj", "output_proj"]
    # 2 layers x (q 8·(64+64) + k 8·(64+32) + v 8·(64+32) + output_proj 8·(64+64)) = 7,168; PEFT's fused
    # qkv_proj 8·(64+128) + o_proj 8·(64+64) = 5,120
    assert any("torchtune builds 7,168 trainable parameters from this, not the 5,120" in c and "qkv_proj" in c
               for c in comments)
    gemma2 = load_structure("builtin:gemma-2-2b")
    body, _ = torchtune_config(LoraPlan(targets="attention"), gemma2)
    assert body["_component_"] == "torchtune.models.gemma2.lora_gemma2_2b" and "apply_lora_to_output" not in body
    with pytest.raises(UsageError, match="no apply_lora_to_output"):
        torchtune_config(LoraPlan(targets="attention,lm_head"), gemma2)
    with pytest.raises(UsageError, match="no LoRA model builder for gpt2"):
        torchtune_config(LoraPlan(targets="attention"), structures["gpt2"])
    assert torchtune_config(LoraPlan(targets="q_proj,v_proj"), quant="4bit")[0]["quantize_base"] is True


def test_tools_refuse_what_they_cannot_express(structures):
    with pytest.raises(UsageError, match="axolotl cannot express bias=all"):
        axolotl_config(LoraPlan(targets="q_proj", bias="all"))
    with pytest.raises(UsageError, match="lora_alpha_pattern\\) take integers"):
        axolotl_config(LoraPlan(targets="q_proj", alpha_pattern={"q_proj": 2.5}))
    with pytest.raises(UsageError, match="LLaMA-Factory cannot express a layer selection"):
        llamafactory_config(LoraPlan(targets="q_proj", layers="0-1"))
    with pytest.raises(UsageError, match="not a regex"):
        llamafactory_config(LoraPlan(targets=r"re:.*\.q_proj"))
    with pytest.raises(UsageError, match="name roles"):
        peft_config(LoraPlan(targets="attention"))


# -- --from on real PEFT adapters and bad files -------------------------------------------------


def test_from_a_real_peft_adapter(tiny, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], lora_dropout=0.1, use_dora=True,
                        modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(make_model("gpt2"), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    trainable, _ = peft_model.get_nb_trainable_parameters()
    code, out, _ = run_cli(["count", tiny["gpt2"], "--from", str(tmp_path / "adapter"), "--json"], capsys)
    assert code == 0
    counted = json.loads(out)
    assert counted["trainable_params"] == trainable
    assert (counted["r"], counted["lora_alpha"], counted["use_dora"]) == (4, 16, True)
    # flags override the file; --no-dora turns the file's DoRA off, --rank keeps the file's alpha
    code, out, _ = run_cli(["count", tiny["gpt2"], "--from", str(tmp_path / "adapter" / "adapter_config.json"),
                            "--rank", "8", "--no-dora", "--json"], capsys)
    counted = json.loads(out)
    assert (counted["r"], counted["lora_alpha"], counted["use_dora"]) == (8, 16, False)


def test_from_peft_regex_target_modules(structures, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": r".*\.self_attn\.(q_proj|v_proj)",
         "newer_peft_key": 1}))
    plan = read_plan(tmp_path)
    resolved = plan.resolve(structures["llama"])
    assert resolved.target_modules == r".*\.self_attn\.(q_proj|v_proj)"  # handed back to PEFT as it reads it
    assert {m.leaf for m in resolved.modules} == {"q_proj", "v_proj"}


@pytest.mark.parametrize("name, text, words", [
    ("missing.yaml", None, "no such file"),
    ("bad.yaml", "lora_r: [8\n", "not valid YAML at line"),
    ("bad.json", "{", "not valid JSON"),
    ("list.yaml", "- 1\n", "does not hold a mapping"),
    ("train.yaml", "base_model: x\nlearning_rate: 0.1\n", "has no LoRA settings"),
    ("full.yaml", "base_model: x\nlora_r: 8\nlora_alpha: 8\n", "no adapter key"),
    ("noalpha.yaml", "adapter: lora\nlora_r: 8\nlora_target_linear: true\n", "no lora_alpha"),
    ("lf.yaml", "finetuning_type: full\nlora_rank: 8\n", "finetuning_type: full"),
    ("ia3.json", '{"peft_type": "IA3", "target_modules": ["k"]}', "IA3 adapter, not LoRA"),
    ("tt.yaml", "model:\n  _component_: torchtune.models.llama3_1.llama3_1_8b\n  lora_rank: 8\n", "not a LoRA builder"),
    ("tokens.json", '{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"], "trainable_token_indices": [5]}',
     "cannot count yet"),
])
def test_from_bad_files_is_one_line_exit_2(tiny, tmp_path, capsys, name, text, words):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    code, out, err = run_cli(["count", tiny["llama"], "--from", str(path)], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and words in err


def test_from_a_folder_without_an_adapter(tiny, tmp_path, capsys):
    code, _, err = run_cli(["count", tiny["llama"], "--from", str(tmp_path)], capsys)
    assert code == 2 and "no adapter_config.json" in err


# -- issue 26: what each tool builds from our files, and what we read from theirs ---------------

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("fmt", ["peft-json", "axolotl", "llamafactory"])
def test_new_tokens_are_full_copies_in_every_format(tiny, structures, fmt, capsys):
    code, out, err = run_cli(["recommend", tiny["llama"], "--task", "chat", "--examples", "5000", "--new-tokens",
                              "--format", fmt], capsys)
    assert code == 0
    data = json.loads(out) if fmt == "peft-json" else yaml.safe_load(out)
    key = {"peft-json": "modules_to_save", "axolotl": "lora_modules_to_save", "llamafactory": "additional_target"}[fmt]
    saved = data[key].split(",") if isinstance(data[key], str) else data[key]
    assert saved == ["embed_tokens", "lm_head"]
    targets = data.get("target_modules") or data.get("lora_target_modules") or data["lora_target"].split(",")
    assert "lm_head" not in targets and "embed_tokens" not in targets  # no LoRA on them (TRL refuses lm_head)
    # the notes reach the file (JSON has no comments: stderr)
    assert "trainable_token_indices" in (err if fmt == "peft-json" else out)
    plan = make_recommendation("chat", 5_000, model=tiny["llama"], new_tokens=True)
    assert plan.count.saved_params == 2 * 128 * 64


def test_new_tokens_where_a_tool_cannot(tiny, capsys):
    code, _, err = run_cli(["recommend", tiny["llama"], "--task", "chat", "--examples", "5000", "--new-tokens",
                            "--format", "torchtune"], capsys)
    assert code == 2 and "torchtune's LoRA recipes cannot train new tokens" in err
    code, _, err = run_cli(["recommend", tiny["llama"], "--task", "chat", "--examples", "5000", "--new-tokens",
                            "--quant", "4bit", "--format", "llamafactory"], capsys)
    assert code == 2 and "refuses resize_vocab with quantization_bit" in err


def test_loraplus_on_embedding_lora_is_not_left_at_1e6(structures):
    plan = LoraPlan(targets="q,v,embed", loraplus_lr_ratio=16)
    assert "loraplus_lr_embedding=2e-4" in export_plan(plan, "peft", structures["llama"])
    assert "loraplus_lr_embedding" in export_plan(plan, "axolotl", structures["llama"])
    assert "loraplus_lr_embedding" not in export_plan(LoraPlan(targets="q,v", loraplus_lr_ratio=16), "peft",
                                                      structures["llama"])


def test_peft_json_says_where_loraplus_goes(capsys):
    code, out, err = run_cli(["recommend", "--task", "code", "--examples", "20000", "--format", "peft-json"], capsys)
    assert code == 0 and "loraplus" not in out
    assert "PEFT's LoraConfig has no LoRA+ key" in err and "create_loraplus_optimizer" in err
    code, out, err = run_cli(["recommend", "--task", "code", "--examples", "20000", "--no-loraplus", "--format",
                              "peft-json"], capsys)
    assert code == 0 and err == ""


def test_recommend_json_gives_resolved_values(capsys):
    code, out, _ = run_cli(["recommend", "--task", "format_only", "--examples", "500", "--json"], capsys)
    plan = json.loads(out)["plan"]
    assert plan["lora_alpha"] == 4 and plan["targets"] == ["q_proj", "v_proj"]


def test_torchtune_phi3_configs_are_refused_with_the_reason(capsys):
    path = FIXTURES / "torchtune" / "phi3_mini_lora_single_device.yaml"
    code, _, err = run_cli(["count", "builtin:phi-3-mini", "--from", str(path)], capsys)
    assert code == 2 and "splits Phi's fused qkv_proj and gate_up_proj" in err


def test_torchtune_export_says_which_torchtune_has_the_builder(capsys):
    code, out, _ = run_cli(["recommend", "builtin:qwen3-0.6b", "--task", "chat", "--examples", "5000",
                            "--format", "torchtune"], capsys)
    assert code == 0 and "torchtune.models.qwen3 is in torchtune's main branch, not in its 0.6.1 release" in out
    code, out, _ = run_cli(["recommend", "builtin:llama-3.2-1b", "--task", "chat", "--examples", "5000",
                            "--format", "torchtune"], capsys)
    assert code == 0 and "main branch" not in out


def test_axolotl_patterns_and_refused_keys(tiny, tmp_path, capsys):
    base = {"adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_target_modules": ["q_proj", "v_proj"]}
    fields = yaml_fields(tmp_path, {**base, "lora_rank_pattern": {"q_proj": 16}, "lora_alpha_pattern": {"q_proj": 32}})
    assert fields["rank_pattern"] == {"q_proj": 16} and fields["alpha_pattern"] == {"q_proj": 32}
    from loraplan.plan.count import count_plan

    # 2 layers x (q at r=16: 16·(64+64) + v at r=8: 8·(64+32))
    assert count_plan(load_structure(tiny["llama"]), LoraPlan(**fields)).trainable_params == 2 * (16 * 128 + 8 * 96)
    for key, value in [("peft_trainable_token_indices", [5]), ("unfrozen_parameters", ["^lm_head.weight$"]),
                       ("peft_layer_replication", [[0, 1]]), ("lora_model_dir", "no/such/adapter")]:
        path = tmp_path / "refused.yaml"
        path.write_text(yaml.safe_dump({**base, key: value}))
        code, out, err = run_cli(["count", tiny["llama"], "--from", str(path)], capsys)
        assert code == 2 and key in err and len(err.strip().splitlines()) == 1, err


def test_axolotl_lora_model_dir_is_read_from_the_adapter(tiny, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    path = tmp_path / "axolotl.yaml"
    path.write_text(yaml.safe_dump({"adapter": "lora", "lora_r": 64, "lora_alpha": 16, "lora_target_linear": True,
                                    "lora_model_dir": str(tmp_path / "a")}))
    assert read_plan(path).r == 4 and read_plan(path).targets == "q_proj"


def test_a_regex_with_a_comma_and_target_parameters(tmp_path, capsys):
    tiny_moe = write_config("qwen3_moe", tmp_path / "moe")
    path = tmp_path / "axolotl.yaml"
    path.write_text(yaml.safe_dump({"adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                    "lora_target_modules": r"model.layers.[0-9]{1,3}.self_attn.(q|v)_proj",
                                    "lora_target_parameters": ["mlp.experts.down_proj"]}))
    plan = read_plan(path)
    resolved = plan.resolve(load_structure(tiny_moe))
    assert {m.leaf for m in resolved.modules} == {"q_proj", "v_proj", "down_proj"}


def test_the_tools_all_is_their_own(tmp_path):
    from loraplan.model.targets import resolve_targets

    gpt2 = load_structure(write_config("gpt2", tmp_path / "gpt2"))
    for item in ("axolotl:linear", "llamafactory:all"):
        with pytest.raises(UsageError, match="leaves nothing to adapt") as e:
            resolve_targets(gpt2, item)
        assert "has none (its layers: Conv1D" in e.value.hint
    llama = load_structure(write_config("llama", tmp_path / "llama"))
    for item in ("axolotl:linear", "llamafactory:all", "llamafactory-v1:all"):
        assert [m.name for m in resolve_targets(llama, item).modules] == [
            m.name for m in resolve_targets(llama, "all-linear").modules]


@pytest.mark.parametrize("fixture, words", [
    ("inference_qwen3_lora_sft.yaml", "trains nothing"), ("merge_qwen3_lora_sft.yaml", "trains nothing"),
])
def test_llamafactory_configs_that_train_nothing(tiny, fixture, words, capsys):
    code, _, err = run_cli(["count", tiny["llama"], "--from", str(FIXTURES / "llamafactory" / fixture)], capsys)
    assert code == 2 and words in err and "--from saves/qwen3-4b/lora/sft" in err


def test_llamafactory_v1_and_defaults(tmp_path):
    fields = read_plan_fields(FIXTURES / "llamafactory" / "v1_train_lora_sft.yaml")
    assert (fields["r"], fields["lora_alpha"], fields["lora_dropout"], fields["targets"]) == (
        16, 32, 0.05, "llamafactory-v1:all")
    fields = yaml_fields(tmp_path, {"model_name_or_path": "x", "stage": "sft", "do_train": True, "template": "qwen3"})
    assert (fields["r"], fields["lora_alpha"], fields["targets"]) == (8, 16, "llamafactory:all")


@pytest.mark.parametrize("fixture, expect", [
    ("axolotl/llama-3-qlora.yml", {"quant": "4bit", "batch_size": 2, "seq_len": 4096, "grad_ckpt": True}),
    ("axolotl/phi-lora-3.5.yaml", {"quant": "8bit", "batch_size": 4, "seq_len": 4096, "grad_ckpt": True}),
    ("llamafactory/qwen3_lora_sft_otfq.yaml", {"quant": "4bit", "batch_size": 1, "seq_len": 2048, "grad_ckpt": True}),
    ("llamafactory/v1_quantization.yaml", {"quant": "4bit", "batch_size": 1, "seq_len": 2048}),
    ("torchtune/llama3_1_8B_qlora_single_device.yaml", {"quant": "4bit", "batch_size": 2, "grad_ckpt": True}),
])
def test_training_settings_from_the_tools_configs(fixture, expect):
    from loraplan.plan.read_config import read_training_settings

    assert read_training_settings(FIXTURES / fixture) == expect


def test_memory_from_takes_the_files_settings_and_flags_override(capsys):
    path = str(FIXTURES / "axolotl" / "llama-3-qlora.yml")
    code, out, _ = run_cli(["memory", "builtin:llama-3.1-8b", "--from", path, "--json"], capsys)
    data = json.loads(out)
    assert (data["batch_size"], data["seq_len"], data["quant"], data["grad_ckpt"]) == (2, 4096, "4bit", True)
    code, out, _ = run_cli(["memory", "builtin:llama-3.1-8b", "--from", path, "-b", "1", "--no-grad-ckpt",
                            "--quant", "none", "--json"], capsys)
    data = json.loads(out)
    assert (data["batch_size"], data["seq_len"], data["quant"], data["grad_ckpt"]) == (1, 4096, None, False)
    assert data["from_file"] == {"seq_len": 4096}

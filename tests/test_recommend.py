"""`recommend`: the seed's build_lora_config reproduced exactly, every task x data size sane, the
model's own names, the memory verdict, and bad input as one-line errors."""

from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
from support.cli import run_cli

import loraplan
from loraplan.errors import UsageError
from loraplan.plan.recommend import (
    SIZE_BUCKETS,
    TASKS,
    make_recommendation,
    recommend,
)

FIELDS = ("quadrant", "targets", "r", "lora_alpha", "use_rslora", "use_dora", "loraplus_lr_ratio", "lora_dropout",
          "bias", "task_type")
SIZES = (1, 500, 999, 1_000, 5_000, 9_999, 10_000, 50_000, 100_000, 100_001, 2_000_000)


def seed_build_lora_config(task_type: str, dataset_size: int, domain_complexity: str = "medium"):
    """The oracle: build_lora_config from seed 000 ("Quick-Reference Config Builder"), returning
    (target_modules, r, lora_alpha, use_rslora) instead of a LoraConfig."""
    attention_minimal = ["q_proj", "v_proj"]
    attention_all = ["q_proj", "k_proj", "v_proj", "o_proj"]
    attention_ffn = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if task_type == "format_only":
        modules, base_rank = attention_minimal, 4
    elif task_type == "instruction_following":
        modules, base_rank = attention_all, 8
    elif task_type in ("domain_adaptation", "code"):
        modules, base_rank = attention_ffn, 16 if domain_complexity == "low" else 32
    else:
        modules, base_rank = attention_ffn, 16
    if dataset_size < 1000:
        rank = min(base_rank, 8)
    elif dataset_size < 10000:
        rank = base_rank
    else:
        rank = min(base_rank * 2, 64)
    return modules, rank, rank, rank >= 16


# -- the seed's three examples, and its builder everywhere it is defined --------------------------


@pytest.mark.parametrize("args, modules, r, rslora", [
    (("format_only", 500), ["q_proj", "v_proj"], 4, False),
    (("instruction_following", 5000), ["q_proj", "k_proj", "v_proj", "o_proj"], 8, False),
    (("domain_adaptation", 50000, "high"),
     ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 64, True),
])
def test_seed_examples_exactly(args, modules, r, rslora):
    plan = recommend(*args)
    assert plan.targets.split(",") == modules
    assert (plan.r, plan.alpha, plan.use_rslora) == (r, r, rslora)
    assert plan.lora_dropout == 0.05 and plan.bias == "none" and plan.task_type == "CAUSAL_LM"


@pytest.mark.parametrize("task", ["format_only", "instruction_following", "domain_adaptation", "code"])
@pytest.mark.parametrize("complexity", ["low", "medium", "high"])
def test_build_lora_config_reproduced_for_every_size(task, complexity):
    for n in SIZES:
        modules, r, alpha, rslora = seed_build_lora_config(task, n, complexity)
        plan = recommend(task, n, complexity)
        assert (plan.targets.split(","), plan.r, plan.alpha, plan.use_rslora) == (modules, r, alpha, rslora), (task, n)


def test_chat_is_instruction_following():
    assert recommend("chat", 3000).to_dict() == recommend("instruction_following", 3000).to_dict()


# -- every task x size bucket ---------------------------------------------------------------------


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_and_size_bucket_is_sane(task):
    previous = 0
    for n in SIZES:
        plan = recommend(task, n)
        bucket = next(b for b in SIZE_BUCKETS if n < b.below)
        assert 1 <= plan.r <= bucket.cap, (n, plan.r)
        assert plan.r >= previous, "more data never lowers the rank"
        previous = plan.r
        assert plan.alpha == plan.r and plan.lora_alpha is None, "alpha = r, and follows r"
        assert plan.use_rslora == (plan.r >= 16)
        assert plan.loraplus_lr_ratio == 16 and plan.lora_dropout == 0.05 and not plan.use_dora
        choices = [r.choice for r in plan.reasons]
        for field in FIELDS:
            assert field in choices, (task, n, field)
        assert all(r.text and "\n" not in r.text for r in plan.reasons), "one line each"
        names = plan.targets.split(",")
        if TASKS[task].roles == ("attention", "mlp"):
            assert {"gate_proj", "up_proj", "down_proj"} <= set(names)
        else:
            assert not {"gate_proj", "up_proj", "down_proj"} & set(names)
            note = next(r for r in plan.reasons if r.choice == "note" and "attention-only" in r.text)
            for cited in ("Dettmers", "Biderman", "LoRA Without Regret"):
                assert cited in note.source


@pytest.mark.parametrize("task, n, complexity, r", [
    ("complex_domain", 500, None, 8),
    ("complex_domain", 5_000, "low", 32),
    ("complex_domain", 5_000, "high", 32),  # 64 on a few thousand examples overfits: capped at 32
    ("complex_domain", 50_000, "low", 64),
    ("complex_domain", 500_000, "high", 128),
    ("multitask", 5_000, None, 32),
    ("multitask", 50_000, None, 64),
    ("multitask", 200_000, None, 128),
])
def test_rank_table_tasks(task, n, complexity, r):
    assert recommend(task, n, complexity).r == r


def test_rule_of_thumb_note_when_the_builder_goes_above_it():
    notes = [r.text for r in recommend("domain_adaptation", 50_000, "high").reasons if r.choice == "note"]
    assert any("rule of thumb" in t and "r=16-32" in t for t in notes)
    assert not any("rule of thumb" in r.text for r in recommend("code", 50_000, "low").reasons)  # r=32 is inside


def test_rslora_with_alpha_equal_r_is_explained():
    plan = recommend("domain_adaptation", 50_000, "high")
    assert plan.scaling == pytest.approx(8.0)
    assert any(r.choice == "note" and "sqrt(r) = 8" in r.text for r in plan.reasons)


def test_dora_at_half_the_rank():
    plan = recommend("domain_adaptation", 50_000, "high", dora=True)
    assert (plan.r, plan.alpha, plan.use_dora, plan.use_rslora) == (32, 32, True, True)
    small = recommend("instruction_following", 5_000, dora=True)
    assert (small.r, small.use_rslora) == (4, False)


def test_new_tokens_trains_embeddings_and_lm_head_in_full_only_when_asked():
    assert recommend("domain_adaptation", 20_000).modules_to_save == ()
    plan = recommend("domain_adaptation", 20_000, new_tokens=True)
    # full copies (modules_to_save), as axolotl requires and LLaMA-Factory's resize_vocab does; no LoRA on them
    assert plan.modules_to_save == ("embed_tokens", "lm_head") and "embed_tokens" not in plan.targets
    assert any("trainable_token_indices" in r.text for r in plan.reasons)


def test_complexity_that_changes_nothing_says_so():
    assert any("does not change" in r.text for r in recommend("format_only", 500, "high").reasons)
    assert not any("does not change" in r.text for r in recommend("format_only", 500).reasons)


def test_no_loraplus():
    assert recommend("code", 20_000, loraplus=False).loraplus_lr_ratio is None


def test_api_is_exported():
    assert loraplan.recommend is recommend


# -- with a model: its own names ------------------------------------------------------------------


def test_llama_names(tiny):
    plan = recommend("format_only", 500, model=tiny["llama"])
    assert plan.targets == "q,v"
    from loraplan.model.loading import load_structure

    structure = load_structure(tiny["llama"])
    assert plan.to_peft_kwargs(structure)["target_modules"] == ["q_proj", "v_proj"]
    domain = recommend("domain_adaptation", 20_000, model=tiny["llama"])
    assert domain.to_peft_kwargs(structure)["target_modules"] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_gpt2_attention_is_c_attn_and_attention_c_proj(tiny):
    result = make_recommendation("instruction_following", 5_000, model=tiny["gpt2"])
    assert result.peft_config()["target_modules"] == ["c_attn", "attn.c_proj"]
    fused = make_recommendation("format_only", 500, model=tiny["gpt2"])
    assert fused.plan.targets == "qkv" and fused.peft_config()["target_modules"] == ["c_attn"]


def test_phi3_gets_qkv_proj_with_a_reason(tiny):
    result = make_recommendation("format_only", 500, model=tiny["phi3"])
    assert result.plan.targets == "qkv"
    assert result.peft_config()["target_modules"] == ["qkv_proj"]
    assert any("fuses q and v into qkv_proj" in r.text for r in result.plan.reasons)
    domain = make_recommendation("domain_adaptation", 20_000, model=tiny["phi3"])
    assert set(domain.peft_config()["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_sized_with_the_model(tiny):
    from loraplan.plan.count import count

    result = make_recommendation("code", 20_000, model=tiny["llama"])
    expected = count(tiny["llama"], targets="attention,mlp", rank=64, rslora=True).trainable_params
    assert result.count.trainable_params == expected
    assert any(r.choice == "size" and f"{expected:,}" in r.text for r in result.plan.reasons)


def test_task_type_follows_the_model(tiny):
    assert recommend("instruction_following", 5_000, model=tiny["t5"]).task_type == "SEQ_2_SEQ_LM"
    assert recommend("instruction_following", 5_000, model=tiny["llama"]).task_type == "CAUSAL_LM"


def test_moe_experts_are_targets_and_dora_is_refused(tiny):
    result = make_recommendation("domain_adaptation", 20_000, model=tiny["mixtral"])
    assert result.peft_config()["target_parameters"]
    with pytest.raises(UsageError, match="DoRA"):
        make_recommendation("domain_adaptation", 20_000, model=tiny["mixtral"], dora=True)


# -- memory: never a plan that does not fit, silently ---------------------------------------------


class _FakeEstimate:
    """Stands in for gpu_memory.MemoryEstimate: 1 KiB per token, 5% less with checkpointing."""

    def __init__(self, plan, batch_size, seq_len, dtype, quant, grad_ckpt):
        self.plan, self.batch_size, self.seq_len, self.dtype = plan, batch_size, seq_len, dtype
        self.quant, self.grad_ckpt, self.optimizer = quant, grad_ckpt, "adamw"
        self.total_bytes = self.needed_bytes = batch_size * seq_len * 1024

    def fits(self, gpu_bytes):
        return self.total_bytes <= gpu_bytes

    def suggestions(self, gpu_bytes):
        return [f"batch {max(1, gpu_bytes // (self.seq_len * 1024))} fits"]

    def to_json(self):
        return {"total_bytes": self.total_bytes}


@pytest.fixture
def fake_memory(monkeypatch):
    module = types.ModuleType("loraplan.plan.memory")
    module.estimate_memory = lambda s, plan, b, l, *, dtype="bf16", quant=None, double_quant=True, grad_ckpt=False, \
        optimizer="adamw": _FakeEstimate(plan, b, l, dtype, quant, grad_ckpt)
    module.parse_size = lambda text: int(text.removesuffix("KiB")) * 1024
    monkeypatch.setitem(sys.modules, "loraplan.plan.memory", module)
    import loraplan.plan

    monkeypatch.setattr(loraplan.plan, "memory", module, raising=False)
    return module


def test_plan_that_does_not_fit_warns_and_says_what_fits(tiny, fake_memory):
    with pytest.warns(UserWarning, match="does NOT fit"):
        plan = recommend("code", 20_000, model=tiny["llama"], gpu_memory="64KiB", batch_size=4, seq_len=32)
    memory = next(r for r in plan.reasons if r.choice == "memory")
    assert "does NOT fit in 64.0 KiB" in memory.text and "batch 2 fits" in memory.text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fits = recommend("code", 20_000, model=tiny["llama"], gpu_memory="1024KiB", batch_size=4, seq_len=32)
    assert "fits in 1.0 MiB" in next(r.text for r in fits.reasons if r.choice == "memory")


def test_cli_export_of_a_plan_that_does_not_fit(tiny, fake_memory, capsys):
    code, out, err = run_cli(["recommend", tiny["llama"], "--task", "code", "--examples", "20k", "--gpu-memory",
                              "64KiB", "--batch-size", "4", "--seq-len", "32", "--format", "axolotl"], capsys)
    assert code == 0
    assert out.splitlines()[1].startswith("# warning: estimated peak") and "does NOT fit" in out.splitlines()[1]
    assert err.startswith("warning:") and "batch 2 fits" in err
    code, out, _ = run_cli(["recommend", tiny["llama"], "--task", "code", "--examples", "20k", "--gpu-memory",
                            "64KiB", "--batch-size", "4", "--seq-len", "32", "--json"], capsys)
    data = json.loads(out)
    assert data["memory"]["fits"] is False and data["memory"]["suggestions"] == ["batch 2 fits"]


def test_real_memory_estimate(tiny):
    pytest.importorskip("loraplan.plan.memory")
    result = make_recommendation("code", 20_000, model=tiny["llama"], gpu_memory="80GiB", batch_size=2, seq_len=64)
    assert result.memory.total_bytes > 0 and result.fits is True
    assert any(r.choice == "memory" and "fits in 80.0 GiB" in r.text for r in result.plan.reasons)


# -- the command line -----------------------------------------------------------------------------


def test_cli_text(capsys):
    code, out, _ = run_cli(["recommend", "--task", "domain_adaptation", "--examples", "50000", "--complexity",
                            "high"], capsys)
    assert code == 0
    assert "quadrant 1: low behavioral change, high knowledge injection" in out
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in out
    assert "64 (alpha/sqrt(r) = 8)" in out
    for field in ("targets", "r", "lora_alpha", "use_rslora", "loraplus_lr_ratio", "lora_dropout"):
        assert f"\n  {field} " in out


def test_cli_json_reads_back_through_from(tmp_path, tiny, capsys):
    code, out, _ = run_cli(["recommend", tiny["gpt2"], "--task", "chat", "--examples", "5000", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["task"] == "instruction_following" and data["quadrant"]["number"] == 4
    assert data["peft_config"]["target_modules"] == ["c_attn", "attn.c_proj"]
    path = tmp_path / "plan.json"
    path.write_text(out)
    code, out, _ = run_cli(["count", tiny["gpt2"], "--from", str(path), "--json"], capsys)
    assert code == 0 and json.loads(out)["trainable_params"] == data["count"]["trainable_params"]


@pytest.mark.parametrize("argv, words", [
    (["--task", "cod", "--examples", "5"], ["unknown task 'cod'", "did you mean 'code'", "format_only",
                                             "instruction_following (chat)", "multitask"]),
    (["--task", "code", "--examples", "5", "--complexity", "extreme"], ["unknown complexity", "low, medium or high"]),
    (["--task", "code", "--examples", "-5"], ["positive whole number"]),
    (["--task", "code", "--examples=-5"], ["positive whole number"]),
    (["--task", "code", "--examples", "0"], ["positive whole number"]),
    (["--task", "code", "--examples", "lots"], ["number of training examples such as 5000"]),
    (["--task", "code", "--examples", "5", "--batch-size", "0"], ["--batch-size", "positive integer"]),
    (["--task", "code"], ["required", "--examples"]),
    (["--task", "code", "--examples", "5", "--gpu-memory", "24GiB"], ["needs MODEL"]),
    (["--task", "code", "--examples", "5", "--json", "--format", "axolotl"], ["--json contradicts --format axolotl"]),
    (["--task", "code", "--examples", "5", "--format", "yaml"], ["invalid choice", "axolotl"]),
    (["code", "--task", "code", "--examples", "5"], ["'code' is a task, not a model"]),
])
def test_bad_input_is_one_line_exit_2(argv, words, capsys):
    code, out, err = run_cli(["recommend", *argv], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    for word in words:
        assert word in err


def test_bad_memory_flags_with_a_model(tiny, capsys):
    code, _, err = run_cli(["recommend", tiny["llama"], "--task", "code", "--examples", "5", "--gpu-memory", "24GiB"],
                           capsys)
    assert code == 2 and "--batch-size and --seq-len" in err and len(err.strip().splitlines()) == 1


def test_bad_input_in_python():
    assert recommend("code", 5e4).r == recommend("code", 50_000).r
    for bad in (-1, 0, 2.5, True, "100"):
        with pytest.raises(UsageError, match="positive number of training examples"):
            recommend("code", bad)
    with pytest.raises(UsageError, match="unknown task"):
        recommend("poetry", 100)

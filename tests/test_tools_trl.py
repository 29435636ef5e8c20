"""loraplan's PEFT exports trained by TRL itself: `SFTTrainer` (its default chunked loss included)
takes the `--format peft-json` LoraConfig, trains one step on a tiny model and has exactly the
trainable parameters `loraplan count` gives; with `--new-tokens` the tokens are really added and
their rows trained; the `--format peft` snippet's LoRA+ optimizer moves lora_B at ratio x lora_A's
learning rate."""

from __future__ import annotations

import json

import pytest
from support.tiny import make_model, make_tokenizer
from support.tools import require, version

from loraplan.cli import main
from loraplan.model.loading import load_structure
from loraplan.plan.export import export_plan
from loraplan.plan.recommend import make_recommendation

trl = require("trl")
pytestmark = [pytest.mark.tools, pytest.mark.slow]
NEW_TOKENS = [f"<new{i}>" for i in range(30)]  # 102 + 30 tokens: more than the tiny vocab of 128


def sft_config(tmp_path, **changes):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, learning_rate=2e-4,
                lr_scheduler_type="constant", report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                logging_steps=1, max_length=48, dataset_text_field="text", seed=0)
    return trl.SFTConfig(**{**base, **changes})


def dataset(text_tokens=()):
    from datasets import Dataset

    extra = " ".join(text_tokens)
    return Dataset.from_dict({"text": [f"hello world {extra} the end", f"a b c {extra} d e f"] * 2})


def model_with_new_tokens(family, folder):
    """A tiny model whose tokenizer gained NEW_TOKENS and whose embeddings were resized to them;
    its config.json (vocab grown) is what loraplan reads."""
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(NEW_TOKENS)
    model = make_model(family)
    model.resize_token_embeddings(len(tokenizer))
    model.config.save_pretrained(folder)
    return model, tokenizer


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt_neox"])
def test_sft_trainer_trains_the_new_tokens_export(family, tmp_path, capsys):
    from peft import LoraConfig

    model, tokenizer = model_with_new_tokens(family, tmp_path / "model")
    assert main(["recommend", str(tmp_path / "model"), "--task", "code", "--examples", "20000", "--new-tokens",
                 "--format", "peft-json"]) == 0
    config = json.loads(capsys.readouterr().out)
    counted = make_recommendation("code", 20_000, model=str(tmp_path / "model"), new_tokens=True).count
    embedding = model.get_input_embeddings().weight.detach().clone()
    trainer = trl.SFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=dataset(NEW_TOKENS[:3]),
                             processing_class=tokenizer, peft_config=LoraConfig(**config))
    assert trainer.model.get_nb_trainable_parameters()[0] == counted.trainable_params
    # LoRA+ gives the full embedding copies the base rate, not loraplus_lr_embedding (1e-6)
    import torch
    from peft.optimizers import create_loraplus_optimizer

    loraplus = create_loraplus_optimizer(trainer.model, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=16)
    saved = {id(p) for n, p in trainer.model.named_parameters() if "modules_to_save" in n and p.requires_grad}
    assert saved and {g["lr"] for g in loraplus.param_groups for p in g["params"] if id(p) in saved} == {2e-4}
    trainer.train()
    # the new tokens' rows of the trained embedding copy moved
    new_ids = tokenizer.convert_tokens_to_ids(NEW_TOKENS[:3])
    trained = trainer.model.get_input_embeddings()
    trained = getattr(trained, "modules_to_save", {"default": trained})["default"].weight.detach()
    assert not trained[new_ids].float().allclose(embedding[new_ids].float()), f"trl {version('trl')}"


def test_loraplus_snippet_trains_lora_b_at_ratio_times_lora_a(tmp_path):
    structure = load_structure(_folder(tmp_path, "llama"))
    plan = make_recommendation("code", 20_000, model=structure.source).plan
    snippet = export_plan(plan, "peft", structure)
    namespace = {"model": make_model("llama")}
    exec(compile(snippet, "<peft snippet>", "exec"), namespace)
    model, optimizer = namespace["model"], namespace["optimizer"]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = trl.SFTTrainer(model=model, args=sft_config(tmp_path), train_dataset=dataset(),
                             processing_class=make_tokenizer(), optimizers=(optimizer, None))
    trainer.train()
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer  # accelerate wraps it
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    after = dict(model.named_parameters())
    ratio = plan.loraplus_lr_ratio
    for name, old in before.items():
        lr = lr_of[id(after[name])]
        assert lr == pytest.approx(2e-4 * (ratio if "lora_B" in name else 1)), name
        if "lora_B" in name:
            # AdamW's first step moves each weight with a gradient by lr (m/sqrt(v) = sign(g))
            moved = (after[name].detach() - old).abs()
            assert moved.max().item() == pytest.approx(ratio * 2e-4, rel=1e-2), name


def _folder(tmp_path, family):
    from tiny import write_config

    return write_config(family, tmp_path / family)

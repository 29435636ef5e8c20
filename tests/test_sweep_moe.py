"""The sweep on a tiny MoE model (CPU): trials with and without the experts (PEFT `target_parameters`)
complete, the expert adapter reloads with `PeftModel.from_pretrained` and reproduces its eval loss,
trials whose `target_parameters` differ share a successive-halving run exactly as if alone, and
DoRA on experts is refused before anything loads."""

import json

import pytest
from support.tiny import save_tiny_model

from loraplan.cli import main
from loraplan.sweeps.runner import sweep

FAST = {"training.lr_policy": "fixed", "training.max_steps": 4, "training.batch_size": 4, "training.eval_every": 2, "training.warmup_steps": 1,
        "training.learning_rate": 1e-2, "data.max_length": 64}


@pytest.fixture(scope="module")
def moe_workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_moe")
    model = save_tiny_model(root / "model", "qwen3_moe")
    lines = [json.dumps({"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}."}) for i in range(48)]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root, model


def _train_losses(folder) -> list[float]:
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if r["kind"] == "train"]


@pytest.mark.slow
def test_attention_and_expert_trials_complete_and_the_expert_adapter_reloads(moe_workspace):
    import torch
    from support.adapters import reloaded_eval_loss

    from loraplan.adapter.analyze import analyze
    from loraplan.data.batches import eval_batches
    from loraplan.data.load import load_data
    from loraplan.model.loading import load_model, load_tokenizer
    from loraplan.plan.count import count

    root, model = moe_workspace
    out = root / "ledger"
    result = sweep(model, str(root / "train.jsonl"), out=out, progress=False,
                   overrides={"grid": {"targets": ["attention", "experts"], "r": [4], "alpha": ["r"]}, **FAST})
    by_name = {r.name: r for r in result.results}
    assert {n: r.status for n, r in by_name.items()} == {"attention_r4": "completed", "experts_r4": "completed"}
    for name, r in by_name.items():
        assert r.trainable_params == count(model, targets=r.targets, rank=4).trainable_params
    config = json.loads((out / "trials" / "experts_r4" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["down_proj", "gate_up_proj"] and config["target_modules"] == []
    assert json.loads((out / "trials" / "attention_r4" / "adapter" / "adapter_config.json").read_text()).get(
        "target_parameters") in (None, [])

    tokenizer = load_tokenizer(model)
    splits = load_data(str(root / "train.jsonl"), tokenizer, max_length=64, seed=0)
    peft_model, loss = reloaded_eval_loss(model, out / "trials" / "experts_r4" / "adapter", splits.eval,
                                          tokenizer.pad_token_id)
    assert peft_model.get_nb_trainable_parameters()[0] == 0  # loaded for inference; the count is in the config
    assert loss == pytest.approx(by_name["experts_r4"].eval_loss, abs=1e-5)
    # the experts moved: the adapter is not the base model, and analyze reads it per expert
    ids, _, mask = eval_batches(splits.eval, 4)[0].tensors("cpu", tokenizer.pad_token_id)
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=mask).logits
        base_logits = load_model(model, dtype="fp32", device="cpu")(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(base_logits, logits)
    spectra = analyze(out / "trials" / "experts_r4").spectra
    assert len(spectra) == 2 * 2 * 4 and all(s.role == "experts" and s.energy > 0 for s in spectra)


@pytest.mark.slow
def test_trials_with_other_target_parameters_share_a_halving_run_exactly(moe_workspace):
    """PEFT refuses two adapters whose `target_parameters` differ on one model: the engine parks one
    while the other trains, and the parked trial's curve is the one it has when it runs alone."""
    root, model = moe_workspace
    halving = {**FAST, "halving.enabled": True, "halving.rungs": 2}
    alone = sweep(model, str(root / "train.jsonl"), out=root / "alone", progress=False,
                  overrides={"grid": {"targets": ["experts"], "r": [4], "alpha": ["r"]}, **halving})
    # the router's adapter is attached first; the experts' then parks it, and so on at every rung
    mixed = sweep(model, str(root / "train.jsonl"), out=root / "mixed", progress=False,
                  overrides={"grid": {"targets": ["router", "experts"], "r": [4], "alpha": ["r"]}, **halving})
    assert alone.results[0].status == "completed"
    assert sorted(r.status for r in mixed.results) == ["completed", "pruned"]
    expected = _train_losses(root / "alone" / "trials" / "experts_r4")
    got = _train_losses(root / "mixed" / "trials" / "experts_r4")
    assert len(got) >= 2 and got == expected[:len(got)]
    for r in mixed.results:
        assert (root / "mixed" / "trials" / r.name / "adapter" / "adapter_model.safetensors").exists()


def test_dora_on_experts_is_refused_before_loading(moe_workspace, tmp_path, capsys):
    root, model = moe_workspace
    code = main(["sweep", model, "--data", str(root / "train.jsonl"), "--out", str(tmp_path / "o"),
                 "--grid", "targets=attention,experts r=4 dora=true"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert "dora" in err.lower() and ("expert" in err or "ParamWrapper" in err)
    assert not (tmp_path / "o").exists()

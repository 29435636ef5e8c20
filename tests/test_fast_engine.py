"""The fast engine against the PEFT engine on tiny models (CPU, fp32): the same loss curves and eval
losses for the same config, seed and data (LoRA, rsLoRA and DoRA, with dropout), adapters that PEFT
loads back and that reproduce the recorded eval loss, and the trials it cannot run handed to the
PEFT engine with a note that says so."""

import json
import random

import pytest
from support.tiny import save_tiny_model

from loraplan.data.batches import eval_batches, training_steps
from loraplan.data.formats import TokenizedExample
from loraplan.plan.lora_plan import LoraPlan
from loraplan.sweeps.engine import PeftEngine
from loraplan.sweeps.fast_engine import FastEngine, dora_row_norms, make_engine
from loraplan.sweeps.folder import SweepFolder, now
from loraplan.sweeps.spec import TrainingSettings, Trial

SETTINGS = TrainingSettings(max_steps=4, batch_size=6, micro_batch_size=3, learning_rate=1e-2, warmup_steps=1,
                            eval_every=2, dtype="fp32")
TRIALS = [Trial(name="plain", plan=LoraPlan(targets="attention,mlp", r=4, lora_alpha=8, lora_dropout=0.1)),
          Trial(name="dora_rs", plan=LoraPlan(targets="attention,mlp", r=4, lora_alpha=8, use_rslora=True,
                                              use_dora=True, lora_dropout=0.1))]


def _examples(n: int, seed: int) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, 120) for _ in range(rng.randint(4, 24))]
        out.append(TokenizedExample(input_ids=ids, labels=[-100] * 2 + ids[2:]))  # a prompt of 2 tokens
    return out


def _train(engine, trials, folder, settings=SETTINGS):
    """Each trial through start/advance/finish, as the runner drives them: {name: (losses, result)}."""
    steps = training_steps(_examples(36, 1), settings.max_steps, settings.batch_size, settings.micro_batch_size, 0)
    eval_set = eval_batches(_examples(10, 2), 4)
    engine.load(pad_id=0)
    ledger = SweepFolder(folder)
    ledger.open({"spec": {}, "spec_hash": "test", "created": now()}, [t.name for t in trials])
    out = {}
    for trial in trials:
        state = engine.start(trial, ledger.trial(trial.name), {})
        engine.advance([state], steps, settings.max_steps, eval_set, settings.eval_every)
        out[trial.name] = (list(state.losses), engine.finish(state))
    engine.close()
    ledger.close()
    return out


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_models")
    return lambda family: str(save_tiny_model(root / family, family)) if not (root / family / "config.json").exists() \
        else str(root / family)


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow),
                                    pytest.param("gemma", marks=pytest.mark.slow),
                                    pytest.param("phi3", marks=pytest.mark.slow), "gpt2"])
def test_fp32_curves_equal_the_peft_engines(models, family, tmp_path):
    model = models(family)
    peft = _train(PeftEngine(model, SETTINGS), TRIALS, tmp_path / "peft")
    fast = _train(FastEngine(model, SETTINGS), TRIALS, tmp_path / "fast")
    for trial in TRIALS:
        (want, want_result), (got, got_result) = peft[trial.name], fast[trial.name]
        assert got_result.engine == "fast" and got_result.status == "completed"
        assert len(got) == len(want) == SETTINGS.max_steps
        assert max(_relative(w, g) for w, g in zip(want, got)) < 1e-4, (want, got)
        assert _relative(want_result.eval_loss, got_result.eval_loss) < 1e-4
        assert got_result.eval_batches.tokens == want_result.eval_batches.tokens
        assert got_result.trainable_params == want_result.trainable_params
        assert got_result.tokens_per_s > 0
    # the configs really differ: DoRA's curve is not LoRA's
    assert peft["plain"][0] != peft["dora_rs"][0]


def test_dora_row_norms_from_the_factors_equal_the_formed_matrix():
    import torch

    torch.manual_seed(0)
    w, a, b = torch.randn(48, 40, dtype=torch.float64), torch.randn(6, 40, dtype=torch.float64), \
        torch.randn(48, 6, dtype=torch.float64)
    want = torch.linalg.norm(w + 0.7 * b @ a, dim=1)
    assert torch.allclose(dora_row_norms(w, a, b, 0.7).double(), want, rtol=1e-6)
    # bf16 weight, fp32 factors (the GPU case): within bf16 rounding of the cross term
    got = dora_row_norms(w.bfloat16(), a.float(), b.float(), 0.7)
    assert torch.allclose(got.double(), torch.linalg.norm(w.bfloat16().double() + 0.7 * b @ a, dim=1), rtol=2e-3)


def test_lazy_steps_stop_a_diverged_trial_where_the_peft_engine_does(models, tmp_path, monkeypatch):
    """On CUDA the loss is read back only at evaluations; the trial must still stop at the step that
    diverged, with the PEFT engine's message and rows."""
    model = models("llama")
    monkeypatch.setenv("LORAPLAN_FAULT", "plain:nan@3")
    settings = SETTINGS.model_copy(update={"max_steps": 6, "eval_every": 6})

    class Lazy(FastEngine):
        def load(self, pad_id):
            super().load(pad_id)
            self._lazy = True  # what CUDA turns on

    peft = _train(PeftEngine(model, settings), TRIALS[:1], tmp_path / "peft", settings)
    lazy = _train(Lazy(model, settings), TRIALS[:1], tmp_path / "lazy", settings)
    (want, want_result), (got, got_result) = peft["plain"], lazy["plain"]
    assert got_result.status == want_result.status == "diverged"
    assert got_result.message == want_result.message == "loss is nan at step 3"
    assert got_result.steps == 3 and got_result.adapter is None
    assert got[:2] == pytest.approx(want[:2], rel=1e-4)
    rows = [json.loads(x) for x in (tmp_path / "lazy" / "trials" / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]


def test_a_trial_with_an_adapted_embedding_runs_on_peft_and_says_so(models, tmp_path):
    model = models("llama")
    trials = [Trial(name="with_embed", plan=LoraPlan(targets="q,v,embed", r=4, lora_dropout=0.0)), TRIALS[0]]
    engine = FastEngine(model, SETTINGS)
    results = _train(engine, trials, tmp_path / "fast")
    peft = _train(PeftEngine(model, SETTINGS), trials[:1], tmp_path / "peft")
    assert results["with_embed"][1].engine == "peft" and results["plain"][1].engine == "fast"
    assert results["with_embed"][0] == peft["with_embed"][0]
    assert engine.notes == [("with_embed: the fast engine cannot run lora.Embedding layers (model.embed_tokens); "
                             "it ran on the PEFT engine")]


def test_quantized_models_go_to_the_peft_engine(monkeypatch):
    """QLoRA (bitsandbytes layers) is the PEFT engine's: the fast engine hands every trial over."""
    engine = make_engine("fast", "unused", SETTINGS.model_copy(update={"quantization": "4bit"}))
    assert isinstance(engine, FastEngine)
    assert engine.blocker() == "4bit quantization (bitsandbytes layers)"
    assert isinstance(make_engine("peft", "unused", SETTINGS), PeftEngine)
    assert not isinstance(make_engine("peft", "unused", SETTINGS), FastEngine)


def test_the_sweep_with_the_fast_engine_writes_adapters_peft_reloads(models, tmp_path):
    from support.adapters import reloaded_eval_loss

    from loraplan.data.load import load_data
    from loraplan.model.loading import load_tokenizer
    from loraplan.sweeps.runner import sweep

    model = models("llama")
    lines = [json.dumps({"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}."}) for i in range(40)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    grid = {"targets": ["attention,mlp"], "r": [4], "alpha": ["r"], "dora": [False, True]}
    result = sweep(model, str(tmp_path / "train.jsonl"), out=tmp_path / "ledger", progress=False,
                   overrides={"grid": grid, "training.engine": "fast", "training.lr_policy": "fixed", "training.max_steps": 4,
                              "training.batch_size": 4, "training.eval_every": 2, "training.learning_rate": 1e-2,
                              "data.max_length": 64})
    assert [r.engine for r in result.results] == ["fast", "fast"]
    tokenizer = load_tokenizer(model)
    splits = load_data(str(tmp_path / "train.jsonl"), tokenizer, max_length=64, seed=0)
    for recorded in result.results:
        _, loss = reloaded_eval_loss(model, tmp_path / "ledger" / "trials" / recorded.name / "adapter", splits.eval,
                                     tokenizer.pad_token_id)
        assert loss == pytest.approx(recorded.eval_loss, abs=1e-5)


def test_the_engine_is_a_training_setting_and_a_flag():
    import argparse

    from loraplan.cli.sweep import overrides_from_args, register
    from loraplan.errors import UsageError
    from loraplan.sweeps.spec import load_spec

    parser = argparse.ArgumentParser()
    register(parser)
    args = parser.parse_args(["./model", "--out", "runs/x", "--engine", "peft"])
    assert overrides_from_args(args)["training.engine"] == "peft"
    assert load_spec(None, {"training.engine": "fast"}).training.engine == "fast"
    assert load_spec(None, {}).training.engine == "auto"
    with pytest.raises(UsageError, match="training.engine"):
        load_spec(None, {"training.engine": "turbo"})

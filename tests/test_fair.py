"""Fair comparisons (sweeps/fair.py, ranking.certify): the learning-rate policy, the budget, settling,
the adapters cut from a trained one and the recommendation they vouch for."""

import pytest
import torch

from loraplan.sweeps.fair import derived


def test_derived_adapter_is_the_svd_cut_and_is_restored():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    q = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    down = peft_model.base_model.model.model.layers[0].mlp.down_proj

    def delta(m):
        return m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight

    full = delta(q).detach().clone()
    before = [p.detach().clone() for p in peft_model.parameters() if p.requires_grad]
    with derived(peft_model, "default", rank=3, keep=lambda name: "q_proj" in name):
        u, s, vh = torch.linalg.svd(full)
        assert torch.allclose(delta(q), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-5)
        assert torch.linalg.matrix_rank(delta(q)) == 3
        assert float(delta(down).detach().abs().max()) == 0.0
    after = [p.detach() for p in peft_model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    with pytest.raises(RuntimeError), derived(peft_model, "default", rank=2):
        raise RuntimeError("an eval that fails still restores the weights")
    assert torch.equal(delta(q), full)


# -- the learning-rate policy in the sweep ---------------------------------------------------------

def test_lr_arms_each_config_once_per_rate():
    from loraplan.sweeps.fair import lr_arms
    from loraplan.sweeps.spec import expand, load_spec

    spec = load_spec(None, {"grid": {"targets": ["q,v", "mlp"], "r": [4]}, "training.learning_rate": 3e-3})
    arms = lr_arms(expand(spec), spec.training)
    assert [(a.name, a.config, a.learning_rate) for a in arms] == [
        ("q+v_r4_lr1e-03", "q+v_r4", 0.001), ("q+v_r4", "q+v_r4", 0.003), ("q+v_r4_lr9e-03", "q+v_r4", 0.009),
        ("mlp_r4_lr1e-03", "mlp_r4", 0.001), ("mlp_r4", "mlp_r4", 0.003), ("mlp_r4_lr9e-03", "mlp_r4", 0.009)]
    fixed = load_spec(None, {"grid": {"targets": ["q,v"], "r": [4]}, "training.lr_policy": "fixed"})
    assert [(a.name, a.learning_rate) for a in lr_arms(expand(fixed), fixed.training)] == [("q+v_r4", None)]
    # names that collide at one digit get more digits, never a dot (PEFT's adapter names cannot hold one)
    close = load_spec(None, {"grid": {"targets": ["q,v"], "r": [4]}, "training.lr_factors": [1.0, 1.1, 1.2]})
    names = [a.name for a in lr_arms(expand(close), close.training)]
    assert len(set(names)) == 3 and not any("." in n for n in names), names


def test_budget_sets_max_steps_within_the_budget():
    from loraplan.errors import UsageError
    from loraplan.sweeps.fair import cost_per_config, with_budget
    from loraplan.sweeps.spec import load_spec

    spec = with_budget(load_spec(None, {"training.budget_steps": 3000}), configs=6)
    t = spec.training
    assert cost_per_config(t) == pytest.approx(1.5, abs=0.02)  # 3 rates to 25% of the steps, one to the end
    assert 6 * cost_per_config(t) * t.max_steps <= 3000 < 6 * cost_per_config(t) * (t.max_steps + 2)
    fixed = with_budget(load_spec(None, {"training.budget_steps": 3000, "training.lr_policy": "fixed"}), configs=6)
    assert fixed.training.max_steps == 500
    with pytest.raises(UsageError, match="too small"):
        with_budget(load_spec(None, {"training.budget_steps": 5}), configs=6)


def _trial(name, evals):
    from loraplan.sweeps.folder import EvalPoint, TrialResult, TrialStatus

    t = TrialResult(name, TrialStatus.COMPLETED, eval_loss=evals[-1][1], eval_loss_sem=0.002)
    t.metrics = [EvalPoint(s, v, 0.002, 8, 0.0, 0.0) for s, v in evals]
    return t


def test_settling_says_whether_the_curve_flattened_and_how_long_it_would_take():
    from loraplan.sweeps.ranking import settling

    flat = _trial("flat", [(50, 4.30), (100, 4.20), (150, 4.199)])
    assert settling([flat], 0.004)[0] is True
    slowing = _trial("slowing", [(50, 4.40), (100, 4.20), (150, 4.10)])  # halves every 50 steps
    settled, note = settling([slowing], 0.004)
    # 0.1 · 0.5^n ≤ 0.004 after n = 5 more intervals of 50 steps
    assert settled is False and "slowing" in note and "about 400 steps" in note
    steady = _trial("steady", [(50, 4.40), (100, 4.30), (150, 4.20)])
    settled, note = settling([steady], 0.004)
    assert settled is False and "not slowing down" in note
    assert settling([_trial("short", [(50, 4.4), (100, 4.3)])], 0.004)[0] is None


@pytest.mark.slow
def test_per_config_sweep_keeps_each_configs_best_rate(tmp_path):
    """The default policy: every config at three rates to the screen step; the best goes on to the
    end, the others are pruned; the ledger, summary and report say which rate each config got, the
    budget caps the steps, and a second run trains nothing."""
    import json

    from support.tiny import save_tiny_model

    from loraplan.sweeps.runner import sweep

    model = save_tiny_model(tmp_path / "model", "llama")
    lines = [json.dumps({"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}."}) for i in range(48)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    overrides = {"grid": {"targets": ["q,v", "mlp"], "r": [2, 4], "alpha": ["r"]}, "training.budget_steps": 72,
                 "training.batch_size": 4, "training.eval_every": 3, "training.warmup_steps": 1,
                 "training.learning_rate": 1e-2, "data.max_length": 64}
    out = tmp_path / "s"
    result = sweep(model, str(tmp_path / "train.jsonl"), out=out, overrides=overrides, progress=False)
    by_config = {}
    for r in result.results:
        by_config.setdefault(r.config, []).append(r)
    assert set(by_config) == {"q+v_r2", "q+v_r4", "mlp_r2", "mlp_r4"}
    max_steps = json.loads((out / "sweep.json").read_text())["spec"]["training"]["max_steps"]
    assert max_steps == 12 and sum(r.steps for r in result.results) <= 72  # 4 configs × (3 × 3 + 9)
    for config, arms in by_config.items():
        assert sorted(a.learning_rate for a in arms) == [0.00333, 0.01, 0.03]
        done = [a for a in arms if a.status == "completed"]
        pruned = [a for a in arms if a.status == "pruned"]
        assert len(done) == 1 and len(pruned) == 2 and done[0].steps == max_steps
        assert all(p.steps == 3 and "stopped at step 3" in p.message for p in pruned)
        assert all(done[0].evals[0].eval_loss <= p.eval_loss for p in pruned)  # the best rate at the screen
        assert json.loads((out / "trials" / done[0].name / "plan.json").read_text())["training"]["learning_rate"] \
            == done[0].learning_rate
        # a family's top rank carries its ΔW cut to the lower rank, on the same eval batches
        cut = done[0].certificates
        if done[0].r == 4:
            assert set(cut) == {"2"} and len(cut["2"]) == len(done[0].eval_batches.loss)
        else:
            assert cut is None
    s = result.summary
    assert s.lr_policy == "per-config" and s.settled in (True, False) and s.settle_note
    assert set(s.ranking) == {a.name for arms in by_config.values() for a in arms if a.status == "completed"}
    text = (out / "summary.md").read_text()
    assert "each config at its own best learning rate" in text and "ettled" in text
    assert "lr=" in (out / "report.html").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/result.json")}
    again = sweep(model, str(tmp_path / "train.jsonl"), out=out, overrides=overrides, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/result.json")} == stamps
    assert again.summary.recommended == s.recommended


def test_grid_from_probe_keeps_both_sides_of_what_the_probe_cannot_tell():
    from loraplan.sweeps.runner import grid_from_probe

    grid = grid_from_probe({"plan": {"targets": "up,gate", "r": 8},
                            "uncertain": ["targets: attention or mlp", "rank"]})
    assert grid["targets"] == ["up,gate", "attention", "mlp", "all-linear"] and grid["r"] == [2, 4, 8, 16]
    assert grid_from_probe({"plan": {"targets": "up,gate", "r": 8}, "uncertain": []}) == {
        "targets": ["up,gate", "all-linear"], "r": [4, 8, 16], "alpha": ["r"]}
    assert grid_from_probe({"plan": {"targets": "mlp", "r": 8}})["targets"] == ["mlp", "attention", "all-linear"]


def test_a_cut_within_noise_of_the_best_vouches_for_its_rank():
    """mlp_r8 is best; mlp_r4's own run is clearly worse, but mlp_r8's ΔW cut to r=4 is as good as
    mlp_r8: r=4 holds the change, so mlp_r4 (fewer parameters) is recommended. A cut to r=2 that is
    clearly worse vouches for nothing."""
    from loraplan.sweeps.folder import EvalBatches, TrialResult, TrialStatus
    from loraplan.sweeps.ranking import summarize

    tokens = [100] * 6
    base = [4.00, 4.10, 4.05, 3.95, 4.02, 4.08]

    def trial(name, r, shift, cuts=None):
        losses = [x + shift for x in base]
        return TrialResult(name, TrialStatus.COMPLETED, targets="mlp", r=r, lora_alpha=float(r),
                           trainable_params=1000 * r, eval_loss=sum(losses) / 6, eval_loss_sem=0.02,
                           eval_batches=EvalBatches(losses, tokens), certificates=cuts, steps=200)

    wobble = [0.001, -0.001, 0.002, -0.002, 0.001, -0.001]
    lead = trial("mlp_r8", 8, 0.0, {"4": [x + w for x, w in zip(base, wobble)], "2": [x + 0.1 for x in base]})
    results = [lead, trial("mlp_r4", 4, 0.05), trial("mlp_r2", 2, 0.12)]
    s = summarize(results)
    assert s.best == "mlp_r8" and s.recommended == "mlp_r4" and set(s.certified) == {"mlp_r4"}
    assert "cut to r=4 by SVD" in s.reason and "learns slower" in s.reason
    lead.certificates = {"2": [x + 0.1 for x in base]}
    assert summarize(results).recommended == "mlp_r8"


@pytest.mark.slow
def test_per_config_rates_then_halving_across_configs(tmp_path):
    """With halving on, each config's best rate survives the screen, then the configs halve at the
    rungs after it: one config completes, the other is pruned by successive halving."""
    import json

    from support.tiny import save_tiny_model

    from loraplan.sweeps.runner import sweep

    model = save_tiny_model(tmp_path / "model", "llama")
    lines = [json.dumps({"text": f"item {i} costs {3 * i} coins."}) for i in range(40)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    result = sweep(model, str(tmp_path / "train.jsonl"), out=tmp_path / "s", progress=False,
                   overrides={"grid": {"targets": ["q,v", "mlp"], "r": [4]}, "training.lr_factors": [0.5, 2.0],
                              "training.max_steps": 8, "training.batch_size": 4, "training.eval_every": 2,
                              "training.warmup_steps": 1, "training.learning_rate": 1e-2, "data.max_length": 32,
                              "halving.enabled": True, "halving.rungs": 2})
    statuses = sorted((r.status.value, r.steps) for r in result.results)
    assert statuses == [("completed", 8), ("pruned", 2), ("pruned", 2), ("pruned", 4)], statuses
    halved = next(r for r in result.results if r.steps == 4)
    assert "successive halving" in halved.message and result.summary.recommended not in (None, halved.name)


def test_a_kept_rate_at_the_grids_edge_is_warned():
    from loraplan.sweeps.fair import rate_edge_warnings
    from loraplan.sweeps.folder import TrialResult, TrialStatus
    from loraplan.sweeps.spec import load_spec

    t = load_spec(None, {"training.learning_rate": 3e-3}).training
    results = [TrialResult("a_lr9e-03", TrialStatus.COMPLETED, learning_rate=0.009, config="a"),
               TrialResult("b", TrialStatus.COMPLETED, learning_rate=0.003, config="b"),
               TrialResult("b_lr9e-03", TrialStatus.PRUNED, learning_rate=0.009, config="b")]
    (warning,) = rate_edge_warnings(results, t)
    assert "highest learning rate tried (0.009: a)" in warning and "raise training.learning_rate" in warning
    assert rate_edge_warnings(results, load_spec(None, {"training.lr_policy": "fixed"}).training) == []

"""`loraplan diagnose`: synthetic trainer_state.json curves for every verdict and for healthy runs
(no false alarm), and sweep ledgers written exactly as docs/sweep-dir.md describes."""

from __future__ import annotations

import json
import math
import random

import pytest
from support.cli import one_line_error, run_cli

from loraplan.diagnosis import diagnose

STEPS = range(5, 505, 5)  # logging_steps=5 over 500 steps
EVAL_STEPS = range(50, 550, 50)


def trainer_state(folder, train, evals, name="trainer_state.json"):
    """A transformers trainer_state.json with these (step, loss) points."""
    folder.mkdir(parents=True, exist_ok=True)
    history = []
    for step, loss in train:
        history.append({"epoch": step / 500, "grad_norm": 1.0, "learning_rate": 2e-4, "loss": loss, "step": step})
    for step, loss in evals:
        history.append({"epoch": step / 500, "eval_loss": loss, "eval_runtime": 1.0, "step": step})
    history.sort(key=lambda e: e["step"])
    history.append({"epoch": 1.0, "step": 500, "total_flos": 1.0, "train_loss": 1.0, "train_runtime": 10.0})
    state = {"global_step": 500, "max_steps": 500, "logging_steps": 5, "eval_steps": 50, "log_history": history}
    path = folder / name
    path.write_text(json.dumps(state))
    return path


def curve(fn, steps, noise, seed):
    rng = random.Random(seed)
    return [(s, fn(s) * (1 + rng.gauss(0, noise))) for s in steps]


def healthy(seed, fast=False):
    if fast:  # a quick first drop, then a slow steady decline: still learning at the end
        train = curve(lambda t: 1.0 + 1.0 * math.exp(-t / 20) + 0.4 * (1 - t / 500), STEPS, 0.06, seed)
        evals = curve(lambda t: 1.15 + 0.9 * math.exp(-t / 20) + 0.35 * (1 - t / 500), EVAL_STEPS, 0.004, seed + 1)
    else:
        train = curve(lambda t: 1.0 + 1.3 * math.exp(-t / 150), STEPS, 0.08, seed)
        evals = curve(lambda t: 1.1 + 1.2 * math.exp(-t / 150), EVAL_STEPS, 0.004, seed + 1)
    return train, evals


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("fast", [False, True])
def test_healthy_noisy_curves_raise_nothing(tmp_path, seed, fast):
    result = diagnose(trainer_state(tmp_path, *healthy(seed, fast)))
    assert result.findings == [], [f.message for f in result.findings]
    assert result.healthy


def findings_of(tmp_path, train, evals):
    result = diagnose(trainer_state(tmp_path, train, evals))
    return result, {f.evidence.get("check"): f for f in result.findings}


def test_overfitting_eval_turns_up_while_train_falls(tmp_path):
    train = curve(lambda t: 0.3 + 1.5 * math.exp(-t / 100), STEPS, 0.05, 0)
    evals = curve(lambda t: 1.2 + 1.0 * math.exp(-t / 60) + 0.0012 * t, EVAL_STEPS, 0.003, 1)
    result, found = findings_of(tmp_path, train, evals)
    f = found["eval_rising"]
    assert f.kind == "overfitting" and f.rank == "lower"
    assert f.evidence["best_step"] in (150, 200, 250) and f.evidence["last_step"] == 500
    assert f.evidence["train_end"] < f.evidence["train_at_best"]
    assert "underfitting" not in {x.kind for x in result.findings}


def test_train_loss_near_zero(tmp_path):
    train = curve(lambda t: 0.01 + 2 * math.exp(-t / 40), STEPS, 0.05, 0)
    evals = curve(lambda t: 1.3 + 0.0004 * t, EVAL_STEPS, 0.002, 1)
    _, found = findings_of(tmp_path, train, evals)
    f = found["near_zero"]
    assert f.kind == "overfitting" and f.rank == "lower" and f.evidence["train_end"] < 0.05
    assert "eval_rising" in found


def test_early_plateau_is_underfitting(tmp_path):
    train = curve(lambda t: 1.6 + 0.8 * math.exp(-t / 15), STEPS, 0.05, 0)
    evals = curve(lambda t: 1.7 + 0.8 * math.exp(-t / 15), EVAL_STEPS, 0.002, 1)
    _, found = findings_of(tmp_path, train, evals)
    f = found["plateau"]
    assert f.kind == "underfitting" and f.rank == "higher"
    assert f.evidence["curve"] == "train" and f.evidence["plateau_step"] <= 100


def test_a_loss_that_never_moves(tmp_path):
    train = curve(lambda t: 2.0, STEPS, 0.05, 0)
    evals = curve(lambda t: 2.1, EVAL_STEPS, 0.002, 1)
    _, found = findings_of(tmp_path, train, evals)
    f = found["no_progress"]
    assert f.kind == "underfitting" and f.rank == "higher" and abs(f.evidence["change"]) < 0.05
    assert "plateau" not in found


def test_nan_is_an_error_with_its_step(tmp_path):
    train, evals = healthy(0)
    train = [(s, math.nan if s >= 300 else v) for s, v in train]
    result, found = findings_of(tmp_path, train, evals)
    f = found["non_finite"]
    assert f.severity == "error" and f.kind == "instability" and f.evidence["step"] == 300
    assert f.evidence["last_finite"][0] == 295
    assert not result.healthy


def test_spikes(tmp_path):
    train, evals = healthy(0)
    train = [(s, v * 3 if s in (200, 355) else v) for s, v in train]
    _, found = findings_of(tmp_path, train, evals)
    f = found["spikes"]
    assert f.kind == "instability" and f.evidence["count"] == 2
    assert {x["step"] for x in f.evidence["spikes"]} == {200, 355}


def test_divergence(tmp_path):
    train = curve(lambda t: 1.0 + math.exp(-t / 50) if t < 250 else 1.0 + (t - 250) / 125, STEPS, 0.03, 0)
    _, found = findings_of(tmp_path, train, [])
    f = found["divergence"]
    assert f.severity == "error" and 200 <= f.evidence["min_step"] <= 260 and f.evidence["end"] > 2.5


def test_checkpoint_folders_and_adapter_config(tmp_path, capsys):
    train, evals = healthy(0)
    trainer_state(tmp_path / "out" / "checkpoint-100", train[:20], evals[:2])
    trainer_state(tmp_path / "out" / "checkpoint-500", train, evals)
    (tmp_path / "out" / "checkpoint-500" / "adapter_config.json").write_text(
        json.dumps({"r": 16, "lora_alpha": 32, "use_rslora": False, "peft_type": "LORA"}))
    result = diagnose(tmp_path / "out")
    assert result.kind == "trainer_state" and result.runs[0].name == "checkpoint-500"
    assert result.runs[0].r == 16 and result.runs[0].scale == 2.0
    code, out, err = run_cli(["diagnose", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert "no problem found" in out and "checkpoint-500" in out


# -- the sweep ledger (docs/sweep-dir.md) ---------------------------------------------------------


def write_trial(sweep, name, r, alpha, eval_loss, sem=0.004, targets="attention,mlp", rslora=False,
                status="completed", train=None, evals=None, message=None, config=None):
    folder = sweep / "trials" / name
    folder.mkdir(parents=True)
    train = train if train is not None else curve(lambda t: eval_loss - 0.1 + math.exp(-t / 30), range(1, 101),
                                                  0.05, r)
    evals = evals if evals is not None else [(s, eval_loss + 0.8 * math.exp(-s / 30)) for s in (25, 50, 75, 100)]
    peft = {"r": r, "lora_alpha": float(alpha), "target_modules": ["q_proj", "v_proj"], "use_rslora": rslora,
            "use_dora": False}
    (folder / "plan.json").write_text(json.dumps({
        "name": name,
        "plan": {"targets": targets, "r": r, "lora_alpha": alpha, "use_rslora": rslora, "use_dora": False,
                 "loraplus_lr_ratio": None},
        "peft_config": peft,
        "training": {"max_steps": 100, "batch_size": 8, "learning_rate": 2e-4, "seed": 0, "eval_every": 25}}))
    lines = [json.dumps({"kind": "train", "step": s, "train_loss": v, "lr": 2e-4, "tokens": 4096, "elapsed_s": s / 2})
             for s, v in train]
    lines += [json.dumps({"kind": "eval", "step": s, "eval_loss": v, "eval_loss_sem": sem, "eval_batches": 8,
                          "elapsed_s": s / 2}) for s, v in evals]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if status is not None:
        (folder / "result.json").write_text(json.dumps({
            "name": name, "status": status, "message": message, "targets": targets, "r": r, "lora_alpha": float(alpha),
            "use_rslora": rslora, "use_dora": False, "loraplus_lr_ratio": None, "trainable_params": 1000 * r,
            "eval_loss": eval_loss if status == "completed" else None, "eval_loss_sem": sem, "train_loss": None if eval_loss is None else eval_loss - 0.1,
            "steps": 100, "wall_s": 10.0, "tokens_per_s": 5000.0, "peak_memory_bytes": 1 << 30,
            "started": "2026-11-22T12:00:00+00:00", "finished": "2026-11-22T12:01:00+00:00",
            "learning_rate": 2e-4, "config": config}))
    return folder


def write_sweep(sweep, names, noise=0.006):
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "sweep.json").write_text(json.dumps({
        "format": 1, "loraplan": "0.1.0", "created": "2026-11-22T12:00:00+00:00", "model": "tiny", "spec": {},
        "spec_hash": "0" * 16, "environment": {}, "data": {}, "trials": names}))
    (sweep / "summary.json").write_text(json.dumps({"ranking": names, "best": names[0], "recommended": names[0],
                                                    "noise": noise, "reason": "", "failed": {}}))


def test_sweep_with_fixed_alpha_underfit_and_overfit_ranks(tmp_path, capsys):
    """Each rank at its own best learning rate (a per-config sweep: `config` recorded): lower ranks
    clearly worse is underfitting, and diagnose says to raise r."""
    sweep = tmp_path / "sweep"
    losses = {4: 1.60, 8: 1.50, 16: 1.42, 64: 1.48}
    names = [f"full_r{r}" for r in losses]
    write_sweep(sweep, names)
    for r, loss in losses.items():
        write_trial(sweep, f"full_r{r}", r, 16, loss, config=f"full_r{r}")
    result = diagnose(sweep)
    kinds = {(f.kind, f.rank) for f in result.findings}
    assert ("alpha_trap", None) in kinds
    assert ("underfitting", "higher") in kinds and ("overfitting", "lower") in kinds
    trap = next(f for f in result.findings if f.kind == "alpha_trap")
    assert trap.evidence["ranks"] == [4, 8, 16, 64] and "Alpha/Rank Ratio Confusion" in trap.message
    under = next(f for f in result.findings if f.kind == "underfitting")
    assert [w["r"] for w in under.evidence["worse"]] == [4, 8] and under.evidence["best_r"] == 16
    assert "confounded" in under.message
    over = next(f for f in result.findings if f.kind == "overfitting")
    assert [w["r"] for w in over.evidence["worse"]] == [64]
    code, out, err = run_cli(["diagnose", str(sweep)], capsys)
    assert code == 0, err
    assert "[warning] alpha trap" in out and "→ raise r" in out and "→ lower r" in out
    code, out, _ = run_cli(["diagnose", str(sweep), "--json"], capsys)
    data = json.loads(out)
    assert data["kind"] == "sweep" and len(data["runs"]) == 4 and not data["healthy"]


def test_lower_ranks_worse_at_one_learning_rate_is_no_reason_to_raise_r(tmp_path, capsys):
    """All ranks at one learning rate (lr_policy fixed, alpha = r): a higher rank wins a short run by
    learning faster, so the finding is a note that asks for a per-config sweep, never "raise r"."""
    sweep = tmp_path / "sweep"
    losses = {2: 1.60, 4: 1.50, 8: 1.42}
    write_sweep(sweep, [f"mlp_r{r}" for r in losses])
    for r, loss in losses.items():
        write_trial(sweep, f"mlp_r{r}", r, r, loss)
    result = diagnose(sweep)
    assert "underfitting" not in {f.kind for f in result.findings}
    note = next(f for f in result.findings if f.kind == "note")
    assert note.rank is None and "lr 0.0002" in note.message and "lr_policy: per-config" in note.advice
    code, out, err = run_cli(["diagnose", str(sweep)], capsys)
    assert code == 0, err
    assert "raise r" not in out and "per-config" in out


def test_sweep_within_noise_with_alpha_equal_r_is_healthy(tmp_path):
    sweep = tmp_path / "sweep"
    losses = {8: 1.421, 16: 1.418, 32: 1.420}
    write_sweep(sweep, [f"full_r{r}" for r in losses])
    for r, loss in losses.items():
        write_trial(sweep, f"full_r{r}", r, r, loss)
    result = diagnose(sweep)
    assert result.findings == [], [f.message for f in result.findings]


def test_rslora_with_fixed_alpha_is_not_the_trap(tmp_path):
    sweep = tmp_path / "sweep"
    write_sweep(sweep, ["a", "b"])
    write_trial(sweep, "a", 8, 16, 1.42, rslora=True)
    write_trial(sweep, "b", 32, 16, 1.421, rslora=True)
    assert not [f for f in diagnose(sweep).findings if f.kind == "alpha_trap"]


def test_failed_and_unfinished_trials(tmp_path):
    sweep = tmp_path / "sweep"
    write_sweep(sweep, ["ok", "big", "nan", "running"])
    write_trial(sweep, "ok", 8, 8, 1.42)
    write_trial(sweep, "big", 128, 128, None, status="oom", message="CUDA out of memory", train=[], evals=[])
    train = [(s, 2.0 - s / 100 if s < 40 else math.nan) for s in range(1, 60)]
    write_trial(sweep, "nan", 64, 64, None, status="diverged", message="loss is NaN", train=train, evals=[])
    running = write_trial(sweep, "running", 16, 16, 1.4, status=None)
    with (running / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 101, "train_lo')  # a line being appended
    result = diagnose(sweep)
    by_trial = {f.trial: f for f in result.findings}
    assert by_trial["big"].kind == "note" and "out of memory" in by_trial["big"].message
    assert by_trial["nan"].severity == "error" and by_trial["nan"].evidence["step"] == 40
    assert by_trial["running"].kind == "note" and by_trial["running"].evidence["status"] == "unfinished"
    assert [f.kind for f in result.findings if f.trial == "running"] == ["note"]
    assert "ok" not in by_trial


def test_single_trial_folder(tmp_path):
    folder = write_trial(tmp_path, "full_r64", 64, 64, 1.3,
                         train=curve(lambda t: 0.02 + 2 * math.exp(-t / 10), range(1, 101), 0.05, 0))
    result = diagnose(folder)
    assert result.kind == "trial" and result.runs[0].r == 64
    assert [f.evidence["check"] for f in result.findings] == ["near_zero"]
    assert result.findings[0].trial is None


def test_bad_runs_are_one_line_errors(tmp_path, capsys):
    one_line_error(capsys, ["diagnose", str(tmp_path / "missing")], "no such file or folder")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["diagnose", str(tmp_path / "empty")], "holds no run")
    (tmp_path / "bad.json").write_text("{not json")
    one_line_error(capsys, ["diagnose", str(tmp_path / "bad.json")], "not valid JSON")
    (tmp_path / "other.json").write_text(json.dumps({"global_step": 3}))
    one_line_error(capsys, ["diagnose", str(tmp_path / "other.json")], "log_history")
    trainer_state(tmp_path / "early", [], [])
    one_line_error(capsys, ["diagnose", str(tmp_path / "early")], "no losses")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"kind": "train"\n')
    one_line_error(capsys, ["diagnose", str(broken)], "has no metrics yet")
    # a bad line before good ones is skipped with a note, as every reader of the folder does (docs/sweep-dir.md)
    (broken / "metrics.jsonl").write_text('{"kind": "train"\n{"kind": "train", "step": 1, "train_loss": 2.0}\n')
    code, out, err = run_cli(["diagnose", str(broken)], capsys)
    assert code == 0 and "note: broken/metrics.jsonl: 1 unreadable line skipped (line 1)" in out, err


def test_a_lower_rank_that_a_cut_vouches_for_is_not_underfitting(tmp_path):
    """Per-config sweep: mlp_r8 best, mlp_r4 and mlp_r2 clearly worse in their own runs, but mlp_r8's
    ΔW cut to r=4 matches it: the advice is r ≥ 4 (r=2's cut is clearly worse), not r ≥ 8."""
    sweep = tmp_path / "sweep"
    names = ["mlp_r8", "mlp_r4", "mlp_r2"]
    write_sweep(sweep, names)
    base = [1.40, 1.45, 1.42, 1.38, 1.41, 1.44]
    for name, r, shift in (("mlp_r8", 8, 0.0), ("mlp_r4", 4, 0.05), ("mlp_r2", 2, 0.12)):
        folder = write_trial(sweep, name, r, r, sum(base) / 6 + shift, targets="mlp", config=name)
        result = json.loads((folder / "result.json").read_text())
        result["eval_batches"] = {"loss": [x + shift for x in base], "tokens": [100] * 6}
        if r == 8:
            result["certificates"] = {"4": [x + 0.001 * (-1) ** i for i, x in enumerate(base)],
                                      "2": [x + 0.1 for x in base]}
        (folder / "result.json").write_text(json.dumps(result))
    under = [f for f in diagnose(sweep).findings if f.kind == "underfitting" and f.evidence.get("group")]
    assert len(under) == 1 and under[0].advice == "use r ≥ 4 for targets mlp", [f.message for f in under]
    assert [w["r"] for w in under[0].evidence["worse"]] == [2] and "cut to r=4" in under[0].message

"""A sweep SIGKILLed at seeded random moments, and the same command run again after each kill: the
ledger loses no finished trial and runs none of them again (their result.json and metrics.jsonl stay
byte for byte), and the last run completes every trial. The moments are spread over the run: each
kill waits for a seeded number of trial files to appear (a trial starting, logging, finishing) and
then a seeded fraction of a second, so they land in model loading, mid-trial, while results and
adapters are written, and between trials."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.tiny import save_tiny_model

from loraplan.sweeps.folder import TrialStatus, read_sweep

SEED = 25
KILLS = int(os.environ.get("LORAPLAN_KILLS", "3"))  # more for a soak run: LORAPLAN_KILLS=20


def _events(out: Path) -> int:
    """How far the sweep got: the files in its folder (the lock and sweep.json before the model loads,
    then each trial's plan.json, metrics.jsonl, adapter/ and result.json)."""
    return sum(1 for _ in out.rglob("*")) if out.is_dir() else 0


def _finished(out: Path) -> dict[str, bytes]:
    """{trial: result.json + metrics.jsonl bytes} of every trial the ledger holds as finished."""
    if not (out / "sweep.json").is_file():
        return {}
    sweep = read_sweep(out)
    return {t.name: (out / "trials" / t.name / "result.json").read_bytes()
            + (out / "trials" / t.name / "metrics.jsonl").read_bytes()
            for t in sweep.trials if t.status.finished}


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_and_reruns_nothing(tmp_path):
    model = save_tiny_model(tmp_path / "model", "llama")
    rows = [json.dumps({"prompt": f"Q{i}: {i}+{i}?", "completion": f" {2 * i}."}) for i in range(24)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "loraplan.cli", "sweep", model, "--data", str(tmp_path / "train.jsonl"),
            "--out", str(out), "--grid", "targets=q,v;mlp r=2,4", "--lr-policy", "fixed", "--max-steps", "3", "--eval-every", "2",
            "--batch-size", "2", "--max-length", "32", "--engine", "peft", "--json"]
    rng = random.Random(SEED)
    kept: dict[str, bytes] = {}
    kills = []
    for _ in range(KILLS):
        start = _events(out)
        wait_for = start + rng.randint(1, 14)  # 4 trials × (plan, metrics, adapter/ and its files, result)
        jitter = rng.uniform(0.0, 0.4)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
        t0 = time.monotonic()
        while proc.poll() is None and _events(out) < wait_for and time.monotonic() - t0 < 60:
            time.sleep(0.02)
        time.sleep(jitter)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append((wait_for - start, round(jitter, 2), proc.returncode))
        now = _finished(out)
        for name, data in kept.items():
            assert now.get(name) == data, f"finished trial {name} lost or rerun after kills {kills}"
        kept = now
    done = subprocess.run(argv, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    sweep = read_sweep(out)
    assert [t.status for t in sweep.trials] == [TrialStatus.COMPLETED] * 4, (kills, sweep.counts())
    final = _finished(out)
    for name, data in kept.items():
        assert final[name] == data, f"finished trial {name} was rerun"
    for t in sweep.trials:
        assert (out / "trials" / t.name / "adapter" / "adapter_model.safetensors").is_file()
        assert not list((out / "trials" / t.name).glob(".*tmp*")), "a temporary file was left behind"
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["ranking"]) == sorted(t.name for t in sweep.trials)
    print("kills (files awaited, extra seconds, exit code):", kills)
    assert any(code == -signal.SIGKILL for *_, code in kills), f"no run was killed: {kills}"


@pytest.mark.slow
def test_a_cut_result_is_damaged_and_the_rerun_runs_it_again(tmp_path):
    """A result.json cut short (or holding a wrong type) is `damaged`, never "not started" nor
    completed, and the same command runs that trial again while the others stay as they were."""
    from loraplan.sweeps.runner import sweep

    model = save_tiny_model(tmp_path / "model", "llama")
    rows = [json.dumps({"prompt": f"Q{i}: {i}+{i}?", "completion": f" {2 * i}."}) for i in range(16)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "sweep"
    overrides = {"grid": {"targets": ["q,v", "mlp"], "r": [2]}, "training.max_steps": 2, "training.eval_every": 2, "training.lr_policy": "fixed",
                 "training.batch_size": 2, "training.engine": "peft", "data.max_length": 32}
    sweep(model, str(tmp_path / "train.jsonl"), out=out, overrides=overrides, progress=False)
    cut, wrong = (out / "trials" / n / "result.json" for n in ("q+v_r2", "mlp_r2"))
    cut.write_bytes(cut.read_bytes()[:50])
    wrong.write_text(json.dumps({**json.loads(wrong.read_text()), "eval_loss": "low"}))
    assert [t.status for t in read_sweep(out).trials] == [TrialStatus.DAMAGED] * 2
    result = sweep(model, str(tmp_path / "train.jsonl"), out=out, overrides=overrides, progress=False)
    assert [r.status for r in result.results] == [TrialStatus.COMPLETED] * 2
    assert isinstance(json.loads(wrong.read_text())["eval_loss"], float)

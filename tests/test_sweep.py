"""The sweep on a tiny model (CPU, seconds): the ledger, resuming after SIGKILL, failures recorded,
spec errors, and adapters that reproduce their recorded eval loss."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.tiny import save_tiny_model

from loraplan.cli import main
from loraplan.sweeps.runner import sweep

GRID = {"targets": ["q,v", "attention", "attention,mlp"], "r": [4], "alpha": ["r"]}
# the ledger's mechanics at one learning rate (the per-config policy has its own tests: test_fair.py)
FAST = {"training.lr_policy": "fixed", "training.max_steps": 6, "training.batch_size": 4, "training.eval_every": 3,
        "training.warmup_steps": 1,
        "training.learning_rate": 1e-2, "data.max_length": 64}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model = save_tiny_model(root / "model", "llama")
    lines = [json.dumps({"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}."}) for i in range(48)]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root, model


def run_cli(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "loraplan.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.slow
def test_three_trials_write_the_ledger(workspace):
    root, model = workspace
    out = root / "ledger"
    result = sweep(model, str(root / "train.jsonl"), out=out, overrides={"grid": GRID, **FAST}, progress=False)
    names = [t.name for t in result.trials]
    assert names == ["q+v_r4", "attention_r4", "attention+mlp_r4"]
    header = json.loads((out / "sweep.json").read_text())
    assert header["trials"] == names and header["data"]["format"] == "prompt_completion"
    assert header["environment"]["peft"] and header["spec_hash"]
    for name in names:
        folder = out / "trials" / name
        assert {p.name for p in folder.iterdir()} >= {"plan.json", "metrics.jsonl", "result.json", "adapter"}
        result_json = json.loads((folder / "result.json").read_text())
        assert result_json["status"] == "completed" and result_json["steps"] == 6
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
        assert [r["step"] for r in rows if r["kind"] == "eval"] == [3, 6]
        assert (folder / "adapter" / "adapter_config.json").exists()
        assert (folder / "adapter" / "adapter_model.safetensors").exists()
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("name,status")
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["ranking"]) == sorted(names) and summary["recommended"] in names
    assert "Recommended" in (out / "summary.md").read_text()
    assert (out / "report.html").exists()
    # trainable params recorded from the live adapter equal loraplan's exact count
    from loraplan.plan.count import count

    for r in result.results:
        assert r.trainable_params == count(model, targets=r.targets, rank=4).trainable_params


@pytest.mark.slow
def test_adapter_reloads_and_reproduces_its_eval_loss(workspace):
    root, model = workspace
    out = root / "ledger"
    if not (out / "summary.json").exists():
        pytest.skip("needs test_three_trials_write_the_ledger")
    import torch
    from peft import PeftModel

    from loraplan.autograd.lm_loss import causal_lm_loss_sum
    from loraplan.data.batches import eval_batches
    from loraplan.data.load import load_data
    from loraplan.model.loading import load_model, load_tokenizer
    from loraplan.sweeps.engine import weighted_mean_sem

    tokenizer = load_tokenizer(model)
    splits = load_data(str(root / "train.jsonl"), tokenizer, max_length=64, seed=0)
    recorded = json.loads((out / "trials" / "attention_r4" / "result.json").read_text())
    peft_model = PeftModel.from_pretrained(load_model(model, dtype="fp32", device="cpu"),
                                           str(out / "trials" / "attention_r4" / "adapter")).eval()
    losses, counts = [], []
    with torch.no_grad():
        for mb in eval_batches(splits.eval, 4):
            ids, labels, mask = mb.tensors("cpu", tokenizer.pad_token_id)
            losses.append(float(causal_lm_loss_sum(peft_model(input_ids=ids, attention_mask=mask).logits, labels)) / mb.supervised)
            counts.append(mb.supervised)
    assert weighted_mean_sem(losses, counts)[0] == pytest.approx(recorded["eval_loss"], abs=1e-5)


@pytest.mark.slow
def test_sigkill_mid_trial_then_rerun_finishes_without_redoing(workspace):
    root, model = workspace
    out = root / "killed"
    args = ["sweep", model, "--data", str(root / "train.jsonl"), "--out", str(out), "--grid",
            "targets=q,v;attention;mlp r=4", "--max-steps", "6", "--lr-policy", "fixed", "--batch-size", "4",
            "--eval-every", "3", "--max-length", "64", "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "loraplan.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "LORAPLAN_FAULT": "attention_r4:hang@4"})
    metrics = out / "trials" / "attention_r4" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"train"') >= 3):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = out / "trials" / "q+v_r4" / "result.json"
    assert first.exists() and not (out / "trials" / "attention_r4" / "result.json").exists()
    before = first.read_text()
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    assert first.read_text() == before  # the finished trial was not run again
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # restarted cleanly
    summary = json.loads(done.stdout)["summary"]
    assert len(summary["ranking"]) == 3


@pytest.mark.slow
def test_nan_and_oom_are_recorded_and_the_sweep_goes_on(workspace):
    root, model = workspace
    out = root / "faults"
    done = run_cli("sweep", model, "--data", str(root / "train.jsonl"), "--out", str(out), "--grid",
                   "targets=q,v;attention;mlp r=4", "--max-steps", "6", "--lr-policy", "fixed", "--batch-size", "4",
                   "--max-length", "64", env={"LORAPLAN_FAULT": "q+v_r4:nan@2,attention_r4:oom@3"})
    assert done.returncode == 0, done.stderr
    results = {n: json.loads((out / "trials" / n / "result.json").read_text()) for n in ("q+v_r4", "attention_r4", "mlp_r4")}
    assert results["q+v_r4"]["status"] == "diverged" and "step 2" in results["q+v_r4"]["message"]
    assert results["attention_r4"]["status"] == "oom" and "step 3" in results["attention_r4"]["message"]
    assert results["mlp_r4"]["status"] == "completed" and math.isfinite(results["mlp_r4"]["eval_loss"])
    nan_rows = [json.loads(x) for x in (out / "trials" / "q+v_r4" / "metrics.jsonl").read_text().splitlines()]
    assert math.isnan(nan_rows[-1]["train_loss"])  # the raw loss is logged, not filtered
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recommended"] == "mlp_r4" and summary["failed"] == {"q+v_r4": "diverged", "attention_r4": "oom"}
    assert "diverged" in (out / "summary.md").read_text()


def test_a_bad_spec_lists_every_error_at_once(workspace, tmp_path, capsys):
    root, model = workspace
    spec = tmp_path / "sweep.yaml"
    spec.write_text("training:\n  max_step: 10\n  learning_rate: -1\ngrid:\n  targets: [q]\n  r: [8, 0]\nhalvng: {}\n")
    code = main(["sweep", model, "--data", str(root / "train.jsonl"), "--config", str(spec), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "4 problems" in err
    assert "training.max_step: unknown key (did you mean 'max_steps'?)" in err
    assert "halvng: unknown key (did you mean 'halving'?)" in err
    assert "training.learning_rate" in err and "grid.r" in err


def test_preflight_catches_bad_targets_before_loading(workspace, tmp_path, capsys):
    root, model = workspace
    code = main(["sweep", model, "--data", str(root / "train.jsonl"), "--out", str(tmp_path / "o"),
                 "--grid", "targets=q_prj;attention r=4"])
    err = capsys.readouterr().err
    assert code == 2 and "q_prj" in err and "did you mean 'q_proj'" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_changed_spec_is_refused_with_the_difference(workspace, capsys):
    root, model = workspace
    out = root / "ledger"
    if not (out / "sweep.json").exists():
        pytest.skip("needs test_three_trials_write_the_ledger")
    code = main(["sweep", model, "--data", str(root / "train.jsonl"), "--out", str(out), "--grid",
                 "targets=q,v;attention;attention,mlp r=4", "--max-steps", "7", "--batch-size", "4",
                 "--eval-every", "3", "--max-length", "64", "--lr", "0.01"])
    err = capsys.readouterr().err
    assert code == 2 and "different spec" in err and "training.max_steps: 6 -> 7" in err


def test_dry_run_lists_params_and_warns_on_fixed_alpha(workspace, tmp_path, capsys):
    root, model = workspace
    code = main(["sweep", model, "--data", str(root / "train.jsonl"), "--out", str(tmp_path / "dry"), "--dry-run",
                 "--grid", "targets=attention r=4,8 alpha=16"])
    out = capsys.readouterr().out
    assert code == 0 and "attention_r4_a16" in out and "attention_r8_a16" in out
    assert "fixed at 16 while r varies" in out
    assert not (tmp_path / "dry").exists()


@pytest.mark.slow
def test_successive_halving_prunes_the_worst(workspace):
    root, model = workspace
    out = root / "halving"
    grid = {"targets": ["q", "attention", "mlp", "attention,mlp"], "r": [4], "alpha": ["r"]}
    result = sweep(model, str(root / "train.jsonl"), out=out, progress=False,
                   overrides={"grid": grid, **FAST, "training.max_steps": 8, "halving.enabled": True,
                              "halving.rungs": 2})
    statuses = {r.name: r.status for r in result.results}
    assert sorted(statuses.values()) == ["completed", "completed", "pruned", "pruned"]
    pruned = [r for r in result.results if r.status == "pruned"]
    assert all(r.steps == 4 for r in pruned) and all("successive halving" in r.message for r in pruned)
    assert all((out / "trials" / r.name / "adapter").exists() for r in pruned)


def test_from_file_adds_the_users_config_as_a_trial(workspace, tmp_path, capsys):
    root, model = workspace
    config = tmp_path / "axolotl.yaml"
    config.write_text("adapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_dropout: 0.0\nlora_target_modules: [q_proj, v_proj]\n")
    code = main(["sweep", model, "--data", str(root / "train.jsonl"), "--out", str(tmp_path / "o"), "--dry-run",
                 "--from", str(config), "--grid", "targets=attention r=4"])
    out = capsys.readouterr().out
    assert code == 0 and "attention_r4" in out and "from_axolotl" in out
    code = main(["sweep", model, "--data", str(root / "train.jsonl"), "--out", str(tmp_path / "o2"), "--dry-run",
                 "--from", str(config)])
    out = capsys.readouterr().out
    assert code == 0 and "full_r16_dora" in out and "from_axolotl" in out  # with the seeds' grid


def test_the_example_spec_is_valid():
    from loraplan.sweeps.spec import expand, load_spec

    spec = load_spec(Path(__file__).parents[1] / "examples" / "sweep.yaml")
    names = [t.name for t in expand(spec)]
    assert len(names) == 10 and names[-1] == "my_current_config"

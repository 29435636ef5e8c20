"""Sweeps beyond one process (sweeps/executors.py), on CPU: two local worker processes and a local Ray
cluster give the in-process sweep's ranking and losses, successive halving included; a worker killed
mid-trial costs that trial one rerun and nothing else; a driver killed mid-sweep loses nothing that
finished, and the same command finishes the rest. One Ray session serves the module (it starts slowly)."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import pytest
from support.cli import one_line_error
from support.tiny import save_tiny_model

from loraplan.cli import main
from loraplan.plan.lora_plan import LoraPlan
from loraplan.sweeps.executors import Report, Slot, _Pool
from loraplan.sweeps.folder import TrialResult, TrialStatus, TrialWriter
from loraplan.sweeps.runner import _Progress, sweep
from loraplan.sweeps.spec import Trial

GRID = {"targets": ["q", "attention", "mlp", "attention,mlp"], "r": [4], "alpha": ["r"]}
SETTINGS = {"training.max_steps": 8, "training.batch_size": 4, "training.eval_every": 4, "training.warmup_steps": 1,
            "training.learning_rate": 1e-2, "data.max_length": 64, "halving.enabled": True, "halving.rungs": 2}
CLI_GRID = ["--grid", "targets=q;attention;mlp;attention,mlp r=4", "--max-steps", "6", "--batch-size", "4",
            "--eval-every", "3", "--max-length", "64", "--lr-policy", "fixed", "--json"]  # ledger mechanics: one rate


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("executors")
    model = save_tiny_model(root / "model", "llama")
    lines = [json.dumps({"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}."}) for i in range(48)]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root, model


@pytest.fixture(scope="module")
def reference(workspace):
    """The sweep in this process: what every executor must reproduce."""
    root, model = workspace
    return sweep(model, str(root / "train.jsonl"), out=root / "in-process", progress=False,
                 overrides={"grid": GRID, **SETTINGS})


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (`make test` installs loraplan[ray])")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def outcome(result):
    return {r.name: (r.status.value, r.steps, r.eval_loss) for r in result.results}


def same_sweep(result, reference):
    assert result.summary.ranking == reference.summary.ranking
    assert result.summary.recommended == reference.summary.recommended
    got, want = outcome(result), outcome(reference)
    assert {n: v[:2] for n, v in got.items()} == {n: v[:2] for n, v in want.items()}
    for name, (_, _, loss) in want.items():
        assert got[name][2] == pytest.approx(loss, rel=1e-6), name  # the same seeds: the same losses
    statuses = [s for s, _, _ in got.values()]
    assert statuses.count("completed") == 2 and "pruned" in statuses  # halving kept 2 of the 4 configs


@pytest.mark.slow
def test_two_cpu_workers_give_the_in_process_sweep_with_halving(workspace, reference):
    root, model = workspace
    out = root / "local"
    result = sweep(model, str(root / "train.jsonl"), out=out, progress=False,
                   overrides={"grid": GRID, **SETTINGS, "executor.gpus": "cpu:2"})
    same_sweep(result, reference)
    placements = {r.placement.split(" (pid")[0] for r in result.results}
    assert placements == {f"{os.uname().nodename}/cpu-worker-0", f"{os.uname().nodename}/cpu-worker-1"}
    header = json.loads((out / "sweep.json").read_text())
    assert header["executor"]["kind"] == "local" and header["environment"]["device"] == "2 × cpu"
    assert "Ran on: " in (out / "summary.md").read_text()
    # where trials run is not part of the spec: the folder resumes in-process, with nothing left to run
    again = sweep(model, str(root / "train.jsonl"), out=out, progress=False, overrides={"grid": GRID, **SETTINGS})
    assert outcome(again) == outcome(result)


@pytest.mark.slow
def test_a_ray_cluster_gives_the_in_process_sweep_with_halving(workspace, reference, ray_cluster):
    root, model = workspace
    out = root / "ray"
    result = sweep(model, str(root / "train.jsonl"), out=out, progress=False,
                   overrides={"grid": GRID, **SETTINGS, "executor.kind": "ray"})
    same_sweep(result, reference)
    assert all("ray node" in r.placement for r in result.results)
    assert json.loads((out / "sweep.json").read_text())["executor"]["kind"] == "ray"
    for r in result.results:  # pruned or completed, every adapter was saved by the worker that held it
        assert (out / "trials" / r.name / "adapter" / "adapter_model.safetensors").exists()


def _wait(condition, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _train_steps(folder: Path) -> list[int]:
    metrics = folder / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(x)["step"] for x in metrics.read_text().splitlines()
            if x.strip().endswith("}") and '"train"' in x]


def _pid(folder: Path) -> int | None:
    try:
        placement = json.loads((folder / "plan.json").read_text())["placement"]
    except (OSError, ValueError, KeyError):
        return None
    return int(placement.rsplit("pid ", 1)[1].rstrip(")"))


def _kill_worker_then_driver(root: Path, model: str, out: Path, executor: list[str]):
    """Kill the worker running attention_r4 mid-trial, then the driver while mlp_r4 hangs; rerun."""
    args = ["sweep", model, "--data", str(root / "train.jsonl"), "--out", str(out), *CLI_GRID, *executor]
    env = {**os.environ, "LORAPLAN_FAULT": "attention_r4:pause@3,mlp_r4:hang@4"}
    driver = subprocess.Popen([sys.executable, "-m", "loraplan.cli", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env)
    trials = out / "trials"
    try:
        _wait(lambda: len(_train_steps(trials / "attention_r4")) >= 2 and _pid(trials / "attention_r4"),
              "attention_r4 to reach its pause")
        victim = _pid(trials / "attention_r4")
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: (trials / "attention_r4" / "result.json").exists(), "attention_r4 to run again")
        _wait(lambda: len(_train_steps(trials / "mlp_r4")) >= 3, "mlp_r4 to hang")
        finished = {p.parent.name: (p.read_text(), (p.parent / "plan.json").stat().st_ino)
                    for p in trials.glob("*/result.json")}
        hung = _pid(trials / "mlp_r4")
    finally:
        driver.kill()
        driver.wait()
    rerun = json.loads((trials / "attention_r4" / "result.json").read_text())
    assert rerun["status"] == "completed" and rerun["steps"] == 6
    assert _train_steps(trials / "attention_r4") == [1, 2, 3, 4, 5, 6]  # the rerun started clean
    assert _pid(trials / "attention_r4") != victim
    assert {"q_r4", "attention_r4"} <= set(finished) and "mlp_r4" not in finished
    _wait(lambda: not os.path.exists(f"/proc/{hung}") or "zombie" in _state(hung), "the hung worker to exit", 60)
    done = subprocess.run([sys.executable, "-m", "loraplan.cli", *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name, (text, inode) in finished.items():  # nothing finished was lost or run again
        assert (trials / name / "result.json").read_text() == text
        assert (trials / name / "plan.json").stat().st_ino == inode
    assert _train_steps(trials / "mlp_r4") == [1, 2, 3, 4, 5, 6]
    summary = json.loads(done.stdout)["summary"]
    assert sorted(summary["ranking"]) == ["attention+mlp_r4", "attention_r4", "mlp_r4", "q_r4"]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


@pytest.mark.slow
def test_local_workers_killed_lose_one_trial_and_a_killed_driver_loses_nothing(workspace):
    root, model = workspace
    _kill_worker_then_driver(root, model, root / "local-killed", ["--gpus", "cpu:2"])


@pytest.mark.slow
def test_ray_workers_killed_lose_one_trial_and_a_killed_driver_loses_nothing(workspace, ray_cluster):
    root, model = workspace
    _kill_worker_then_driver(root, model, root / "ray-killed", ["--executor", "ray", "--ray-address", ray_cluster])


class ScriptedPool(_Pool):
    """The pool's dispatch without processes: a worker answers at once, or dies on the trials in `deadly`."""

    def __init__(self, deadly=()):
        super().__init__(None, _Progress(0, 0, 0, enabled=False), [Slot("a", "cpu"), Slot("b", "cpu")])
        self.deadly, self.replies, self.calls, self.replaced = set(deadly), deque(), [], []

    def _send(self, w, call):
        _, trial, writer, until, final = call
        self.calls.append((trial.name, w))
        if trial.name in self.deadly:
            self.replies.append((w, False, "exit code -9"))
            return
        result = writer.finish(TrialResult(trial.name, TrialStatus.COMPLETED, steps=until)) if final else None
        self.replies.append((w, True, Report(trial.name, until, 1.0, result)))

    def _next(self):
        return self.replies.popleft()

    def _replace(self, w):
        self.replaced.append(w)


def _jobs(tmp_path, names):
    return [(Trial(name=n, plan=LoraPlan(targets="q", r=4)), TrialWriter(tmp_path / n, n)) for n in names]


def test_a_trial_whose_worker_dies_runs_once_more_then_is_recorded_failed(tmp_path):
    pool = ScriptedPool(deadly={"b"})
    reports = pool.advance(_jobs(tmp_path, ["a", "b", "c"]), 4, final=True)
    assert [r.result.status for r in reports] == ["completed", "failed", "completed"]
    assert "its worker died 2 times while running it (exit code -9)" in reports[1].result.message
    assert [name for name, _ in pool.calls].count("b") == 2 and len(pool.replaced) == 2
    assert [name for name, _ in pool.calls].count("a") == 1  # the others ran once
    assert json.loads((tmp_path / "b" / "result.json").read_text())["status"] == "failed"


def test_a_trial_going_on_to_the_next_rung_stays_on_the_worker_that_holds_it(tmp_path):
    pool = ScriptedPool()
    jobs = _jobs(tmp_path, ["a", "b", "c", "d"])
    pool.advance(jobs, 2, final=False)
    first = dict(pool.calls)
    pool.calls.clear()
    pool.advance(jobs[::-1], 4, final=True)  # in another order: each still goes back to its worker
    assert dict(pool.calls) == first and len(set(first.values())) == 2
    assert pool.holder == {}  # finished trials are held nowhere


def test_dry_run_shows_where_each_trial_goes(workspace, tmp_path, capsys):
    root, model = workspace
    code = main(["sweep", model, "--data", str(root / "train.jsonl"), "--out", str(tmp_path / "dry"), "--dry-run",
                 "--grid", "targets=q;attention;mlp r=4", "--gpus", "cpu:2"])
    out = capsys.readouterr().out
    host = os.uname().nodename
    assert code == 0 and not (tmp_path / "dry").exists()
    assert f"worker {host}/cpu-worker-0 (cpu): q_r4, mlp_r4" in out
    assert f"worker {host}/cpu-worker-1 (cpu): attention_r4" in out


def test_executor_errors_are_one_line(workspace, tmp_path, capsys, monkeypatch):
    root, model = workspace
    base = ["sweep", model, "--data", str(root / "train.jsonl"), "--out", str(tmp_path / "x"), "--dry-run"]
    import torch

    if not torch.cuda.is_available():
        one_line_error(capsys, [*base, "--gpus", "0"], "--gpus 0: no GPU 0", "cpu:N")
    one_line_error(capsys, [*base, "--gpus", "0,0"], "names a GPU twice")
    one_line_error(capsys, [*base, "--gpus", "two"], "not a list of GPU indices")
    one_line_error(capsys, [*base, "--ray-address", "10.0.0.1:6379"], "--ray-address is for --executor ray")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    one_line_error(capsys, [*base, "--executor", "ray"], "needs Ray", "pip install 'loraplan[ray]'")
    assert not (tmp_path / "x").exists()

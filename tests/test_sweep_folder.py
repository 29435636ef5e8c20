"""The sweep folder's contract (docs/sweep-dir.md): one policy for damaged, cut and unstarted trials,
applied identically by every reader — the runner when it resumes, `report` and `diagnose` — the
lock that keeps a second sweep off a running folder, and the noise rule the sweep's summary and
`diagnose` share."""

from __future__ import annotations

import html as htmllib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.tiny import save_tiny_model

from loraplan.cli import main
from loraplan.diagnosis import diagnose
from loraplan.errors import UsageError
from loraplan.sweeps.folder import (
    LOCK_FILE,
    OWNER_FILE,
    SweepFolder,
    TrialStatus,
    read_sweep,
)
from loraplan.sweeps.ranking import summarize, summary_for
from loraplan.sweeps.report import render_html

HEADER = {"format": 1, "loraplan": "0.1.0", "created": "2026-11-22T12:00:00+00:00", "model": "tiny",
          "spec": {"grid": "test"}, "spec_hash": "0123456789abcdef", "environment": {}, "data": {}}


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_sweep(root: Path, names: list[str]) -> Path:
    write_json(root / "sweep.json", {**HEADER, "trials": names})
    (root / "trials").mkdir(parents=True, exist_ok=True)
    return root


def write_trial(root: Path, name: str, r: int = 8, eval_loss: float | None = 1.40, sem: float | None = 0.01,
                batches: list[float] | None = None, status: str | None = "completed", steps: int = 20) -> Path:
    """A trial folder as docs/sweep-dir.md describes it; `status=None` leaves out result.json."""
    folder = root / "trials" / name
    settings = {"targets": "attention", "r": r, "lora_alpha": float(r), "use_rslora": False, "use_dora": False,
                "loraplus_lr_ratio": None}
    write_json(folder / "plan.json", {"name": name, "plan": settings, "training": {"max_steps": steps},
                                      "peft_config": {"r": r, "lora_alpha": float(r), "target_modules": ["q_proj"]}})
    rows = [{"kind": "train", "step": s, "train_loss": 2.0 - s / 40, "lr": 1e-3, "tokens": 64 * s, "elapsed_s": s / 10}
            for s in range(1, steps + 1)]
    rows += [{"kind": "eval", "step": s, "eval_loss": (eval_loss or 1.5) + 0.1 * (s < steps), "eval_loss_sem": sem,
              "eval_batches": 4, "elapsed_s": s / 10} for s in (steps // 2, steps)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    if status is not None:
        write_json(folder / "result.json", {
            "name": name, "status": status, "message": None if status == "completed" else "it stopped",
            **settings, "trainable_params": 1000 * r, "eval_loss": eval_loss, "eval_loss_sem": sem, "steps": steps,
            "train_loss": 1.5, "wall_s": 2.0, "tokens_per_s": 640.0, "peak_memory_bytes": None,
            "eval_batches": {"loss": batches, "tokens": [100] * len(batches)} if batches else None,
            "started": "2026-11-22T12:01:00+00:00", "finished": "2026-11-22T12:02:00+00:00"})
    return folder


def cut_last_line(file: Path, keep: int = 12) -> None:
    with file.open("a") as f:
        f.write('{"kind": "train", "step": 99, "train_lo'[:keep])


def insert_line(file: Path, at: int, text: str) -> None:
    lines = file.read_text().splitlines(keepends=True)
    lines.insert(at, text + "\n")
    file.write_text("".join(lines))


def edit_result(folder: Path, **changes) -> None:
    data = json.loads((folder / "result.json").read_text())
    (folder / "result.json").write_text(json.dumps({**data, **changes}))


# Each case damages trial "t" of a sweep with a healthy trial "ok" and says what every reader must
# find: its status, a note (or None), and whether the next `loraplan sweep` runs it again.
CASES = {
    "pending: listed, no folder": (lambda t: None, "pending", None, True),
    "pending: empty folder": (lambda t: t.mkdir(parents=True), "pending", None, True),
    "unfinished: no result.json": (lambda t: write_trial(t.parents[1], "t", status=None), "unfinished", None, True),
    "unfinished: last line cut by a kill": (
        lambda t: (write_trial(t.parents[1], "t", status=None), cut_last_line(t / "metrics.jsonl")),
        "unfinished", "trials/t/metrics.jsonl: the last line is cut", True),
    "completed: a bad line in the middle": (
        lambda t: (write_trial(t.parents[1], "t"), insert_line(t / "metrics.jsonl", 2, '{"kind": "train", "st')),
        "completed", "trials/t/metrics.jsonl: 1 unreadable line skipped (line 3)", False),
    "completed: a wrongly-typed metric line": (
        lambda t: (write_trial(t.parents[1], "t"),
                   insert_line(t / "metrics.jsonl", 0, '{"kind": "train", "step": 1, "train_loss": "high"}')),
        "completed", "trials/t/metrics.jsonl: 1 unreadable line skipped (line 1)", False),
    "completed: an unreadable plan.json": (
        lambda t: (write_trial(t.parents[1], "t"), (t / "plan.json").write_text("{")),
        "completed", "trials/t/plan.json is not valid JSON", False),
    "damaged: result.json cut": (
        lambda t: (write_trial(t.parents[1], "t"),
                   (t / "result.json").write_text((t / "result.json").read_text()[:40])),
        "damaged", None, True),
    "damaged: eval_loss is a string": (
        lambda t: (write_trial(t.parents[1], "t"), edit_result(t, eval_loss="low")), "damaged", None, True),
    "damaged: an unknown status": (
        lambda t: (write_trial(t.parents[1], "t"), edit_result(t, status="running")), "damaged", None, True),
    "damaged: result.json is a list": (
        lambda t: (write_trial(t.parents[1], "t"), (t / "result.json").write_text("[1, 2]")), "damaged", None, True),
    "damaged: not UTF-8": (
        lambda t: (write_trial(t.parents[1], "t"), (t / "result.json").write_bytes(b"\xff\xfe{}")),
        "damaged", None, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_reader_applies_the_same_policy(tmp_path, case):
    damage, status, note, rerun = CASES[case]
    root = write_sweep(tmp_path / "s", ["ok", "t"])
    write_trial(root, "ok", r=4)
    damage(root / "trials" / "t")

    sweep = read_sweep(root)
    trial = sweep.trial("t")
    assert trial.status == status
    assert (note is None and not sweep.notes) or any(n.startswith(note) for n in sweep.notes), sweep.notes
    if status == "damaged":
        assert "runs it again" in trial.message
    if "cut" in case and status == "unfinished":
        assert [p.step for p in trial.train] == list(range(1, 21))  # every complete line kept

    # report (its page without the PNGs, which test_report and the tests below draw): the same
    # status and notes; a damaged trial shows its reason; the recommendation only from completed trials
    summary, _ = summary_for(sweep)
    page = render_html(sweep, summary, "computed from result.json", {})
    badge = {"damaged": "failed", "pending": "unfinished"}.get(status, status)  # the badge's style
    assert f"<summary><b>t</b> <span class='badge b-{badge}'>{status}</span>" in page
    assert all(n in htmllib.unescape(page) for n in sweep.notes)
    if status == "damaged":
        assert "runs it again" in page
    assert summary.recommended == "ok"  # as good as t when t completed, and cheaper

    # diagnose: the same statuses and notes
    result = diagnose(root)
    assert {r.name: r.status for r in result.runs} == {"ok": "completed", "t": status}
    assert result.notes == sweep.notes
    if status not in ("completed",):
        assert any(f.trial == "t" and f.kind == "note" and f.evidence.get("status") == status for f in result.findings)

    # the runner when it resumes: what it will run again
    with SweepFolder(root) as ledger:
        reopened = ledger.open(dict(HEADER), ["ok", "t"])
    assert {t.name for t in reopened.trials if not t.status.finished} == ({"t"} if rerun else set())
    assert not (root / OWNER_FILE).exists()  # the lock's sidecar goes with the lock


@pytest.mark.parametrize("damage", ["no trials/", "no sweep.json", "sweep.json cut", "another format"])
def test_a_folder_that_is_not_a_whole_sweep_is_one_error_line(tmp_path, capsys, damage):
    root = write_sweep(tmp_path / "s", ["a", "b"])
    write_trial(root, "a", r=4, eval_loss=1.3)
    write_trial(root, "b", r=8, eval_loss=1.5)
    write_json(root / "summary.json", {"ranking": ["a", "b"], "best": "a", "recommended": "a", "reason": "stale"})
    if damage == "no trials/":
        import shutil

        shutil.rmtree(root / "trials")
    elif damage == "no sweep.json":
        (root / "sweep.json").unlink()
    elif damage == "sweep.json cut":
        (root / "sweep.json").write_text('{"format": 1, "tri')
    else:
        write_json(root / "sweep.json", {**HEADER, "format": 2, "trials": ["a", "b"]})
    for argv in (["report", str(root)], ["diagnose", str(root)]):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured
        assert "stale" not in captured.err
    assert not (root / "report.html").exists()


@pytest.mark.slow
def test_a_stale_summary_is_recomputed_never_shown(tmp_path, capsys):
    root = write_sweep(tmp_path / "s", ["a", "b"])
    write_trial(root, "a", r=4, eval_loss=1.30)
    write_trial(root, "b", r=8, eval_loss=1.50)
    write_json(root / "summary.json", {"ranking": ["a", "b"], "best": "a", "recommended": "a", "reason": "old"})
    assert main(["report", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary_source"] == "summary.json"
    (root / "trials" / "a" / "result.json").write_text("{")  # a now damaged: the saved recommendation is stale
    assert main(["report", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["recommended"] == "b" and info["summary_source"] == "computed from result.json"
    assert any("summary.json does not match" in n for n in info["notes"])


# -- the lock ----------------------------------------------------------------------------------------


def test_a_lock_held_by_a_killed_process_is_taken_over(tmp_path):
    root = tmp_path / "s"
    code = ("import sys, time; from loraplan.sweeps.folder import SweepFolder; "
            "f = SweepFolder(sys.argv[1]); f.lock(); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        other = SweepFolder(root)
        with pytest.raises(UsageError) as busy:
            other.lock()
        message = busy.value.one_line()
        assert f"is in use by another sweep (pid {holder.pid} on {socket.gethostname()}, started " in message
        assert json.loads((root / OWNER_FILE).read_text())["pid"] == holder.pid  # the refusal changed nothing
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (root / OWNER_FILE).exists()  # the killed holder could not clean up: its stale sidecar stays
    with SweepFolder(root) as taker:
        taker.lock()
        assert json.loads((root / OWNER_FILE).read_text())["pid"] == os.getpid()
    assert not (root / OWNER_FILE).exists() and (root / LOCK_FILE).exists()


def test_a_folder_with_only_a_stale_lock_is_still_a_sweep_folder_to_start(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    (root / LOCK_FILE).touch()
    write_json(root / OWNER_FILE, {"pid": 1, "host": "gone", "started": "then"})
    with SweepFolder(root) as ledger:
        sweep = ledger.open(dict(HEADER), ["a"])
    assert [t.status for t in sweep.trials] == [TrialStatus.PENDING]
    (root / "notes.txt").write_text("mine")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a sweep directory"):
        SweepFolder(other).lock()
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]  # nothing written into it


# -- the noise rule: the sweep's summary and diagnose agree ------------------------------------------------


def batch_losses(mean: float, shared: list[float], own: float, seed: int) -> list[float]:
    """Per-batch eval losses: a batch effect every trial shares plus a little of the trial's own."""
    rng = random.Random(seed)
    return [mean + s + rng.gauss(0, own) for s in shared]


SHARED = [random.Random(0).gauss(0, 0.05) for _ in range(16)]

# name -> (r, eval loss, standard error, per-batch losses or None); what both must call clearly worse
NOISE_CASES = {
    # unpaired s.e. 0.004: 2·√2·0.004 = 0.0113 of noise
    "unpaired": ({"r4": (4, 1.4300, 0.004, None), "r8": (8, 1.4100, 0.004, None), "r16": (16, 1.4050, 0.004, None),
                  "r32": (32, 1.4200, 0.004, None)}, {"r4", "r32"}),
    # 0.0025 apart is under the old diagnose floor (0.2% of 1.4 = 0.0028) but far outside the paired
    # noise of batches that move together: the sweep always said "worse"; now diagnose does too
    "paired": ({"r4": (4, 1.4025, 0.0125, batch_losses(1.4025, SHARED, 0.0005, 1)),
                "r8": (8, 1.4000, 0.0125, batch_losses(1.4000, SHARED, 0.0005, 2)),
                "r16": (16, 1.4001, 0.0125, batch_losses(1.4001, SHARED, 0.0005, 3))}, {"r4"}),
    # the same losses without per-batch values: the unpaired s.e. makes them all as good
    "paired values missing": ({"r4": (4, 1.4025, 0.0125, None), "r8": (8, 1.4000, 0.0125, None),
                               "r16": (16, 1.4001, 0.0125, None)}, set()),
    # no standard error at all: no noise estimate, so nothing is "clearly worse" (and nothing but the
    # best is "as good")
    "no standard error": ({"r4": (4, 1.50, None, None), "r8": (8, 1.40, None, None)}, set()),
}


@pytest.mark.parametrize("case", list(NOISE_CASES))
def test_sweep_summary_and_diagnose_agree_on_noise(tmp_path, case):
    trials, expected = NOISE_CASES[case]
    root = write_sweep(tmp_path / "s", list(trials))
    for name, (r, loss, sem, batches) in trials.items():
        write_trial(root, name, r=r, eval_loss=loss, sem=sem, batches=batches)
    summary = summarize(read_sweep(root).trials)
    by_sweep = {n for n, c in summary.trials.items() if c.worse}
    flagged = [f for f in diagnose(root).findings if "worse" in f.evidence]
    by_diagnose = {w["name"] for f in flagged for w in f.evidence["worse"]}
    assert by_sweep == by_diagnose == expected
    as_good = {n for n, c in summary.trials.items() if c.within_noise}
    assert as_good == set(trials) - expected - ({"r4"} if case == "no standard error" else set())
    if case == "paired":
        assert summary.trials["r4"].noise < 0.001  # the paired noise, not the unpaired 0.035


# -- the real runner --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    model = save_tiny_model(root / "model", "llama")
    lines = [json.dumps({"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}."}) for i in range(32)]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root, model


def sweep_args(workspace, out: Path) -> list[str]:
    root, model = workspace
    return ["sweep", model, "--data", str(root / "train.jsonl"), "--out", str(out), "--grid", "targets=q;k;v r=2",
            "--max-steps", "4", "--lr-policy", "fixed", "--batch-size", "4", "--eval-every", "2", "--max-length", "48",
            "--json"]


def run_cli(argv, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "loraplan.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.mark.slow
def test_the_next_sweep_runs_damaged_and_unfinished_trials_again_and_keeps_the_rest(workspace, tmp_path):
    out = tmp_path / "s"
    first = run_cli(sweep_args(workspace, out))
    assert first.returncode == 0, first.stderr
    trials = out / "trials"
    (trials / "q_r2" / "result.json").write_text((trials / "q_r2" / "result.json").read_text()[:50])  # cut
    edit_result(trials / "k_r2", eval_loss="low")  # wrongly typed
    insert_line(trials / "v_r2" / "metrics.jsonl", 1, "not json")  # a finished trial with a bad line: kept
    kept = (trials / "v_r2" / "result.json").read_text()
    assert main(["report", str(out)]) == 0
    assert {t.name: t.status for t in read_sweep(out).trials} == {"q_r2": "damaged", "k_r2": "damaged",
                                                                 "v_r2": "completed"}
    again = run_cli(sweep_args(workspace, out))
    assert again.returncode == 0, again.stderr
    sweep = read_sweep(out)
    assert [t.status for t in sweep.trials] == ["completed"] * 3
    assert all(math.isfinite(t.eval_loss) for t in sweep.trials)
    assert (trials / "v_r2" / "result.json").read_text() == kept  # not run again
    assert sweep.notes == ["trials/v_r2/metrics.jsonl: 1 unreadable line skipped (line 2)"]
    assert sorted(json.loads((out / "summary.json").read_text())["ranking"]) == ["k_r2", "q_r2", "v_r2"]


@pytest.mark.slow
def test_a_second_sweep_on_a_running_folder_stops_and_a_killed_one_is_taken_over(workspace, tmp_path, capsys):
    out = tmp_path / "s"
    args = sweep_args(workspace, out)
    first = subprocess.Popen([sys.executable, "-m", "loraplan.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "LORAPLAN_FAULT": "k_r2:hang@2"})
    metrics = out / "trials" / "k_r2" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and '"train"' in metrics.read_text()):
            assert first.poll() is None, "the first sweep ended early"
            time.sleep(0.2)
        files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        second = run_cli(args)
        assert second.returncode == 2 and second.stdout == "", second
        assert second.stderr.count("\n") == 1 and second.stderr.startswith("error: "), second.stderr
        assert f"is in use by another sweep (pid {first.pid} on {socket.gethostname()}, started" in second.stderr
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # the running trial untouched
        # readers do not take the lock: they see the running trial as unfinished
        assert main(["report", str(out), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["trials"] == {"q_r2": "completed", "k_r2": "unfinished",
                                                                 "v_r2": "pending"}
        assert {r.name: r.status for r in diagnose(out).runs}["k_r2"] == "unfinished"
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    third = run_cli(args)  # the killed sweep's lock is taken over
    assert third.returncode == 0, third.stderr
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]  # restarted cleanly
    assert [t.status for t in read_sweep(out).trials] == ["completed"] * 3
    assert not (out / OWNER_FILE).exists()

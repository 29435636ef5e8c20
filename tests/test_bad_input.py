"""Hostile and broken input over every command (issue 25): one table of cases, each run through the
real CLI. Every case asserts the exit code, one `error:` line (no traceback) when it fails, and that
no file outside the case's --out changed: the shared workspace (model, data, adapter) and a `victim/`
folder next to --out that a hostile trial name aims at.

Read-only folders and full disks cannot be made here without root's mount rights, so those cases make
the writes under one folder fail with that errno (`fault`), at the system calls every writer uses.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from support.adapters import save_adapter
from support.cli import run_cli
from support.tiny import FAMILIES, save_tiny_model

FAST = ["--max-steps", "2", "--batch-size", "2", "--eval-every", "2", "--max-length", "32", "--engine", "peft"]
TRIAL = {"targets": "q,v", "r": 4}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The workspace every case reads and none may change."""
    root = tmp_path_factory.mktemp("hostile-ws")
    model = Path(save_tiny_model(root / "model", "llama"))
    weights = (model / "model.safetensors").read_bytes()
    rows = [json.dumps({"prompt": f"Q{i}: {i}+{i}?", "completion": f" {2 * i}."}) for i in range(24)]
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    save_adapter(root / "adapter", "llama", r=4, target_modules=["q_proj", "v_proj"])

    def variant(name: str, weights_bytes: bytes, **config) -> None:
        folder = root / name
        folder.mkdir()
        for f in model.iterdir():
            if f.name != "model.safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
        (folder / "model.safetensors").write_bytes(weights_bytes)
        if config:
            data = json.loads((model / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**data, **config}))

    variant("truncated", weights[: len(weights) // 2])
    variant("garbage", os.urandom(4096))
    variant("shapes", weights, intermediate_size=96)
    for name, config in (("indivisible", {**FAMILIES["llama"], "hidden_size": 66}),
                         ("big", {**FAMILIES["llama"], "hidden_size": "big"})):
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "random.bin").write_bytes(bytes(range(256)) * 8)
    adapter = root / "adapter_cut"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_bytes((root / "adapter" / "adapter_config.json").read_bytes())
    cut = (root / "adapter" / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(cut[: len(cut) // 2])
    return root


# -- the cases ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {ws}: the workspace, {tmp}: this case's folder (--out goes to {tmp}/out…)
    words: tuple[str, ...] = ()  # each must be in the error line (exit 2) or in stdout (exit 0)
    code: int = 2
    files: dict = field(default_factory=dict)  # {path under {tmp}: str | bytes | dict (YAML/JSON)}
    fault: tuple[str, int] | None = None  # (folder under {tmp}, errno): writes there fail so
    subprocess: bool = False  # run `python -m loraplan.cli` without the offline switches (a Hub look-up)
    seconds: float | None = None  # the subprocess must answer within this (offline look-ups)


def sweep(*extra: str) -> tuple[str, ...]:
    return ("sweep", "{ws}/model", "--data", "{ws}/train.jsonl", "--out", "{tmp}/out", *FAST, *extra)


def spec(*trials: dict, **top) -> dict:
    return {"spec.yaml": {**({"trials": list(trials)} if trials else {}), **top}}


def named(name) -> dict:
    return spec({**TRIAL, "name": name})


def sweep_folder(**trials) -> dict:
    """A hand-written sweep folder under {tmp}/sw: sweep.json and trials/<name>/<file>: content."""
    files = {"sw/sweep.json": {"format": 1, "model": "m", "spec": {}, "trials": list(trials)}}
    for name, content in trials.items():
        for file, value in content.items():
            files[f"sw/trials/{name}/{file}"] = value
    return files


RESULT = {"name": "a", "status": "completed", "targets": "q,v", "r": 4, "lora_alpha": 4.0, "eval_loss": 1.5,
          "eval_loss_sem": 0.01, "steps": 2}
METRICS = "".join(json.dumps({"kind": "train", "step": s, "train_loss": 2.0 - 0.1 * s}) + "\n" for s in range(1, 9))
STATE = {"log_history": [{"step": s, "loss": 2.0 - 0.1 * s} for s in range(1, 9)]}
EVAL = {"log_history": [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.9}]}

CASES = [
    # trial names: where they enter, one rule; nothing outside --out is ever removed
    Case("sweep-name-parent-path", sweep("--config", "{tmp}/spec.yaml"), ("trial name", "../../victim"),
         files=named("../../victim")),
    Case("sweep-name-absolute", sweep("--config", "{tmp}/spec.yaml"), ("trial name",), files=named("{tmp}/victim")),
    Case("sweep-name-dot", sweep("--config", "{tmp}/spec.yaml"), ("trial name",), files=named(".")),
    Case("sweep-name-dotdot", sweep("--config", "{tmp}/spec.yaml"), ("trial name",), files=named("..")),
    Case("sweep-name-separator", sweep("--config", "{tmp}/spec.yaml"), ("trial name", "a/b"), files=named("a/b")),
    Case("sweep-name-backslash", sweep("--config", "{tmp}/spec.yaml"), ("trial name",), files=named("a\\b")),
    Case("sweep-name-leading-dot", sweep("--config", "{tmp}/spec.yaml"), ("trial name",), files=named(".hidden")),
    Case("sweep-name-space", sweep("--config", "{tmp}/spec.yaml"), ("trial name",), files=named("my trial")),
    Case("sweep-name-empty", sweep("--config", "{tmp}/spec.yaml"), ("trial name",), files=named("")),
    Case("sweep-name-too-long", sweep("--config", "{tmp}/spec.yaml"), ("trial name",), files=named("a" * 300)),
    Case("sweep-name-not-text", sweep("--config", "{tmp}/spec.yaml"), ("name",), files=named(["x"])),
    Case("sweep-duplicate-names", sweep("--config", "{tmp}/spec.yaml"), ("duplicate", "'a'"),
         files=spec({**TRIAL, "name": "a"}, {"targets": "attention", "r": 4, "name": "a"})),
    Case("sweep-duplicate-grid", sweep("--grid", "targets=q,v;q,v r=4"), ("duplicate",)),
    Case("sweep-duplicate-grid-and-trial", sweep("--config", "{tmp}/spec.yaml"), ("duplicate", "q+v_r4"),
         files=spec({**TRIAL, "name": "q+v_r4"}, grid={"targets": ["q,v"], "r": [4]})),
    # the spec: unreadable files and silent guesses
    Case("sweep-spec-random-bytes", sweep("--config", "{ws}/random.bin"), ("random.bin", "UTF-8")),
    Case("sweep-spec-empty-grid", sweep("--config", "{tmp}/spec.yaml"), ("grid",), files={"spec.yaml": "grid:\n"}),
    Case("sweep-spec-empty-grid-map", sweep("--config", "{tmp}/spec.yaml"), ("grid",), files={"spec.yaml": "grid: {}\n"}),
    Case("sweep-spec-empty-trials", sweep("--config", "{tmp}/spec.yaml"), ("trials",), files={"spec.yaml": "trials: []\n"}),
    Case("sweep-micro-above-batch", sweep("--batch-size", "4", "--micro-batch-size", "8"), ("micro_batch_size",)),
    Case("sweep-data-random-bytes", sweep("--data", "{ws}/random.bin"), ("random.bin",)),
    # models: damaged weights, weights of another shape, configs that build no model
    Case("probe-truncated-weights", ("probe", "{ws}/truncated", "--data", "{ws}/train.jsonl", "--batches", "4"),
         ("model.safetensors",)),
    Case("probe-garbage-weights", ("probe", "{ws}/garbage", "--data", "{ws}/train.jsonl", "--batches", "4"),
         ("model.safetensors",)),
    Case("sweep-truncated-weights", ("sweep", "{ws}/truncated", "--data", "{ws}/train.jsonl", "--out", "{tmp}/out",
                                     *FAST, "--grid", "targets=q,v r=4"), ("model.safetensors",)),
    Case("merge-truncated-weights", ("merge", "{ws}/truncated", "{ws}/adapter", "--out", "{tmp}/out"),
         ("model.safetensors",)),
    Case("probe-weights-of-another-shape", ("probe", "{ws}/shapes", "--data", "{ws}/train.jsonl", "--batches", "4"),
         ("shape",)),
    Case("merge-weights-of-another-shape", ("merge", "{ws}/shapes", "{ws}/adapter", "--out", "{tmp}/out"),
         ("shape",)),
    Case("inspect-heads-do-not-divide", ("inspect", "{ws}/indivisible"), ("multiple",)),
    Case("count-heads-do-not-divide", ("count", "{ws}/indivisible", "--rank", "4"), ("multiple",)),
    Case("inspect-hidden-size-text", ("inspect", "{ws}/big"), ("hidden_size",)),
    Case("count-hidden-size-text", ("count", "{ws}/big", "--rank", "4"), ("hidden_size",)),
    Case("memory-hidden-size-text", ("memory", "{ws}/big", "--rank", "4"), ("hidden_size",)),
    Case("inspect-config-random-bytes", ("inspect", "{ws}/random.bin"), ("random.bin",)),
    Case("count-from-random-bytes", ("count", "builtin:llama-3.2-1b", "--from", "{ws}/random.bin"), ("random.bin",)),
    Case("memory-from-random-bytes", ("memory", "builtin:llama-3.2-1b", "--from", "{ws}/random.bin"), ("random.bin",)),
    Case("analyze-truncated-adapter", ("analyze", "{ws}/adapter_cut"), ("adapter_model.safetensors",)),
    Case("compress-truncated-adapter", ("compress", "{ws}/adapter_cut", "--rank", "2", "--out", "{tmp}/out"),
         ("adapter_model.safetensors",)),
    # output paths: a file, under a file, read-only, a full disk
    *[Case(f"{cmd}-out-is-a-file", argv, ("afile",), files={"afile": "keep"}) for cmd, argv in (
        ("sweep", sweep("--out", "{tmp}/afile")),
        ("planted", ("planted", "--out", "{tmp}/afile", "--examples", "8", "--eval-examples", "4")),
        ("demo", ("demo", "--out", "{tmp}/afile")),
        ("compress", ("compress", "{ws}/adapter", "--rank", "2", "--out", "{tmp}/afile")),
        ("merge", ("merge", "{ws}/model", "{ws}/adapter", "--out", "{tmp}/afile")))],
    *[Case(f"{cmd}-out-under-a-file", argv, ("afile",), files={"afile": "keep", **extra}) for cmd, argv, extra in (
        ("sweep", sweep("--out", "{tmp}/afile/out"), {}),
        ("probe", ("probe", "{ws}/model", "--data", "{ws}/train.jsonl", "--out", "{tmp}/afile/p.json"), {}),
        ("planted", ("planted", "--out", "{tmp}/afile/t", "--examples", "8", "--eval-examples", "4"), {}),
        ("demo", ("demo", "--out", "{tmp}/afile/d"), {}),
        ("compress", ("compress", "{ws}/adapter", "--rank", "2", "--out", "{tmp}/afile/c"), {}),
        ("merge", ("merge", "{ws}/model", "{ws}/adapter", "--out", "{tmp}/afile/m"), {}),
        ("report", ("report", "{tmp}/sw", "--out", "{tmp}/afile/r.html"), sweep_folder(a={"result.json": RESULT})))],
    *[Case(f"{cmd}-out-{kind}", argv, (word,), fault=("ro", code), files=extra)
      for kind, code, word in (("read-only", errno.EROFS, "read-only"), ("disk-full", errno.ENOSPC, "space"))
      for cmd, argv, extra in (
          ("sweep", sweep("--out", "{tmp}/ro/out"), {}),
          ("probe", ("probe", "{ws}/model", "--data", "{ws}/train.jsonl", "--batches", "4", "--json",
                     "--out", "{tmp}/ro/p.json"), {}),
          ("planted", ("planted", "--out", "{tmp}/ro/t", "--examples", "8", "--eval-examples", "4",
                       "--layers", "1", "--hidden", "32", "--intermediate", "64"), {}),
          ("demo", ("demo", "--out", "{tmp}/ro/d"), {}),
          ("compress", ("compress", "{ws}/adapter", "--rank", "2", "--out", "{tmp}/ro/c"), {}),
          ("merge", ("merge", "{ws}/model", "{ws}/adapter", "--out", "{tmp}/ro/m"), {}),
          ("report", ("report", "{tmp}/sw", "--out", "{tmp}/ro/r.html"), sweep_folder(a={"result.json": RESULT})))],
    Case("probe-out-is-a-folder", ("probe", "{ws}/model", "--data", "{ws}/train.jsonl", "--out", "{tmp}/dir"),
         ("dir", "folder"), files={"dir/keep": "keep"}),
    # diagnose: values of the wrong type are errors, never NaN
    Case("diagnose-step-not-a-number", ("diagnose", "{tmp}/trainer_state.json"), ("step", "ten"),
         files={"trainer_state.json": {"log_history": [{"step": "ten", "loss": 1.0}, *STATE["log_history"]]}}),
    Case("diagnose-loss-high", ("diagnose", "{tmp}/trainer_state.json"), ("loss", "high"),
         files={"trainer_state.json": {"log_history": [*STATE["log_history"], {"step": 9, "loss": "high"}]}}),
    Case("diagnose-eval-loss-low", ("diagnose", "{tmp}/t"), ("eval_loss", "low"),
         files={"t/result.json": {**RESULT, "eval_loss": "low"}, "t/metrics.jsonl": METRICS}),
    Case("diagnose-trainer-state-random-bytes", ("diagnose", "{ws}/random.bin"), ("random.bin",)),
    Case("diagnose-sweep-without-trials", ("diagnose", "{tmp}/sw"), ("trials/",),
         files={"sw/sweep.json": {"format": 1, "trials": ["a"]}, "sw/summary.json": {"ranking": ["a"], "best": "a",
                                                                                     "recommended": "a"}}),
    # report: damaged trials are reported as damaged, never as completed or not started
    Case("report-without-trials", ("report", "{tmp}/sw"), ("trials/",),
         files={"sw/sweep.json": {"format": 1, "trials": ["a"]}, "sw/summary.json": {"ranking": ["a"], "best": "a",
                                                                                     "recommended": "a"}}),
    Case("report-result-wrong-types", ("report", "{tmp}/sw"), ("1 damaged",), code=0,
         files=sweep_folder(a={"result.json": RESULT}, b={"result.json": {**RESULT, "name": "b", "r": "four"}})),
    Case("report-result-cut", ("report", "{tmp}/sw"), ("1 damaged",), code=0,
         files=sweep_folder(a={"result.json": RESULT}, b={"result.json": json.dumps(RESULT)[:40]})),
    Case("report-metrics-line-cut", ("report", "{tmp}/sw"), ("2 completed", "line"), code=0,
         files=sweep_folder(a={"result.json": RESULT, "metrics.jsonl": METRICS},
                            b={"result.json": {**RESULT, "name": "b"},
                               "metrics.jsonl": METRICS[:30] + "\n" + METRICS[60:]})),
    Case("report-sweep-json-random-bytes", ("report", "{tmp}/sw"), ("sweep.json",),
         files={"sw/sweep.json": bytes(range(256)), "sw/trials/a/result.json": RESULT}),
    # look-ups on the Hub without a network: fast, one line
    Case("inspect-hub-id-offline", ("inspect", "loraplan-test-org/no-such-model"), ("no-such-model",),
         subprocess=True, seconds=20),
    Case("sweep-hub-dataset-offline", ("sweep", "{ws}/model", "--data", "loraplan-test-org/no-such-data",
                                       "--out", "{tmp}/out", *FAST), ("no-such-data",), subprocess=True, seconds=25),
]


# -- running them -------------------------------------------------------------------------------------


def fill(text: str, ws: Path, tmp: Path) -> str:
    return text.replace("{ws}", str(ws)).replace("{tmp}", str(tmp))


def write_files(files: dict, ws: Path, tmp: Path) -> None:
    for rel, value in files.items():
        path = tmp / fill(rel, ws, tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, dict):
            value = {k: ([{kk: fill(vv, ws, tmp) if isinstance(vv, str) else vv for kk, vv in t.items()} for t in v]
                         if k == "trials" and isinstance(v, list) and v and isinstance(v[0], dict) else v)
                     for k, v in value.items()}
            value = yaml.safe_dump(value) if path.suffix == ".yaml" else json.dumps(value)
        path.write_bytes(value if isinstance(value, bytes) else value.encode())


def snapshot(*roots: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """{path: sha256} of every file (and every folder, as a marker) under the roots, but `skip`."""
    out = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            here = Path(dirpath)
            if any(here == s or s in here.parents for s in skip):
                continue
            out[str(here)] = "dir"
            for f in files:
                p = here / f
                if not any(s in p.parents for s in skip):
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if not p.is_symlink() else "link"
    return out


@pytest.fixture
def failing_writes(monkeypatch):
    """fail(folder, code): every write, folder made or file renamed under `folder` fails with `code`
    (a read-only mount or a full disk, at the calls loraplan's writers and the libraries they call use)."""

    def fail(folder: Path, code: int) -> None:
        folder = folder.resolve()

        def under(path) -> bool:
            try:
                p = Path(os.fsdecode(path)).resolve()
            except (TypeError, ValueError):
                return False
            return p == folder or folder in p.parents

        def raise_for(path):
            raise OSError(code, os.strerror(code), os.fsdecode(path))

        real_open, real_mkdir, real_replace, real_access = builtins.open, os.mkdir, os.replace, os.access

        def fake_open(file, mode="r", *a, **k):
            if isinstance(file, str | bytes | os.PathLike) and any(c in mode for c in "wax+") and under(file):
                raise_for(file)
            return real_open(file, mode, *a, **k)

        def fake_mkdir(path, *a, **k):
            if under(path) and (code != errno.EROFS or Path(os.fsdecode(path)).resolve() != folder):
                raise_for(path)
            return real_mkdir(path, *a, **k)

        def fake_replace(src, dst, *a, **k):
            if under(dst):
                raise_for(dst)
            return real_replace(src, dst, *a, **k)

        def fake_access(path, mode, *a, **k):
            if code == errno.EROFS and mode & os.W_OK and under(path):
                return False
            return real_access(path, mode, *a, **k)

        folder.mkdir(parents=True, exist_ok=True)
        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        monkeypatch.setattr(os, "replace", fake_replace)
        monkeypatch.setattr(os, "access", fake_access)

    return fail


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ws: Path, tmp_path: Path, capsys, failing_writes):
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("must survive")
    write_files(case.files, ws, tmp_path)
    outs = (tmp_path / "out", tmp_path / "ro") + ((tmp_path / "sw",) if case.code == 0 else ())
    before = snapshot(ws, tmp_path, skip=outs)
    argv = [fill(a, ws, tmp_path) for a in case.argv]
    if case.subprocess:
        env = {k: v for k, v in os.environ.items()
               if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
        t0 = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "loraplan.cli", *argv], capture_output=True, text=True,
                              env=env, timeout=120)
        seconds = time.monotonic() - t0
        code, out, err = done.returncode, done.stdout, done.stderr
        assert seconds < case.seconds, f"took {seconds:.1f} s"
    else:
        if case.fault:
            failing_writes(tmp_path / case.fault[0], case.fault[1])
        code, out, err = run_cli(argv, capsys)
    assert code == case.code, (code, out, err)
    if case.code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert "(hint: " in lines[0], lines[0]
        for w in case.words:
            assert fill(w, ws, tmp_path) in lines[0], lines[0]
    else:
        assert "Traceback" not in err, err
        for w in case.words:
            assert w in out, out
    print(f"{case.id}: exit {code}: {err.strip().splitlines()[-1] if err.strip() else out.strip()[:200]}")
    assert snapshot(ws, tmp_path, skip=outs) == before, "a file outside --out changed"
    assert (tmp_path / "victim" / "keep.txt").read_text() == "must survive"


# -- the rules behind the table, one by one --------------------------------------------------------


def test_a_trial_folder_that_links_out_is_never_removed(tmp_path):
    from loraplan.errors import UsageError
    from loraplan.sweeps.folder import SweepFolder, TrialPlan, TrialWriter

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("must survive")
    root = tmp_path / "sweep"
    (root / "trials").mkdir(parents=True)
    (root / "trials" / "a").symlink_to(victim, target_is_directory=True)
    with pytest.raises(UsageError, match="outside"):
        SweepFolder(root).trial("a")
    writer = TrialWriter(root / "trials" / "a", "a")  # as a worker process gets it
    with pytest.raises(UsageError, match="link"):
        writer.start(TrialPlan("a", {}, {}))
    assert (victim / "keep.txt").read_text() == "must survive"
    # trials/ itself a link out of the sweep folder
    other = tmp_path / "other"
    (other / "trials").mkdir(parents=True)
    (other / "trials").rmdir()
    (other / "trials").symlink_to(victim, target_is_directory=True)
    with pytest.raises(UsageError, match="outside"):
        SweepFolder(other).trial("keep")
    with pytest.raises(UsageError, match="safe name"):
        SweepFolder(root).trial("..")
    assert (victim / "keep.txt").read_text() == "must survive"


@pytest.mark.parametrize("name", ["q", "a.b", "a+b", "lora_A", "x" * 100])
def test_the_adapter_name_peft_sees_saves_and_loads(tmp_path, name):
    """PEFT strips `.NAME` from state-dict keys when it saves: a trial named `q` would turn
    `self_attn.q_proj` into `self_attn_proj`. The derived adapter name saves every key intact."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file
    from support.tiny import make_model

    from loraplan.plan.lora_plan import LoraPlan
    from loraplan.sweeps.folder import SweepFolder, TrialPlan
    from loraplan.sweeps.spec import Trial

    trial = Trial(name=name, plan=LoraPlan(targets="q,v", r=2))
    assert trial.adapter_name.isidentifier() and trial.adapter_name.isascii()
    model = get_peft_model(make_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                           adapter_name=trial.adapter_name)
    writer = SweepFolder(tmp_path / "sweep").trial(name)
    writer.start(TrialPlan(name, {}, {}))
    writer.save_adapter(model, trial.adapter_name)
    keys = load_file(str(writer.adapter_dir / "adapter_model.safetensors"))
    assert len(keys) == 8 and all(".q_proj." in k or ".v_proj." in k for k in keys), sorted(keys)
    reloaded = PeftModel.from_pretrained(make_model("llama"), str(writer.adapter_dir))
    ids = torch.tensor([[1, 5, 9, 11]])
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_names_from_every_entry_follow_one_rule(tmp_path):
    from loraplan.errors import UsageError
    from loraplan.files import name_problem
    from loraplan.sweeps.runner import with_trial_from_file
    from loraplan.sweeps.spec import SweepSpec, expand

    config = tmp_path / "my adapter (v2).json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}))
    spec = with_trial_from_file(SweepSpec(grid={"targets": ["q,v", "re:.*_proj"], "r": [4]}), config)
    names = [t.name for t in expand(spec)]
    assert names == ["q+v_r4", "re_.__proj_r4", "from_my_adapter_v2"]
    assert all(name_problem(n) is None for n in names)
    twice = with_trial_from_file(SweepSpec(trials=[{"name": "from_my_adapter_v2", "targets": "q", "r": 4}]), config)
    with pytest.raises(UsageError, match="duplicate trial names: 'from_my_adapter_v2'"):
        expand(twice)


def test_an_unreachable_hub_is_seen_in_the_timeout(monkeypatch):
    import socket

    from loraplan import hub

    t0 = time.monotonic()
    assert not hub.reachable("huggingface.invalid", 443, timeout=0.5)  # .invalid never resolves (RFC 6761)
    assert time.monotonic() - t0 < 1.5
    with socket.create_server(("127.0.0.1", 0)) as server:
        assert hub.reachable("127.0.0.1", server.getsockname()[1], timeout=0.5)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.offline()

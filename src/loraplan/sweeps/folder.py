"""The sweep folder (format: docs/sweep-dir.md): the one module that writes it and reads it.

Writing. `SweepFolder` owns a folder while a sweep runs: it holds an OS lock on it (`filelock`, an
flock the kernel releases when the process dies), so a second `loraplan sweep` on the same folder
stops with one line naming the first one's process instead of deleting its running trial, and a
sweep that was killed leaves nothing to clean up. Each trial writes through a `TrialWriter`, which
touches only `trials/<name>/` and takes no lock: the process that holds the folder hands each
trial to exactly one writer, which may live in another process (a worker of a local executor).
Every file is written atomically (`loraplan.files`); `metrics.jsonl` is appended one line at a
time, so a SIGKILL loses at most the trials that were running, and those restart on the next run.

Reading. `read_sweep` and `read_trial` return typed objects — a `Sweep` and, per trial, a
`TrialResult` with a `TrialStatus` — to every reader: the runner when it resumes, `report` and
`diagnose`. They apply one policy to damaged, cut and unstarted trials (the table in
docs/sweep-dir.md): a cut last line of metrics.jsonl is skipped with a note (the normal trace of a
kill); another unreadable line is skipped with a note; a result.json that does not parse or has a
wrong type makes the trial `damaged`, which the next sweep runs again; a folder without sweep.json
or trials/ is an error, never an empty or stale report. Readers never take the lock.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import socket
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from ..errors import UsageError, listing
from ..files import check_name, check_output, inside, write_atomic, write_json

LEDGER_FORMAT = 1
LOCK_FILE = ".sweep.lock"  # the flock; it stays in place after release (waiters share its inode)
OWNER_FILE = ".sweep.lock.json"  # who holds the lock: pid, host, start time, command (for the message)
RERUN = "the next `loraplan sweep` with the same command runs it again"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class TrialStatus(str, Enum):
    """Where a trial stands. The first five are written in result.json (the trial is finished and
    the ledger keeps it); the other three are what a reader finds without a valid result.json."""

    COMPLETED = "completed"
    OOM = "oom"
    DIVERGED = "diverged"
    FAILED = "failed"  # raised, or PEFT could not build the adapter
    PRUNED = "pruned"  # stopped early by successive halving; adapter and curves kept
    UNFINISHED = "unfinished"  # started (files in its folder), no result.json: running, or killed
    PENDING = "pending"  # nothing written yet
    DAMAGED = "damaged"  # result.json unreadable or of the wrong shape

    __str__ = str.__str__
    __format__ = str.__format__

    @property
    def finished(self) -> bool:
        """A result the ledger keeps: the next sweep skips this trial."""
        return self in _FINISHED

    @property
    def failed(self) -> bool:
        return self in (TrialStatus.OOM, TrialStatus.DIVERGED, TrialStatus.FAILED)


_FINISHED = frozenset({TrialStatus.COMPLETED, TrialStatus.OOM, TrialStatus.DIVERGED, TrialStatus.FAILED,
                       TrialStatus.PRUNED})


# -- typed records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainPoint:
    """One optimizer step (a `"kind": "train"` line of metrics.jsonl); `train_loss` is the raw loss,
    NaN included."""

    step: int
    train_loss: float
    lr: float | None = None
    tokens: int | None = None
    elapsed_s: float | None = None
    kind: ClassVar[str] = "train"

    def to_json(self) -> dict:
        return {"kind": self.kind, **_fields_json(self)}


@dataclass(frozen=True)
class EvalPoint:
    """One evaluation (a `"kind": "eval"` line): the token-weighted eval loss and its standard error."""

    step: int
    eval_loss: float | None  # None: the eval set had no supervised token
    eval_loss_sem: float | None = None
    eval_batches: int | None = None
    elapsed_s: float | None = None
    eval_seconds: float | None = None
    kind: ClassVar[str] = "eval"

    def to_json(self) -> dict:
        return {"kind": self.kind, **_fields_json(self)}


MetricPoint = TrainPoint | EvalPoint


@dataclass(frozen=True)
class EvalBatches:
    """The final eval pass batch by batch (every trial sees the same batches): for paired comparisons."""

    loss: list[float]
    tokens: list[int]

    def to_json(self) -> dict:
        return {"loss": self.loss, "tokens": self.tokens}


@dataclass
class TrialPlan:
    """plan.json: the trial's LoraPlan (`settings`, written under "plan"), the exact PEFT LoraConfig
    kwargs and the training settings."""

    name: str | None
    settings: dict
    peft_config: dict
    training: dict | None = None
    placement: str | None = None  # where it runs (TrialResult.placement)

    def to_json(self) -> dict:
        return {"name": self.name, "plan": self.settings, "peft_config": self.peft_config, "training": self.training,
                "placement": self.placement}

    @classmethod
    def from_json(cls, data: Any) -> TrialPlan:
        if not isinstance(data, dict):
            raise ValueError("is not a JSON object")
        for key in ("plan", "peft_config", "training"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise ValueError(f"has {key!r} of type {type(data[key]).__name__}, not an object")
        if data.get("name") is not None and not isinstance(data["name"], str):
            raise ValueError("has a 'name' that is not a string")
        placement = data.get("placement")
        return cls(data.get("name"), data.get("plan") or {}, data.get("peft_config") or {}, data.get("training"),
                   placement if isinstance(placement, str) else None)


_READ = {"read": True}  # a field filled from the trial's other files, never written to result.json


@dataclass
class TrialResult:
    """One trial: its result.json when it finished, or what its plan and metrics tell so far.

    Every reader gets these (in sweep order) from `read_sweep`; the engine builds one when a trial
    ends and `TrialWriter.finish` writes it."""

    name: str
    status: TrialStatus
    message: str | None = None
    targets: str | None = None
    r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    use_dora: bool = False
    loraplus_lr_ratio: float | None = None
    lora_dropout: float | None = None
    trainable_params: int | None = None
    eval_loss: float | None = None
    eval_loss_sem: float | None = None
    eval_step: int | None = None
    train_loss: float | None = None  # the mean of the last 10% of steps
    steps: int | None = None
    wall_s: float | None = None
    train_s: float | None = None
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    adapter: str | None = None  # the adapter folder, relative to the trial's folder
    engine: str | None = None  # which engine trained it: fast or peft (sweeps/fast_engine.py)
    placement: str | None = None  # where it ran: host/device and worker (sweeps/executors.py)
    learning_rate: float | None = None  # the peak rate it trained at (None: an older result.json)
    config: str | None = None  # the config it trained at one of several learning rates (None: itself)
    # its ΔW cut by SVD to each lower rank of its family (configs that differ only in r): rank -> the
    # per-batch eval losses on the same batches as eval_batches (sweeps/fair.py, "certificates")
    certificates: dict[str, list[float]] | None = None
    eval_batches: EvalBatches | None = None
    started: str | None = None
    finished: str | None = None
    plan: TrialPlan | None = field(default=None, metadata=_READ)
    metrics: list[MetricPoint] = field(default_factory=list, metadata=_READ, repr=False)

    @property
    def train(self) -> list[TrainPoint]:
        return [p for p in self.metrics if isinstance(p, TrainPoint)]

    @property
    def evals(self) -> list[EvalPoint]:
        return [p for p in self.metrics if isinstance(p, EvalPoint)]

    @property
    def comparable(self) -> bool:
        """Completed with a finite eval loss: what the ranking compares."""
        return self.status is TrialStatus.COMPLETED and _finite(self.eval_loss)

    def to_json(self) -> dict:
        """result.json."""
        return _fields_json(self)

    @classmethod
    def from_json(cls, data: Any, name: str | None = None) -> TrialResult:
        """A result.json, checked: a ValueError names the first field of the wrong type."""
        if not isinstance(data, dict):
            raise ValueError("is not a JSON object")
        status = data.get("status")
        try:
            status = TrialStatus(status)
        except ValueError:
            raise ValueError(f"has status {status!r}, not one of {', '.join(s.value for s in _FINISHED)}") from None
        if not status.finished:
            raise ValueError(f"has status {status.value!r}, which is not a finished trial's")
        values = _checked(cls, data, skip=("name", "status"))
        if values.get("eval_batches") is not None:
            values["eval_batches"] = EvalBatches(**_checked(EvalBatches, values["eval_batches"], where="eval_batches."))
        if name is None and not isinstance(data.get("name"), str):
            raise ValueError("has no name")
        return cls(name=name or data["name"], status=status, **values)


@dataclass
class Comparison:
    """A trial against the best one, by the noise rule of `ranking.compare`."""

    delta: float  # its eval loss minus the best's
    noise: float | None  # None: no standard error to judge by
    within_noise: bool

    @property
    def worse(self) -> bool:
        """Clearly worse than the best: outside a known noise."""
        return self.noise is not None and not self.within_noise

    def to_json(self) -> dict:
        return {"delta": self.delta, "noise": self.noise, "within_noise": self.within_noise}


@dataclass
class Summary:
    """summary.json: the ranking and the recommendation (`ranking.summarize` makes one)."""

    ranking: list[str]
    best: str | None
    recommended: str | None
    reason: str = ""
    noise: float | None = None
    noise_method: str | None = None
    failed: dict[str, str] = field(default_factory=dict)
    trials: dict[str, Comparison] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    lr_policy: str | None = None  # per-config or fixed (None: an older summary.json)
    settled: bool | None = None  # whether the best and the recommended trials' eval curves had flattened
    settle_note: str | None = None  # why (not), and how many steps would settle it
    certified: dict[str, str] = field(default_factory=dict)  # config -> why a cut adapter vouches for it

    def to_json(self) -> dict:
        out = _fields_json(self)
        out["trials"] = {name: c.to_json() for name, c in self.trials.items()}
        return out

    @classmethod
    def from_json(cls, data: Any) -> Summary:
        if not isinstance(data, dict):
            raise ValueError("is not a JSON object")
        if "ranking" not in data:
            raise ValueError("has no ranking")
        values = _checked(cls, data, skip=("trials",))
        trials = data.get("trials") or {}
        if not isinstance(trials, dict):
            raise ValueError("has 'trials' that is not an object")
        values["trials"] = {str(name): Comparison(**_checked(Comparison, c, where=f"trials.{name}."))
                            for name, c in trials.items()}
        return cls(**values)


@dataclass
class Sweep:
    """A sweep folder as read: sweep.json (`header`), every trial in sweep order, summary.json as
    written (None when absent or unreadable), the optional probe.json / analysis.json, and notes on
    whatever was skipped while reading."""

    path: Path
    header: dict
    trials: list[TrialResult]
    summary: Summary | None = None
    notes: list[str] = field(default_factory=list)
    probe: dict | None = None
    analysis: dict | None = None

    @property
    def model(self) -> str | None:
        return self.header.get("model")

    @property
    def spec(self) -> dict:
        return self.header.get("spec") or {}

    @property
    def environment(self) -> dict:
        return self.header.get("environment") or {}

    @property
    def data(self) -> dict:
        return self.header.get("data") or {}

    @property
    def created(self) -> str | None:
        return self.header.get("created")

    @property
    def spec_hash(self) -> str | None:
        return self.header.get("spec_hash")

    def trial(self, name: str) -> TrialResult | None:
        return next((t for t in self.trials if t.name == name), None)

    def counts(self) -> dict[str, int]:
        """How many trials per status, in order of first appearance: {"completed": 6, "oom": 1}."""
        out: dict[str, int] = {}
        for t in self.trials:
            out[t.status.value] = out.get(t.status.value, 0) + 1
        return out


# -- reading --------------------------------------------------------------------------------------


def read_sweep(path: str | os.PathLike) -> Sweep:
    """Read a sweep folder (or its sweep.json) with the policy of docs/sweep-dir.md. A folder that is
    not a sweep, lacks sweep.json or trials/, or holds another format is a UsageError."""
    path = Path(path).expanduser()
    if path.is_file() and path.name == "sweep.json":
        path = path.parent
    if not path.exists():
        raise UsageError(f"{path} does not exist", "give the folder that `loraplan sweep … --out DIR` wrote")
    if not path.is_dir():
        raise UsageError(f"{path} is a file, not a sweep folder", "give the folder that holds sweep.json")
    if not (path / "sweep.json").is_file():
        inside = sorted(p.parent.name for p in path.glob("*/sweep.json"))
        above = next((p for p in path.resolve().parents if (p / "sweep.json").is_file()), None)
        hint = (f"sweep folders inside it: {listing(inside)}" if inside
                else f"it is inside the sweep folder {above}" if above
                else "give the folder that `loraplan sweep … --out DIR` wrote")
        raise UsageError(f"{path} is not a sweep folder: it has no sweep.json", hint)
    header = _read_header(path / "sweep.json")
    if not (path / "trials").is_dir():
        raise UsageError(f"{path} has sweep.json but no trials/ folder: its results are gone",
                         "rerun the same `loraplan sweep` command to run the trials again")
    notes: list[str] = []
    trials = [read_trial(path / "trials" / name, name, notes, base=path) for name in _trial_names(path, header, notes)]
    summary = None
    if (path / "summary.json").is_file():
        try:
            summary = Summary.from_json(_load(path / "summary.json"))
        except ValueError as e:
            notes.append(f"summary.json {e}: the ranking is computed from the trials")
    probe = _optional(path / "probe.json", "modules", notes)
    analysis = _optional(path / "analysis.json", "trials", notes)
    return Sweep(path, header, trials, summary, notes, probe, analysis)


def read_trial(folder: str | os.PathLike, name: str | None = None, notes: list[str] | None = None,
               base: Path | None = None) -> TrialResult:
    """One trial folder: result.json when it is valid, else an unfinished, pending or damaged trial
    with what plan.json and metrics.jsonl tell. Skipped lines and unreadable files go to `notes`
    (paths relative to `base`)."""
    folder = Path(folder)
    name = name or folder.name
    notes = notes if notes is not None else []
    base = base or folder.parent

    def where(file: str) -> str:
        return str((folder / file).relative_to(base)) if (folder / file).is_relative_to(base) else str(folder / file)

    plan = None
    if (folder / "plan.json").is_file():
        try:
            plan = TrialPlan.from_json(_load(folder / "plan.json"))
        except ValueError as e:
            notes.append(f"{where('plan.json')} {e}: the trial's settings come from result.json only")
    metrics = read_metrics(folder / "metrics.jsonl", notes, where("metrics.jsonl"))
    status, message = TrialStatus.PENDING, "not started (the next `loraplan sweep` with the same command runs it)"
    if (folder / "result.json").is_file():
        try:
            result = TrialResult.from_json(_load(folder / "result.json"), name)
        except ValueError as e:
            status, message = TrialStatus.DAMAGED, f"result.json {e}; {RERUN}"
        else:
            result.plan, result.metrics = plan, metrics
            return result
    elif folder.is_dir() and any(folder.iterdir()):
        status = TrialStatus.UNFINISHED
        message = "no result.json yet: still running, or interrupted (a rerun of the sweep restarts it)"
    trial = TrialResult(name, status, message, plan=plan, metrics=metrics,
                        placement=plan.placement if plan else None)  # a running trial: where it runs
    settings = plan.settings if plan else {}
    for key, kind in (("targets", str), ("r", int), ("lora_alpha", float), ("use_rslora", bool),
                      ("use_dora", bool), ("loraplus_lr_ratio", float)):
        if _fits(settings.get(key), kind):
            setattr(trial, key, settings[key])
    steps = [p.step for p in trial.train]
    elapsed = [p.elapsed_s for p in metrics if _finite(p.elapsed_s)]
    trial.steps = max(steps) if steps else None
    trial.wall_s = max(elapsed) if elapsed else None
    return trial


def read_metrics(file: Path, notes: list[str] | None = None, label: str | None = None) -> list[MetricPoint]:
    """metrics.jsonl as points. A last line without its newline that does not parse is the trace of a
    process killed while writing it; it and any other unreadable line are skipped with a note. Lines
    of a kind this version does not know are ignored (a later loraplan may log more)."""
    if not file.is_file():
        return []
    notes = notes if notes is not None else []
    label = label or str(file)
    lines = file.read_bytes().decode("utf-8", errors="replace").split("\n")
    open_end = lines[-1] != ""  # no newline at the end: the last line may have been cut
    if not open_end:
        lines.pop()
    points, bad, cut = [], [], False
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            point = metric_point(json.loads(line))
        except ValueError:
            if open_end and n == len(lines):
                cut = True
            else:
                bad.append(n)
            continue
        if point is not None:
            points.append(point)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (f", … ({len(bad) - 5} more)" if len(bad) > 5 else "")
        notes.append(f"{label}: {len(bad)} unreadable line{'s' * (len(bad) > 1)} skipped (line{'s' * (len(bad) > 1)} "
                     f"{shown})")
    if cut:
        notes.append(f"{label}: the last line is cut (the trial stopped while writing it): skipped")
    return points


def metric_point(row: Any) -> MetricPoint | None:
    """One metrics.jsonl object as a point (None for a kind this version does not read)."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    kind = row.get("kind")
    for cls in (TrainPoint, EvalPoint):
        if kind == cls.kind:
            return cls(**_checked(cls, row))
    return None


def _read_header(file: Path) -> dict:
    try:
        header = _load(file)
    except ValueError as e:
        raise UsageError(f"{file} {e}",
                         "the sweep's header is damaged: move the folder away or choose another --out") from None
    if not isinstance(header, dict):
        raise UsageError(f"{file} is not a JSON object", "is it a loraplan sweep.json?")
    if header.get("format", LEDGER_FORMAT) != LEDGER_FORMAT:
        raise UsageError(f"{file} has format {header.get('format')!r}; this loraplan reads format {LEDGER_FORMAT}",
                         "use the loraplan version that wrote the sweep")
    return header


def _trial_names(path: Path, header: dict, notes: list[str]) -> list[str]:
    """The trials sweep.json lists, in its order, then any other folder under trials/."""
    listed = header.get("trials") if isinstance(header.get("trials"), list) else []
    on_disk = sorted(p.name for p in (path / "trials").iterdir() if p.is_dir())
    names = []
    for name in dict.fromkeys([*listed, *on_disk]):
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            notes.append(f"trial name {name!r} is not a folder name: skipped")
            continue
        names.append(name)
    return names


def _load(file: Path) -> Any:
    """JSON from a file; every way of not being JSON is a ValueError with its reason."""
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"is not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"cannot be read ({e.strerror or e})") from None


def _optional(file: Path, key: str, notes: list[str]) -> dict | None:
    if not file.is_file():
        return None
    try:
        data = _load(file)
    except ValueError as e:
        notes.append(f"{file.name} {e}: section left out")
        return None
    if not isinstance(data, dict) or key not in data:
        notes.append(f"{file.name} has no '{key}' (see docs/sweep-dir.md): section left out")
        return None
    return data


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type a field declares (int is not bool; float takes an int and NaN)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_fits(k, key) and _fits(v, item) for k, v in value.items())
    if hint is dict:
        return isinstance(value, dict)
    return isinstance(value, dict)  # a nested record: checked by its own class


def _checked(cls, data: Any, skip: tuple[str, ...] = (), where: str = "") -> dict:
    """The fields of dataclass `cls` found in `data`, each checked against its annotation: missing
    ones take their default, unknown keys are ignored. A ValueError names the first wrong one."""
    if not isinstance(data, dict):
        raise ValueError(f"has {where.rstrip('.') or 'a value'} that is not a JSON object")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if f.name in skip or f.metadata.get("read") or not f.init:
            continue
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"has no {where}{f.name}")
            continue
        value = data[f.name]
        if not _fits(value, hints[f.name]):
            raise ValueError(f"has {where}{f.name} = {json.dumps(value, default=str)[:40]}, "
                             f"not {_type_name(hints[f.name])}")
        values[f.name] = value
    return values


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join(names.get(a, "a list" if typing.get_origin(a) is list else "an object") for a in args)


def _fields_json(record) -> dict:
    out = {}
    for f in fields(record):
        if f.metadata.get("read"):
            continue
        value = getattr(record, f.name)
        if hasattr(value, "to_json"):
            value = value.to_json()
        out[f.name] = value.value if isinstance(value, Enum) else value
    return out


# -- the lock -------------------------------------------------------------------------------------


class FolderLock:
    """An OS-level lock on a sweep folder with a small sidecar naming its holder. The kernel drops
    the lock when its process dies, so a killed sweep's lock is simply taken over (the stale sidecar
    is overwritten)."""

    def __init__(self, root: Path):
        self.root = root
        self._lock = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def acquire(self) -> None:
        from filelock import FileLock, Timeout

        if self._lock is not None:
            return
        lock = FileLock(str(self.root / LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise UsageError(f"{self.root} is in use by another sweep ({self.holder_text()})",
                             "wait for it to finish, or stop that process; a killed sweep frees the folder by "
                             "itself") from None
        self._lock = lock
        write_json(self.root / OWNER_FILE, {"pid": os.getpid(), "host": socket.gethostname(), "started": now(),
                                            "command": " ".join(sys.argv)})

    def release(self) -> None:
        if self._lock is None:
            return
        try:
            (self.root / OWNER_FILE).unlink(missing_ok=True)
        finally:
            self._lock.release()
            self._lock = None

    def holder(self) -> dict | None:
        """The sidecar's {pid, host, started, command}, or None when there is none to read."""
        try:
            data = _load(self.root / OWNER_FILE)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def holder_text(self) -> str:
        who = self.holder()
        if not who:
            return "its process wrote no owner file yet"
        return f"pid {who.get('pid', '?')} on {who.get('host', '?')}, started {who.get('started', '?')}"


# -- writing --------------------------------------------------------------------------------------


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spec_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ: `training.max_steps: 100 -> 200`."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(dict.fromkeys([*old, *new])):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{path}: (absent) -> {json.dumps(new[key], default=str)}")
            elif key not in new:
                out.append(f"{path}: {json.dumps(old[key], default=str)} -> (absent)")
            else:
                out.extend(spec_differences(old[key], new[key], path))
        return out
    if old != new:
        return [f"{prefix}: {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}"]
    return []


@dataclass
class TrialWriter:
    """Where one trial writes: start / log / save_adapter / finish. It touches only its own folder
    and takes no lock (the holder of the sweep folder gives each trial to one writer), so it can be
    sent to a worker process before `start`. Before it creates or removes anything it checks that
    the folder resolves (symlinks followed) to a child of the sweep's trials/ folder."""

    folder: Path
    name: str
    placement: str | None = None  # where the trial runs, written into its result
    _metrics: io.TextIOWrapper | None = field(default=None, repr=False)

    @property
    def adapter_dir(self) -> Path:
        return self.folder / "adapter"

    def _checked(self, path: Path) -> Path:
        """`path` (the trial folder or a file in it), after checking that the folder is a plain
        folder named after the trial and resolves into the sweep folder (trials/ is not a link out)."""
        check_name(self.name)
        if self.folder.name != self.name or self.folder.is_symlink():
            raise UsageError(f"{self.folder} is a link or not the folder of trial {self.name!r}",
                             "remove the link: a trial's folder is a plain folder under trials/")
        inside(self.folder.parent.parent, self.folder, f"the folder of trial {self.name!r}")
        return inside(self.folder, path, f"a file of trial {self.name!r}")

    def start(self, plan: TrialPlan) -> None:
        """Begin (or begin again: an unfinished or damaged attempt is removed first)."""
        self._checked(self.folder)
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        plan.placement = plan.placement or self.placement
        write_json(self.folder / "plan.json", plan.to_json())
        self._metrics = open(self.folder / "metrics.jsonl", "a", buffering=1, encoding="utf-8")

    def log(self, point: MetricPoint) -> None:
        """Append one line to metrics.jsonl (flushed: a crash loses at most the line being written)."""
        assert self._metrics is not None, "start() first"
        self._metrics.write(json.dumps(point.to_json(), allow_nan=True) + "\n")
        self._metrics.flush()

    def write_error(self, text: str) -> None:
        """error.txt: the traceback of a trial that raised."""
        write_atomic(self.folder / "error.txt", text, durable=False)

    def save_adapter(self, peft_model, adapter_name: str) -> None:
        tmp = self._checked(self.folder / ".adapter.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        peft_model.save_pretrained(str(tmp), selected_adapters=[adapter_name], safe_serialization=True)
        # PEFT writes a non-default adapter into a subfolder named after it
        written = tmp / adapter_name if (tmp / adapter_name).is_dir() else tmp
        if self.adapter_dir.exists():
            shutil.rmtree(self.adapter_dir)
        os.replace(written, self.adapter_dir)
        if tmp.exists():
            shutil.rmtree(tmp)

    def finish(self, result: TrialResult) -> TrialResult:
        """Write result.json (the trial is finished from then on) and return the result as written."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        result.name, result.finished = self.name, now()
        result.placement = result.placement or self.placement
        self.folder.mkdir(parents=True, exist_ok=True)  # a trial whose worker died before it started
        write_json(self.folder / "result.json", result.to_json())
        return result


class SweepFolder:
    """The owner of a sweep folder while a sweep runs: `open` takes the lock and writes sweep.json,
    `trial(name)` hands out a writer, `write_outputs` writes summary.json / results.csv / summary.md,
    `read` reads it back like every other reader, `close` frees it. Use it as a context manager."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._lock = FolderLock(self.root)

    @property
    def trials_dir(self) -> Path:
        return self.root / "trials"

    def __enter__(self) -> SweepFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def lock(self) -> None:
        """Take the folder (creating it); a folder that holds something else, or that another sweep
        holds, is a UsageError and is left untouched."""
        if self._lock.held:
            return
        check_output(self.root)
        if self.root.is_dir() and not (self.root / "sweep.json").exists():
            others = [p.name for p in self.root.iterdir() if p.name not in (LOCK_FILE, OWNER_FILE)]
            if others:
                raise UsageError(f"{self.root} exists and is not a sweep directory", "choose an empty or new --out")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()

    def open(self, header: dict, trial_names: list[str]) -> Sweep:
        """Take the folder, create the ledger or reopen it after checking that the spec is the same,
        and return what it holds (finished trials are `status.finished`)."""
        self.lock()
        path = self.root / "sweep.json"
        if path.exists():
            old = _read_header(path)
            if old.get("spec_hash") != header["spec_hash"]:
                diff = spec_differences(old.get("spec"), header["spec"])
                raise UsageError(f"{self.root} holds a sweep with a different spec: " + "; ".join(diff[:6])
                                 + (f"; … {len(diff) - 6} more" if len(diff) > 6 else ""),
                                 "rerun with the same spec to resume, or choose another --out")
            header = {**header, "created": old.get("created", header["created"]), "resumed": now()}
        inside(self.root, self.trials_dir, "trials/")
        self.trials_dir.mkdir(exist_ok=True)
        write_json(path, {**header, "trials": trial_names})
        return self.read()

    def read(self) -> Sweep:
        return read_sweep(self.root)

    def trial(self, name: str) -> TrialWriter:
        check_name(name)
        return TrialWriter(inside(self.root, self.trials_dir / name, f"trial {name!r}"), name)

    def update_header(self, **values) -> None:
        """Change top-level keys of sweep.json (e.g. the environment once the engine knows its device)."""
        write_json(self.root / "sweep.json", {**_read_header(self.root / "sweep.json"), **values})

    def write_probe(self, probe: dict) -> None:
        """probe.json: the probe a --from-probe sweep started from (the report shows it)."""
        write_json(self.root / "probe.json", probe)

    def write_outputs(self, trials: list[TrialResult], summary: Summary, markdown: str) -> None:
        write_json(self.root / "summary.json", summary.to_json())
        write_atomic(self.root / "results.csv", results_csv(trials))
        write_atomic(self.root / "summary.md", markdown)

    def close(self) -> None:
        self._lock.release()


def ran_on(trials: list[TrialResult]) -> str | None:
    """Where the trials ran, grouped: `node-a/cuda:0 (pid 11): q_r8, mlp_r8; node-a/cuda:1 (pid 12): all_r8`."""
    places: dict[str, list[str]] = {}
    for t in trials:
        if t.placement:
            places.setdefault(t.placement, []).append(t.name)
    return "; ".join(f"{where}: {', '.join(names)}" for where, names in places.items()) or None


CSV_COLUMNS = ("name", "status", "targets", "r", "lora_alpha", "use_rslora", "use_dora", "loraplus_lr_ratio",
               "trainable_params", "eval_loss", "eval_loss_sem", "train_loss", "steps", "wall_s", "tokens_per_s",
               "peak_memory_bytes", "placement", "message")


def results_csv(trials: list[TrialResult]) -> str:
    """results.csv: one row per trial, the scalar columns of result.json."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for t in trials:
        writer.writerow([_csv_value(getattr(t, c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def _csv_value(v):
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, Enum):
        return v.value
    return "" if v is None else v

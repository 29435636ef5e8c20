"""The sweep directory as a ledger (format: docs/sweep-dir.md).

A finished trial is one whose `result.json` exists; it is never run again. Every file is written
atomically (a temporary file in the same folder, then `os.replace`), and `metrics.jsonl` is flushed
line by line, so a crash or a SIGKILL loses at most the trial that was running — and that one is
restarted from scratch on the next run. A rerun with a different spec is refused, showing the
difference.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..files import read_json, write_atomic, write_json

LEDGER_FORMAT = 1
STATUSES = ("completed", "oom", "diverged", "failed", "pruned")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")




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
class TrialRecorder:
    """Where one trial writes: the engine calls these, and knows nothing about files."""

    folder: Path
    name: str
    _metrics: io.TextIOWrapper | None = field(default=None, repr=False)

    @property
    def adapter_dir(self) -> Path:
        return self.folder / "adapter"

    def start(self, plan: dict) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)  # an unfinished attempt: start clean
        self.folder.mkdir(parents=True)
        write_json(self.folder / "plan.json", plan)
        self._metrics = open(self.folder / "metrics.jsonl", "a", buffering=1)

    def log(self, row: dict) -> None:
        assert self._metrics is not None, "start() first"
        self._metrics.write(json.dumps(row, allow_nan=True) + "\n")
        self._metrics.flush()

    def save_adapter(self, peft_model, adapter_name: str) -> None:
        tmp = self.folder / ".adapter.tmp"
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

    def finish(self, result: dict) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        write_json(self.folder / "result.json", {"name": self.name, **result, "finished": now()})


class SweepLedger:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def trials_dir(self) -> Path:
        return self.root / "trials"

    def open(self, header: dict, trial_names: list[str]) -> list[str]:
        """Create the ledger, or reopen it after checking the spec is the same. Returns the names of
        the trials already finished."""
        path = self.root / "sweep.json"
        if path.exists():
            try:
                old = read_json(path)
            except ValueError:
                raise UsageError(f"{path} is damaged", "move the folder away or choose another --out") from None
            if old.get("spec_hash") != header["spec_hash"]:
                diff = spec_differences(old.get("spec"), header["spec"])
                raise UsageError(f"{self.root} holds a sweep with a different spec: " + "; ".join(diff[:6])
                                 + (f"; … {len(diff) - 6} more" if len(diff) > 6 else ""),
                                 "rerun with the same spec to resume, or choose another --out")
            header = {**header, "created": old.get("created", header["created"]), "resumed": now()}
        elif self.root.exists() and any(self.root.iterdir()):
            raise UsageError(f"{self.root} exists and is not a sweep directory", "choose an empty or new --out")
        self.root.mkdir(parents=True, exist_ok=True)
        self.trials_dir.mkdir(exist_ok=True)
        write_json(path, {**header, "trials": trial_names})
        return [n for n in trial_names if (self.trials_dir / n / "result.json").exists()]

    def recorder(self, name: str) -> TrialRecorder:
        return TrialRecorder(self.trials_dir / name, name)

    def results(self) -> list[dict]:
        """Every finished trial's result.json, in sweep order."""
        header = read_json(self.root / "sweep.json")
        out = []
        for name in header["trials"]:
            path = self.trials_dir / name / "result.json"
            if path.exists():
                out.append(read_json(path))
        return out

    def metrics(self, name: str) -> list[dict]:
        path = self.trials_dir / name / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # the last line of a killed trial may be cut
        return rows

    def write_results_csv(self, results: list[dict]) -> None:
        columns = ["name", "status", "targets", "r", "lora_alpha", "use_rslora", "use_dora", "loraplus_lr_ratio",
                   "trainable_params", "eval_loss", "eval_loss_sem", "train_loss", "steps", "wall_s",
                   "tokens_per_s", "peak_memory_bytes", "message"]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in results:
            writer.writerow({k: _csv_value(r.get(k)) for k in columns})
        write_atomic(self.root / "results.csv", buf.getvalue())


def _csv_value(v):
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return "" if v is None else v

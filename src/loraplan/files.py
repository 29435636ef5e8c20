"""Writing files and folders so that a crash or a SIGKILL leaves the old version or the new one,
never half of one: a temporary name in the same folder (so the last step is a rename on one file
system), then `os.replace`. Every file loraplan writes goes through here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UsageError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path next to `path`, for a writer that wants a file name (savefig, torch).
    Renamed onto `path` when the block ends; removed if it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` atomically. `durable` also fsyncs before the rename (ledger files: a
    power cut must not leave an empty file under the final name)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2, durable: bool = True) -> None:
    """`data` as JSON (NaN and inf kept as JavaScript's spellings, which Python reads back)."""
    separators = None if indent is not None else (",", ":")
    text = json.dumps(data, indent=indent, separators=separators, default=_json_default, allow_nan=True)
    write_atomic(path, text + "\n", durable=durable)


def _json_default(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "to_json"):
        return value.to_json()
    return str(value)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# -- output folders (compress, merge) ----------------------------------------------------------


def prepare_output(out: str | os.PathLike, marker: str, overwrite: bool, inputs: tuple = ()) -> Path:
    """A folder to write into: new or empty, or (with overwrite) one that already holds `marker`
    (the same kind of folder). Never one of the inputs."""
    folder = Path(out).expanduser()
    for source in inputs:
        if source is not None and Path(source).expanduser().resolve() == folder.resolve():
            raise UsageError(f"--out {folder} is an input of this command", "write to a new folder")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file", "give a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {folder} exists and is not empty", "choose a new folder, or pass --overwrite")
        if not (folder / marker).is_file():
            raise UsageError(f"--out {folder} is not empty and holds no {marker}; not overwriting it",
                             "choose a new or empty folder")
    return folder


def staging_folder(folder: Path) -> Path:
    """A temporary folder next to `folder` (same file system, so `publish` only renames)."""
    parent = folder.expanduser().resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=parent))


def publish(staging: Path, folder: Path) -> list[str]:
    """Move the files written into `staging` to `folder`, each with an atomic replace."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for item in sorted(staging.iterdir()):
        target = folder / item.name
        if target.is_dir() and not item.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
        written.append(item.name)
    staging.rmdir()
    return written

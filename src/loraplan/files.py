"""Writing files and folders so that a crash or a SIGKILL leaves the old version or the new one,
never half of one: a temporary name in the same folder (so the last step is a rename on one file
system), then `os.replace`. Every file loraplan writes goes through here.

Also the rules that keep writes where the user said: a name from a user's file becomes a path only
when it is a safe name (`check_name`), every path made from one is checked to stay inside its root
after resolving symlinks (`inside`), and an output path is checked before any work starts
(`check_output`: not a file where a folder is wanted, not under a file, writable).
"""

from __future__ import annotations

import json
import os
import re
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
    except OSError as e:  # a full disk, a read-only folder: name the file the user knows
        if e.filename is not None and os.fsdecode(e.filename) == str(tmp):
            e.filename = str(path)
        raise
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


# -- names and paths ------------------------------------------------------------------------------

NAME_RULE = "letters, digits, '-', '_', '+' and '.', not starting with '.', at most 100 characters"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,99}")  # '+': grid names join targets with it


def name_problem(name) -> str | None:
    """Why `name` cannot be a folder name loraplan creates (None when it can): the one rule for
    trial names, whatever file or flag they come from."""
    if not isinstance(name, str):
        return f"is {type(name).__name__}, not text"
    if not _SAFE_NAME.fullmatch(name):
        return f"{name!r} is not a safe name ({NAME_RULE})"
    return None


def check_name(name, what: str = "trial name") -> str:
    problem = name_problem(name)
    if problem:
        raise UsageError(f"{what} {problem}", f"rename it: {NAME_RULE}")
    return name


def safe_name(text: str, fallback: str = "trial") -> str:
    """A safe name made from any text (a file's stem, a target list): other characters become '_'."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(text)).lstrip("._")[:100].rstrip("_") or fallback


def inside(root: str | os.PathLike, path: str | os.PathLike, what: str = "path") -> Path:
    """`path`, after checking that it resolves (symlinks followed) to `root` or below it."""
    real_root = Path(root).expanduser().resolve()
    real = Path(path).expanduser().resolve()
    if real != real_root and real_root not in real.parents:
        raise UsageError(f"{what} {path} resolves to {real}, outside {root}",
                         f"remove the symlink or the name that leads out of {root}")
    return Path(path)


def check_output(path: str | os.PathLike, kind: str = "folder", flag: str = "--out") -> Path:
    """Before any work: `path` can be written as a `kind` ("folder" or "file"): not the other kind,
    not under a file, and its nearest existing folder writable. Returns the path."""
    p = Path(path).expanduser()
    if kind == "folder" and p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {p} is a file", "give a folder (new or empty)")
    if kind == "file" and p.is_dir():
        raise UsageError(f"{flag} {p} is a folder", f"give a file name, e.g. {p / 'result.json'}")
    nearest = p if p.exists() else next((a for a in p.absolute().parents if a.exists()), Path("/"))
    if not nearest.is_dir() and nearest != p:
        raise UsageError(f"{flag} {p} is under {nearest}, which is a file", "choose a path in a folder")
    folder = nearest if nearest.is_dir() else nearest.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {p}: {folder} is read-only (not writable)", "choose a folder you can write to")
    return p


# -- output folders (compress, merge) ----------------------------------------------------------


def prepare_output(out: str | os.PathLike, marker: str, overwrite: bool, inputs: tuple = ()) -> Path:
    """A folder to write into: new or empty, or (with overwrite) one that already holds `marker`
    (the same kind of folder). Never one of the inputs."""
    folder = check_output(out)
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
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=parent))
    except OSError as e:  # name the folder the user gave, not the temporary one
        e.filename = str(folder)
        raise


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

"""Reading training rows, each with its location for error messages (`train.jsonl:17`).

Sources: `.jsonl` / `.json` / `.csv` / `.tsv` (each optionally `.gz`) and `.parquet` files, a local
`datasets` folder, or a Hub dataset `ID`, `ID:SPLIT` or `ID:CONFIG:SPLIT` (default split: train).
A row is a dict, taken as it is: its format is for formats.py to detect.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from pathlib import Path

from ..errors import UsageError, listing

Record = tuple[str, dict]  # (location such as "train.jsonl:17", the row)

FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet"}


def read_records(source: str, *, split: str | None = None) -> list[Record]:
    """Every row of SOURCE with its location: `file.jsonl:17` (line), `file.csv:row 5` (data row,
    header excluded), `file.json:12` (the line the object starts on), `hub:ID[split]#i` (0-based)."""
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        records = _read_dataset(str(path), source, None, split, local=True)
    elif path.is_file():
        if split is not None:
            raise UsageError(f"a split ('{split}') applies to Hub datasets and dataset folders, not to {source}",
                             "give the split's own file")
        records = _read_file(path, source)
    elif _looks_like_path(source):
        raise UsageError(f"no such file or folder: {source}",
                         "give a .jsonl, .json, .csv, .tsv or .parquet file, a dataset folder or a Hub dataset id")
    else:
        name, config, hub_split = _parse_hub_id(source)
        records = _read_dataset(name, f"hub:{name}", config, split or hub_split or "train", local=False)
    if not records:
        raise UsageError(f"{source} holds no rows", "a data file needs at least one example")
    return records


def _looks_like_path(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or source.count("/") > 1
            or any(source.lower().removesuffix(".gz").endswith(s) for s in FILE_KINDS))


def _parse_hub_id(source: str) -> tuple[str, str | None, str | None]:
    parts = source.split(":")
    if len(parts) > 3 or not parts[0] or any(c.isspace() for c in source) or not all(parts):
        raise UsageError(f"'{source}' is not a data file, a dataset folder or a Hub dataset id",
                         "examples: train.jsonl, tatsu-lab/alpaca, HuggingFaceH4/ultrachat_200k:train_sft, "
                         "openai/gsm8k:main:train")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return parts[0], None, parts[1] if len(parts) == 2 else None


def _read_file(path: Path, source: str) -> list[Record]:
    name = path.name.lower()
    compressed = name.endswith(".gz")
    kind = FILE_KINDS.get(Path(name.removesuffix(".gz")).suffix)
    if kind is None or (compressed and kind == "parquet"):
        raise UsageError(f"{source}: unknown data file type", "use .jsonl, .json, .csv, .tsv (or any of them .gz) "
                         "or .parquet")
    if kind == "parquet":
        return _read_parquet(path, source)
    raw = path.read_bytes()
    if compressed:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise UsageError(f"{source} is not a valid gzip file ({e})", "compress it with gzip, or drop .gz") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UsageError(f"{source}:{line}: not UTF-8 text", "save the file as UTF-8") from None
    if kind == "jsonl":
        return _read_jsonl(text, source)
    if kind == "json":
        return _read_json(text, source)
    return _read_csv(text, source, "\t" if kind == "tsv" else ",")


def _read_jsonl(text: str, source: str) -> list[Record]:
    records = []
    # split on "\n" only: JSON strings may hold U+2028 and friends, which str.splitlines breaks on
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        location = f"{source}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{location}: not valid JSON ({e.msg} at column {e.colno})",
                             "each line of a JSON Lines file holds one JSON object") from None
        records.append((location, _as_row(value, location)))
    return records


def _read_json(text: str, source: str) -> list[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _read_jsonl(text, source)  # JSON Lines saved as .json, as many Hub datasets are
        raise UsageError(f"{source}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})",
                         "a .json data file holds a list of objects (or {\"data\": [...]})") from None
    if isinstance(data, dict):
        if not isinstance(data.get("data"), list):
            raise UsageError(f"{source} holds an object with keys {listing(sorted(data))}, not a list of rows",
                             "a .json data file holds a list of objects, or {\"data\": [...]}")
        start = _json_member_start(text, "data")
    elif isinstance(data, list):
        start = len(text) - len(text.lstrip())
    else:
        raise UsageError(f"{source} holds a JSON {_json_type(data)}, not a list of rows",
                         "a .json data file holds a list of objects, or {\"data\": [...]}")
    return [(f"{source}:{line}", _as_row(value, f"{source}:{line}")) for line, value in _json_array_items(text, start)]


_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _json_member_start(text: str, key: str) -> int:
    """Where the value of KEY starts in the (valid) top-level JSON object `text` (the last one wins, as in json)."""
    found, pos = -1, _SPACE.match(text, 0).end() + 1
    while True:
        pos = _SPACE.match(text, pos).end()
        if text[pos] == "}":
            return found
        name, pos = _DECODER.raw_decode(text, pos)
        pos = _SPACE.match(text, _SPACE.match(text, pos).end() + 1).end()  # past ':'
        if name == key:
            found = pos
        _, pos = _DECODER.raw_decode(text, pos)
        pos = _SPACE.match(text, pos).end()
        if text[pos] == ",":
            pos += 1


def _json_array_items(text: str, start: int):
    """(line, value) for each item of the (valid) JSON array at text[start], the line where it starts."""
    pos, line, counted = start + 1, 1, 0
    while True:
        pos = _SPACE.match(text, pos).end()
        if text[pos] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        value, pos = _DECODER.raw_decode(text, pos)
        yield line, value
        pos = _SPACE.match(text, pos).end()
        if text[pos] == ",":
            pos += 1


def _read_csv(text: str, source: str, delimiter: str) -> list[Record]:
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long documents; the default is 128 KiB
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    records = []
    try:
        header = next(reader, None)
        if header is None:
            return []
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise UsageError(f"{source}:1: the header repeats the column {listing(repeated)}",
                             "give every column its own name")
        for number, cells in enumerate(reader, 1):
            if not cells:
                continue  # a blank line
            location = f"{source}:row {number}"
            if len(cells) != len(header):
                raise UsageError(f"{location}: {len(cells)} cells, the header has {len(header)}",
                                 "quote cells that hold the delimiter or a line break")
            records.append((location, dict(zip(header, cells))))
    except csv.Error as e:
        raise UsageError(f"{source}: line {reader.line_num}: not valid CSV ({e})", "check the quoting") from None
    return records


def _read_parquet(path: Path, source: str) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UsageError(f"{source} is not a readable parquet file ({str(e).splitlines()[0]})",
                         "write it with pandas.DataFrame.to_parquet or datasets' to_parquet") from None
    return [(f"{source}:row {i}", row) for i, row in enumerate(rows, 1)]


def _read_dataset(name: str, label: str, config: str | None, split: str | None, *, local: bool) -> list[Record]:
    """A `datasets` dataset: a folder (save_to_disk, or data files) or a Hub id (from the Hub or its cache)."""
    import datasets

    try:
        if local and (Path(name, "state.json").is_file() or Path(name, "dataset_dict.json").is_file()):
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.DatasetDict):
                split = split or "train"
                if split not in loaded:
                    raise UsageError(f"{label} has no split '{split}'", f"its splits: {listing(loaded)}")
                loaded = loaded[split]
            split = split or "train"
        else:
            from ..hub import offline

            offline()  # no network: the cache only, at once, instead of retries for tens of seconds
            split = split or "train"
            loaded = datasets.load_dataset(name, config, split=split)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - the Hub and the loaders raise many kinds; all mean "can't read it"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = ("give a folder saved with save_to_disk or holding data files (train.jsonl, …), and one of its "
                "splits" if local else
                "check the id, config and split, your network or HF_HUB_OFFLINE, `hf auth login` for gated "
                "datasets; or download the data and give the file")
        raise UsageError(f"could not load the dataset {label} ({type(e).__name__}: {reason})", hint) from None
    return [(f"{label}[{split}]#{i}", row) for i, row in enumerate(loaded.to_list())]


def _as_row(value, location: str) -> dict:
    if not isinstance(value, dict):
        raise UsageError(f"{location}: a row must be a JSON object, not a JSON {_json_type(value)}",
                         "one object per row, e.g. {\"prompt\": \"…\", \"completion\": \"…\"}")
    return value


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _source_of(records: list[Record]) -> str:
    if not records:
        return ""
    location = records[0][0]
    return location.rsplit("#", 1)[0].rsplit("[", 1)[0] if "#" in location else location.rsplit(":", 1)[0]

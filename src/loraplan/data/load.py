"""Training data for the sweep and the probe: read rows, detect their format, tokenize with loss masks.

Sources: `.jsonl` / `.json` / `.csv` / `.tsv` (each optionally `.gz`) and `.parquet` files, a local
`datasets` folder, or a Hub dataset `ID`, `ID:SPLIT` or `ID:CONFIG:SPLIT` (default split: train).
Formats, detected per row in this order of precedence (extra keys are ignored) or forced with `fmt`:

  chat               `messages` [{role, content}] or ShareGPT `conversations` [{from, value}], rendered
                     by the tokenizer's chat template; loss on the assistant turns (with their end tokens)
  alpaca             `instruction`, `output`, optional `input`, in the Alpaca prompt; loss on output + EOS
  prompt_completion  `prompt` + `completion` strings: loss on completion + EOS; or TRL's conversational
                     form (both lists of messages): loss on the completion messages
  text               `text`: loss on every token, + EOS

Every example becomes one string and the character spans that carry loss; one batched call of the
fast tokenizer gives the ids, and each token's character offsets give its label. A token that straddles
the start of a span (BPE merging a prompt's trailing space into " Paris") carries loss: it is the token
the model has to produce. Labels are -100 elsewhere, and always at position 0, which no causal LM
predicts. The tokenizer's own leading special tokens (BOS) are added once, never doubled.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import re
from bisect import bisect_left, bisect_right
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UsageError, did_you_mean, listing

FORMATS = ("text", "prompt_completion", "alpaca", "chat")
IGNORE_INDEX = -100  # the label torch's cross_entropy skips (ignore_index default)

Record = tuple[str, dict]  # (location such as "train.jsonl:17", the row)

# Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca, train.py), with the newline after
# "### Response:" that alpaca-lora and axolotl add.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

FORMAT_KEYS = {
    "chat": "messages [{role, content}] or conversations [{from, value}]",
    "alpaca": "instruction, output (input optional)",
    "prompt_completion": "prompt, completion",
    "text": "text",
}
FORMAT_ALIASES = {"sharegpt": "chat", "messages": "chat", "conversational": "chat", "completion": "prompt_completion"}
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "function_call": "assistant", "observation": "tool",
                  "tool": "tool"}
FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet"}


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss: prompt, template, position 0


@dataclass
class DataSummary:
    source: str
    format: str
    examples: int  # kept
    tokens: int  # in the kept examples, after truncation
    supervised_tokens: int  # labels that carry loss
    truncated: int  # rows cut to max_length
    max_length: int
    dropped: int  # rows with no supervised token (after truncation, or none to begin with)
    longest: int = 0  # tokens of the longest row before truncation

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for humans: `train.jsonl: 900 alpaca examples, 91,204 tokens (40,112 supervised)…`"""
        text = (f"{self.source}: {self.examples:,} {self.format} examples, {self.tokens:,} tokens "
                f"({self.supervised_tokens:,} supervised)")
        if self.truncated:
            text += f", {self.truncated:,} truncated to {self.max_length:,} tokens (longest {self.longest:,})"
        if self.dropped:
            text += f", {self.dropped:,} dropped (no supervised token left)"
        return text


@dataclass
class DataSplits:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    train_summary: DataSummary
    eval_summary: DataSummary
    eval_source: str  # the eval path, or "held-out 10% (seed 0)"

    def to_json(self) -> dict:
        """The `data` block of sweep.json (docs/sweep-dir.md), with the two summaries."""
        t, e = self.train_summary, self.eval_summary
        return {"train": t.source, "eval": e.source if e.source == self.eval_source else None,
                "eval_source": self.eval_source, "format": t.format, "train_examples": t.examples,
                "eval_examples": e.examples, "train_tokens": t.tokens, "truncated": t.truncated,
                "max_length": t.max_length, "train_summary": t.to_json(), "eval_summary": e.to_json()}


# --- reading rows -------------------------------------------------------------------------------

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


# --- formats -------------------------------------------------------------------------------------

def _present(row: dict, key: str) -> bool:
    return row.get(key) is not None  # parquet and Hub rows hold None for a column the row lacks


def _row_format(row: dict) -> str | None:
    if _present(row, "messages") or _present(row, "conversations"):
        return "chat"
    if _present(row, "instruction") and _present(row, "output"):
        return "alpaca"
    if _present(row, "prompt") and _present(row, "completion"):
        return "prompt_completion"
    if _present(row, "text"):
        return "text"
    return None


def detect_format(records: list[Record]) -> str:
    """The one format all rows share; an error naming the row that fits none, or the mix."""
    seen: dict[str, tuple[str, list[str], int]] = {}  # format -> (first location, its keys, rows)
    for location, row in records:
        fmt = _row_format(row)
        if fmt is None:
            keys = [k for k in row if _present(row, k)]
            hint = ("this is preference (DPO) data; for SFT give prompt + completion (e.g. the chosen answer)"
                    if {"chosen", "rejected"} <= set(keys) else
                    "rename the columns to one of: " + "; ".join(f"{f}: {k}" for f, k in FORMAT_KEYS.items()))
            raise UsageError(f"{location}: no data format fits the keys {listing(keys) or '(none)'}", hint)
        first, keys, rows = seen.get(fmt, (location, sorted(k for k in row if _present(row, k)), 0))
        seen[fmt] = (first, keys, rows + 1)
    if not seen:
        raise UsageError("no rows to detect a format from", "give a file with at least one example")
    if len(seen) > 1:
        parts = [f"{fmt} in {rows} row{'s' * (rows > 1)} (first {first}, keys {listing(keys)})"
                 for fmt, (first, keys, rows) in seen.items()]
        raise UsageError("mixed data formats: " + "; ".join(parts),
                         f"make every row one format, or force one with --format ({', '.join(FORMATS)})")
    return next(iter(seen))


def check_format(fmt: str) -> str:
    """`auto` or one of FORMATS (accepting `prompt-completion`, `sharegpt`…)."""
    name = str(fmt).strip().lower().replace("-", "_")
    name = FORMAT_ALIASES.get(name, name)
    if name == "auto" or name in FORMATS:
        return name
    raise UsageError(f"unknown data format '{fmt}'",
                     did_you_mean(name, ("auto", *FORMATS)) or f"choose auto, {', '.join(FORMATS)}")


@dataclass
class _Plain:
    prompt: str  # no loss
    completion: str  # loss, then EOS


@dataclass
class _Chat:
    messages: list[dict]
    trained: list[int]  # indices of the messages that carry loss


def _normalize(location: str, row: dict, fmt: str) -> _Plain | _Chat:
    """Check a row's fields for FMT and turn it into a plain prompt/completion pair or a conversation."""
    if fmt == "text":
        return _Plain("", _string(row, "text", location, fmt))
    if fmt == "alpaca":
        _require(row, ("instruction", "output"), location, fmt)
        instruction, output = _string(row, "instruction", location, fmt), _string(row, "output", location, fmt)
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise UsageError(f"{location}: 'input' must be a string, not a JSON {_json_type(extra)}",
                             "the alpaca format's input is text (or empty)")
        prompt = (ALPACA_PROMPT.format(instruction=instruction, input=extra) if extra and extra.strip()
                  else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction))
        return _Plain(prompt, output)
    if fmt == "prompt_completion":
        _require(row, ("prompt", "completion"), location, fmt)
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return _Plain(prompt, completion)
        if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt-completion
            messages = _messages(prompt, location, "prompt") + _messages(completion, location, "completion")
            return _Chat(messages, list(range(len(prompt), len(messages))))
        raise UsageError(f"{location}: 'prompt' and 'completion' must both be strings or both lists of messages, "
                         f"not a {_json_type(prompt)} and a {_json_type(completion)}",
                         "e.g. {\"prompt\": \"2+2=\", \"completion\": \"4\"}")
    if fmt == "chat":
        key = "conversations" if _present(row, "conversations") and not _present(row, "messages") else "messages"
        _require(row, (key,), location, fmt)
        messages = _messages(row[key], location, key)
        return _Chat(messages, [i for i, m in enumerate(messages) if m["role"] == "assistant"])
    raise UsageError(f"unknown data format '{fmt}'", f"choose one of {', '.join(FORMATS)}")


def _require(row: dict, keys: tuple[str, ...], location: str, fmt: str) -> None:
    missing = [k for k in keys if not _present(row, k)]
    if missing:
        found = [k for k in row if _present(row, k)]
        other = _row_format(row)
        hint = (f"its keys fit the {other} format: drop --format or pass --format {other}" if other and other != fmt
                else f"{_article(fmt)} {fmt} row has {FORMAT_KEYS[fmt]}")
        raise UsageError(f"{location}: {_article(fmt)} {fmt} row needs {listing(repr(k) for k in missing)}; "
                         f"it has {listing(found) or 'no fields'}", hint)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _string(row: dict, key: str, location: str, fmt: str) -> str:
    _require(row, (key,), location, fmt)
    value = row[key]
    if not isinstance(value, str):
        raise UsageError(f"{location}: '{key}' must be a string, not a JSON {_json_type(value)}",
                         f"{_article(fmt)} {fmt} row has {FORMAT_KEYS[fmt]}, all text")
    return value


def _messages(value, location: str, key: str) -> list[dict]:
    """A list of {role, content} messages; ShareGPT's {from, value} mapped (human → user, gpt → assistant)."""
    if isinstance(value, str):  # CSV cells and some parquet exports hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, list) or not value:
        raise UsageError(f"{location}: '{key}' must be a non-empty list of {{role, content}} messages",
                         'e.g. [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]')
    messages = []
    for number, message in enumerate(value, 1):
        where = f"{location}: {key}[{number - 1}]"
        if not isinstance(message, dict):
            raise UsageError(f"{where} must be an object with role and content, not a JSON {_json_type(message)}",
                             "e.g. {\"role\": \"user\", \"content\": \"Hi\"}")
        if "from" in message and "value" in message and "role" not in message:
            role, content = message["from"], message["value"]
            if role not in SHAREGPT_ROLES:
                raise UsageError(f"{where}: unknown ShareGPT role '{role}'",
                                 did_you_mean(str(role), SHAREGPT_ROLES) or f"known: {listing(SHAREGPT_ROLES)}")
            role, extra = SHAREGPT_ROLES[role], {}
        else:
            if "role" not in message or "content" not in message:
                raise UsageError(f"{where} needs 'role' and 'content' (or ShareGPT's 'from' and 'value'); "
                                 f"it has {listing(sorted(message)) or 'no fields'}",
                                 "e.g. {\"role\": \"user\", \"content\": \"Hi\"}")
            role, content = message["role"], message["content"]
            if role not in ROLES:
                raise UsageError(f"{where}: unknown role '{role}'",
                                 did_you_mean(str(role), ROLES) or f"known roles: {', '.join(ROLES)}")
            # keys such as tool_calls or reasoning_content go to the template; a None one (a column
            # another row filled, in parquet or Hub data) would read as defined to it
            extra = {k: v for k, v in message.items() if k not in ("role", "content") and v is not None}
        if not isinstance(content, (str, list)):
            raise UsageError(f"{where}: content must be a string (or a list of content parts), "
                             f"not a JSON {_json_type(content)}", "give each message's text as a string")
        messages.append({"role": role, "content": content, **extra})
    return messages


# --- tokenizing ----------------------------------------------------------------------------------

def tokenize_records(records: list[Record], tokenizer, fmt: str, max_length: int, *,
                     source: str | None = None) -> tuple[list[TokenizedExample], DataSummary]:
    """Token ids and labels of every row in FMT (`auto` detects it), cut to MAX_LENGTH from the right.

    Rows left with no supervised token are dropped and counted in the summary, never silently.
    """
    fmt = check_format(fmt)
    if fmt == "auto":
        fmt = detect_format(records)
    _check_max_length(max_length)
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"{type(tokenizer).__name__} is not a fast tokenizer; loraplan locates the loss tokens "
                         "by their character offsets, which only fast tokenizers give",
                         "load the tokenizer with use_fast=True (its folder needs tokenizer.json)")
    rows = [_normalize(location, row, fmt) for location, row in records]
    texts, spans, add_eos = [], [], []
    for (location, _), row in zip(records, rows):
        if isinstance(row, _Plain):
            texts.append(row.prompt + row.completion)
            spans.append([(len(row.prompt), len(row.prompt) + len(row.completion))])
            add_eos.append(True)
        else:
            text, chat_spans = _render_chat(tokenizer, row, location)
            texts.append(text)
            spans.append(chat_spans)
            add_eos.append(False)  # the template ends each turn itself

    # One batched call: the Rust tokenizer spreads it over the cores.
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                        return_token_type_ids=False) if texts else {"input_ids": [], "offset_mapping": []}
    prefix = _special_prefix(tokenizer)
    eos = tokenizer.eos_token_id
    examples, tokens, supervised, truncated, dropped, longest = [], 0, 0, 0, 0, 0
    for ids, offsets, row_spans, eos_here in zip(encoded["input_ids"], encoded["offset_mapping"], spans, add_eos):
        labels = _labels(ids, offsets, row_spans)
        if prefix and ids[:len(prefix)] != prefix:  # a chat template or the text may hold BOS already
            ids, labels = prefix + ids, [IGNORE_INDEX] * len(prefix) + labels
        if eos_here and eos is not None and (not ids or ids[-1] != eos or labels[-1] == IGNORE_INDEX):
            ids, labels = ids + [eos], labels + [eos]
        if labels:
            labels[0] = IGNORE_INDEX
        longest = max(longest, len(ids))
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        kept = len(labels) - labels.count(IGNORE_INDEX)
        if kept == 0:
            dropped += 1
            continue
        examples.append(TokenizedExample(ids, labels))
        tokens += len(ids)
        supervised += kept
    summary = DataSummary(source=source or _source_of(records), format=fmt, examples=len(examples), tokens=tokens,
                          supervised_tokens=supervised, truncated=truncated, max_length=max_length,
                          dropped=dropped, longest=longest)
    return examples, summary


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """ids where the token overlaps a span of trained characters, IGNORE_INDEX elsewhere."""
    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        if a < b:  # the tokens with end > a and start < b; offsets never decrease
            lo = bisect_right(offsets, a, key=_end)
            hi = bisect_left(offsets, b, lo=lo, key=_start)
            labels[lo:hi] = ids[lo:hi]
    return labels


def _start(offset: tuple[int, int]) -> int:
    return offset[0]


def _end(offset: tuple[int, int]) -> int:
    return offset[1]


def _special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for Llama, none for Qwen), found by asking it."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k:k + len(plain)] == plain:
            return full[:k]
    return []


def _render_chat(tokenizer, chat: _Chat, location: str) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the chat template writes it, and the character spans of the trained messages.

    Each trained message i spans from the end of render(messages[:i], generation prompt) to the end of
    render(messages[:i+1]); both must be prefixes of the whole render, which holds for any template that
    writes turns left to right. One that rewrites earlier turns is refused rather than mislabelled.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{location}: chat rows need the tokenizer's chat template, and this tokenizer has none",
                         "use the chat/instruct model's tokenizer, or give the data as prompt/completion")
    full = _render(tokenizer, chat.messages, False, location)
    spans = []
    for i in chat.trained:
        end = _render(tokenizer, chat.messages[:i + 1], False, location)
        if not full.startswith(end):
            raise _rewrites_turns(location, i + 1)
        spans.append((_turn_start(tokenizer, chat.messages, i, full, location), len(end)))
    return full, spans


def _turn_start(tokenizer, messages: list[dict], i: int, full: str, location: str) -> int:
    """Where message i's trained text starts: after the generation prompt (the assistant header), or, when
    the template opens a finished turn differently (a prompt that adds "<think>"), after the turns before."""
    for generation_prompt in (True, False):
        try:
            start = _render(tokenizer, messages[:i], generation_prompt, location)
        except UsageError:
            if i:
                raise
            return 0  # a template that refuses an empty conversation: the first message starts the text
        if full.startswith(start):
            return len(start)
    raise _rewrites_turns(location, i)


def _rewrites_turns(location: str, count: int) -> UsageError:
    return UsageError(f"{location}: the chat template renders the first {count} messages differently inside the "
                      "whole conversation, so the trained tokens cannot be located",
                      "this template rewrites earlier turns (e.g. drops their reasoning); give the data as "
                      "prompt/completion, or use a template that writes turns left to right")


def _render(tokenizer, messages: list[dict], generation_prompt: bool, location: str) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        raise UsageError(f"{location}: the chat template rejected this conversation ({e})",
                         "check the roles and their order (many templates want user/assistant turns to "
                         "alternate)") from None


def _source_of(records: list[Record]) -> str:
    if not records:
        return ""
    location = records[0][0]
    return location.rsplit("#", 1)[0].rsplit("[", 1)[0] if "#" in location else location.rsplit(":", 1)[0]


def _check_max_length(max_length) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise UsageError(f"max_length must be an integer of at least 2, not {max_length!r}",
                         "e.g. --max-length 1024")


# --- splits --------------------------------------------------------------------------------------

def load_data(train: str, tokenizer, *, eval: str | None = None, fmt: str = "auto", max_length: int = 1024,
              eval_fraction: float = 0.1, seed: int = 0, max_examples: int | None = None) -> DataSplits:
    """Train and eval examples from files or Hub datasets, tokenized and masked.

    The eval split is the `eval` source, else a held-out `eval_fraction` of the train rows chosen with
    `seed` (at least one row each side). `max_examples` keeps a seeded random subset of each source's
    rows (in file order) before the split. The train format (given or detected) applies to eval too.
    """
    fmt = check_format(fmt)
    _check_max_length(max_length)
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise UsageError(f"max_examples must be a positive integer, not {max_examples!r}", "e.g. --max-examples 2000")
    records = _subset(read_records(train), max_examples, seed)
    if fmt == "auto":
        fmt = detect_format(records)
    _check_rows(records, fmt)  # before the split, so the first bad row in file order is the one named
    if eval is not None:
        eval_records = _subset(read_records(eval), max_examples, seed)
        _check_rows(eval_records, fmt)
        eval_source, eval_label = str(eval), str(eval)
    else:
        records, eval_records = hold_out(records, eval_fraction, seed, source=str(train))
        eval_source = f"held-out {eval_fraction * 100:g}% (seed {seed})"
        eval_label = f"{train}, {eval_source}"
    train_examples, train_summary = tokenize_records(records, tokenizer, fmt, max_length, source=str(train))
    eval_examples, eval_summary = tokenize_records(eval_records, tokenizer, fmt, max_length, source=eval_label)
    for examples, summary in ((train_examples, train_summary), (eval_examples, eval_summary)):
        if not examples:
            raise UsageError(f"no example of {summary.source} has a token to learn from: all {summary.dropped:,} "
                             f"rows dropped ({summary.truncated:,} were cut to max_length {max_length})",
                             "raise --max-length, or check that the rows have completions / assistant turns")
    return DataSplits(train_examples, eval_examples, train_summary, eval_summary, eval_source)


def _check_rows(records: list[Record], fmt: str) -> None:
    for location, row in records:
        _normalize(location, row, fmt)


def hold_out(records: list[Record], fraction: float, seed: int, *, source: str = "the train data"
             ) -> tuple[list[Record], list[Record]]:
    """(train, eval): a seeded random `fraction` of the rows for eval, both in their original order."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise UsageError(f"eval_fraction must be between 0 and 1 (exclusive), not {fraction!r}",
                         "e.g. --eval-fraction 0.1, or give an eval file")
    if len(records) < 2:
        raise UsageError(f"{source} has {len(records)} row, too few to hold out an eval split",
                         "give more rows, or an eval file (--eval)")
    n_eval = min(max(1, round(len(records) * fraction)), len(records) - 1)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen = set(order[:n_eval])
    return ([r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen])


def _subset(records: list[Record], limit: int | None, seed: int) -> list[Record]:
    if limit is None or len(records) <= limit:
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[i] for i in keep]

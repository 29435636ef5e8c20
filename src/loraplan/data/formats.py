"""A row's format, detected or forced, and its tokens with the labels that carry loss.

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

import json
from bisect import bisect_left, bisect_right
from dataclasses import asdict, dataclass

from ..errors import UsageError, did_you_mean, listing
from .records import Record, _json_type, _source_of

FORMATS = ("text", "prompt_completion", "alpaca", "chat")
IGNORE_INDEX = -100  # the label torch's cross_entropy skips (ignore_index default)

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


def _check_max_length(max_length) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise UsageError(f"max_length must be an integer of at least 2, not {max_length!r}",
                         "e.g. --max-length 1024")

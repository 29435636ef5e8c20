"""Training data: every format from every file type, exact loss masks, truncation, splits, and errors
that name the file and line. The tokenizer is tests/support/tiny.py's character-level one (one token per
character, `</s>` = EOS), so the expected masks can be written down by hand."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from pathlib import Path

import pytest
from support.tiny import make_tokenizer

from loraplan.data.formats import FORMATS, detect_format, tokenize_records
from loraplan.data.load import DataSplits, hold_out, load_data
from loraplan.data.records import read_records
from loraplan.errors import UsageError

IGNORE = -100
EOS = "</s>"
ALPACA_WITH_INPUT = (  # Stanford Alpaca's prompt, written out independently of the module's constant
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{}\n\n### Input:\n{}\n\n"
    "### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{}\n\n### Response:\n")

# per format: rows, and for each row (prompt text without loss, [(trained text, untrained text after it)…])
ROWS = {
    "text": [{"text": "hello world"}, {"text": "abc"}],
    "prompt_completion": [{"prompt": "2+2=", "completion": "4"},
                          {"prompt": "Capital of France? ", "completion": "Paris"}],
    "alpaca": [{"instruction": "Say hi", "input": "", "output": "hi there"},
               {"instruction": "Add", "input": "2+3", "output": "5"}],
    "chat": [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hey"},
                           {"role": "assistant", "content": "yo"}, {"role": "user", "content": "more"},
                           {"role": "assistant", "content": "ok"}]},
             {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
}
# the full text of each row and the substrings that carry loss, in order
EXPECTED = {
    "text": [("hello world" + EOS, ["ello world" + EOS]), ("abc" + EOS, ["bc" + EOS])],  # position 0 never
    "prompt_completion": [("2+2=4" + EOS, ["4" + EOS]), ("Capital of France? Paris" + EOS, ["Paris" + EOS])],
    "alpaca": [(ALPACA_NO_INPUT.format("Say hi") + "hi there" + EOS, ["hi there" + EOS]),
               (ALPACA_WITH_INPUT.format("Add", "2+3") + "5" + EOS, ["5" + EOS])],
    "chat": [("<|system|>be brief</s><|user|>hey</s><|assistant|>yo</s><|user|>more</s><|assistant|>ok</s>",
              ["yo</s>", "ok</s>"]),
             ("<|user|>a</s><|assistant|>b</s>", ["b</s>"])],
}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_labels(tok, full: str, trained: list[str]) -> list[int]:
    """Labels built by hand: find each trained substring, left to right, in the full text (one token a char)."""
    ids = ids_of(tok, full)
    labels = [IGNORE] * len(ids)
    pos = 0
    for piece in trained:
        start = full.index(piece, pos)
        a, b = len(ids_of(tok, full[:start])), len(ids_of(tok, full[:start + len(piece)]))
        labels[a:b] = ids[a:b]
        pos = start + len(piece)
    labels[0] = IGNORE
    return labels


def write(path: Path, rows: list[dict]) -> str:
    """Rows in the file type PATH's name says; CSV/TSV/parquet hold message lists as JSON text / structs."""
    name = path.name.removesuffix(".gz")
    if name.endswith((".csv", ".tsv")):
        columns = list(dict.fromkeys(k for r in rows for k in r))
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, delimiter="\t" if name.endswith(".tsv") else ",")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
        buffer = out.getvalue()
    elif name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return str(path)
    elif name.endswith(".jsonl"):
        buffer = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        buffer = json.dumps(rows, indent=2)
    data = buffer.encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet", ".jsonl.gz"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_from_each_file_type_and_masks_exactly(tmp_path, tok, fmt, suffix):
    source = write(tmp_path / f"train{suffix}", ROWS[fmt])
    records = read_records(source)
    assert detect_format(records) == fmt
    examples, summary = tokenize_records(records, tok, "auto", max_length=1024)
    assert summary.format == fmt and summary.examples == 2 and summary.dropped == 0 and summary.truncated == 0
    for example, (full, trained) in zip(examples, EXPECTED[fmt]):
        assert example.input_ids == ids_of(tok, full)
        assert example.labels == expected_labels(tok, full, trained)
        supervised = [t for t in example.labels if t != IGNORE]
        assert tok.decode(supervised) == "".join(trained)
    assert summary.tokens == sum(len(e.input_ids) for e in examples)
    assert summary.supervised_tokens == sum(len(e.labels) - e.labels.count(IGNORE) for e in examples)


def test_locations_name_the_line_or_row(tmp_path):
    rows = ROWS["prompt_completion"]
    assert [loc for loc, _ in read_records(write(tmp_path / "t.jsonl", rows))] == ["%s:1" % (tmp_path / "t.jsonl"),
                                                                                     "%s:2" % (tmp_path / "t.jsonl")]
    # a .json list written with indent=2: "[", then each object starts on lines 2 and 6
    source = write(tmp_path / "t.json", rows)
    assert [loc.rsplit(":", 1)[1] for loc, _ in read_records(source)] == ["2", "6"]
    wrapped = tmp_path / "w.json"
    wrapped.write_text('{"version": 1,\n "data": [\n  {"text": "a"},\n\n  {"text": "b"}]}')
    assert [loc.rsplit(":", 1)[1] for loc, _ in read_records(str(wrapped))] == ["3", "5"]
    assert [loc.rsplit(":", 1)[1] for loc, _ in read_records(write(tmp_path / "t.csv", rows))] == ["row 1", "row 2"]
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [loc.rsplit(":", 1)[1] for loc, _ in read_records(str(blank))] == ["1", "3"]


def test_json_lines_saved_as_json(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [r["text"] for _, r in read_records(str(path))] == ["a", "b"]


def test_bos_added_once_as_the_tokenizer_does(tmp_path):
    from tokenizers import processors

    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # this tokenizer adds BOS, like Llama's
    examples, _ = tokenize_records([("m:1", {"text": "ab"}), ("m:2", {"text": "<s>ab"})], tok, "auto", 64)
    examples += tokenize_records([("m:3", {"prompt": "x", "completion": "y"})], tok, "auto", 64)[0]
    bos, eos, a, b = tok.bos_token_id, tok.eos_token_id, *ids_of(tok, "ab")
    assert examples[0].input_ids == [bos, a, b, eos] and examples[0].labels == [IGNORE, a, b, eos]
    assert examples[1].input_ids == examples[0].input_ids  # the BOS the text holds is not doubled
    x, y = ids_of(tok, "xy")
    assert examples[2].input_ids == [bos, x, y, eos] and examples[2].labels == [IGNORE, IGNORE, y, eos]
    # a chat template that writes BOS itself: still one BOS
    tok.chat_template = "<s>" + tok.chat_template
    (example,), _ = tokenize_records([("m:4", ROWS["chat"][1])], tok, "chat", 64)
    assert example.input_ids == ids_of(tok, "<s><|user|>a</s><|assistant|>b</s>")
    assert tok.decode([t for t in example.labels if t != IGNORE]) == "b</s>"


def test_completion_that_ends_with_eos_gets_no_second_one(tok):
    (example,), _ = tokenize_records([("m:1", {"prompt": "q", "completion": "a</s>"})], tok, "auto", 64)
    assert example.input_ids == ids_of(tok, "qa</s>")


def test_sharegpt_conversations_map_to_messages(tok):
    sharegpt = {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hey"},
                                  {"from": "gpt", "value": "yo"}, {"from": "human", "value": "more"},
                                  {"from": "gpt", "value": "ok"}]}
    assert detect_format([("s:1", sharegpt)]) == "chat"
    (shared,), _ = tokenize_records([("s:1", sharegpt)], tok, "auto", 256)
    (openai,), _ = tokenize_records([("o:1", ROWS["chat"][0])], tok, "auto", 256)
    assert shared == openai
    bad = {"conversations": [{"from": "system", "value": "x"}, {"from": "humann", "value": "y"}]}
    with pytest.raises(UsageError, match=r"s:1: conversations\[1\]: unknown ShareGPT role 'humann'") as e:
        tokenize_records([("s:1", bad)], tok, "auto", 256)
    assert e.value.hint == "did you mean 'human'?"


def test_conversational_prompt_completion_trains_the_completion_messages(tok):
    row = {"prompt": [{"role": "user", "content": "hey"}], "completion": [{"role": "assistant", "content": "yo"}]}
    assert detect_format([("c:1", row)]) == "prompt_completion"
    (example,), summary = tokenize_records([("c:1", row)], tok, "auto", 64)
    full = "<|user|>hey</s><|assistant|>yo</s>"
    assert example.input_ids == ids_of(tok, full)
    assert example.labels == expected_labels(tok, full, ["yo</s>"])
    assert summary.format == "prompt_completion"


def test_chatml_template_with_a_default_system_prompt(tok):
    """A ChatML template that injects a system prompt when the conversation has none (as Qwen's does):
    the injected prompt and the headers stay masked; each assistant turn trains through its end marker."""
    chatml = make_tokenizer()
    chatml.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    row = {"messages": ROWS["chat"][0]["messages"][1:]}  # no system message
    (example,), _ = tokenize_records([("c:1", row)], chatml, "chat", 512)
    full = ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhey<|im_end|>\n"
            "<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n"
            "<|im_start|>assistant\nok<|im_end|>\n")
    assert example.input_ids == ids_of(chatml, full)
    assert example.labels == expected_labels(chatml, full, ["yo<|im_end|>\n", "ok<|im_end|>\n"])


def test_no_rows_gives_an_empty_result(tok):
    examples, summary = tokenize_records([], tok, "text", 16)
    assert examples == [] and (summary.examples, summary.tokens) == (0, 0)


def test_chat_rows_without_assistant_turns_are_dropped_and_counted(tok):
    records = [("c:1", {"messages": [{"role": "user", "content": "only a question"}]}), ("c:2", ROWS["chat"][1])]
    examples, summary = tokenize_records(records, tok, "chat", 64)
    assert len(examples) == 1 and summary.dropped == 1 and summary.examples == 1


def test_generation_prompt_that_differs_from_a_finished_turn(tok):
    """A template whose generation prompt adds text a finished turn lacks (like "<think>"): the turn then
    starts after the previous messages, header included, instead of being refused."""
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>think:{% endif %}")
    (example,), _ = tokenize_records([("c:1", ROWS["chat"][1])], tok, "chat", 64)
    assert tok.decode([t for t in example.labels if t != IGNORE]) == "<|assistant|>b</s>"


def test_template_that_rewrites_earlier_turns_is_refused(tok):
    tok = make_tokenizer()
    # writes only the last assistant turn in full, like templates that drop earlier reasoning
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' and not loop.last %}"
                         "...{% else %}{{ m['content'] }}{% endif %}</s>{% endfor %}")
    with pytest.raises(UsageError, match=r"c:1: the chat template renders the first 3 messages differently"):
        tokenize_records([("c:1", ROWS["chat"][0])], tok, "chat", 256)


def test_chat_needs_a_template_and_reports_its_complaints(tok):
    bare = make_tokenizer()
    bare.chat_template = None
    with pytest.raises(UsageError, match="c:1: chat rows need the tokenizer's chat template") as e:
        tokenize_records([("c:1", ROWS["chat"][1])], bare, "chat", 64)
    assert "prompt/completion" in e.value.hint
    strict = make_tokenizer()
    strict.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}"
                            "{% endif %}" + strict.chat_template)
    row = {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}
    with pytest.raises(UsageError, match=r"c:7: the chat template rejected this conversation \(must start with user\)"):
        tokenize_records([("c:7", row)], strict, "chat", 64)


def test_token_straddling_the_prompt_boundary_carries_loss():
    """With BPE, a prompt's trailing space merges into the completion's first word (" Paris"): the
    sequence is tokenized whole, as the model sees it, and that token is trained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["The capital of France is Paris."] * 50,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    assert ids_of(tok, " Paris") == [tok.convert_tokens_to_ids("ĠParis")]
    (example,), _ = tokenize_records([("p:1", {"prompt": "The capital of France is ", "completion": "Paris."})],
                                     tok, "prompt_completion", 64)
    assert example.input_ids == ids_of(tok, "The capital of France is Paris.") + [tok.eos_token_id]
    assert tok.decode([t for t in example.labels if t != IGNORE]) == " Paris.</s>"
    assert tok.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE]) == \
        "The capital of France is"


def test_truncation_and_dropping_are_counted(tok):
    records = [("t:1", {"prompt": "p" * 10, "completion": "c" * 10}),  # 21 tokens: cut, keeps 5 of the completion
               ("t:2", {"prompt": "p" * 20, "completion": "c"}),  # the prompt fills max_length: dropped
               ("t:3", {"prompt": "p", "completion": "c"})]  # fits
    examples, summary = tokenize_records(records, tok, "prompt_completion", max_length=15)
    assert [len(e.input_ids) for e in examples] == [15, 3]
    assert examples[0].labels == [IGNORE] * 10 + ids_of(tok, "c" * 5)
    assert (summary.truncated, summary.dropped, summary.examples, summary.longest) == (2, 1, 2, 22)
    assert summary.tokens == 18 and summary.supervised_tokens == 5 + 2
    assert "2 truncated to 15 tokens (longest 22)" in summary.describe() and "1 dropped" in summary.describe()


def test_tokenization_is_one_batched_call(tok):
    """Per-row tokenizer calls would make 10,000 rows take minutes; the rows go to the tokenizer at once."""
    calls = []

    class Counting(type(tok)):
        def __call__(self, text, *args, **kwargs):
            calls.append(len(text) if isinstance(text, list) else 1)
            return super().__call__(text, *args, **kwargs)

    counting = make_tokenizer()
    counting.__class__ = Counting
    records = [(f"r:{i}", {"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(2000)]
    examples, summary = tokenize_records(records, counting, "auto", 64)
    assert summary.examples == 2000 and len(calls) <= 3 and max(calls) == 2000


def test_held_out_split_is_deterministic_and_disjoint(tmp_path, tok):
    rows = [{"prompt": f"q{i:02d}", "completion": f"a{i:02d}"} for i in range(40)]
    source = write(tmp_path / "train.jsonl", rows)
    first = load_data(source, tok, eval_fraction=0.1, seed=0)
    again = load_data(source, tok, eval_fraction=0.1, seed=0)
    other = load_data(source, tok, eval_fraction=0.1, seed=1)
    assert first.train == again.train and first.eval == again.eval
    assert first.eval != other.eval
    assert len(first.eval) == 4 and len(first.train) == 36
    assert {tuple(e.input_ids) for e in first.eval}.isdisjoint({tuple(e.input_ids) for e in first.train})
    assert first.eval_source == "held-out 10% (seed 0)"
    assert first.train_summary.source == source and first.eval_summary.examples == 4
    train_order = [tok.decode(e.input_ids) for e in first.train]
    assert train_order == sorted(train_order)  # the file's order is kept
    assert load_data(source, tok, eval_fraction=0.001).eval_summary.examples == 1  # at least one
    block = first.to_json()
    assert block["eval"] is None and block["train_examples"] == 36 and block["format"] == "prompt_completion"
    assert isinstance(first, DataSplits)


def test_eval_file_and_max_examples(tmp_path, tok):
    train = write(tmp_path / "train.jsonl", [{"text": f"row {i}"} for i in range(50)])
    evalf = write(tmp_path / "eval.csv", [{"text": "held"}, {"text": "out"}])
    splits = load_data(train, tok, eval=evalf, max_examples=20, seed=3)
    assert splits.eval_source == evalf and splits.to_json()["eval"] == evalf
    assert [tok.decode(e.input_ids) for e in splits.eval] == ["held</s>", "out</s>"]
    assert len(splits.train) == 20
    assert splits.train == load_data(train, tok, eval=evalf, max_examples=20, seed=3).train
    assert splits.train != load_data(train, tok, eval=evalf, max_examples=20, seed=4).train
    # the train format applies to the eval file: a row of another format is named
    bad_eval = write(tmp_path / "eval.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(UsageError, match=r"eval\.jsonl:1: a text row needs 'text'"):
        load_data(train, tok, eval=bad_eval)


def test_split_errors(tmp_path, tok):
    one = write(tmp_path / "one.jsonl", [{"text": "alone"}])
    with pytest.raises(UsageError, match="1 row, too few to hold out an eval split"):
        load_data(one, tok)
    for fraction in (0, 1, 1.5, -0.1):
        with pytest.raises(UsageError, match="eval_fraction must be between 0 and 1"):
            hold_out([("a", {}), ("b", {})], fraction, 0)
    with pytest.raises(UsageError, match="max_length must be an integer of at least 2"):
        load_data(one, tok, max_length=0)
    with pytest.raises(UsageError, match="max_examples must be a positive integer"):
        load_data(one, tok, max_examples=0)
    long_prompts = write(tmp_path / "long.jsonl", [{"prompt": "p" * 30, "completion": "c"}] * 4)
    with pytest.raises(UsageError, match="no example of .*long.jsonl has a token to learn from") as e:
        load_data(long_prompts, tok, max_length=8)
    assert "--max-length" in e.value.hint


BAD_FILES = [
    ("bad.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:3: not valid JSON"),
    ("bad.jsonl", '{"text": "ok"}\n["a", "list"]\n', r"bad\.jsonl:2: a row must be a JSON object, not a JSON array"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": 5}\n', r"bad\.jsonl:2: 'text' must be a string, not a JSON number"),
    ("bad.jsonl", '{"instruction": "a", "output": ["x"]}\n', r"bad\.jsonl:1: 'output' must be a string"),
    ("bad.jsonl", '{"instruction": "a", "input": 3, "output": "b"}\n', r"bad\.jsonl:1: 'input' must be a string"),
    ("bad.jsonl", '{"messages": "hello"}\n', r"bad\.jsonl:1: 'messages' must be a non-empty list"),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": "a"}, "b"]}\n',
     r"bad\.jsonl:1: messages\[1\] must be an object"),
    ("bad.jsonl", '{"messages": [{"role": "user", "text": "a"}]}\n',
     r"bad\.jsonl:1: messages\[0\] needs 'role' and 'content'"),
    ("bad.jsonl", '{"messages": [{"role": "usr", "content": "a"}]}\n',
     r"bad\.jsonl:1: messages\[0\]: unknown role 'usr'.*did you mean 'user'"),
    ("bad.jsonl", '{"messages": [{"role": "user", "content": 7}]}\n',
     r"bad\.jsonl:1: messages\[0\]: content must be a string"),
    ("bad.jsonl", '{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}\n',
     r"bad\.jsonl:1: 'prompt' and 'completion' must both be strings or both lists"),
    ("bad.jsonl", '{"text": "a"}\n{"prompt": "a", "completion": "b"}\n',
     r"mixed data formats: text in 1 row \(first .*bad\.jsonl:1, keys text\); prompt_completion in 1 row "
     r"\(first .*bad\.jsonl:2, keys completion, prompt\)"),
    ("bad.jsonl", '{"question": "a", "answer": "b"}\n', r"bad\.jsonl:1: no data format fits the keys question, answer"),
    ("bad.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n', r"preference \(DPO\) data"),
    ("bad.jsonl", "\n\n", r"bad\.jsonl holds no rows"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', r"bad\.jsonl:2: not UTF-8 text"),
    ("bad.json", '[\n  {"text": "a"},\n  {"text": "b",}\n]', r"bad\.json:3: not valid JSON"),
    ("bad.json", '[\n  {"text": "a"},\n  "b"\n]', r"bad\.json:3: a row must be a JSON object, not a JSON string"),
    ("bad.json", '{"rows": []}', r"bad\.json holds an object with keys rows, not a list of rows"),
    ("bad.json", "", r"bad\.json:1: not valid JSON"),
    ("bad.csv", "prompt,completion\na,b\nc,d,e\n", r"bad\.csv:row 2: 3 cells, the header has 2"),
    ("bad.csv", "prompt,prompt\na,b\n", r"bad\.csv:1: the header repeats the column prompt"),
    ("bad.csv", "", r"bad\.csv holds no rows"),
    ("bad.csv", 'messages\n"[{""role"": ""user""}]"\n', r"bad\.csv:row 1: messages\[0\] needs 'role' and 'content'"),
    ("bad.parquet", "not parquet", r"bad\.parquet is not a readable parquet file"),
    ("bad.xlsx", "x", r"bad\.xlsx: unknown data file type"),
    ("bad.jsonl.gz", "not gzip", r"bad\.jsonl\.gz is not a valid gzip file"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[m[:40] for _, _, m in BAD_FILES])
def test_malformed_input_names_the_file_and_line(tmp_path, tok, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UsageError) as e:
        load_data(str(path), tok)
    line = e.value.one_line()
    assert re.search(message, line), line
    assert "\n" not in line and e.value.hint


def test_forced_format_names_missing_fields(tmp_path, tok):
    source = write(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(UsageError, match=r"t\.jsonl:1: an alpaca row needs 'instruction', 'output'; it has text") as e:
        load_data(source, tok, fmt="alpaca")
    assert "fit the text format" in e.value.hint
    assert load_data(source, tok, fmt="text").train_summary.format == "text"


def test_format_names(tok):
    with pytest.raises(UsageError, match="unknown data format 'alpacca'") as e:
        tokenize_records([("a:1", {"text": "x"})], tok, "alpacca", 16)
    assert "alpaca" in e.value.hint
    records = [("a:1", {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]})]
    assert tokenize_records(records, tok, "sharegpt", 64)[1].format == "chat"
    records = [("a:1", {"prompt": "a", "completion": "b"})]
    assert tokenize_records(records, tok, "prompt-completion", 64)[1].format == "prompt_completion"


def test_detection_precedence_ignores_extra_columns():
    # tatsu-lab/alpaca carries a rendered `text` column; ultrachat a `prompt` beside `messages`
    assert detect_format([("a", {"instruction": "i", "input": "", "output": "o", "text": "t"})]) == "alpaca"
    assert detect_format([("a", {"prompt": "p", "prompt_id": "x", "messages": [{"role": "user", "content": "p"}]})]) \
        == "chat"
    assert detect_format([("a", {"prompt": "p", "completion": "c", "text": None})]) == "prompt_completion"


def test_dataset_folders_and_the_hub(tmp_path, tok, monkeypatch):
    import datasets
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS["alpaca"]),
                          "test": datasets.Dataset.from_list(ROWS["alpaca"][:1])}).save_to_disk(str(saved))
    records = read_records(str(saved))
    assert [loc for loc, _ in records] == [f"{saved}[train]#0", f"{saved}[train]#1"]
    assert read_records(str(saved), split="test")[0][1]["output"] == "hi there"
    with pytest.raises(UsageError, match="has no split 'dev'") as e:
        read_records(str(saved), split="dev")
    assert "test, train" in e.value.hint or "train, test" in e.value.hint

    files = tmp_path / "files"
    files.mkdir()
    write(files / "train.jsonl", ROWS["chat"])
    splits = load_data(str(files), tok)
    assert splits.train_summary.format == "chat" and (splits.train_summary.examples, len(splits.eval)) == (1, 1)
    assert splits.train_summary.source == str(files)

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match=r"could not load the dataset hub:someorg/no-such-data") as e:
        read_records("someorg/no-such-data:validation")
    assert "HF_HUB_OFFLINE" in e.value.hint
    with pytest.raises(UsageError, match="not a data file, a dataset folder or a Hub dataset id"):
        read_records("a:b:c:d")
    with pytest.raises(UsageError, match="no such file or folder: ./missing.jsonl"):
        read_records("./missing.jsonl")
    with pytest.raises(UsageError, match="a split .* applies to Hub datasets"):
        read_records(write(tmp_path / "x.jsonl", ROWS["text"]), split="train")


def test_with_a_tokenizer_saved_and_loaded_back(tmp_path):
    """The tokenizer as the sweep gets it (sources.load_tokenizer on a model folder) keeps its template."""
    from support.tiny import write_config

    from loraplan.model.loading import load_tokenizer

    folder = tmp_path / "model"
    write_config("llama", folder)
    make_tokenizer().save_pretrained(folder)
    tok = load_tokenizer(str(folder))
    source = write(tmp_path / "chat.jsonl", ROWS["chat"] * 5)
    splits = load_data(source, tok, eval_fraction=0.2)
    assert (len(splits.train), len(splits.eval)) == (8, 2)
    full, trained = EXPECTED["chat"][1]
    example = next(e for e in splits.train + splits.eval if len(e.input_ids) == len(ids_of(tok, full)))
    assert example.labels == expected_labels(tok, full, trained)

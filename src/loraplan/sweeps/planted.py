"""Planted tasks: LoRA problems whose right answer is known.

A small random Llama is the base; the teacher is the base plus a planted update ΔW = c·U·Vᵀ of rank
k on chosen modules in every layer (U, V orthonormal, all k singular values equal to c = strength ×
the module's largest singular value, so every planted direction matters and the rank is sharp).
Training and eval text is sampled from the teacher. An adapter on the planted modules with r ≥ k
can represent the teacher exactly, so its eval loss can reach the teacher's own (`ideal_eval_loss`);
one on other modules, or with r < k, cannot. The sweep and the probe are validated on these.

The defaults are the built-in generator (the demo's). Its other settings make the different generators
a validation needs, so that a method is never judged only on the tasks it was tuned on:
- `architecture`: llama, qwen3 (norms on q and k) or gemma (GeGLU MLP, scaled embeddings);
- `tokenizer`: word (one pseudo-word per token: the text is the teacher's token sequence exactly),
  char (one character per token, no spaces), or bpe (subword pieces learned from pseudo-words: the
  text the sweep re-tokenizes need not be the sequence the teacher sampled);
- `temperature`: the teacher samples at this temperature (below 1: a sharper head than any adapter
  on the planted modules can express exactly);
- `context`: teacher (the teacher samples whole sequences) or prompted (a prompt sampled from the
  base, a completion sampled from the teacher given that exact prompt; prompt/completion rows, loss
  on the completion only);
- `spectrum`: flat (k equal singular values), decaying (c, c/2^(1/2), c/2, …: halving every two
  directions) or gaussian (U·Vᵀ from Gaussian factors, the spread of a random rank-k matrix);
- `planted_layers`: the layers that carry the change (default every layer).
`ideal_eval_loss` is always the teacher's loss on the eval set as the sweep tokenizes it (for bpe,
temperature ≠ 1 or a prompted context, an adapter can come close to it, or pass it slightly).

Files: base/ (config.json, model.safetensors, tokenizer), train.jsonl and eval.jsonl (`text`
rows, or `prompt`/`completion` with a prompted context), planted.json (the answer and the reference
losses), planted.safetensors (the planted factors per module: B·A = ΔW).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..files import check_output, write_atomic, write_json

_CONSONANTS = "bcdfghjklmnprstvz"
_VOWELS = "aeiou"
_SPECIALS = ["<pad>", "<s>", "<unk>"]
ARCHITECTURES = ("llama", "qwen3", "gemma")
TOKENIZERS = ("word", "char", "bpe")
CONTEXTS = ("teacher", "prompted")
SPECTRA = ("flat", "decaying", "gaussian")


@dataclass(frozen=True)
class PlantedSpec:
    targets: str = "mlp"
    rank: int = 4
    layers: int = 4
    hidden: int = 128
    intermediate: int = 256
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256
    init_range: float = 0.15  # larger than the usual 0.02, so the base's predictions have structure
    strength: float = 1.0
    examples: int = 2000
    eval_examples: int = 256
    seq_len: int = 48
    seed: int = 0
    architecture: str = "llama"
    tokenizer: str = "word"
    temperature: float = 1.0
    context: str = "teacher"
    prompt_len: int = 16  # tokens of prompt, with a prompted context
    spectrum: str = "flat"
    planted_layers: str | None = None  # e.g. "0,1"; None: every layer

    def __post_init__(self):
        for name in ("rank", "layers", "hidden", "intermediate", "heads", "kv_heads", "examples",
                     "eval_examples", "seq_len"):
            if getattr(self, name) <= 0:
                raise UsageError(f"planted task: {name} must be positive, got {getattr(self, name)}")
        if self.vocab < 16 or self.vocab > len(_CONSONANTS) * len(_VOWELS) * (1 + len(_CONSONANTS)):
            raise UsageError(f"planted task: vocab must be between 16 and 1500, got {self.vocab}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise UsageError("planted task: hidden must divide by heads, and heads by kv_heads")
        if self.strength <= 0 or self.init_range <= 0 or self.temperature <= 0:
            raise UsageError("planted task: strength, init_range and temperature must be positive")
        for name, allowed in (("architecture", ARCHITECTURES), ("tokenizer", TOKENIZERS), ("context", CONTEXTS),
                              ("spectrum", SPECTRA)):
            if getattr(self, name) not in allowed:
                raise UsageError(f"planted task: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.context == "prompted" and not 0 < self.prompt_len < self.seq_len:
            raise UsageError(f"planted task: prompt_len must be between 1 and seq_len - 1, got {self.prompt_len}")
        if self.tokenizer == "char" and self.vocab > len(_characters()) + len(_SPECIALS):
            raise UsageError(f"planted task: a char tokenizer has at most {len(_characters()) + len(_SPECIALS)} tokens")

    def layer_indices(self) -> list[int]:
        if self.planted_layers is None:
            return list(range(self.layers))
        try:
            chosen = sorted({int(x) for x in str(self.planted_layers).split(",") if x.strip()})
        except ValueError:
            chosen = []
        if not chosen or chosen[0] < 0 or chosen[-1] >= self.layers:
            raise UsageError(f"planted task: planted_layers {self.planted_layers!r} must name layers 0..{self.layers - 1}")
        return chosen


@dataclass
class PlantedTask:
    folder: Path
    spec: PlantedSpec
    modules: list[str]  # the adapted weights, full names
    target_modules: list[str] | str  # what PEFT needs to target them
    roles: list[str]
    ideal_eval_loss: float  # the teacher's own loss on eval.jsonl: the best any adapter can do
    base_eval_loss: float  # the base model's loss on eval.jsonl: no adapter at all
    extra: dict = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.folder / "base"

    @property
    def train(self) -> Path:
        return self.folder / "train.jsonl"

    @property
    def eval(self) -> Path:
        return self.folder / "eval.jsonl"

    def to_json(self) -> dict:
        return {"spec": asdict(self.spec), "modules": self.modules, "target_modules": self.target_modules,
                "roles": self.roles, "rank": self.spec.rank, "ideal_eval_loss": self.ideal_eval_loss,
                "base_eval_loss": self.base_eval_loss, "base": "base", "train": "train.jsonl",
                "eval": "eval.jsonl", **self.extra}

    @classmethod
    def load(cls, folder: str | Path) -> PlantedTask:
        folder = Path(folder)
        data = json.loads((folder / "planted.json").read_text())
        return cls(folder, PlantedSpec(**data["spec"]), data["modules"], data["target_modules"], data["roles"],
                   data["ideal_eval_loss"], data["base_eval_loss"],
                   {k: v for k, v in data.items() if k not in _TASK_KEYS})


_TASK_KEYS = {"spec", "modules", "target_modules", "roles", "rank", "ideal_eval_loss", "base_eval_loss", "base",
              "train", "eval"}


def vocabulary(n: int) -> list[str]:
    """n distinct pronounceable pseudo-words: ba, be, …, then bab, bac, … (one token each)."""
    words = [c + v for c in _CONSONANTS for v in _VOWELS]
    words += [c + v + d for c in _CONSONANTS for v in _VOWELS for d in _CONSONANTS]
    return words[:n]


def _characters() -> str:
    """Printable characters without whitespace: ASCII, then Latin-1 and Latin Extended letters."""
    import string

    latin = "".join(chr(c) for c in range(0xC0, 0x250) if chr(c).isalpha())
    return string.ascii_letters + string.digits + string.punctuation + latin


def make_tokenizer(vocab: int, kind: str = "word", seed: int = 0):
    """<pad>, <s>, <unk>, then `vocab - 3` tokens; BOS added, no EOS (the teacher's sequences have no
    end, so no config is judged on guessing one). word: pseudo-words split on spaces; char: single
    characters (a BPE model without merges); bpe: subword pieces learned from a pseudo-word corpus,
    word starts marked ▁ (as SentencePiece)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "word":
        words = vocabulary(vocab - len(_SPECIALS))
        tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(_SPECIALS + words)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    elif kind == "char":
        chars = _characters()[: vocab - len(_SPECIALS)]
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(_SPECIALS + list(chars))}, merges=[],
                                   unk_token="<unk>"))
    else:
        rng = random.Random(seed)
        words = vocabulary(120)
        corpus = [" ".join(rng.choice(words) + rng.choice(["", "", rng.choice(words)]) for _ in range(16))
                  for _ in range(2000)]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=_SPECIALS, show_progress=False,
                                      initial_alphabet=sorted(set(_CONSONANTS + _VOWELS)))
        tok.train_from_iterator(corpus, trainer)
        if tok.get_vocab_size() != vocab:
            raise UsageError(f"planted task: a bpe vocabulary of {vocab} cannot be learned (got {tok.get_vocab_size()})",
                             "choose a vocab between 64 and 1500")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>", pad_token="<pad>")


def make_planted_task(out: str | Path, spec: PlantedSpec | None = None, **overrides) -> PlantedTask:
    """Write a planted task to OUT and return what was planted (the answer)."""
    check_output(out)
    import torch
    from safetensors.torch import save_file

    from ..model.structure import read_structure
    from ..model.targets import resolve_targets

    spec = spec or PlantedSpec(**overrides)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty", "choose a new --out folder")
    layers = spec.layer_indices()
    tokenizer = make_tokenizer(spec.vocab, spec.tokenizer, spec.seed)
    config = _config(spec)
    torch.manual_seed(spec.seed)
    base = _model_class(spec)(config).eval()
    structure = read_structure(base)
    resolved = resolve_targets(structure, spec.targets)
    if resolved.target_parameters:
        raise UsageError("planted tasks plant into Linear layers only", "choose roles such as mlp, attention, q,v")
    planted = [m for m in resolved.modules if m.layer is None or m.layer in layers]
    teacher = _model_class(spec)(config).eval()
    teacher.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(spec.seed + 1)
    factors = {}
    modules = dict(teacher.named_modules())
    for m in planted:
        weight = modules[m.name].weight.data
        if spec.rank > min(weight.shape):
            raise UsageError(f"planted rank {spec.rank} exceeds {m.name}'s shape {tuple(weight.shape)}")
        delta, b, a = _planted_factors(weight, spec, generator)
        weight += delta
        factors[f"{m.name}.B"] = b.contiguous()
        factors[f"{m.name}.A"] = a.contiguous()

    total = spec.examples + spec.eval_examples
    banned = [] if spec.tokenizer == "word" else list(range(len(_SPECIALS)))
    if spec.context == "prompted":
        prompts = _sample(base, total, spec.prompt_len, spec.seed + 3, banned=banned)
        ids = _sample(teacher, total, spec.seq_len - spec.prompt_len, spec.seed + 2, spec.temperature, banned,
                      prefix=prompts)
    else:
        ids = _sample(teacher, total, spec.seq_len, spec.seed + 2, spec.temperature, banned)
    rows = [_row(tokenizer, spec, seq) for seq in ids[:, 1:].tolist()]
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", rows[: spec.examples])
    _write_jsonl(out / "eval.jsonl", rows[spec.examples:])
    import transformers

    transformers.utils.logging.disable_progress_bar()
    base.save_pretrained(out / "base", safe_serialization=True)
    tokenizer.save_pretrained(out / "base")
    save_file(factors, str(out / "planted.safetensors"))
    evals = _tokenized(rows[spec.examples:], tokenizer, spec)
    task = PlantedTask(out, spec, [m.name for m in planted], resolved.target_modules, resolved.roles,
                       ideal_eval_loss=_loss(teacher, *evals), base_eval_loss=_loss(base, *evals))
    write_json(out / "planted.json", task.to_json())
    return task


def _config(spec: PlantedSpec):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        spec.architecture, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads, vocab_size=spec.vocab, max_position_embeddings=max(256, 2 * spec.seq_len),
        initializer_range=spec.init_range, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=None, architectures=[_model_class(spec).__name__])


def _model_class(spec: PlantedSpec):
    import transformers

    name = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM"}[spec.architecture]
    return getattr(transformers, name)


def _planted_factors(weight, spec: PlantedSpec, generator):
    """The planted update ΔW and its factors B (out × k), A (k × in), B·A = ΔW. Flat: orthonormal U, V and k equal
    singular values c = strength × ‖W‖₂; decaying: c·2^(-i/2) for direction i; gaussian: Gaussian
    factors, scaled so that the largest singular value is c."""
    import torch

    k = spec.rank
    c = spec.strength * torch.linalg.matrix_norm(weight, ord=2)
    if spec.spectrum == "gaussian":
        b = torch.randn(weight.shape[0], k, generator=generator)
        a = torch.randn(k, weight.shape[1], generator=generator)
        scale = (c / torch.linalg.matrix_norm(b @ a, ord=2)).sqrt()
        b, a = b * scale, a * scale
        return b @ a, b, a
    u, _ = torch.linalg.qr(torch.randn(weight.shape[0], k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(weight.shape[1], k, generator=generator))
    if spec.spectrum == "flat":
        return c * u @ v.T, u * c.sqrt(), v.T * c.sqrt()
    root = (c * 0.5 ** (torch.arange(k, dtype=weight.dtype) / 2)).sqrt()
    b, a = u * root, (v * root).T
    return b @ a, b, a


def _row(tokenizer, spec: PlantedSpec, seq: list[int]) -> dict:
    """One data row from a sampled sequence (BOS dropped): text, or prompt + completion."""
    if spec.context != "prompted":
        return {"text": _decode(tokenizer, spec, seq)}
    full = _decode(tokenizer, spec, seq)
    prompt = _decode(tokenizer, spec, seq[: spec.prompt_len])
    if not full.startswith(prompt):  # cannot happen with these decoders; a wrong row would be worse
        raise RuntimeError(f"planted task: the prompt {prompt!r} does not start its text {full!r}")
    return {"prompt": prompt, "completion": full[len(prompt):]}


def _decode(tokenizer, spec: PlantedSpec, seq: list[int]) -> str:
    if spec.tokenizer == "word":
        return " ".join(tokenizer.convert_ids_to_tokens(seq))
    if spec.tokenizer == "char":
        return "".join(tokenizer.convert_ids_to_tokens(seq))
    return tokenizer.decode(seq)


def _tokenized(rows: list[dict], tokenizer, spec: PlantedSpec):
    """The eval rows as the sweep reads them: padded ids, labels (-100 where there is no loss) and
    the attention mask."""
    import torch

    from ..data.formats import IGNORE_INDEX, tokenize_records

    examples, _ = tokenize_records([(f"eval.jsonl:{i + 1}", row) for i, row in enumerate(rows)], tokenizer, "auto",
                                   max_length=4 * spec.seq_len + 8)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return ids, labels, mask


def _sample(model, n: int, length: int, seed: int, temperature: float = 1.0, banned: list[int] = (), *,
            prefix=None):
    """n sequences of `length` tokens after BOS (after `prefix`, when given: BOS and the prompt),
    sampled from the model at `temperature` over its whole vocabulary but `banned`. With the word
    tokenizer nothing is banned: data drawn from a model's own distribution has an expected gradient of
    exactly zero at that model, so at the base every bit of the expected gradient comes from the planted
    update (masking, say, the special tokens would add a signal of its own); only the first token may
    not be BOS, which the tokenizer would take for the BOS it adds. The char and bpe tokenizers could
    not write special tokens back as text, so they ban them (a small signal of their own)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    chunks = []
    with torch.no_grad():
        for start in range(0, n, 256):
            rows = min(256, n - start)
            ids = torch.ones(rows, 1, dtype=torch.long) if prefix is None else prefix[start:start + rows]
            past = None
            nxt = ids
            for _ in range(length):
                step = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = step.past_key_values
                logits = step.logits[:, -1].float() / temperature
                if banned:
                    logits[:, banned] = -math.inf
                if ids.shape[1] == 1:
                    logits[:, 1] = -math.inf
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
                ids = torch.cat([ids, nxt], dim=1)
            chunks.append(ids)
    return torch.cat(chunks)


def _loss(model, ids, labels, mask) -> float:
    """Mean next-token loss over the supervised tokens, as the sweep computes it."""
    import torch

    from ..autograd.lm_loss import causal_lm_loss_sum

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 256):
            chunk, target, real = ids[start:start + 256], labels[start:start + 256], mask[start:start + 256]
            total += float(causal_lm_loss_sum(model(input_ids=chunk, attention_mask=real).logits, target))
            count += int((target[:, 1:] != -100).sum())
    return total / count


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))

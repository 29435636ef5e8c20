"""Planted tasks: LoRA problems whose right answer is known.

A small random Llama is the base; the teacher is the base plus a planted update ΔW = c·U·Vᵀ of rank
k on chosen modules in every layer (U, V orthonormal, all k singular values equal to c = strength ×
the module's largest singular value, so every planted direction matters and the rank is sharp).
Training and eval text is sampled from the teacher. An adapter on the planted modules with r ≥ k
can represent the teacher exactly, so its eval loss can reach the teacher's own (`ideal_eval_loss`);
one on other modules, or with r < k, cannot. The sweep and the probe are validated on these.

Files: base/ (config.json, model.safetensors, tokenizer), train.jsonl and eval.jsonl (`text`
format: space-separated pseudo-words, one token each), planted.json (the answer and the reference
losses), planted.safetensors (the planted factors U·√c and V·√c per module).
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

    def __post_init__(self):
        for name in ("rank", "layers", "hidden", "intermediate", "heads", "kv_heads", "examples",
                     "eval_examples", "seq_len"):
            if getattr(self, name) <= 0:
                raise UsageError(f"planted task: {name} must be positive, got {getattr(self, name)}")
        if self.vocab < 16 or self.vocab > len(_CONSONANTS) * len(_VOWELS) * (1 + len(_CONSONANTS)):
            raise UsageError(f"planted task: vocab must be between 16 and 1500, got {self.vocab}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise UsageError("planted task: hidden must divide by heads, and heads by kv_heads")
        if self.strength <= 0 or self.init_range <= 0:
            raise UsageError("planted task: strength and init_range must be positive")


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
                   data["ideal_eval_loss"], data["base_eval_loss"])


def vocabulary(n: int) -> list[str]:
    """n distinct pronounceable pseudo-words: ba, be, …, then bab, bac, … (one token each)."""
    words = [c + v for c in _CONSONANTS for v in _VOWELS]
    words += [c + v + d for c in _CONSONANTS for v in _VOWELS for d in _CONSONANTS]
    return words[:n]


def make_tokenizer(vocab: int):
    """A word-level tokenizer: <pad>, <s>, <unk>, then the pseudo-words; BOS added, no EOS (the
    teacher's sequences have no end, so no config is judged on guessing one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<unk>"]
    words = vocabulary(vocab - len(specials))
    table = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>", pad_token="<pad>")


def make_planted_task(out: str | Path, spec: PlantedSpec | None = None, **overrides) -> PlantedTask:
    """Write a planted task to OUT and return what was planted (the answer)."""
    check_output(out)
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..model.structure import read_structure
    from ..model.targets import resolve_targets

    spec = spec or PlantedSpec(**overrides)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty", "choose a new --out folder")
    config = LlamaConfig(
        hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab,
        max_position_embeddings=max(256, 2 * spec.seq_len), initializer_range=spec.init_range,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=None,
        architectures=["LlamaForCausalLM"])
    torch.manual_seed(spec.seed)
    base = LlamaForCausalLM(config).eval()
    structure = read_structure(base)
    resolved = resolve_targets(structure, spec.targets)
    if resolved.target_parameters:
        raise UsageError("planted tasks plant into Linear layers only", "choose roles such as mlp, attention, q,v")
    teacher = LlamaForCausalLM(config).eval()
    teacher.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(spec.seed + 1)
    factors = {}
    modules = dict(teacher.named_modules())
    for m in resolved.modules:
        weight = modules[m.name].weight.data
        if spec.rank > min(weight.shape):
            raise UsageError(f"planted rank {spec.rank} exceeds {m.name}'s shape {tuple(weight.shape)}")
        u, _ = torch.linalg.qr(torch.randn(weight.shape[0], spec.rank, generator=generator))
        v, _ = torch.linalg.qr(torch.randn(weight.shape[1], spec.rank, generator=generator))
        c = spec.strength * torch.linalg.matrix_norm(weight, ord=2)
        weight += c * u @ v.T
        factors[f"{m.name}.B"] = (u * c.sqrt()).contiguous()
        factors[f"{m.name}.A"] = (v.T * c.sqrt()).contiguous()

    tokenizer = make_tokenizer(spec.vocab)
    words = tokenizer.convert_ids_to_tokens(list(range(spec.vocab)))
    total = spec.examples + spec.eval_examples
    ids = _sample(teacher, total, spec.seq_len, spec.seed + 2)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"text": " ".join(words[t] for t in seq)} for seq in ids[:, 1:].tolist()]
    _write_jsonl(out / "train.jsonl", rows[: spec.examples])
    _write_jsonl(out / "eval.jsonl", rows[spec.examples:])
    import transformers

    transformers.utils.logging.disable_progress_bar()
    base.save_pretrained(out / "base", safe_serialization=True)
    tokenizer.save_pretrained(out / "base")
    save_file(factors, str(out / "planted.safetensors"))
    eval_ids = ids[spec.examples:]
    task = PlantedTask(out, spec, [m.name for m in resolved.modules], resolved.target_modules, resolved.roles,
                       ideal_eval_loss=_loss(teacher, eval_ids), base_eval_loss=_loss(base, eval_ids))
    write_json(out / "planted.json", task.to_json())
    return task


def _sample(model, n: int, length: int, seed: int):
    """n sequences of `length` tokens after BOS, sampled from the teacher at temperature 1 over its
    whole vocabulary. Nothing is masked: data drawn from a model's own distribution has an expected
    gradient of exactly zero at that model, so at the base every bit of the expected gradient comes
    from the planted update (masking, say, the special tokens would add a signal of its own). Only the
    first token may not be BOS, which the tokenizer would take for the BOS it adds."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    chunks = []
    with torch.no_grad():
        for start in range(0, n, 256):
            ids = torch.ones(min(256, n - start), 1, dtype=torch.long)
            past = None
            nxt = ids
            for _ in range(length):
                step = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = step.past_key_values
                logits = step.logits[:, -1].float()
                if ids.shape[1] == 1:
                    logits[:, 1] = -math.inf
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
                ids = torch.cat([ids, nxt], dim=1)
            chunks.append(ids)
    return torch.cat(chunks)


def _loss(model, ids) -> float:
    """Mean next-token loss over the sequences (BOS never predicted), as the sweep computes it."""
    import torch

    from ..autograd.lm_loss import causal_lm_loss_sum

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 256):
            chunk = ids[start:start + 256]
            total += float(causal_lm_loss_sum(model(input_ids=chunk).logits, chunk))
            count += chunk[:, 1:].numel()
    return total / count


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))

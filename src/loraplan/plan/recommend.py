"""`recommend`: a LoRA plan from the task, the size of the training set and (optionally) the model,
with the reason for every choice: the seeds' decision framework, computed.

Rules (seed 000, "Selecting Target Modules and Rank", unless another source is named):
- the task's quadrant (behavioral change x knowledge injection) picks the module set: q, v for a
  format change; every attention projection for behavior; attention + MLP for knowledge;
- the rank table gives a base rank per task (and complexity, where the table gives a range);
- the data size scales it as the seed's `build_lora_config` does: under 1k examples at most 8,
  1k-10k the base rank, from 10k twice the base rank up to 64 (up to 128 above 100k: seed 001's
  "very large dataset, complex task: 64-128"); 1k-10k is also capped at 32, the largest rank the
  builder gives there, because r=64 on a few thousand examples overfits (seed 000, Q4);
- alpha = r; rsLoRA from r = 16; DoRA at half the rank; LoRA+ ratio 16; dropout 0.05;
  embeddings and lm_head only for new tokens, trained in full (modules_to_save), as axolotl requires
  and LLaMA-Factory's resize_vocab does.
For the builder's four task types every (task, size, complexity) gives exactly its result; later
evidence that disagrees with a rule is attached as a note with its citation.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ..errors import RunError, UsageError, did_you_mean
from ..model.roles import FUSED_INTO
from ..model.targets import parse_spec
from .alpha import DEFAULT_POLICY, alpha_for, policy_reason
from .export import LLAMA_NAMES, peft_config
from .lora_plan import LoraPlan, Reason

SEED = "seed 000: Selecting Target Modules and Rank"
COMPLEXITIES = ("low", "medium", "high")
QUADRANTS = {
    1: ("low", "high"),  # (behavioral change, knowledge injection)
    2: ("high", "high"),
    3: ("low", "low"),
    4: ("high", "low"),
}


@dataclass(frozen=True)
class Task:
    name: str
    quadrant: int
    roles: tuple[str, ...]  # the module set, in loraplan's role grammar
    ranks: tuple[int, int, int]  # base rank for complexity low, medium, high
    why_targets: str
    why_rank: str


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("format_only", 3, ("q", "v"), (4, 4, 4),
         "a format or style change needs few directions; q and v are the LoRA paper's highest-impact pair "
         "(Hu et al. 2021)",
         "rank table: format only -> r=4, a single behavioral direction"),
    Task("instruction_following", 4, ("attention",), (8, 8, 8),
         "behavior is how attention routes and mixes information: all four attention projections at "
         "moderate rank",
         "rank table: instruction following -> r=8 (build_lora_config)"),
    Task("domain_adaptation", 1, ("attention", "mlp"), (16, 32, 32),
         "new facts and terminology live in the MLP projections, so they are adapted with attention",
         "rank table: domain adaptation -> r=16-32 (build_lora_config: 16 at low complexity, else 32)"),
    Task("code", 1, ("attention", "mlp"), (16, 32, 32),
         "code adds syntax and API knowledge (MLP) and reasoning patterns (attention)",
         "rank table: code -> r=16-32 (build_lora_config: 16 at low complexity, else 32)"),
    Task("complex_domain", 2, ("attention", "mlp"), (32, 64, 64),
         "quadrant 2 needs new knowledge and new behavior: every attention and MLP projection",
         "rank table: complex domain (medical, legal) -> r=32-64 (32 at low complexity, else 64)"),
    Task("multitask", 2, ("attention", "mlp"), (64, 64, 64),
         "several independent tasks change both behavior and knowledge: every attention and MLP projection",
         "rank table: multi-task continual learning -> r=64+"),
)}
TASK_ALIASES = {"chat": "instruction_following"}


@dataclass(frozen=True)
class SizeBucket:
    label: str
    below: float  # examples < below fall in this bucket (100k itself is in 10k-100k, as in the seed)
    factor: int  # build_lora_config: the base rank doubles from 10k examples
    cap: int
    rule_of_thumb: tuple[int, int]  # the seed's "rank and dataset size" rule for this bucket
    why: str


SIZE_BUCKETS = (
    SizeBucket("under 1k", 1_000, 1, 8, (1, 8), "at most 8: too few examples for more directions, the rest fit noise"),
    SizeBucket("1k-10k", 10_000, 1, 32, (8, 16), "the base rank, at most 32"),
    SizeBucket("10k-100k", 100_001, 2, 64, (16, 32), "twice the base rank, at most 64"),
    SizeBucket("over 100k", math.inf, 2, 128, (32, 64),
               "twice the base rank, at most 128 (seed 001: very large dataset, complex task -> 64-128)"),
)

ATTENTION_ONLY_NOTE = (
    "attention-only LoRA underperforms in later work: QLoRA needed LoRA on every linear layer to match full "
    "fine-tuning (Dettmers et al. 2023), Biderman et al. 2024 rank all > MLP > attention, and LoRA Without "
    "Regret (Schulman et al. 2025) finds attention-only behind MLP-only even at equal parameter count; for more "
    "than a light change, compare with attention,mlp at the same rank (loraplan sweep)")
ATTENTION_ONLY_SOURCE = ("Dettmers et al. 2023 (QLoRA); Biderman et al. 2024 (LoRA Learns Less and Forgets Less); "
                         "Schulman et al. 2025 (LoRA Without Regret, Thinking Machines)")


def resolve_task(name: str) -> Task:
    key = str(name).strip().lower().replace("-", "_")
    key = TASK_ALIASES.get(key, key)
    if key in TASKS:
        return TASKS[key]
    choices = list(TASKS) + list(TASK_ALIASES)
    hint = did_you_mean(key, choices)
    listed = "format_only, instruction_following (chat), domain_adaptation, code, complex_domain, multitask"
    raise UsageError(f"unknown task '{name}'", f"{hint + ' ' if hint else ''}tasks: {listed}")


def size_bucket(examples: int) -> SizeBucket:
    return next(b for b in SIZE_BUCKETS if examples < b.below)


def seed_rank(task: Task, examples: int, complexity: str) -> int:
    """The LoRA rank before DoRA: the task's base rank scaled by the data size."""
    bucket = size_bucket(examples)
    return min(task.ranks[COMPLEXITIES.index(complexity)] * bucket.factor, bucket.cap)


@dataclass
class Recommendation:
    """A recommended plan and what it was sized against."""

    task: Task
    examples: int
    complexity: str
    plan: LoraPlan
    structure: Any = None  # ModelStructure when a model was given
    count: Any = None  # CountResult
    memory: Any = None  # gpu_memory.MemoryEstimate
    gpu_bytes: int | None = None

    @property
    def fits(self) -> bool | None:
        if self.memory is None or self.gpu_bytes is None:
            return None
        return self.memory.fits(self.gpu_bytes)

    @cached_property
    def suggestions(self) -> list[str]:
        """What would make it fit (each re-estimated by the memory model); empty when it fits."""
        return list(self.memory.suggestions(self.gpu_bytes)) if self.fits is False else []

    def peft_config(self) -> dict[str, Any]:
        return peft_config(self.plan, self.structure)

    def plan_json(self) -> dict[str, Any]:
        """The plan with resolved values: lora_alpha a number (alpha = r spelled out), targets a list."""
        data = self.plan.to_dict()
        data["lora_alpha"] = int(self.plan.alpha) if self.plan.alpha.is_integer() else self.plan.alpha
        data["targets"] = parse_spec(self.plan.targets)
        return data

    def to_json(self) -> dict[str, Any]:
        behavior, knowledge = QUADRANTS[self.task.quadrant]
        out: dict[str, Any] = {
            "task": self.task.name,
            "quadrant": {"number": self.task.quadrant, "behavioral_change": behavior, "knowledge_injection": knowledge},
            "examples": self.examples,
            "size_bucket": size_bucket(self.examples).label,
            "complexity": self.complexity,
            "model": self.structure.source if self.structure is not None else None,
            "plan": self.plan_json(),
            "peft_config": self.peft_config(),
            "count": self.count.to_json() if self.count is not None else None,
            "memory": None,
        }
        if self.memory is not None:
            out["memory"] = {**self.memory.to_json(), "gpu_bytes": self.gpu_bytes, "fits": self.fits,
                             "suggestions": self.suggestions}
        return out


def recommend(task: str, examples: int, complexity: str | None = None, *, model=None, new_tokens: bool = False,
              dora: bool = False, loraplus: bool = True, gpu_memory: int | str | None = None,
              batch_size: int | None = None, seq_len: int | None = None, quant: str | None = None,
              grad_ckpt: bool = False, optimizer: str = "adamw", dtype: str = "bf16",
              trust_remote_code: bool = False) -> LoraPlan:
    """The recommended `LoraPlan` (with `.reasons`): `loraplan recommend` as a function.

    `recommend("format_only", 500)` -> q_proj, v_proj at r=4. With `model` the targets are that
    model's roles and the plan is sized; with `gpu_memory` (bytes or "24GiB") and the batch shape
    a plan that does not fit says so in its reasons and in a warning.
    """
    result = make_recommendation(task, examples, complexity, model=model, new_tokens=new_tokens, dora=dora,
                                 loraplus=loraplus, gpu_memory=gpu_memory, batch_size=batch_size, seq_len=seq_len,
                                 quant=quant, grad_ckpt=grad_ckpt, optimizer=optimizer, dtype=dtype,
                                 trust_remote_code=trust_remote_code)
    if result.fits is False:
        warnings.warn(next(r.text for r in result.plan.reasons if r.choice == "memory"), stacklevel=2)
    return result.plan


def make_recommendation(task: str, examples: int, complexity: str | None = None, *, model=None,
                        new_tokens: bool = False, dora: bool = False, loraplus: bool = True,
                        gpu_memory: int | str | None = None, batch_size: int | None = None,
                        seq_len: int | None = None, quant: str | None = None, grad_ckpt: bool = False,
                        optimizer: str = "adamw", dtype: str = "bf16",
                        trust_remote_code: bool = False) -> Recommendation:
    """`recommend` with everything the plan was sized against (count, memory estimate)."""
    spec = resolve_task(task)
    examples = _check_examples(examples)
    level = _check_complexity(complexity)
    if quant not in (None, "4bit", "8bit"):
        raise UsageError(f"unknown quantization '{quant}'", "choose 4bit (QLoRA) or 8bit")
    # quant alone only shapes the exports (adapter: qlora, quantization_bit...); the rest asks for an estimate
    wants_memory = (any(v not in (None, False) for v in (gpu_memory, batch_size, seq_len, grad_ckpt))
                    or optimizer != "adamw")
    if wants_memory and model is None:
        raise UsageError("a memory estimate needs MODEL", "give the model, or leave out --gpu-memory, --batch-size, "
                         "--seq-len, --grad-ckpt and --optimizer")
    if wants_memory and (batch_size is None or seq_len is None):
        missing = " and ".join(f for f, v in (("--batch-size", batch_size), ("--seq-len", seq_len)) if v is None)
        raise UsageError(f"the memory estimate needs {missing}", "e.g. --batch-size 4 --seq-len 2048")
    gpu_bytes = _gpu_bytes(gpu_memory)

    structure = None
    if model is not None:
        from ..model.loading import load_structure

        structure = load_structure(model, trust_remote_code=trust_remote_code)
        if dora and "mlp" in spec.roles and any(m.role == "experts" for m in structure.modules):
            raise UsageError(f"--dora: PEFT cannot apply DoRA to the MoE expert parameters that `mlp` covers on "
                             f"{structure.architecture}", "leave out --dora")
    plan = _plan(spec, examples, level, complexity is not None, structure, new_tokens, dora, loraplus)
    result = Recommendation(spec, examples, level, plan, structure, gpu_bytes=gpu_bytes)
    if structure is None:
        return result

    from .count import count_plan, human_bytes

    result.count = count_plan(structure, plan)
    c = result.count
    reasons = [Reason("size", f"trainable {c.trainable_params:,} params ({c.trainable_percent:.3g}% of "
                              f"{c.total_params:,}); adapter {human_bytes(c.adapter_bytes('bf16'))} in bf16",
                      "loraplan count (equal to PEFT's print_trainable_parameters)")]
    reasons += [Reason("note", n) for n in c.notes]
    if batch_size is not None:
        result.memory = _memory_module().estimate_memory(structure, plan, batch_size, seq_len, dtype=dtype,
                                                         quant=quant, grad_ckpt=grad_ckpt, optimizer=optimizer)
        reasons.append(Reason("memory", _memory_text(result), "loraplan memory"))
    result.plan = plan.replace(reasons=plan.reasons + tuple(reasons))
    return result


def _check_examples(examples) -> int:
    if isinstance(examples, float) and examples.is_integer():  # 5e4
        examples = int(examples)
    if isinstance(examples, bool) or not isinstance(examples, int) or examples <= 0:
        raise UsageError(f"examples must be a positive number of training examples, got {examples!r}",
                         "count the rows of your training set, e.g. --examples 5000")
    return examples


def _check_complexity(complexity: str | None) -> str:
    if complexity is None:
        return "medium"
    key = str(complexity).strip().lower()
    if key not in COMPLEXITIES:
        hint = did_you_mean(key, COMPLEXITIES)
        raise UsageError(f"unknown complexity '{complexity}'",
                         f"{hint + ' ' if hint else ''}choose low, medium or high")
    return key


def _gpu_bytes(gpu_memory: int | str | None) -> int | None:
    if gpu_memory is None:
        return None
    if isinstance(gpu_memory, int) and not isinstance(gpu_memory, bool):
        if gpu_memory <= 0:
            raise UsageError(f"gpu_memory must be positive, got {gpu_memory}", "bytes, or a size such as '24GiB'")
        return gpu_memory
    return _memory_module().parse_size(str(gpu_memory))


def _memory_module():
    try:
        from . import memory as gpu_memory
    except ImportError as e:  # the estimator ships with loraplan; a broken install is a run-time failure
        raise RunError(f"the memory estimator is unavailable ({e})", "reinstall loraplan") from None
    return gpu_memory


def _memory_text(result: Recommendation) -> str:
    from .count import human_bytes

    est = result.memory
    setup = ([est.dtype] + ([f"{est.quant} base"] if est.quant not in (None, "none") else [])
             + (["checkpointing"] if est.grad_ckpt else []) + [est.optimizer])
    text = (f"estimated peak {human_bytes(est.total_bytes)} for batch {est.batch_size} x {est.seq_len} tokens "
            f"({', '.join(setup)}); {human_bytes(est.needed_bytes)} with the CUDA context and allocator margin")
    if result.gpu_bytes is None:
        return text
    gpu = human_bytes(result.gpu_bytes)
    if result.fits:
        return f"{text}: fits in {gpu}"
    fixes = result.suggestions
    fix = "; ".join(fixes) if fixes else "nothing loraplan knows of makes it fit: a larger GPU, or several (FSDP)"
    return f"{text}: does NOT fit in {gpu} -- {fix}"


# -- the rules ----------------------------------------------------------------------------------


def _plan(task: Task, examples: int, complexity: str, complexity_given: bool, structure, new_tokens: bool,
          dora: bool, loraplus: bool) -> LoraPlan:
    behavior, knowledge = QUADRANTS[task.quadrant]
    reasons = [Reason("quadrant", f"quadrant {task.quadrant}: {behavior} behavioral change, {knowledge} knowledge "
                                  f"injection ({task.name})", SEED)]

    targets, target_reasons = _targets(task, structure)
    reasons += target_reasons

    bucket = size_bucket(examples)
    base = task.ranks[COMPLEXITIES.index(complexity)]
    lora_rank = seed_rank(task, examples, complexity)
    reasons.append(Reason("r", f"r={lora_rank}: {task.why_rank}; {examples:,} examples ({bucket.label}) -> "
                               f"{bucket.why}" + (f" (base {base})" if lora_rank != base else ""),
                          f"{SEED}: rank table, dataset size, build_lora_config"))
    if complexity_given and len(set(task.ranks)) == 1:
        reasons.append(Reason("note", f"complexity does not change the rank of {task.name} (the rank table gives "
                                      f"one value)"))
    low, high = bucket.rule_of_thumb
    if lora_rank > high:
        reasons.append(Reason("note", f"r={lora_rank} is above the seed's rule of thumb for {bucket.label} examples "
                                      f"(r={low}-{high}); its build_lora_config goes higher: if eval loss rises while "
                                      f"train loss falls, use r={high} (loraplan sweep compares both)", SEED))
    r = lora_rank
    if dora:
        r = max(1, lora_rank // 2)
        reasons.append(Reason("r", f"DoRA at half the rank: r={lora_rank} -> {r} (DoRA at r=8 matches LoRA at r=16)",
                              "Liu et al. 2024 (DoRA)"))

    rslora = r >= 16
    if rslora:
        reasons.append(Reason("use_rslora", f"on: r={r} >= 16; with alpha/r scaling the stable learning rate "
                                            "shrinks as r grows", "Kalajdzievski 2023 (rsLoRA)"))
    else:
        reasons.append(Reason("use_rslora", f"off: at r={r} (< 16) rsLoRA changes little", SEED))

    reasons.append(Reason("lora_alpha", policy_reason(r, rslora), SEED))
    if rslora:
        reasons.append(Reason("note", f"with rsLoRA and alpha = r the update is scaled by sqrt(r) = "
                                      f"{math.sqrt(r):.3g}, "
                                      "not 1: rsLoRA's rank-stable choice keeps alpha fixed across ranks; the seed's "
                                      "builder sets both, so if training is unstable lower the learning rate, and when "
                                      "sweeping r with rsLoRA keep alpha fixed", "Kalajdzievski 2023 (rsLoRA)"))

    if dora:
        reasons.append(Reason("use_dora", "on (--dora): magnitude and direction learned apart; one weight norm per "
                                          "adapted layer per step (under 5% overhead with QLoRA)",
                              "Liu et al. 2024 (DoRA)"))
    else:
        reasons.append(Reason("use_dora", "off: plain LoRA; --dora gives DoRA at half the rank for a little "
                                          "training speed", SEED))

    ratio = 16.0 if loraplus else None
    if loraplus:
        reasons.append(Reason("loraplus_lr_ratio", "16: lora_B (zero-initialized) learns 16x faster than lora_A; an "
                                                   "optimizer setting (axolotl/LLaMA-Factory loraplus_lr_ratio, PEFT "
                                                   "create_loraplus_optimizer)", "Hayou et al. 2024 (LoRA+)"))
    else:
        reasons.append(Reason("loraplus_lr_ratio", "off (--no-loraplus): one learning rate for lora_A and lora_B"))

    experts = structure is not None and any(m.role == "experts" for m in structure.modules) and "mlp" in targets
    dropout = ("0 here: PEFT's MoE expert parameters (ParamWrapper) take no dropout and one LoraConfig holds one "
               "value (0.05, the seeds' value, otherwise)" if experts else "0.05: light regularization, the seeds' value")
    reasons.append(Reason("lora_dropout", dropout, SEED))
    reasons.append(Reason("bias", "none: frozen biases keep the adapter small and mergeable (PEFT's default)", SEED))
    task_type = _task_type(structure)
    head = (f"the head of {structure.architecture}" if structure is not None
            else "a decoder-only language model, as in the seeds (give MODEL to check)")
    reasons.append(Reason("task_type", f"{task_type}: {head}"))
    if task.roles != ("attention", "mlp"):
        reasons.append(Reason("note", ATTENTION_ONLY_NOTE, ATTENTION_ONLY_SOURCE))
    saved: tuple[str, ...] = ()
    if new_tokens:
        saved = _embedding_names(structure)
        reasons.append(Reason("modules_to_save", f"{', '.join(saved)} (--new-tokens): new token rows need their input "
                                                 "and output weights learned, so both are trained in full; what "
                                                 "axolotl requires when it adds tokens and what LLaMA-Factory's "
                                                 "resize_vocab does (LoRA on them gives each new row only a rank-r "
                                                 "code, and TRL refuses LoRA on lm_head)", SEED))
        reasons.append(Reason("new_tokens", "new tokens: add them to the tokenizer and resize the embeddings before the "
                                            "adapter is built (axolotl: `tokens:`; LLaMA-Factory: resize_vocab; PEFT: "
                                            "model.resize_token_embeddings before get_peft_model); when you know the "
                                            "new ids, PEFT's trainable_token_indices (axolotl: "
                                            "peft_trainable_token_indices) = {'" + saved[0] + "': [the new ids]} "
                                            "trains only those rows instead of full copies, far fewer parameters"))
    if new_tokens and structure is not None and structure.tied_embeddings:
        reasons.append(Reason("new_tokens", f"{structure.architecture} ties lm_head to the input embeddings: "
                                      "modules_to_save trains two separate copies (counted here), so the adapter "
                                      "unties them; PEFT's ensure_weight_tying=True (axolotl peft_ensure_weight_tying) "
                                      "keeps one, about half the trainable parameters"))
    return LoraPlan(targets=targets, r=r, lora_alpha=alpha_for(DEFAULT_POLICY, r), use_rslora=rslora, use_dora=dora,
                    loraplus_lr_ratio=ratio, lora_dropout=0.0 if experts else 0.05, bias="none", modules_to_save=saved,
                    task_type=task_type, reasons=tuple(reasons))


def _embedding_names(structure) -> tuple[str, ...]:
    """The names PEFT's modules_to_save takes for the input embeddings and the output layer."""
    if structure is None:
        return (LLAMA_NAMES["embed"], LLAMA_NAMES["lm_head"])
    names = [n.rpartition(".")[2] for n in (structure.input_embeddings, structure.output_embeddings) if n]
    if not names:
        raise UsageError(f"--new-tokens: {structure.architecture} has no input embeddings loraplan can find",
                         "leave out --new-tokens")
    return tuple(dict.fromkeys(names))


def _targets(task: Task, structure) -> tuple[str, list[Reason]]:
    """The module set as a target spec: PEFT's Llama names without a model, the roles with one."""
    roles = list(task.roles)
    reasons: list[Reason] = []
    if structure is not None and roles == ["q", "v"]:
        roles, fused = _unfused(structure, roles)
        if fused:
            reasons.append(Reason("targets", fused))
    if structure is None:
        expand = {"attention": ["q", "k", "v", "o"], "mlp": ["gate", "up", "down"]}
        names = [LLAMA_NAMES[x] for r in roles for x in expand.get(r, [r])]
        spec = ",".join(names)
        shown = ", ".join(names)
    else:
        spec = ",".join(roles)
        shown = f"{spec} -> {_peft_names(structure, spec)}"
    text = f"{shown}: {task.why_targets}"
    reasons.insert(0, Reason("targets", text, SEED))
    return spec, reasons


def _unfused(structure, roles: list[str]) -> tuple[list[str], str | None]:
    """q, v on a model that fuses them (Phi-3 qkv_proj, GPT-2 c_attn, MLA kv): the fused projection."""
    present = {m.role for m in structure.modules}
    out, fused_into = [], {}
    for role in roles:
        if role in present:
            out.append(role)
            continue
        holder = next((f for f in FUSED_INTO.get(role, ()) if f in present), None)
        if holder is None:
            return roles, None  # the target grammar reports what the model has
        fused_into[role] = holder
        out.append(holder)
    if not fused_into:
        return roles, None
    out = list(dict.fromkeys(out))
    parts = []
    for holder in dict.fromkeys(fused_into.values()):
        leaf = next(m.leaf for m in structure.modules if m.role == holder)
        parts.append(f"{' and '.join(r for r, h in fused_into.items() if h == holder)} into {leaf}")
    text = (f"{structure.architecture} fuses {'; '.join(parts)}: LoRA cannot adapt them alone, so `q,v` becomes "
            f"`{','.join(out)}` (one rank-r update on the fused weight, which also moves its other projections)")
    return out, text


def _peft_names(structure, spec: str) -> str:
    from ..model.targets import resolve_targets

    resolved = resolve_targets(structure, spec)
    names = resolved.target_modules if isinstance(resolved.target_modules, str) else ", ".join(resolved.target_modules)
    if resolved.target_parameters:
        names += f" + parameters {', '.join(resolved.target_parameters)}"
    return names


def _task_type(structure) -> str:
    """PEFT's task_type for the model's head (CAUSAL_LM without a model: the seeds' setting)."""
    if structure is None:
        return "CAUSAL_LM"
    arch = structure.architecture
    for suffix, task_type in (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                              ("ForQuestionAnswering", "QUESTION_ANS")):
        if arch.endswith(suffix):
            return task_type
    if structure.config.get("is_encoder_decoder"):
        return "SEQ_2_SEQ_LM"
    return "CAUSAL_LM"

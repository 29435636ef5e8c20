"""The probe against the sweep on a real-data task: does `loraplan probe` pick the modules and rank that
a sweep's winner picks, and at what fraction of the sweep's cost?

Neither machine has a pretrained LM or a dataset offline, so the task is built from real text that
ships with Python: a small Llama pretrained from scratch on the standard library's `.py` sources
(code), then LoRA-fine-tuned on the Python reference manual (`pydoc_data.topics`, English prose).
The corpus depends on the interpreter (3.11 here, 3.12 on the GPU machine); its sha256 is recorded.

Stages, each skipped when its output is already in --work (so a rerun resumes):
  1. corpora     code_train/code_eval.jsonl (code; 2% of the files held out), train/eval.jsonl (prose;
                 ~5% held out by whole topic, so eval text never appears in train)
  2. tokenizer   byte-level BPE trained on both corpora, saved in WORK/base/
  3. base        LlamaForCausalLM, random init, pretrained on packed 256-token windows of code
  4. probe       loraplan.probing.probe.probe on train.jsonl
  5. sweep       loraplan.sweeps.runner.sweep: q,v / attention / mlp / all-linear × r 4, 16 (alpha = r),
                 eval on eval.jsonl, ledger in WORK/sweep/
  6. compare     OUT/real_task.json and OUT/real_task.md (the table printed at the end)

    python benchmarks/probe/real_task.py --work /tmp/real --out /tmp/real_out                 # small, GPU
    python benchmarks/probe/real_task.py --work /tmp/real_tiny --out /tmp/real_tiny_out --size tiny --device cpu
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from loraplan.files import write_atomic, write_json  # noqa: E402  (after the path)

SEQ = 256  # pretraining window, and the fine-tune max_length
SEED = 0
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SKIPPED_DIRS = {"test", "tests", "idlelib", "pydoc_data", "site-packages", "__pycache__"}
CODE_CHUNK = 1500  # characters: top-level blocks are merged up to this, longer ones cut at lines
PROSE_CHUNK = 800  # characters per fine-tune example: ~180 tokens, most within SEQ
CODE_EVAL_FILES = 0.02
PROSE_EVAL = 0.05  # share of the fine-tune examples held out, by whole topic
GRID = {"targets": ["q,v", "attention", "mlp", "all-linear"], "r": [4, 16], "alpha": ["r"]}
SWEEP_BATCH = 16
SWEEP_MICRO_BATCH = 8


@dataclass(frozen=True)
class Size:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    pretrain_steps: int
    pretrain_batch: int  # windows of SEQ tokens per step
    pretrain_lr: float
    sweep_steps: int
    sweep_lr: float
    probe_batches: int
    probe_batch_size: int


SIZES = {
    # 12.6M parameters (3.1M of them embeddings). 4000 steps × 32 × 256 = 33M tokens, ~11 passes
    # over the stdlib's ~3M code tokens (3.0M on 3.11); sized, not measured, for 2-3 min on an H100.
    "small": Size(layers=6, hidden=384, intermediate=1024, heads=6, kv_heads=2, vocab=4096,
                  pretrain_steps=4000, pretrain_batch=32, pretrain_lr=1e-3,
                  sweep_steps=300, sweep_lr=2e-3, probe_batches=16, probe_batch_size=16),
    # a CPU smoke test of the whole pipeline in a few minutes on 2 cores
    "tiny": Size(layers=2, hidden=128, intermediate=384, heads=4, kv_heads=2, vocab=4096,
                 pretrain_steps=300, pretrain_batch=8, pretrain_lr=3e-3,
                 sweep_steps=40, sweep_lr=5e-3, probe_batches=8, probe_batch_size=8),
}


# -- files ---------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_atomic(path, text)  # a stage's output exists only once it is complete
    return hashlib.sha256(text.encode()).hexdigest()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def check_settings(path: Path, recorded: dict, settings: dict) -> None:
    """A resumed stage must have been made with the same settings, or its numbers mean something else."""
    if recorded.get("settings") != settings:
        changed = sorted(k for k in settings.keys() | recorded.get("settings", {}).keys()
                         if settings.get(k) != recorded.get("settings", {}).get(k))
        raise SystemExit(f"error: {path} was made with other settings ({', '.join(changed)} differ) "
                         "(hint: rerun with the same flags, or use a fresh --work; to redo a stage, delete its "
                         "record in WORK/stages/ and those of the stages after it, and WORK/sweep/ with the sweep's)")


# -- 1. corpora ----------------------------------------------------------------------------------


def stdlib_files(stdlib: Path) -> list[Path]:
    return [p for p in sorted(stdlib.rglob("*.py"))
            if not SKIPPED_DIRS.intersection(p.relative_to(stdlib).parts[:-1])]


def pack(pieces: list[str], limit: int, sep: str = "") -> list[str]:
    """Consecutive pieces joined by `sep` into chunks of at most `limit` characters (a longer piece alone)."""
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + len(sep) + len(piece) > limit:
            chunks.append(current)
            current = ""
        current = f"{current}{sep}{piece}" if current else piece
    return chunks + [current] if current else chunks


def cut_lines(text: str, limit: int) -> list[str]:
    """Consecutive lines grouped into pieces of at most `limit` characters (a longer line alone)."""
    return pack(text.splitlines(keepends=True), limit)


def code_chunks(source: str) -> list[str]:
    """A module cut before each top-level def/class (with its decorators), blocks merged up to
    CODE_CHUNK characters; the chunks concatenate back to the file."""
    lines = source.splitlines(keepends=True)
    blocks, current = [], []
    for i, line in enumerate(lines):
        starts = re.match(r"(async def |def |class |@)", line)
        after_decorator = i > 0 and lines[i - 1].startswith("@")
        if starts and current and not after_decorator:
            blocks.append("".join(current))
            current = []
        current.append(line)
    if current:
        blocks.append("".join(current))
    return pack([piece for block in blocks
                 for piece in (cut_lines(block, CODE_CHUNK) if len(block) > CODE_CHUNK else [block])], CODE_CHUNK)


def prose_chunks(text: str) -> list[str]:
    """Paragraphs of one manual topic grouped up to PROSE_CHUNK characters (longer ones cut at lines)."""
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
    pieces = [piece.strip("\n") for paragraph in paragraphs
              for piece in (cut_lines(paragraph, PROSE_CHUNK) if len(paragraph) > PROSE_CHUNK else [paragraph])]
    return pack(pieces, PROSE_CHUNK, sep="\n\n")


def held_out_topics(chunks: dict[str, list[str]], rng: random.Random) -> list[str]:
    """Whole topics, in random order, until PROSE_EVAL of the examples are held out (without
    overshooting by a large topic)."""
    total = sum(map(len, chunks.values()))
    target, ceiling = PROSE_EVAL * total, math.ceil(1.5 * PROSE_EVAL * total)
    names = sorted(chunks)
    rng.shuffle(names)
    chosen, count = [], 0
    for name in names:
        if count >= target:
            break
        if count + len(chunks[name]) <= ceiling:
            chosen.append(name)
            count += len(chunks[name])
    return sorted(chosen)


def build_corpora(work: Path) -> dict:
    from pydoc_data.topics import topics

    rng = random.Random(SEED)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(stdlib)
    held = set(rng.sample(range(len(files)), max(1, round(CODE_EVAL_FILES * len(files)))))
    code = {"train": [], "eval": []}
    for i, path in enumerate(files):
        source = path.read_text(encoding="utf-8", errors="replace")
        split = "eval" if i in held else "train"
        code[split] += [{"text": c, "file": str(path.relative_to(stdlib))} for c in code_chunks(source)]
    prose = {name: prose_chunks(text) for name, text in topics.items()}
    eval_topics = held_out_topics(prose, rng)
    rows = {"train": [{"text": c} for name in sorted(prose) if name not in eval_topics for c in prose[name]],
            "eval": [{"text": c} for name in eval_topics for c in prose[name]]}
    record = {"python": platform.python_version(), "stdlib": str(stdlib),
              "code": {"files": len(files), "eval_files": len(held)},
              "prose": {"source": "pydoc_data.topics.topics", "topics": len(prose), "eval_topics": eval_topics}}
    for split in ("train", "eval"):
        record["code"][f"{split}_chunks"] = len(code[split])
        record["code"][f"{split}_chars"] = sum(len(r["text"]) for r in code[split])
        record["code"][f"{split}_sha256"] = write_jsonl(work / f"code_{split}.jsonl", code[split])
        record["prose"][f"{split}_examples"] = len(rows[split])
        record["prose"][f"{split}_chars"] = sum(len(r["text"]) for r in rows[split])
        record["prose"][f"{split}_sha256"] = write_jsonl(work / f"{split}.jsonl", rows[split])
    return record


# -- 2. tokenizer --------------------------------------------------------------------------------


def train_tokenizer(work: Path, vocab: int) -> dict:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    texts = [r["text"] for name in ("code_train", "train") for r in read_jsonl(work / f"{name}.jsonl")]
    t0 = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=2, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    # BOS in front of every text, as Llama's tokenizer does; loraplan.data.formats finds it by asking the tokenizer
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1024)
    fast.save_pretrained(work / "base")
    return {"kind": "byte-level BPE (tokenizers)", "vocab": len(fast), "trained_on_texts": len(texts),
            "seconds": round(time.time() - t0, 1)}


# -- 3. base model -------------------------------------------------------------------------------


def token_stream(rows: list[dict], tokenizer) -> list[int]:
    """Each file as BOS + its chunks' tokens + EOS, files concatenated (packed pretraining)."""
    # verbose=False: chunks longer than model_max_length are fine here, the stream is cut into windows
    ids = tokenizer([r["text"] for r in rows], add_special_tokens=False, verbose=False)["input_ids"]
    stream, last = [], None
    for row, chunk in zip(rows, ids, strict=True):
        if row["file"] != last:
            if last is not None:
                stream.append(tokenizer.eos_token_id)
            stream.append(tokenizer.bos_token_id)
            last = row["file"]
        stream.extend(chunk)
    return stream + [tokenizer.eos_token_id]


def pretrain(work: Path, size: Size, steps: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    t0 = time.time()
    train = torch.tensor(token_stream(read_jsonl(work / "code_train.jsonl"), tokenizer), device=device)
    held = torch.tensor(token_stream(read_jsonl(work / "code_eval.jsonl"), tokenizer), device=device)
    tokenize_s = time.time() - t0
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads, max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    # no weight decay on norms (nanoGPT's split: decay only the 2-D weights)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    cuda = device == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=size.pretrain_lr, betas=(0.9, 0.95), **({"fused": True} if cuda else {}))
    warmup = max(10, steps // 20)

    def lr_factor(step: int) -> float:  # linear warmup, cosine down to 10% of the peak
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    offsets = torch.arange(SEQ + 1, device=device)
    generator = torch.Generator(device="cpu").manual_seed(SEED)

    def window_loss(windows):
        with autocast:
            logits = model(input_ids=windows[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())

    def held_out_loss() -> float:
        starts = torch.arange(0, len(held) - SEQ - 1, SEQ, device=device)[:64]
        if len(starts) == 0:
            return math.nan
        model.eval()
        with torch.no_grad():
            loss = sum(float(window_loss(held[s[:, None] + offsets])) * len(s) for s in starts.split(16))
        model.train()
        return loss / len(starts)

    curve, held_curve, running = [], [], torch.zeros((), device=device)
    model.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(train) - SEQ - 1, (size.pretrain_batch,), generator=generator).to(device)
        loss = window_loss(train[starts[:, None] + offsets])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()
        if step % 100 == 0 or step == steps:
            mean = float(running) / (step - 100 * ((step - 1) // 100))  # the steps since the last print
            running.zero_()
            curve.append({"step": step, "train_loss": round(mean, 4)})
            line = f"  pretrain step {step}/{steps}  loss {mean:.4f}  {time.time() - t0:.0f}s"
            if step % 1000 == 0 or step == steps:
                held_curve.append({"step": step, "held_out_loss": round(held_out_loss(), 4)})
                line += f"  held-out code loss {held_curve[-1]['held_out_loss']:.4f}"
            if step == 100:
                line += f"  (eta {(time.time() - t0) / 100 * (steps - 100):.0f}s)"
            print(line, flush=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.time() - t0
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(work / "base", safe_serialization=True)
    if not (work / "base" / "model.safetensors").is_file():
        raise SystemExit(f"error: save_pretrained wrote no model.safetensors in {work / 'base'}")
    return {"params": params, "embedding_params": embedding, "config": {
                "layers": size.layers, "hidden": size.hidden, "intermediate": size.intermediate, "heads": size.heads,
                "kv_heads": size.kv_heads, "vocab": len(tokenizer), "max_position_embeddings": 1024,
                "tie_word_embeddings": False},
            "train_tokens_in_corpus": len(train), "held_out_tokens": len(held),
            "steps": steps, "batch": size.pretrain_batch, "seq_len": SEQ, "tokens_seen": steps * size.pretrain_batch * SEQ,
            "epochs": round(steps * size.pretrain_batch * SEQ / len(train), 2), "lr": size.pretrain_lr,
            "warmup_steps": warmup, "precision": "bf16 autocast" if cuda else "fp32",
            "seconds": round(seconds, 1), "tokenize_seconds": round(tokenize_s, 1),
            "curve": curve, "held_out_curve": held_curve}


def base_eval_loss(work: Path) -> dict:
    """The pretrained base's loss on the fine-tune eval set, measured as the sweep measures its trials."""
    import torch

    from loraplan.data.batches import eval_batches
    from loraplan.data.load import load_data
    from loraplan.model.loading import load_model, load_tokenizer
    from loraplan.sweeps.engine import model_loss
    from loraplan.sweeps.ranking import weighted_mean_sem

    base = str(work / "base")
    tokenizer = load_tokenizer(base)
    splits = load_data(str(work / "train.jsonl"), tokenizer, eval=str(work / "eval.jsonl"), max_length=SEQ)
    model = load_model(base)
    device = next(model.parameters()).device
    losses, counts = [], []
    with torch.no_grad():
        for mb in eval_batches(splits.eval, SWEEP_MICRO_BATCH):
            ids, labels, mask = mb.tensors(device, tokenizer.pad_token_id)
            losses.append(float(model_loss(model, ids, labels, mask, mb.supervised)))
            counts.append(mb.supervised)
    mean, sem = weighted_mean_sem(losses, counts)
    return {"eval_loss": mean, "eval_loss_sem": sem, "dtype": str(next(model.parameters()).dtype),
            "train": splits.train_summary.describe(), "eval": splits.eval_summary.describe()}


# -- 4-5. probe and sweep ------------------------------------------------------------------------


def run_probe(work: Path, size: Size) -> dict:
    from loraplan.probing.probe import probe

    t0 = time.time()
    result = probe(str(work / "base"), str(work / "train.jsonl"), batches=size.probe_batches,
                   batch_size=size.probe_batch_size, max_length=SEQ)
    return {"wall_s": round(time.time() - t0, 2), "result": result.to_json()}


def run_sweep(work: Path, steps: int, lr: float, probe_plan: dict | None) -> dict:
    from loraplan.sweeps.runner import sweep

    # micro-batches of 8 make the eval batches of 8 too: ~40 eval examples give 5-6 batches, enough
    # for the paired per-batch noise estimate that decides "within noise of the best"
    overrides = {"grid": GRID, "training.max_steps": steps, "training.batch_size": SWEEP_BATCH,
                 "training.micro_batch_size": SWEEP_MICRO_BATCH,
                 "training.learning_rate": lr, "training.warmup_steps": max(5, steps // 20),
                 "training.eval_every": max(1, steps // 4), "data.max_length": SEQ}
    if probe_plan:  # the probe's own plan as one more trial: is it within noise of the sweep's best?
        overrides["trials"] = [{"name": "probe_plan", "targets": probe_plan["targets"], "r": probe_plan["r"],
                                "lora_alpha": probe_plan["lora_alpha"], "use_rslora": probe_plan["use_rslora"]}]
    resumed = (work / "sweep" / "sweep.json").exists()
    t0 = time.time()
    result = sweep(str(work / "base"), str(work / "train.jsonl"), eval=str(work / "eval.jsonl"),
                   out=work / "sweep", overrides=overrides, progress=False)
    wall = time.time() - t0
    trials = []
    for r in result.results:
        row = r.to_json()
        trials.append({k: row[k] for k in ("name", "status", "targets", "r", "lora_alpha", "trainable_params",
                                           "eval_loss", "eval_loss_sem", "train_loss", "wall_s")}
                      | {"eval_curve": [{"step": e.step, "eval_loss": e.eval_loss} for e in r.evals]})
    summary = result.summary
    return {"wall_s": round(wall, 2), "resumed": resumed,
            # a resumed sweep's wall time misses the earlier trials: their own times stand in for it
            "seconds": round(wall if not resumed else sum(t["wall_s"] or 0 for t in trials), 2),
            "overrides": overrides, "data": result.data, "trials": trials,
            "best": summary.best, "recommended": summary.recommended, "reason": summary.reason,
            "noise": summary.noise, "ranking": summary.ranking,
            "within_noise": {k: v.within_noise for k, v in summary.trials.items()}}


# -- 6. compare ----------------------------------------------------------------------------------


def compare(work: Path, probe_run: dict, sweep_run: dict) -> dict:
    """Role sets of the probe's plan and of the sweep's picks, resolved on the model, compared."""
    from loraplan.model.loading import load_structure
    from loraplan.model.targets import resolve_targets

    structure = load_structure(str(work / "base"))

    def roles(targets: str) -> set[str]:
        return set(resolve_targets(structure, targets).roles)

    plan = probe_run["result"]["plan"]
    probe_roles = roles(plan["targets"]) if plan else set()
    top_role = probe_run["result"]["roles"][0]["role"]
    by_name = {t["name"]: t for t in sweep_run["trials"]}
    out = {"probe_roles": sorted(probe_roles), "probe_top_role": top_role, "probe_r": plan["r"] if plan else None}
    for pick in ("best", "recommended"):
        trial = by_name.get(sweep_run[pick])
        if trial is None:
            out[pick] = None
            continue
        picked = roles(trial["targets"])
        out[pick] = {"name": trial["name"], "roles": sorted(picked), "r": trial["r"],
                     "exact_role_match": picked == probe_roles, "r_over_probe_r": trial["r"] / plan["r"] if plan else None,
                     "jaccard": round(len(picked & probe_roles) / len(picked | probe_roles), 3),
                     "top_role_covered": top_role in picked}
    # where the grid's closest stand-in for the probe's plan (same roles, nearest r) ranks
    same = [t for t in sweep_run["trials"] if roles(t["targets"]) == probe_roles and t["eval_loss"] is not None]
    if plan and same:
        stand_in = min(same, key=lambda t: (abs(math.log2(t["r"] / plan["r"])), t["r"]))
        out["probe_plan_in_grid"] = {"name": stand_in["name"], "eval_loss": stand_in["eval_loss"],
                                     "position": sweep_run["ranking"].index(stand_in["name"]) + 1,
                                     "of": len(sweep_run["ranking"]),
                                     "within_noise_of_best": sweep_run["within_noise"].get(stand_in["name"])}
    else:
        out["probe_plan_in_grid"] = None
    out["cost_ratio"] = round(probe_run["wall_s"] / sweep_run["seconds"], 4)
    return out


def markdown(report: dict) -> str:
    sweep_run, probe_run, agree = report["sweep"], report["probe"]["result"], report["agreement"]
    base = report["base_eval_loss"]["eval_loss"]
    head = (f"Real-data task on {report['device']}: base {report['model']['params'] / 1e6:.1f}M params, "
            f"pretrained {report['pretraining']['steps']} steps on stdlib code (final train loss "
            f"{report['pretraining']['curve'][-1]['train_loss']:.3f}); fine-tune eval loss of the base {base:.4f}.")
    lines = [head, "", "| trial | targets | r | trainable | eval loss | vs base | within noise of best |",
             "|---|---|---:|---:|---:|---:|---|"]
    order = {n: i for i, n in enumerate(sweep_run["ranking"] or [])}
    for t in sorted(sweep_run["trials"], key=lambda t: order.get(t["name"], len(order))):
        mark = " (best)" if t["name"] == sweep_run["best"] else ""
        mark += " (recommended)" if t["name"] == sweep_run["recommended"] else ""
        loss = f"{t['eval_loss']:.4f} ± {t['eval_loss_sem']:.4f}" if t["eval_loss"] is not None else t["status"]
        delta = f"{t['eval_loss'] - base:+.4f}" if t["eval_loss"] is not None else ""
        lines.append(f"| {t['name']}{mark} | {t['targets']} | {t['r']} | {t['trainable_params'] or 0:,} | {loss} | "
                     f"{delta} | {'yes' if sweep_run['within_noise'].get(t['name']) else 'no'} |")
    roles = ", ".join(f"{r['role']} {r['share']:.0%} r{r['rank']}" for r in probe_run["roles"])
    plan = probe_run["plan"]
    stand_in = agree["probe_plan_in_grid"]
    lines += ["", "| | |", "|---|---|",
              f"| probe roles (share, rank est.) | {roles} |",
              f"| probe plan | {plan['targets']} r{plan['r']} (signal/noise {probe_run['snr']:.3f})" + " |"
              if plan else "| probe plan | none |"]
    for pick in ("best", "recommended"):
        a = agree[pick]
        if a:
            lines.append(f"| sweep {pick} | {a['name']}: roles {','.join(a['roles'])} r{a['r']}; same roles as the probe: "
                         f"{'yes' if a['exact_role_match'] else 'no'} (Jaccard {a['jaccard']}); probe's top role "
                         f"({agree['probe_top_role']}) covered: {'yes' if a['top_role_covered'] else 'no'} |")
    lines.append("| probe plan's grid stand-in | " + (
        f"{stand_in['name']}: #{stand_in['position']} of {stand_in['of']}, within noise of best: "
        f"{'yes' if stand_in['within_noise_of_best'] else 'no'}" if stand_in else "no grid trial has the probe's roles") + " |")
    lines.append(f"| cost | probe {report['probe']['wall_s']:.1f} s, sweep {sweep_run['seconds']:.1f} s "
                 f"({len(sweep_run['trials'])} trials × {sweep_run['overrides']['training.max_steps']} steps): "
                 f"probe / sweep = {agree['cost_ratio']:.2%} |")
    return "\n".join(lines) + "\n"


# -- driver --------------------------------------------------------------------------------------


def stage(path: Path, name: str, settings: dict, build, after: tuple[dict, ...] = ()) -> dict:
    """Load a finished stage's record (checking its settings), or run it and save the record. A stage
    made after another (`after`) records when that one was made: a remade upstream stage is caught."""
    settings = {**settings, "after": [r["made"] for r in after]}
    if path.exists():
        record = json.loads(path.read_text())
        check_settings(path, record, settings)
        print(f"[{name}] done already: {path}", flush=True)
        return record
    print(f"[{name}] ...", flush=True)
    t0 = time.time()
    record = {"settings": settings, **build(), "stage_seconds": round(time.time() - t0, 1),
              "made": datetime.now(timezone.utc).isoformat()}
    write_json(path, record)
    print(f"[{name}] {record['stage_seconds']} s", flush=True)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder for the corpora, the base model and the sweep (resumable)")
    p.add_argument("--out", required=True, help="folder for real_task.json and real_task.md")
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when there is one")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--sweep-steps", type=int, default=None)
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch loads: the sweep engine takes CUDA when it sees one
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device (hint: --device cpu --size tiny)")
    size = SIZES[args.size]
    pretrain_steps = args.pretrain_steps or size.pretrain_steps
    sweep_steps = args.sweep_steps or size.sweep_steps
    if pretrain_steps < 1 or sweep_steps < 1:
        raise SystemExit("error: --pretrain-steps and --sweep-steps must be positive")
    work, out = Path(args.work), Path(args.out)
    stages = work / "stages"
    for folder in (work / "base", stages, out):
        folder.mkdir(parents=True, exist_ok=True)
    model_settings = {**asdict(size), "pretrain_steps": pretrain_steps, "device": device}

    corpora = stage(stages / "corpora.json", "corpora", {}, lambda: build_corpora(work))
    tokenizer = stage(stages / "tokenizer.json", "tokenizer", {"vocab": size.vocab},
                      lambda: train_tokenizer(work, size.vocab), after=(corpora,))
    pretraining = stage(stages / "base.json", "base", model_settings,
                        lambda: pretrain(work, size, pretrain_steps, device), after=(tokenizer,))
    base_eval = stage(stages / "base_eval.json", "base eval", model_settings, lambda: base_eval_loss(work),
                      after=(pretraining,))
    probe_run = stage(stages / "probe.json", "probe", model_settings, lambda: run_probe(work, size),
                      after=(pretraining,))
    sweep_run = stage(stages / "sweep.json", "sweep", {**model_settings, "sweep_steps": sweep_steps},
                      lambda: run_sweep(work, sweep_steps, size.sweep_lr, probe_run["result"]["plan"]),
                      after=(pretraining, probe_run))

    from loraplan.sweeps.runner import package_versions

    report = {
        "task": "pretrain a small Llama on the stdlib's .py sources; LoRA-fine-tune it on the reference manual's prose",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "versions": package_versions(("torch", "transformers", "peft", "tokenizers", "loraplan")), "size": args.size,
        "corpora": corpora, "tokenizer": tokenizer,
        "model": {"params": pretraining["params"], "embedding_params": pretraining["embedding_params"],
                  **pretraining["config"]},
        "pretraining": {k: v for k, v in pretraining.items() if k not in ("params", "embedding_params", "config")},
        "base_eval_loss": base_eval, "probe": probe_run, "sweep": sweep_run,
        "agreement": compare(work, probe_run, sweep_run),
    }
    write_json(out / "real_task.json", report)
    table = markdown(report)
    (out / "real_task.md").write_text(table)
    print("\n" + table)
    print(f"wrote {out / 'real_task.json'} and {out / 'real_task.md'}")


if __name__ == "__main__":
    main()

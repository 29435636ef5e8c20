"""Research tool: train many LoRA configs at once on one frozen base, on CPU, with full curves.

The sweep's engine trains one PEFT adapter at a time; for the research behind the fair sweep we need
every config of a grid (targets × rank × alpha policy × learning rate) trained on the same batches
with its whole eval curve kept, so that any selection rule (successive halving, a budget, a capacity
criterion) can be replayed offline on the curves. Here every Linear of the base gets N adapters at
once (N = the number of configs): the batch is repeated N times, each copy goes through its own
A, B (zero-padded to the largest rank: padded rows and columns get zero gradient and stay zero, so a
config of rank r trains exactly an r-rank adapter), with its own scale (0 on modules it does not
target) and its own learning rate. The rest is what the engine does: PEFT's init (A Kaiming-uniform,
B zero), dropout on the adapter's input, AdamW (wd 0), gradient clipping per config at 1.0, warmup
then cosine or constant, the sweep's own data pipeline (loraplan.data) and batches, eval loss per
batch (for the paired noise of sweeps/ranking.py).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplan.data.batches import eval_batches, training_steps
from loraplan.data.formats import IGNORE_INDEX
from loraplan.data.load import load_data
from loraplan.model.loading import load_model, load_structure, load_tokenizer
from loraplan.model.targets import resolve_targets


@dataclass
class Config:
    name: str
    targets: str  # target grammar (resolved on the base)
    r: int
    alpha: float  # lora_alpha; scale = alpha / r
    lr: float
    dropout: float = 0.05
    rslora: bool = False  # scale alpha / sqrt(r)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class MultiLora(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear, n: int, rmax: int):
        super().__init__()
        self.base = base
        self.n = n
        d_out, d_in = base.weight.shape
        self.A = torch.nn.Parameter(torch.zeros(n, rmax, d_in))
        self.B = torch.nn.Parameter(torch.zeros(n, d_out, rmax))
        self.register_buffer("scale", torch.zeros(n))
        self.dropout = torch.zeros(n)
        self.enabled = True

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        shape = x.shape
        xs = x.reshape(self.n, -1, shape[-1])
        if self.training and float(self.dropout.max()) > 0:
            keep = 1 - self.dropout.to(x.dtype)[:, None, None]
            xs = xs * (torch.rand_like(xs) < keep) / keep
        h = torch.bmm(xs, self.A.transpose(1, 2))
        z = torch.bmm(h, self.B.transpose(1, 2)) * self.scale[:, None, None]
        return y + z.reshape(*shape[:-1], -1)


class Grid:
    """N configs on one base: load once, `train(steps)`; curves in `self.curves`."""

    def __init__(self, task_dir: str, configs: list[Config], *, batch_size: int = 16, max_length: int = 128,
                 seed: int = 0, candidates: str = "all-linear", max_eval_examples: int | None = None):
        torch.manual_seed(seed)
        self.configs = configs
        self.base_dir = f"{task_dir}/base"
        self.tokenizer = load_tokenizer(self.base_dir)
        splits = load_data(f"{task_dir}/train.jsonl", self.tokenizer, eval=f"{task_dir}/eval.jsonl",
                           max_length=max_length, seed=seed)
        self.train_examples = splits.train
        evals = splits.eval[:max_eval_examples] if max_eval_examples else splits.eval
        self.eval_set = eval_batches(evals, batch_size)
        self.batch_size = batch_size
        self.seed = seed
        self.model = load_model(self.base_dir, dtype="fp32", device="cpu").eval()
        self.model.requires_grad_(False)
        self.structure = load_structure(self.base_dir)
        n = len(configs)
        rmax = max(c.r for c in configs)
        self.modules = {}
        named = dict(self.model.named_modules())
        for m in resolve_targets(self.structure, candidates).modules:
            parent_name, _, child = m.name.rpartition(".")
            wrapped = MultiLora(named[m.name], n, rmax)
            setattr(named[parent_name], child, wrapped)
            self.modules[m.name] = (m, wrapped)
        self.targeted = {c.name: {m.name for m in resolve_targets(self.structure, c.targets).modules} for c in configs}
        for name, (m, w) in self.modules.items():
            d_in = w.A.shape[2]
            gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()) % 1000)
            init = (torch.rand(rmax, d_in, generator=gen) * 2 - 1) / math.sqrt(d_in)
            with torch.no_grad():
                for i, c in enumerate(configs):
                    if name in self.targeted[c.name]:
                        w.A[i, : c.r] = init[: c.r]
                        w.scale[i] = c.scale
                    w.dropout[i] = c.dropout
        self.params = [p for _, w in self.modules.values() for p in (w.A, w.B)]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.lr = torch.tensor([c.lr for c in configs])
        self.step = 0
        self.curves = {"train": [], "eval_steps": [], "eval": [], "eval_batches": [], "eval_tokens": None}
        self.alive = torch.ones(n, dtype=torch.bool)

    def trainable(self, i: int) -> int:
        c = self.configs[i]
        return sum(c.r * (w.A.shape[2] + w.B.shape[1]) for name, (_, w) in self.modules.items()
                   if name in self.targeted[c.name])

    def _losses(self, ids, labels, mask):
        n = len(self.configs)
        b = ids.shape[0]
        logits = self.model(input_ids=ids.repeat(n, 1), attention_mask=mask.repeat(n, 1)).logits
        logits = logits.view(n, b, *logits.shape[1:])[:, :, :-1]
        target = labels[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.repeat(n, 1).reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none").view(n, -1)
        count = int((target != IGNORE_INDEX).sum())
        return ce.sum(1), count

    def evaluate(self):
        self.model.eval()
        losses, counts = [], []
        with torch.no_grad():
            for mb in self.eval_set:
                ids, labels, mask = mb.tensors("cpu", self.tokenizer.pad_token_id)
                total, count = self._losses(ids, labels, mask)
                losses.append(total / count)
                counts.append(count)
        per_batch = torch.stack(losses, 1)  # (N, batches)
        w = torch.tensor(counts, dtype=torch.float)
        mean = (per_batch * w).sum(1) / w.sum()
        self.curves["eval_steps"].append(self.step)
        self.curves["eval"].append(mean.tolist())
        self.curves["eval_batches"].append(per_batch.tolist())
        self.curves["eval_tokens"] = counts
        return mean

    def train(self, steps: int, *, total_steps: int, warmup: int = 10, schedule: str = "cosine",
              eval_every: int = 25, max_grad_norm: float = 1.0, log=None):
        batches = training_steps(self.train_examples, total_steps, self.batch_size, None, self.seed)
        if not self.curves["eval"]:
            self.evaluate()
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        t0 = time.time()
        for _ in range(steps):
            self.model.train()
            mb = batches[self.step][0]
            ids, labels, mask = mb.tensors("cpu", self.tokenizer.pad_token_id)
            total, count = self._losses(ids, labels, mask)
            loss = total / count
            for p in self.params:
                p.grad = None
            loss.sum().backward()
            sq = sum(p.grad.pow(2).sum(dim=(1, 2)) for p in self.params)
            coef = (max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            self.step += 1
            t = self.step
            factor = _schedule(t - 1, total_steps, warmup, schedule)  # the lr of this step (HF's LambdaLR)
            lr = (self.lr * factor * self.alive)[:, None, None]
            with torch.no_grad():
                for p, m, v in zip(self.params, self.m, self.v, strict=True):
                    g = p.grad * coef[:, None, None]
                    m.mul_(beta1).add_(g, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
                    p.sub_(lr * (m / (1 - beta1 ** t)) / denom)
            self.curves["train"].append(loss.detach().tolist())
            if t % eval_every == 0 or t == total_steps:
                ev = self.evaluate()
                if log:
                    log(t, time.time() - t0, ev)

    def snapshot(self) -> dict:
        """Every config's adapter factors now: {module: (A (N, rmax, in), B (N, out, rmax), scale (N,))}."""
        return {name: (w.A.detach().clone(), w.B.detach().clone(), w.scale.clone())
                for name, (_, w) in self.modules.items()}

    def set_enabled(self, i: int, roles_off: set[str]):
        """For ablations: zero config i's adapter on modules of these roles (returns a restore function)."""
        saved = []
        for name, (m, w) in self.modules.items():
            if m.role in roles_off:
                saved.append((w, float(w.scale[i])))
                w.scale[i] = 0.0

        def restore():
            for w, s in saved:
                w.scale[i] = s
        return restore


def _schedule(step: int, total: int, warmup: int, kind: str) -> float:
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def deltas(snapshot: dict, i: int) -> dict:
    """Config i's ΔW = scale·B·A per module (modules it does not target are left out)."""
    out = {}
    for name, (a, b, scale) in snapshot.items():
        if float(scale[i]) != 0.0:
            out[name] = float(scale[i]) * b[i] @ a[i]
    return out


def truncate(delta: dict, rank: int) -> dict:
    """Each ΔW cut to its `rank` largest singular directions (what `loraplan compress` does)."""
    out = {}
    for name, d in delta.items():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        out[name] = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return out


class MergedEval:
    """Eval loss (mean and per batch) of the base with given ΔWs merged in: for adapters derived
    from a trained one (SVD-truncated, roles removed) without training anything."""

    def __init__(self, task_dir: str, *, batch_size: int = 16, max_length: int = 128, seed: int = 0,
                 max_eval_examples: int | None = None, candidates: str = "all-linear"):
        base_dir = f"{task_dir}/base"
        tokenizer = load_tokenizer(base_dir)
        splits = load_data(f"{task_dir}/train.jsonl", tokenizer, eval=f"{task_dir}/eval.jsonl",
                           max_length=max_length, seed=seed)
        evals = splits.eval[:max_eval_examples] if max_eval_examples else splits.eval
        self.eval_set = eval_batches(evals, batch_size)
        self.pad = tokenizer.pad_token_id
        self.model = load_model(base_dir, dtype="fp32", device="cpu").eval()
        self.structure = load_structure(base_dir)
        self.named = dict(self.model.named_modules())
        self.roles = {m.name: m.role for m in resolve_targets(self.structure, candidates).modules}
        self.original = {name: self.named[name].weight.detach().clone() for name in self.roles}

    def __call__(self, delta: dict):
        with torch.no_grad():
            for name, w in self.original.items():
                self.named[name].weight.copy_(w + delta[name] if name in delta else w)
            losses, counts = [], []
            for mb in self.eval_set:
                ids, labels, mask = mb.tensors("cpu", self.pad)
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
                target = labels[:, 1:]
                total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                        ignore_index=IGNORE_INDEX, reduction="sum")
                count = int((target != IGNORE_INDEX).sum())
                losses.append(float(total) / count)
                counts.append(count)
        mean = sum(x * c for x, c in zip(losses, counts, strict=True)) / sum(counts)
        return mean, losses

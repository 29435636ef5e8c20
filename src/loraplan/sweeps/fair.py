"""Fair comparisons: what makes the sweep's answer about capacity, not about learning speed.

Three things decide a short LoRA ablation besides what each config can express, and each is handled:

- The learning rate. Configs are compared each at its own best learning rate: a `family` is the
  configs that differ only in r (same targets, DoRA, rsLoRA, LoRA+, dropout, layers); its top-rank
  config (the `lead`) is trained at a small grid of learning rates around the plan's, and the best
  one is the family's. One rate serves every rank of a family because alpha is fixed across ranks
  (scale alpha/r): under Adam the first steps then change ΔW by the same amount at every rank, and
  the best rate is nearly rank-independent (LoRA Without Regret, Thinking Machines 2025; on planted
  tasks: benchmarks/truth/RESULTS.md). With alpha = r a rank-r adapter's step grows with r, so at
  one rate the higher ranks win a short run by learning faster.
- Learning speed at equal rate. Even so a higher rank finds the planted directions sooner (its
  random A overlaps them more), and a broader target set gains sooner. So ranks are also judged by
  `certificates`: the lead's trained ΔW cut by SVD to each lower rank of the family (what
  `loraplan compress` does), evaluated on the same eval batches. A cut adapter is a real adapter of
  that rank, so its eval loss shows what the rank can reach — long before the low-rank trial itself
  has caught up.
- Noise. Every candidate (trained or cut) is compared with the best on the same eval batches: the
  noise is 2σ of the paired per-batch difference (ranking.py). The recommendation is the cheapest
  candidate within noise of the best.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

from ..plan.lora_plan import LoraPlan
from .ranking import NOISE_SIGMAS, weighted_mean_sem

LR_FACTORS = (1 / 3, 1.0, 3.0)  # the learning-rate grid of a family's lead, around the plan's rate


def family_key(plan: LoraPlan) -> tuple:
    """Configs that differ only in r (and an alpha that is one number for all of them) compare as ranks."""
    return (plan.targets, plan.use_dora, plan.use_rslora, plan.loraplus_lr_ratio, plan.lora_dropout, plan.layers,
            plan.lora_alpha is None)


def lr_grid(lr: float, factors=LR_FACTORS) -> list[float]:
    return [float(f"{lr * f:.3g}") for f in factors]


@dataclass
class Candidate:
    """A config with a measured eval loss: a trained trial, or an adapter derived from one."""

    name: str
    targets: str
    r: int
    params: int
    eval_loss: float
    batch_losses: list[float]
    batch_tokens: list[int]
    source: str | None = None  # the trained trial it was derived from (None: trained itself)
    how: str | None = None  # e.g. "ΔW cut to rank 4 by SVD"
    learning_rate: float | None = None
    step: int | None = None

    @property
    def derived(self) -> bool:
        return self.source is not None


@dataclass
class Decision:
    best: Candidate
    pick: Candidate
    noise: dict[str, float | None]  # candidate name -> paired noise to the best
    within: list[str]
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def config(self) -> tuple[str, int]:
        return (self.pick.targets, self.pick.r)


def paired_noise(a: Candidate, b: Candidate, sigmas: float = NOISE_SIGMAS) -> float | None:
    if len(a.batch_losses) != len(b.batch_losses) or len(a.batch_losses) < 2 or a.batch_tokens != b.batch_tokens:
        return None
    diffs = [x - y for x, y in zip(a.batch_losses, b.batch_losses, strict=True)]
    _, sem = weighted_mean_sem(diffs, a.batch_tokens)
    return None if sem is None else sigmas * sem


def decide(candidates: list[Candidate]) -> Decision:
    """The best candidate, and the cheapest within noise of it (fewest trainable parameters; then
    the lower loss; a trained candidate before a derived one of the same config)."""
    ok = [c for c in candidates if math.isfinite(c.eval_loss)]
    best = min(ok, key=lambda c: (c.eval_loss, c.derived))
    noise, within = {}, []
    for c in ok:
        n = 0.0 if c is best else paired_noise(c, best)
        noise[c.name] = n
        if c is best or (n is not None and c.eval_loss - best.eval_loss <= n):
            within.append(c)
    cheapest = min(c.params for c in within)
    same = [c for c in within if c.params == cheapest]
    pick = min(same, key=lambda c: (c.derived, c.eval_loss))
    return Decision(best, pick, noise, [c.name for c in within], ok)


# -- adapters derived from a trained one, in place on a PeftModel ----------------------------------


def _lora_layers(peft_model, adapter: str):
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and hasattr(lora_a, "keys") and adapter in lora_a.keys():
            yield name, module


@contextlib.contextmanager
def derived(peft_model, adapter: str, *, rank: int | None = None, keep=None):
    """The adapter cut to its `rank` largest singular directions per weight (ΔW = s·B·A by SVD) and/or
    restricted to the weights for which `keep(module_name)` is true (the others' B set to zero), for
    the duration; the trained weights are restored after."""
    import torch

    saved = []
    try:
        with torch.no_grad():
            for name, module in _lora_layers(peft_model, adapter):
                a = module.lora_A[adapter].weight
                b = module.lora_B[adapter].weight
                saved.append((a, b, a.detach().clone(), b.detach().clone()))
                if keep is not None and not keep(name):
                    b.zero_()
                    continue
                if rank is None or rank >= a.shape[0]:
                    continue
                s = module.scaling[adapter]
                delta = (b.float() @ a.float()) * s
                u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
                root = sigma[:rank].sqrt()
                a.zero_()
                b.zero_()
                a[:rank] = (root[:, None] * vh[:rank]).to(a.dtype)
                b[:, :rank] = (u[:, :rank] * root / s).to(b.dtype)
        yield
    finally:
        with torch.no_grad():
            for a, b, a0, b0 in saved:
                a.copy_(a0)
                b.copy_(b0)

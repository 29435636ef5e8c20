"""Fair comparisons: what makes the sweep's answer about capacity, not about learning speed.

- The learning rate (wired into the sweep: `training.lr_policy`, `run_schedule`). With alpha = r and
  one learning rate a rank-r adapter's Adam step grows with r, so a higher rank wins a short run by
  learning faster (LoRA Without Regret, Thinking Machines 2025; on our planted tasks the best rate
  falls with r under alpha = r and is nearly rank-independent under a fixed alpha:
  benchmarks/truth/RESULTS.md). So each config is trained at a small log-spaced grid of rates (lr ×
  1/3, 1, 3) up to a screen step, the best rate goes on and the others stop: successive halving
  inside each config, about 1.5 × the steps of one pass of the grid. The recommendation is then the
  cheapest config within noise of the best, each at its own best rate (ranking.py), and the summary
  says whether the curves had flattened.
- Learning speed at equal rate. Even so a higher rank finds the planted directions sooner, and a
  broader target set gains sooner. So each rank family's top-rank trial, when done, is evaluated with
  its ΔW cut by SVD to every lower rank of the family in the grid (`derived`, what `loraplan
  compress` does; the "certificates" in result.json). A cut is a real adapter of that rank: a cut
  within noise of the best shows the rank holds the change, long before that rank's own run has
  caught up (ranking.certify).
- Noise. Every candidate is compared with the best on the same eval batches: the noise is 2σ of the
  paired per-batch difference (ranking.py).
"""

from __future__ import annotations

import contextlib
import math

from ..errors import UsageError
from ..plan.lora_plan import LoraPlan
from .folder import TrialStatus
from .spec import SweepSpec, TrainingSettings, Trial

# -- the learning-rate policy: each config at its own best rate ----------------------------------------


def rate_name(name: str, lr: float, taken: set[str] = frozenset()) -> str:
    """`name_lr3e-03`: no dot (PEFT's adapter names cannot hold one); more digits when that is taken."""
    short = f"{name}_lr{lr:.0e}"
    return short if short not in taken else f"{name}_lr{lr:.3g}".replace(".", "p")


def lr_arms(trials: list[Trial], training: TrainingSettings) -> list[Trial]:
    """Each config once per learning rate of the grid (training.lr_factors × learning_rate). The arm at
    the plan's own rate keeps the config's name (a ledger of a fixed-rate sweep resumes into it)."""
    if training.lr_policy == "fixed":
        return trials
    out, taken = [], {t.name for t in trials}
    for t in trials:
        for f in training.lr_factors:
            lr = float(f"{training.learning_rate * f:.3g}")
            name = t.name if f == 1.0 else rate_name(t.name, lr, taken)
            taken.add(name)
            out.append(t.model_copy(update={"name": name, "learning_rate": lr, "config": t.name}))
    return out


def lr_policy_text(training: dict) -> str:
    """The learning-rate policy of a spec's training section, in words (summary.md, the report)."""
    lr = training.get("learning_rate")
    if training.get("lr_policy", "fixed") == "fixed":
        return f"lr {lr:g} for every config (fixed)"
    factors = training.get("lr_factors") or [1.0]
    rates = ", ".join(f"{lr * f:.3g}" for f in factors)
    return (f"each config at its own best learning rate: {rates} tried for the first "
            f"{training.get('lr_screen', 0.25):.0%} of the steps, the best one kept (per-config)")


def rate_edge_warnings(results, training: TrainingSettings) -> list[str]:
    """Configs whose kept rate is the grid's lowest or highest: their best rate may lie outside it."""
    if training.lr_policy == "fixed" or len(training.lr_factors) < 2:
        return []
    factors = training.lr_factors
    low, high = (float(f"{training.learning_rate * f:.3g}") for f in (min(factors), max(factors)))
    out = []
    for edge, rate, fix in ((high, "highest", "raise"), (low, "lowest", "lower")):
        names = [r.config for r in results if r.config and r.status.value == "completed" and r.learning_rate == edge]
        if names:
            out.append(f"{len(names)} config{'s' if len(names) > 1 else ''} kept the {rate} learning rate tried "
                       f"({edge:g}: {', '.join(names[:4])}{', …' if len(names) > 4 else ''}): the best rate may lie "
                       f"beyond the grid; {fix} training.learning_rate and rerun in a new folder")
    return out


def screen_step(training: TrainingSettings) -> int:
    return max(1, min(training.max_steps - 1, round(training.max_steps * training.lr_screen)))


def cost_per_config(training: TrainingSettings) -> float:
    """Optimizer steps one config costs, in units of max_steps: every rate to the screen, one to the end."""
    if training.lr_policy == "fixed" or len(training.lr_factors) == 1:
        return 1.0
    screen = screen_step(training) / training.max_steps
    return len(training.lr_factors) * screen + (1 - screen)


def with_budget(spec: SweepSpec, configs: int) -> SweepSpec:
    """The spec with max_steps derived from training.budget_steps (the sweep's steps in all)."""
    t = spec.training
    if t.budget_steps is None:
        return spec
    per_config = t.budget_steps / max(configs, 1)
    steps = int(per_config / cost_per_config(t))
    for _ in range(3):  # the screen's share moves with max_steps by rounding: settle on one that fits
        trial = t.model_copy(update={"max_steps": max(steps, 2)})
        if steps <= 2 or cost_per_config(trial) * steps * configs <= t.budget_steps:
            break
        steps -= 1
    if steps < 2:
        raise UsageError(f"a budget of {t.budget_steps} steps is too small for {configs} configs",
                         f"give at least {math.ceil(2 * configs * cost_per_config(t))} steps, or fewer configs")
    return spec.model_copy(update={"training": t.model_copy(update={"max_steps": steps})})


def rank_family(plan: LoraPlan) -> tuple:
    """Configs that differ only in r (and alpha): a ΔW of one cut to another's rank is that config's."""
    return (plan.targets, plan.use_dora, plan.use_rslora, plan.loraplus_lr_ratio, plan.lora_dropout, plan.layers)


def certificate_ranks(trials: list[Trial]) -> dict[str, list[int]]:
    """For each family's top-rank config (by config name): the lower ranks of its family in the grid,
    which its trained ΔW is cut to (not for DoRA: its magnitude vector is not a low-rank ΔW)."""
    families: dict[tuple, dict[str, int]] = {}
    for t in trials:
        families.setdefault(rank_family(t.plan), {})[t.config or t.name] = t.plan.r
    out = {}
    for key, members in families.items():
        if key[1]:
            continue
        lead = max(members, key=members.get)
        lower = sorted({r for r in members.values() if r < members[lead]})
        if lower:
            out[lead] = lower
    return out


def run_schedule(executor, jobs: list[tuple[Trial, object]], spec: SweepSpec) -> None:
    """Train `jobs` (the pending trials and their writers) on `executor` (sweeps/executors.py) under
    the spec's learning-rate policy and halving.

    per-config: each config's rates train to the screen step; the best one goes on, the others stop
    as pruned (successive halving within the config, eta = the number of rates). Then the configs'
    survivors train to max_steps, through successive halving across configs when halving is on.
    Every `advance` is a barrier over however many workers the executor has; a family's lead is cut
    to its lower ranks by the worker that finishes it (`Work.cuts`)."""
    t = spec.training
    if t.lr_policy == "fixed" or all(trial.config is None for trial, _ in jobs):
        survivors, low = list(jobs), 0
    else:
        low = screen_step(t)
        groups: dict[str, list] = {}
        for job in jobs:
            groups.setdefault(job[0].config or job[0].name, []).append(job)
        survivors = []
        for config, arms in groups.items():
            reports = executor.advance(arms, low, final=False, label=f"to step {low}")
            live = sorted((r for r in reports if r.result is None), key=_report_loss)
            if not live:
                continue
            win = live[0]
            rate = {trial.name: trial.learning_rate for trial, _ in arms}
            for r in live[1:]:
                executor.stop(r.name, TrialStatus.PRUNED,
                              f"lr {rate[r.name]:g} stopped at step {low}: eval loss {_report_loss(r):.4f}, "
                              f"lr {rate[win.name]:g} had {_report_loss(win):.4f}")
            survivors += [job for job in arms if job[0].name == win.name]
    if spec.halving.enabled and len(survivors) > 1:
        h = spec.halving
        rungs = sorted({r for r in (max(1, math.ceil(t.max_steps / h.eta ** k)) for k in range(h.rungs)) if r > low}
                       | {t.max_steps})
    else:
        rungs = [t.max_steps]
    live_jobs = survivors
    for i, rung in enumerate(rungs):
        last = rung == rungs[-1]
        label = f"rung {i + 1}/{len(rungs)}: step {rung}" if len(rungs) > 1 else None
        reports = executor.advance(live_jobs, rung, final=last, label=label)
        if last:
            break
        live = sorted((r for r in reports if r.result is None), key=_report_loss)
        keep = max(1, math.ceil(len(live) / spec.halving.eta))
        for r in live[keep:]:
            executor.stop(r.name, TrialStatus.PRUNED, f"stopped at step {r.step} by successive halving (eval loss "
                                                      f"{_report_loss(r):.4f}, not in the best {keep} of {len(live)})")
        going = {r.name for r in live[:keep]}
        live_jobs = [job for job in live_jobs if job[0].name in going]


def _report_loss(report) -> float:
    x = report.eval_loss
    return x if x is not None and math.isfinite(x) else math.inf


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

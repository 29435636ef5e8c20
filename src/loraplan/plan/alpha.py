"""The alpha rule: how lora_alpha follows r, and when a set of configs breaks it.

PEFT multiplies B·A by alpha/r (with rsLoRA by alpha/sqrt(r), Kalajdzievski 2023). The seeds'
"Alpha/Rank Ratio Confusion": keep alpha fixed while r varies and the scale, and with it the
effective learning rate, changes with r, so ranks compared side by side differ in two things at
once. The policy loraplan recommends (`DEFAULT_POLICY`, `alpha_for`, `policy_reason`) and the check
(`alpha_traps`) live here only; `count` (a rank table), `recommend`, the sweep spec and `diagnose`
all call them, so changing the policy here changes it everywhere.

Choices where the three earlier copies of the check disagreed:
- rsLoRA exempts a series (the sweep and `diagnose` did this; `count` warned anyway). A fixed alpha
  under alpha/sqrt(r) is rsLoRA's own rank-stable recipe, not a trap. With rsLoRA and alpha = r the
  scale is sqrt(r), as the seeds' builder sets it; that is not flagged either (`recommend` says so
  in a note).
- The trap is a scale alpha/r that differs across ranks, not only one alpha repeated (`diagnose`
  saw this, the sweep did not): alpha = 16 at r = 8 next to alpha = 48 at r = 16 confounds the
  comparison as much as a fixed alpha.
- A series is a set of configs that differ only in r and alpha (the caller's group key, e.g.
  targets, layers, DoRA, LoRA+), as `diagnose` grouped them: trials that also differ in targets or
  DoRA are not a rank comparison, and a DoRA series is checked on its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from .lora_plan import LoraPlan

# alpha = r: scale 1 at every rank, the seeds' build_lora_config. A policy is "r", "2r", "0.5r"
# (alpha = factor·r) or a number (one alpha for every rank).
DEFAULT_POLICY = "r"
SOURCE = "the seeds' \"Alpha/Rank Ratio Confusion\""
FIX = "alpha = r (or 2r) at every rank, or rsLoRA"
_FACTOR = re.compile(r"(\d+(?:\.\d+)?)?r")


def parse_policy(value: str | float) -> str | float:
    """A policy as the sweep spec accepts it; ValueError (with the accepted forms) otherwise."""
    if isinstance(value, str):
        text = value.strip()
        if not _FACTOR.fullmatch(text) or float(text[:-1] or 1) <= 0:
            raise ValueError(f"alpha policy {value!r}: use 'r', '2r' (alpha = 2·r) or a number")
        return text
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"a fixed alpha must be a positive number, got {value!r}")
    return value


def alpha_for(policy: str | float, r: int) -> float | None:
    """lora_alpha at rank r under a policy; None for alpha = r (LoraPlan's default)."""
    policy = parse_policy(policy)
    if isinstance(policy, str):
        factor = policy[:-1]
        return None if factor in ("", "1") else float(factor) * r
    return float(policy)


def policy_reason(r: int, rslora: bool, policy: str | float = DEFAULT_POLICY) -> str:
    """Why `recommend` sets lora_alpha as it does at rank r."""
    alpha = alpha_for(policy, r)
    alpha = float(r) if alpha is None else alpha
    said = f"alpha = {policy} = {alpha:g}" if isinstance(policy, str) else f"alpha = {alpha:g} at every rank"
    if rslora:
        return f"{said} (alpha/sqrt(r) = {alpha / math.sqrt(r):.3g}), as the seed's build_lora_config sets it"
    if not isinstance(policy, str):
        return f"{said} (alpha/r = {alpha / r:.3g})"
    return (f"{said} (alpha/r = {alpha / r:g}): alpha follows r, so changing r does not silently change the "
            "effective learning rate (never a fixed alpha while r varies)")


@dataclass(frozen=True)
class AlphaTrap:
    """One series of configs whose scale alpha/r differs across its ranks."""

    group: Hashable  # the caller's key for "the same config but r and alpha"
    pairs: tuple[tuple[int, float], ...]  # (r, alpha), sorted
    where: str | None = None  # the series in words, e.g. "targets attention, DoRA"

    @property
    def ranks(self) -> list[int]:
        return sorted({r for r, _ in self.pairs})

    @property
    def fixed(self) -> bool:
        """One alpha for every rank (else: alpha not proportional to r)."""
        return len({a for _, a in self.pairs}) == 1

    def message(self) -> str:
        what = f"lora_alpha is fixed at {self.pairs[0][1]:g}" if self.fixed else "lora_alpha is not proportional to r"
        where = f" ({self.where})" if self.where else ""
        scales = ", ".join(f"{a / r:.3g} at r={r}" + ("" if self.fixed else f" (alpha {a:g})") for r, a in self.pairs)
        return (f"{what} while r varies{where}, without rsLoRA: alpha/r is {scales}, so each rank trains at a "
                f"different effective learning rate and the ranks are not compared fairly ({SOURCE})")


def alpha_traps(configs: Iterable[tuple[Hashable, int, float, bool]]) -> list[AlphaTrap]:
    """The series whose alpha/r differs across ranks, from (group, r, alpha, use_rslora) per config.

    Configs with rsLoRA are exempt; a series needs two ranks or more."""
    series: dict[Hashable, set[tuple[int, float]]] = {}
    for group, r, alpha, rslora in configs:
        if not rslora:
            series.setdefault(group, set()).add((int(r), float(alpha)))
    traps = []
    for group, pairs in series.items():
        if len({r for r, _ in pairs}) > 1 and len({round(a / r, 9) for r, a in pairs}) > 1:
            traps.append(AlphaTrap(group, tuple(sorted(pairs))))
    return traps


def plan_traps(plans: Iterable[LoraPlan]) -> list[AlphaTrap]:
    """`alpha_traps` over LoraPlans: a series shares targets, layers, DoRA and LoRA+ (the effective
    alpha counts: lora_alpha None is alpha = r). Series with the same (r, alpha) pairs, as a grid
    makes them, are reported once, naming each."""
    plans = list(plans)
    keys = {(p.targets, p.layers, p.use_dora, p.loraplus_lr_ratio) for p in plans}
    traps = alpha_traps(((p.targets, p.layers, p.use_dora, p.loraplus_lr_ratio), p.r, p.alpha, p.use_rslora)
                        for p in plans)
    if len(keys) < 2:
        return traps
    merged: dict[tuple, list[AlphaTrap]] = {}
    for trap in traps:
        merged.setdefault(trap.pairs, []).append(trap)
    return [AlphaTrap(tuple(t.group for t in same), pairs, "; ".join(_series_text(t.group) for t in same))
            for pairs, same in merged.items()]


def _series_text(group: tuple) -> str:
    targets, layers, dora, loraplus = group
    parts = [f"targets {targets}"] + ([f"layers {layers}"] if layers else [])
    parts += (["DoRA"] if dora else []) + ([f"LoRA+ {loraplus:g}"] if loraplus else [])
    return ", ".join(parts)

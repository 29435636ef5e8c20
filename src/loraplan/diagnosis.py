"""Read a finished (or running) training run and say what its curves show: overfitting,
underfitting, instability, the alpha trap — each with its evidence (steps, values) and the way to
move the rank.

RUN is a loraplan sweep folder (docs/sweep-dir.md), one trial folder of it, or a transformers
`trainer_state.json` (or a checkpoint or output folder holding one). A sweep or trial folder is read
by `sweeps.folder` (its policy for damaged and unfinished trials; lines it skips become notes), and
"clearly worse" in a sweep is the sweep's own noise rule (`sweeps.ranking.compare`), so `diagnose`
and the sweep's summary agree on the same folder. The signs come from the seeds:
- r too low: "Validation loss plateaus early"; in a sweep, a higher rank clearly better.
- r too high: "Training loss decreases but validation loss increases"; "Train loss converges to
  near 0 while eval loss increases"; "Evaluation performance worse than lower-rank variant".
- "Alpha/Rank Ratio Confusion": lora_alpha fixed while r varies changes the effective learning
  rate of every rank (unless rsLoRA): the rule shared with count and the sweep, plan/alpha.py.
Thresholds are constants below, each with its reason; noisy but healthy curves raise nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError
from .plan.alpha import FIX, AlphaTrap, alpha_traps
from .sweeps.folder import TrialResult, TrialStatus, read_sweep, read_trial
from .sweeps.ranking import certify, compare

# -- thresholds ---------------------------------------------------------------------------------
# Spikes: a step's loss against the median of the steps before it. Per-step losses of small
# batches scatter by ±10–30%, so a spike must be both 1.5× the recent level and 6 robust standard
# deviations (1.4826·MAD) above it.
SPIKE_WINDOW, SPIKE_RATIO, SPIKE_SIGMAS = 20, 1.5, 6.0
# Divergence: the smoothed train loss ends 30% above its minimum (and well outside the noise).
DIVERGE_RATIO = 1.3
# Overfitting: eval loss ends above its minimum by 2% (or 3 standard errors when the run logged
# them), for the last two evaluations, while the train loss kept falling by 2% or more.
OVERFIT_RISE, OVERFIT_SEMS, TRAIN_FALL = 0.02, 3.0, 0.02
# Near zero: cross-entropy 0.05 nats/token is p(next token) ≈ 0.95 on average — memorisation for
# any natural-language data (a completion-only loss on rigid formats can legitimately get there).
NEAR_ZERO = 0.05
# Early plateau: 95% of the improvement down to the final level (the second half's median)
# reached in the first quarter of the run, and the last quarter improving the loss by under 1%
# (plus twice the noise of that estimate).
PLATEAU_DONE, PLATEAU_BY, PLATEAU_GAIN = 0.95, 0.25, 0.01
# No progress: the train loss ends less than 1% below where it started (or within its noise).
PROGRESS_MIN = 0.01
TAIL = 0.1  # "the end of the run": the last 10% of the logged steps (result.json's train_loss too)


@dataclass
class Run:
    """One training run: its curves and what is known of its LoRA config."""

    name: str
    train: list[tuple[int, float]]  # (step, loss), in order
    eval: list[tuple[int, float, float | None]]  # (step, loss, standard error)
    r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    use_dora: bool = False
    targets: str | None = None
    loraplus_lr_ratio: float | None = None
    status: str | None = None  # a TrialStatus value, for a sweep trial
    message: str | None = None
    eval_loss: float | None = None  # the final one (result.json), else the last logged
    eval_loss_sem: float | None = None
    trainable_params: int | None = None
    result: TrialResult | None = field(default=None, repr=False)  # the sweep folder's record of it

    @classmethod
    def from_trial(cls, t: TrialResult) -> Run:
        evals = t.evals
        train = [(p.step, p.train_loss) for p in t.train]
        curve = [(p.step, math.nan if p.eval_loss is None else p.eval_loss, p.eval_loss_sem) for p in evals]
        last = next((p for p in reversed(evals) if p.eval_loss is not None and math.isfinite(p.eval_loss)), None)
        if t.eval_loss is not None:
            eval_loss, sem = t.eval_loss, t.eval_loss_sem
        else:
            eval_loss, sem = (last.eval_loss, last.eval_loss_sem) if last else (None, None)
        return cls(t.name, train, curve, r=t.r, lora_alpha=t.lora_alpha, use_rslora=t.use_rslora,
                   use_dora=t.use_dora, targets=t.targets, loraplus_lr_ratio=t.loraplus_lr_ratio,
                   status=t.status.value, message=t.message, eval_loss=eval_loss, eval_loss_sem=sem,
                   trainable_params=t.trainable_params, result=t)

    @property
    def scale(self) -> float | None:
        if self.r is None or self.lora_alpha is None:
            return None
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def group(self) -> tuple:
        """Trials that differ only in r (and alpha) compare as a rank series."""
        return (self.targets, self.use_dora, self.use_rslora, self.loraplus_lr_ratio)

    def summary(self) -> dict:
        finite_eval = [(s, v) for s, v, _ in self.eval if math.isfinite(v)]
        best = min(finite_eval, key=lambda x: x[1]) if finite_eval else None
        return {"name": self.name, "r": self.r, "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora,
                "targets": self.targets, "status": self.status, "steps": self.train[-1][0] if self.train else None,
                "train_first": self.train[0][1] if self.train else None,
                "train_last": _tail_median(self.train) if self.train else None,
                "eval_best": best[1] if best else None, "eval_best_step": best[0] if best else None,
                "eval_last": finite_eval[-1][1] if finite_eval else None, "eval_loss": self.eval_loss}


@dataclass
class Finding:
    kind: str  # overfitting | underfitting | instability | alpha_trap | note
    severity: str  # error | warning | info
    message: str
    evidence: dict = field(default_factory=dict)
    rank: str | None = None  # "lower" | "higher": which way to move r
    advice: str | None = None
    trial: str | None = None

    def to_json(self) -> dict:
        return dict(vars(self))


@dataclass
class Diagnosis:
    source: str
    kind: str  # sweep | trial | trainer_state
    runs: list[Run]
    findings: list[Finding]
    notes: list[str] = field(default_factory=list)  # what the reader skipped (cut or unreadable lines)

    @property
    def healthy(self) -> bool:
        return not any(f.severity in ("error", "warning") for f in self.findings)

    def to_json(self) -> dict:
        return {"source": self.source, "kind": self.kind, "healthy": self.healthy,
                "findings": [f.to_json() for f in self.findings], "runs": [r.summary() for r in self.runs],
                "notes": self.notes}


def diagnose(run: str | os.PathLike) -> Diagnosis:
    """`loraplan diagnose` as a function: findings for a sweep, a trial, or a trainer_state.json."""
    path = Path(run).expanduser()
    if not path.exists():
        raise UsageError(f"no such file or folder: {path}",
                         "give a loraplan sweep or trial folder, or a trainer_state.json")
    notes: list[str] = []
    if path.is_file():
        runs, kind = [read_trainer_state(path)], "trainer_state"
    elif (path / "sweep.json").is_file() or (path / "trials").is_dir():
        sweep = read_sweep(path)
        if not sweep.trials:
            raise UsageError(f"{path} has no trials", "run `loraplan sweep` into it first")
        runs, kind, notes = [Run.from_trial(t) for t in sweep.trials], "sweep", sweep.notes
    elif any((path / n).is_file() for n in ("metrics.jsonl", "result.json", "plan.json")):
        runs, kind = [_one_trial(path, notes)], "trial"
    elif (path / "trainer_state.json").is_file():
        runs, kind = [read_trainer_state(path / "trainer_state.json")], "trainer_state"
    else:
        checkpoints = sorted(path.glob("checkpoint-*/trainer_state.json"), key=_checkpoint_number)
        if not checkpoints:
            raise UsageError(f"{path} holds no run loraplan can read",
                             "expected sweep.json + trials/, a trial's metrics.jsonl, or a trainer_state.json")
        runs, kind = [read_trainer_state(checkpoints[-1])], "trainer_state"
    findings = []
    for r in runs:
        if r.status == "pruned" and r.result is not None and r.result.config is not None:
            continue  # a learning rate its config did not keep: the sweep's table says so
        findings.extend(run_findings(r, tagged=kind == "sweep"))
    if kind == "sweep":
        findings.extend(sweep_findings(runs))
    return Diagnosis(str(path), kind, runs, findings, notes)


# -- reading ------------------------------------------------------------------------------------


def _checkpoint_number(path: Path) -> int:
    match = re.search(r"checkpoint-(\d+)", str(path.parent.name))
    return int(match.group(1)) if match else -1


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({type(e).__name__})", f"is this a {what}?") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} does not hold a JSON object", f"is this a {what}?")
    return data


def read_trainer_state(path: Path) -> Run:
    """A transformers Trainer run: `log_history` entries with `loss` (train) or `eval_loss`."""
    state = _read_json(path, "trainer_state.json")
    history = state.get("log_history")
    if not isinstance(history, list):
        raise UsageError(f"{path} has no 'log_history' list", "give the trainer_state.json a Trainer saved")
    train, evals = [], []
    for i, entry in enumerate(history):
        if not isinstance(entry, dict) or "step" not in entry:
            continue
        step = _logged(entry, "step", int, path, i)
        if "loss" in entry:
            train.append((step, _logged(entry, "loss", float, path, i)))
        if "eval_loss" in entry:
            evals.append((step, _logged(entry, "eval_loss", float, path, i), None))
    if not train and not evals:
        raise UsageError(f"{path} logs no losses yet", "set logging_steps (and eval_strategy) and let it train")
    run = Run(path.parent.name if path.name == "trainer_state.json" else path.stem, train, evals)
    adapter = path.parent / "adapter_config.json"
    if adapter.is_file():
        config = _read_json(adapter, "adapter_config.json")
        run.r, run.lora_alpha = config.get("r"), config.get("lora_alpha")
        run.use_rslora, run.use_dora = bool(config.get("use_rslora")), bool(config.get("use_dora"))
    run.eval_loss = next((v for _, v, _ in reversed(evals) if math.isfinite(v)), None)
    return run


def _one_trial(folder: Path, notes: list[str]) -> Run:
    """One trial folder of a sweep, read as the sweep reads it."""
    trial = read_trial(folder, notes=notes)
    if trial.status is TrialStatus.DAMAGED:
        raise UsageError(f"{folder} is damaged: {trial.message.split('; ')[0]}",
                         "rerun the sweep to run it again, or diagnose the sweep folder (it notes damaged trials)")
    if not trial.metrics and not trial.status.finished:
        raise UsageError(f"{folder} has no metrics yet", "the trial has not logged a step; run the sweep")
    return Run.from_trial(trial)


def _logged(entry: dict, key: str, kind: type, path: Path, index: int):
    """A number of a log_history entry, as the Trainer writes it: an integer step; a loss that is a
    number (NaN and Infinity included, which Python's json reads as floats). Anything else is an
    error: a loss of "high" is not NaN, and reading it as NaN would report an instability."""
    value = entry[key]
    ok = isinstance(value, int) if kind is int else isinstance(value, int | float)
    if not ok or isinstance(value, bool):
        raise UsageError(f"{path}: log_history[{index}].{key} is {json.dumps(value)[:40]}, not "
                         f"{'an integer' if kind is int else 'a number'}",
                         "is this a trainer_state.json the Trainer wrote? fix or remove that entry")
    return kind(value)


# -- one curve ----------------------------------------------------------------------------------


def _tail(points: list, fraction: float = TAIL, minimum: int = 3) -> list:
    return points[-max(minimum, math.ceil(fraction * len(points))):]


def _tail_median(points: list[tuple[int, float]]) -> float:
    return statistics.median(v for _, v in _tail(points))


def _half_window(n: int) -> int:
    """Smoothing half-width: 5% of the run each side, between 2 and 50 points (a long run's
    curve stays responsive and cheap to smooth)."""
    return min(50, max(2, n // 20))


def rolling_median(values: list[float], half: int) -> list[float]:
    return [statistics.median(values[max(0, i - half):i + half + 1]) for i in range(len(values))]


def _robust_sigma(values: list[float]) -> float:
    med = statistics.median(values)
    return 1.4826 * statistics.median(abs(v - med) for v in values)


def run_findings(run: Run, tagged: bool = False) -> list[Finding]:
    """Every finding one run's curves support."""
    out: list[Finding] = []
    if run.status not in (None, "completed"):
        out.extend(_status_finding(run))
        if run.status not in ("diverged", "unfinished", "damaged"):  # their curves still say something
            return _tag(out, run, tagged)
    bad = non_finite(run)
    if bad:
        # the curve names the step; result.json's "diverged" says nothing more
        out = [f for f in out if f.evidence.get("check") != "status"] + [bad]
    train = _finite_prefix(run.train)
    evals = _finite_prefix(run.eval)
    for check in (spikes, divergence):
        finding = check(train)
        if finding:
            out.append(finding)
    overfit = [f for f in (overfitting(train, evals), near_zero(train, evals)) if f]
    out.extend(overfit)
    if not overfit and run.status != "unfinished":  # a plateau needs the whole run
        finding = plateau(train, evals)
        if finding:
            out.append(finding)
    return _tag(out, run, tagged)


def _tag(findings: list[Finding], run: Run, tagged: bool) -> list[Finding]:
    for f in findings:
        if tagged:
            f.trial = run.name
    return findings


def _finite_prefix(points: list) -> list:
    """The points before the first NaN/inf (what comes after a divergence says nothing more)."""
    out = []
    for p in points:
        if not math.isfinite(p[1]):
            break
        out.append(p)
    return out


def _status_finding(run: Run) -> list[Finding]:
    message = f": {run.message}" if run.message else ""
    if run.status == "diverged":
        return [Finding("instability", "error", f"the trial diverged{message}", {"check": "status"},
                        advice="lower the learning rate or the scale alpha/r, add warmup or gradient clipping")]
    if run.status == "oom":
        return [Finding("note", "info", f"ran out of memory{message}", {"status": "oom"},
                        advice="see `loraplan memory` for what fits; gradient checkpointing or a smaller batch")]
    if run.status in ("pending", "unfinished", "damaged"):  # the sweep folder's reader says why and what next
        return [Finding("note", "info", f"{run.status}: {run.message}", {"status": run.status})]
    return [Finding("note", "info", f"status {run.status}{message}", {"status": run.status})]


def non_finite(run: Run) -> Finding | None:
    for label, points in (("train", run.train), ("eval", run.eval)):
        for i, p in enumerate(points):
            if not math.isfinite(p[1]):
                before = next((q for q in reversed(points[:i]) if math.isfinite(q[1])), None)
                last = f" (last finite {before[1]:.4g} at step {before[0]})" if before else ""
                return Finding("instability", "error", f"{label} loss became {p[1]} at step {p[0]}{last}",
                               {"check": "non_finite", "curve": label, "step": p[0],
                                "last_finite": list(before) if before else None},
                               advice="lower the learning rate or the scale alpha/r; add warmup and gradient "
                                      "clipping; in fp16 use bf16 or a loss scaler")
    return None


def spikes(train: list[tuple[int, float]]) -> Finding | None:
    found = []
    values = [v for _, v in train]
    for i in range(5, len(values)):
        window = values[max(0, i - SPIKE_WINDOW):i]
        med = statistics.median(window)
        sigma = _robust_sigma(window)
        if med > 0 and values[i] > SPIKE_RATIO * med and values[i] - med > SPIKE_SIGMAS * max(sigma, 1e-12):
            found.append((train[i][0], values[i], med))
    if not found:
        return None
    worst = sorted(found, key=lambda x: x[1] / x[2], reverse=True)[:5]
    step, value, med = worst[0]
    return Finding("instability", "warning",
                   f"{len(found)} loss spike(s); the largest at step {step}: {value:.4g} against ~{med:.4g} "
                   "just before",
                   {"check": "spikes", "spikes": [{"step": s, "loss": v, "before": m} for s, v, m in worst],
                    "count": len(found)},
                   advice="lower the learning rate (or alpha/r), add warmup and gradient clipping (max_grad_norm=1)")


def divergence(train: list[tuple[int, float]]) -> Finding | None:
    if len(train) < 10:
        return None
    values = [v for _, v in train]
    smooth = rolling_median(values, _half_window(len(values)))
    low = min(range(len(smooth)), key=smooth.__getitem__)
    end = _tail_median(train)
    noise = _robust_sigma([v - s for v, s in zip(values, smooth, strict=True)])
    if low < 0.9 * len(values) and end > DIVERGE_RATIO * smooth[low] and end - smooth[low] > 6 * noise:
        return Finding("instability", "error",
                       f"train loss is diverging: down to {smooth[low]:.4g} at step {train[low][0]}, back up to "
                       f"{end:.4g} at the end",
                       {"check": "divergence", "min_step": train[low][0], "min": smooth[low], "end": end},
                       advice="lower the learning rate or the scale alpha/r; without rsLoRA a high r with a large "
                              "alpha amplifies updates")
    return None


def _train_near(train: list[tuple[int, float]], step: int) -> float | None:
    """The smoothed train loss around `step`."""
    if not train:
        return None
    i = min(range(len(train)), key=lambda k: abs(train[k][0] - step))
    half = _half_window(len(train))
    return statistics.median(v for _, v in train[max(0, i - half):i + half + 1])


def overfitting(train: list[tuple[int, float]], evals: list) -> Finding | None:
    if len(evals) < 3:
        return None
    best = min(range(len(evals)), key=lambda k: evals[k][1])
    after = evals[best + 1:]
    if len(after) < 2:
        return None
    step_min, low, sem_min = evals[best]
    step_end, end, sem_end = evals[-1]
    sems = [s for s in (sem_min, sem_end) if isinstance(s, int | float)]
    threshold = max(OVERFIT_RISE * low, OVERFIT_SEMS * math.sqrt(sum(s * s for s in sems)) if sems else 0.0)
    if not (end - low > threshold and evals[-2][1] - low > threshold / 2):
        return None
    at_min, at_end = _train_near(train, step_min), _tail_median(train) if len(train) >= 3 else None
    if at_min is not None and at_end is not None and at_end > at_min * (1 - TRAIN_FALL):
        return None  # train did not keep falling: not the overfitting signature (divergence is checked apart)
    train_text = f" while train loss fell {at_min:.4g} → {at_end:.4g}" if at_end is not None else ""
    return Finding("overfitting", "warning",
                   f"eval loss turned up: best {low:.4g} at step {step_min}, {end:.4g} at step {step_end} "
                   f"(+{end - low:.3g}, {100 * (end - low) / low:.1f}%){train_text}",
                   {"check": "eval_rising", "best_step": step_min, "best": low, "last_step": step_end, "last": end,
                    "threshold": threshold, "train_at_best": at_min, "train_end": at_end},
                   rank="lower",
                   advice=f"lower r (or add data, dropout, fewer steps); the best checkpoint is near step {step_min}")


def near_zero(train: list[tuple[int, float]], evals: list) -> Finding | None:
    if len(train) < 3:
        return None
    end = _tail_median(train)
    if end >= NEAR_ZERO:
        return None
    last_eval = evals[-1][1] if evals else None
    tail = f" while eval loss is {last_eval:.4g}" if last_eval is not None else " (no eval loss logged to confirm)"
    return Finding("overfitting", "warning",
                   f"train loss is near zero ({end:.3g} over the last {TAIL:.0%} of steps){tail}: the adapter is "
                   "memorising the training set",
                   {"check": "near_zero", "train_end": end, "eval_last": last_eval, "threshold": NEAR_ZERO},
                   rank="lower", advice="lower r or train for fewer steps/epochs; check generations for verbatim "
                                        "copies of training examples")


def plateau(train: list[tuple[int, float]], evals: list) -> Finding | None:
    """Most of the improvement done early and none since: the seeds' first sign of r too low.

    The timing comes from the (smoothed) train curve, which is logged densely; the eval curve, when
    there is one, must have stopped improving too (evaluations are often too sparse to show the
    early drop at all). The plateau level is the median of the second half, so noise around a flat
    end does not move it."""
    if len(train) >= 20:
        raw = [v for _, v in train]
        smooth = rolling_median(raw, _half_window(len(train)))
        points, label = [(s, v) for (s, _), v in zip(train, smooth, strict=True)], "train"
        start = max(smooth[0], statistics.median(raw[:3]))  # the window flattens a steep first drop
        gain, noise = _quarter_gain(train)
    elif len(evals) >= 5:
        points, label = [(s, v) for s, v, _ in evals], "eval"
        start = points[0][1]
        gain, noise = _quarter_gain(points)
    else:
        return None
    first_step, last_step = points[0][0], points[-1][0]
    second_half = [v for s, v in points if s >= first_step + 0.5 * (last_step - first_step)]
    level = statistics.median(second_half)
    spread = 2 * _robust_sigma(second_half)
    if start - level <= max(PROGRESS_MIN * start, spread):
        if label != "train":  # sparse evals may simply start after the drop
            return None
        change = (level - start) / start
        evidence = {"check": "no_progress", "curve": label, "start": start, "level": level, "change": change,
                    "last_step": last_step}
        if evals:
            evidence["eval_last"] = evals[-1][1]
        return Finding("underfitting", "warning",
                       f"train loss barely moved: {start:.4g} → {level:.4g} ({change:+.1%}) over {last_step} steps",
                       evidence, rank="higher",
                       advice="the adapter does not reach what the data asks: more capacity (a higher r, or more "
                              "targets — the MLP for new knowledge) or a higher learning rate; a sweep shows which")
    tolerance = max((1 - PLATEAU_DONE) * (start - level), spread)
    done = next(s for s, v in points if v <= level + tolerance)
    fraction = (done - first_step) / (last_step - first_step)
    eval_gain, eval_noise = _quarter_gain([(s, v) for s, v, _ in evals]) if label == "train" else (0.0, 0.0)
    if (fraction <= PLATEAU_BY and gain < PLATEAU_GAIN + 2 * noise
            and eval_gain < PLATEAU_GAIN + 2 * eval_noise):
        return Finding("underfitting", "warning",
                       f"{label} loss plateaued early: from {start:.4g} to its final level {level:.4g} by step {done} "
                       f"of {last_step}, then flat (last quarter {gain:+.1%}"
                       + (f", eval {eval_gain:+.1%})" if evals else ")"),
                       {"check": "plateau", "curve": label, "plateau_step": done, "last_step": last_step,
                        "start": start, "level": level, "last_quarter_gain": gain, "eval_last_quarter_gain": eval_gain},
                       rank="higher",
                       advice="if this loss is still above what the task needs, r (or the target set) may be too "
                              "small: compare a higher rank in a sweep; if that plateaus too, the limit is data or "
                              "learning rate, not rank")
    return None


def _quarter_gain(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(relative improvement from the third quarter of the steps to the last, its standard error),
    from the medians of the raw values (a median's standard error is 1.2533·σ/√n)."""
    if len(points) < 4:
        return 0.0, 0.0
    first, last = points[0][0], points[-1][0]
    third = [v for s, v in points if first + 0.5 * (last - first) <= s < first + 0.75 * (last - first)]
    fourth = [v for s, v in points if s >= first + 0.75 * (last - first)]
    if not third or not fourth:
        return 0.0, 0.0
    before = statistics.median(third)
    if before <= 0:
        return 0.0, 0.0
    sigma = _robust_sigma(third + fourth) if len(third) + len(fourth) > 2 else 0.0
    error = 1.2533 * sigma * math.sqrt(1 / len(third) + 1 / len(fourth)) / before
    return (before - statistics.median(fourth)) / before, error


# -- a sweep ------------------------------------------------------------------------------------


def sweep_findings(runs: list[Run]) -> list[Finding]:
    out = alpha_trap(runs)
    trapped = {tuple(f.evidence["group"]) for f in out}
    out.extend(rank_series(runs, trapped))
    return out


def _group_text(group: tuple) -> str:
    targets, dora, rslora, loraplus = group
    parts = [f"targets {targets}" if targets else "these targets"]
    if dora:
        parts.append("DoRA")
    if rslora:
        parts.append("rsLoRA")
    if loraplus:
        parts.append(f"LoRA+ {loraplus:g}")
    return ", ".join(parts)


def _groups(runs: list[Run]) -> dict[tuple, list[Run]]:
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.r is not None:
            groups.setdefault(r.group, []).append(r)
    return groups


def alpha_trap(runs: list[Run]) -> list[Finding]:
    """The alpha rule (plan/alpha.py) over the sweep's rank series."""
    traps = alpha_traps((m.group, m.r, m.lora_alpha, m.use_rslora)
                        for m in runs if m.r is not None and m.lora_alpha is not None)
    return [Finding("alpha_trap", "warning", AlphaTrap(t.group, t.pairs, _group_text(t.group)).message(),
                    {"group": list(t.group), "ranks": t.ranks, "pairs": [list(p) for p in t.pairs]},
                    advice=f"set {FIX} and rerun the sweep") for t in traps]


def one_learning_rate(runs: list[Run]) -> str | None:
    """The rate, when these trials were all trained at one learning rate rather than each at its own
    best (a per-config sweep records the config each rate belongs to): "lr 0.0002", or "an unrecorded
    one" for results that do not say."""
    if any(m.result is not None and m.result.config is not None for m in runs):
        return None
    rates = {m.result.learning_rate for m in runs if m.result is not None}
    return f"lr {rates.pop():g}" if len(rates) == 1 and None not in rates else "an unrecorded one"


def rank_series(runs: list[Run], trapped: set) -> list[Finding]:
    """Within trials that differ only in r: lower ranks clearly worse than the best → underfit;
    higher ranks clearly worse than the best → overfitting territory. "Clearly worse" is the sweep's
    noise rule (`ranking.compare`), the one its summary uses."""
    out = []
    for group, members in _groups(runs).items():
        done = [m for m in members if m.result is not None and m.result.comparable]
        if len({m.r for m in done}) < 2:
            continue
        best = min(done, key=lambda m: (m.result.eval_loss, m.r))
        caveat = " (confounded: alpha/r differs across these ranks)" if group in trapped else ""
        evidence = {"group": list(group), "best": best.name, "best_r": best.r, "best_eval_loss": best.result.eval_loss}
        noise = {m.name: compare(m.result, best.result) for m in done}
        # a lower rank that the best's ΔW, cut to it by SVD, matches holds the change: it learns slower
        vouched = certify([m.result for m in done], best.result)
        worse = [m for m in done if noise[m.name].worse and m.name not in vouched]
        floor = min([best.r] + [m.r for m in done if m.name in vouched])
        held = f" (r={floor} holds it: {vouched[next(m.name for m in done if m.r == floor)]})" if floor < best.r else ""
        sides = [
            ([m for m in worse if m.r < floor], "underfitting", "higher",
             f"r={best.r} reaches eval loss {best.eval_loss:.4g}{held}; lower ranks are clearly worse", "",
             f"use r ≥ {floor} for {_group_text(group)}"),
            ([m for m in worse if m.r > best.r], "overfitting", "lower",
             f"higher ranks than r={best.r} ({best.eval_loss:.4g}) are clearly worse",
             f": past r={best.r} is overfitting territory", f"keep r ≤ {best.r} for {_group_text(group)}, or add data"),
        ]
        one_rate = one_learning_rate(done)
        for side, kind, rank, said, tail, advice in sides:
            if not side:
                continue
            rows = ", ".join(f"r={m.r} {m.eval_loss:.4g} (+{noise[m.name].delta:.3g}, noise "
                             f"±{noise[m.name].noise:.2g})" for m in sorted(side, key=lambda m: m.r))
            worse_rows = {**evidence, "worse": [{"name": m.name, "r": m.r, "eval_loss": m.eval_loss} for m in side]}
            if kind == "underfitting" and one_rate:
                # at one learning rate a higher rank (alpha = r: bigger steps; any alpha: more random
                # directions near the needed ones) wins a short run by learning faster, not by capacity
                out.append(Finding(
                    "note", "info", f"{_group_text(group)}: {said} at one learning rate ({one_rate}): {rows}; "
                    "a higher rank learns faster at the same rate, so this does not show that lower ranks lack "
                    f"capacity{caveat}", {**worse_rows, "learning_rate": one_rate},
                    advice="rerun the sweep with training.lr_policy: per-config (each rank at its own best "
                           "learning rate) before raising r"))
                continue
            out.append(Finding(kind, "warning", f"{_group_text(group)}: {said}: {rows}{tail}{caveat}", worse_rows,
                               rank=rank, advice=advice))
    return out

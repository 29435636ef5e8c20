"""Ranking the trials and choosing one: the cheapest config as good as the best.

The noise rule, used by the sweep's summary and by `diagnose` alike (`compare`): every trial is
evaluated on the same eval batches, so the difference between a trial and the best one is judged
batch by batch — the noise on that difference is twice the standard error of the token-weighted
per-batch differences (a paired comparison, ~95%). Without per-batch losses (a result.json written
by hand or by an older loraplan) it is twice the combined standard error of the two means; without
standard errors there is no noise estimate, and a trial is then neither "as good" nor "clearly
worse". A trial within the noise of the best is "as good"; among those, the one with the fewest
trainable parameters is recommended. This measures eval-set noise for one seed; the seed-to-seed
spread of training is not included.
"""

from __future__ import annotations

import math

from .folder import Comparison, Summary, Sweep, TrialResult, TrialStatus

NOISE_SIGMAS = 2.0
NOISE_METHOD = f"{NOISE_SIGMAS:g}σ of the paired per-batch eval-loss difference to the best (one seed)"


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def paired_noise(trial: TrialResult, best: TrialResult) -> float | None:
    """NOISE_SIGMAS × the standard error of the token-weighted per-batch loss differences (or of the
    difference of the two means when the per-batch losses are not there)."""
    a, b = trial.eval_batches, best.eval_batches
    if a and b and len(a.loss) == len(b.loss) > 1 and a.tokens == b.tokens:
        _, sem = weighted_mean_sem([x - y for x, y in zip(a.loss, b.loss, strict=True)], a.tokens)
        if _finite(sem):
            return NOISE_SIGMAS * sem
    if _finite(trial.eval_loss_sem) and _finite(best.eval_loss_sem):
        return NOISE_SIGMAS * math.sqrt(trial.eval_loss_sem ** 2 + best.eval_loss_sem ** 2)
    return None


def compare(trial: TrialResult, best: TrialResult) -> Comparison:
    """The noise rule: `trial` (a completed trial with a finite eval loss) against `best`."""
    if trial.name == best.name:
        return Comparison(0.0, 0.0, True)
    delta = trial.eval_loss - best.eval_loss
    noise = paired_noise(trial, best)
    return Comparison(delta, noise, noise is not None and delta <= noise)


def summarize(results: list[TrialResult], lr_policy: str | None = None) -> Summary:
    """The ranking, the best trial, the recommendation and its reason (summary.json), and whether the
    answer had settled. Under the per-config learning-rate policy each config's losing rates are
    pruned, so every completed trial is a config at its own best rate."""
    ranked = sorted((r for r in results if r.comparable), key=lambda r: r.eval_loss)
    failed = {r.name: r.status.value for r in results if r.status is not TrialStatus.COMPLETED}
    if not ranked:
        return Summary([], None, None, "no trial completed with a finite eval loss", failed=failed)
    best = ranked[0]
    table = {r.name: compare(r, best) for r in ranked}
    certified = certify(ranked, best)
    within = [r for r in ranked if table[r.name].within_noise or r.name in certified]
    pick = min(within, key=lambda r: (r.trainable_params or math.inf, r.eval_loss))
    noise = table[pick.name].noise if pick is not best else _typical_noise(table, best.name)
    if pick.name in certified and not table[pick.name].within_noise:
        reason = (f"{pick.name} has the fewest trainable parameters ({pick.trainable_params:,}) among configs as good "
                  f"as the best ({best.name}, {best.eval_loss:.4f}): {certified[pick.name]}. Its own run reached "
                  f"{pick.eval_loss:.4f} (+{table[pick.name].delta:.4f}) in {pick.steps} steps: it learns slower, "
                  "its rank holds the change")
    elif pick is best:
        cheaper = [r for r in ranked[1:] if (r.trainable_params or 0) < (best.trainable_params or 0)]
        if cheaper:
            c = cheaper[0]
            info = table[c.name]
            margin = f" > ±{info.noise:.4f}" if info.noise is not None else ""
            reason = (f"{best.name} has the lowest eval loss ({best.eval_loss:.4f}) and every cheaper trial is "
                      f"worse by more than the noise (closest: {c.name}, +{info.delta:.4f}{margin})")
        else:
            reason = f"{best.name} has the lowest eval loss ({best.eval_loss:.4f}) and is also the cheapest"
    else:
        reason = (f"{pick.name} has the fewest trainable parameters ({pick.trainable_params:,}) among trials "
                  f"within noise of the best ({best.name}, {best.eval_loss:.4f}): its eval loss is "
                  f"{pick.eval_loss:.4f}, +{table[pick.name].delta:.4f} ≤ ±{noise:.4f}")
    settled, note = settling([best] if pick is best else [pick, best], noise)
    return Summary([r.name for r in ranked], best.name, pick.name, reason, noise=noise, noise_method=NOISE_METHOD,
                   failed=failed, trials=table, lr_policy=lr_policy, settled=settled, settle_note=note,
                   certified=certified)


def _family(r: TrialResult) -> tuple:
    return (r.targets, r.use_dora, r.use_rslora, r.loraplus_lr_ratio, r.lora_dropout)


def certify(ranked: list[TrialResult], best: TrialResult) -> dict[str, str]:
    """Configs vouched for by a cut: a family lead's ΔW cut by SVD to a lower rank of its family
    (its `certificates`, on the same eval batches) within the noise of the best. What a rank can
    reach shows in the cut long before that rank's own run has caught up (benchmarks/truth)."""
    out: dict[str, str] = {}
    if not (best.eval_batches and len(best.eval_batches.loss) > 1):
        return out
    tokens = best.eval_batches.tokens
    for lead in ranked:
        for rank, losses in sorted((lead.certificates or {}).items(), key=lambda kv: int(kv[0])):
            if len(losses) != len(tokens) or not (lead.eval_batches and lead.eval_batches.tokens == tokens):
                continue
            mean, _ = weighted_mean_sem(losses, tokens)
            _, sem = weighted_mean_sem([x - y for x, y in zip(losses, best.eval_batches.loss, strict=True)], tokens)
            if not (_finite(mean) and _finite(sem)) or mean - best.eval_loss > NOISE_SIGMAS * sem:
                continue
            for r in ranked:
                if r.r == int(rank) and _family(r) == _family(lead) and r.name not in out:
                    out[r.name] = (f"{lead.name}'s ΔW cut to r={rank} by SVD reaches {mean:.4f} "
                                   f"({mean - best.eval_loss:+.4f}, noise ±{NOISE_SIGMAS * sem:.4f})")
    return out


def settling(trials: list[TrialResult], noise: float | None) -> tuple[bool | None, str | None]:
    """Whether these trials' eval curves had flattened: the drop over the last eval interval within
    the noise. When not, how many steps would make it so: the last two intervals' drop rates fitted
    by a geometric decay (none when the curve is not slowing down)."""
    notes, settled = [], True
    for trial in trials:
        points = [p for p in trial.evals if _finite(p.eval_loss)]
        if len(points) < 3:
            return None, f"{trial.name} has fewer than 3 eval points: cannot tell whether its eval loss had flattened"
        a, b, c = points[-3:]
        tol = noise if _finite(noise) and noise > 0 else NOISE_SIGMAS * (c.eval_loss_sem or 0.0)
        drop, before = b.eval_loss - c.eval_loss, a.eval_loss - b.eval_loss
        if drop <= tol:
            continue
        settled = False
        w1, w2 = b.step - a.step, c.step - b.step
        q = (drop / w2) / (before / w1) if before > 0 and w1 > 0 and w2 > 0 else math.inf
        more = math.ceil(math.log(tol / drop) / math.log(q)) * w2 if q < 0.95 and tol > 0 else math.inf
        if c.step + more <= 10 * c.step:
            hint = f"about {c.step + more} steps would flatten it"
        else:
            hint = f"it is not slowing down: more than {2 * c.step} steps are needed"
        notes.append(f"{trial.name}'s eval loss still fell {drop:.4f} over its last {w2} steps (noise ±{tol:.4f}); "
                     + hint)
    if settled:
        return True, "the eval curves of the best and the recommended trials had flattened (last drop within noise)"
    return False, ("; ".join(notes) + ". A higher rank or broader targets can still win by "
                   "learning faster: rerun with more --max-steps (or a larger --budget) before trusting the rank")


def summary_for(sweep: Sweep) -> tuple[Summary, str]:
    """The summary to show for a sweep read from disk, and where it comes from: summary.json when it
    agrees with the trials as they are now, else computed from them (with a note saying why), so a
    report never shows a recommendation its folder no longer supports."""
    computed = summarize(sweep.trials, lr_policy=sweep.spec.get("training", {}).get("lr_policy", "fixed"))
    saved = sweep.summary
    if saved is None:
        return computed, "computed from result.json"
    if ((saved.ranking, saved.best) == (computed.ranking, computed.best)
            and (saved.recommended in saved.ranking or (saved.recommended is None and not saved.ranking))):
        return saved, "summary.json"
    sweep.notes.append("summary.json does not match the trials' result.json (written before a trial changed): "
                       "the ranking below is computed from the results")
    return computed, "computed from result.json"


def _typical_noise(table: dict[str, Comparison], best: str) -> float | None:
    values = sorted(c.noise for name, c in table.items() if name != best and c.noise is not None)
    return values[len(values) // 2] if values else None


def weighted_mean_sem(values: list[float], weights: list[int]) -> tuple[float | None, float | None]:
    """Token-weighted mean of per-batch losses and its standard error (ratio estimator)."""
    if not values:
        return None, None
    total = sum(weights)
    mean = sum(v * w for v, w in zip(values, weights, strict=True)) / total
    n = len(values)
    if n < 2:
        return mean, None
    var = sum((w * (v - mean)) ** 2 for v, w in zip(values, weights, strict=True)) / total ** 2 * n / (n - 1)
    return mean, math.sqrt(var)

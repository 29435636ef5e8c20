"""Ranking the trials and choosing one: the cheapest config as good as the best.

Every trial is evaluated on the same eval batches, so the difference between a trial and the best
one can be judged batch by batch: the noise on that difference is twice the standard error of the
per-batch differences (a paired comparison, ~95%). A trial whose eval loss is within that noise of
the best is "as good"; among those, the one with the fewest trainable parameters is recommended.
This measures eval-set noise for one seed; the seed-to-seed spread of training is not included.
"""

from __future__ import annotations

import math

NOISE_SIGMAS = 2.0


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def paired_noise(trial: dict, best: dict) -> float | None:
    """NOISE_SIGMAS × the standard error of the token-weighted per-batch loss differences."""
    a = (trial.get("eval_batches") or {})
    b = (best.get("eval_batches") or {})
    la, lb, w = a.get("loss"), b.get("loss"), a.get("tokens")
    if la and lb and w and len(la) == len(lb) > 1 and w == b.get("tokens"):
        _, sem = weighted_mean_sem([x - y for x, y in zip(la, lb, strict=True)], w)
        return NOISE_SIGMAS * sem
    sa, sb = trial.get("eval_loss_sem"), best.get("eval_loss_sem")
    if _finite(sa) and _finite(sb):
        return NOISE_SIGMAS * math.sqrt(sa ** 2 + sb ** 2)
    return None


def summarize(results: list[dict]) -> dict:
    """The ranking, the best trial, the recommendation and its reason (summary.json)."""
    ranked = sorted((r for r in results if r.get("status") == "completed" and _finite(r.get("eval_loss"))),
                    key=lambda r: r["eval_loss"])
    failed = {r["name"]: r["status"] for r in results if r.get("status") != "completed"}
    if not ranked:
        return {"ranking": [], "best": None, "recommended": None, "noise": None, "failed": failed,
                "reason": "no trial completed with a finite eval loss", "trials": {}}
    best = ranked[0]
    table = {}
    for r in ranked:
        noise = paired_noise(r, best) if r is not best else 0.0
        delta = r["eval_loss"] - best["eval_loss"]
        table[r["name"]] = {"delta": delta, "noise": noise,
                            "within_noise": r is best or (noise is not None and delta <= noise)}
    within = [r for r in ranked if table[r["name"]]["within_noise"]]
    pick = min(within, key=lambda r: (r.get("trainable_params") or math.inf, r["eval_loss"]))
    noise = table[pick["name"]]["noise"] if pick is not best else _typical_noise(table, best["name"])
    if pick is best:
        cheaper = [r for r in ranked[1:] if (r.get("trainable_params") or 0) < (best.get("trainable_params") or 0)]
        if cheaper:
            c = cheaper[0]
            info = table[c["name"]]
            margin = f" > ±{info['noise']:.4f}" if info["noise"] is not None else ""
            reason = (f"{best['name']} has the lowest eval loss ({best['eval_loss']:.4f}) and every cheaper trial is "
                      f"worse by more than the noise (closest: {c['name']}, +{info['delta']:.4f}{margin})")
        else:
            reason = f"{best['name']} has the lowest eval loss ({best['eval_loss']:.4f}) and is also the cheapest"
    else:
        reason = (f"{pick['name']} has the fewest trainable parameters ({pick['trainable_params']:,}) among trials "
                  f"within noise of the best ({best['name']}, {best['eval_loss']:.4f}): its eval loss is "
                  f"{pick['eval_loss']:.4f}, +{table[pick['name']]['delta']:.4f} ≤ ±{noise:.4f}")
    return {
        "ranking": [r["name"] for r in ranked],
        "best": best["name"],
        "recommended": pick["name"],
        "noise": noise,
        "noise_method": f"{NOISE_SIGMAS:g}σ of the paired per-batch eval-loss difference to the best (one seed)",
        "reason": reason,
        "failed": failed,
        "trials": table,
    }


def _typical_noise(table: dict, best: str) -> float | None:
    values = sorted(v["noise"] for k, v in table.items() if k != best and v["noise"] is not None)
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

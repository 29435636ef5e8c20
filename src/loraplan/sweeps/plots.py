"""The sweep's plots as PNG files: one function per plot, the sweep folder's records in (`TrialResult`,
metrics points; probe.json / analysis.json as read), a path out.

Matplotlib's object API on a bare `Figure` (Agg, no pyplot state, no display). Every plot stays
readable in grayscale and on a laptop screen: series differ by marker and line style as well as
colour, axes carry units, and trials that could not be plotted are named in a caption.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from ..files import atomic_path
from .folder import EvalPoint, MetricPoint, TrainPoint, TrialResult, TrialStatus

# Okabe & Ito (2008) colour-blind-safe palette; lightness differs enough to survive grayscale,
# and markers/line styles carry the distinction anyway.
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#000000", "#E69F00", "#56B4E9", "#F0E442")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", ":", "-.")
DPI = 150
WIDTH_IN = 9.0  # 1350 px at DPI: sharp when shown at a laptop's ~1000 px column
LOSS_LABEL = "eval loss (nats/token)"
GIB = 2**30


def finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def completed(results: Iterable[TrialResult]) -> list[TrialResult]:
    """Trials that finished and have an eval loss to plot."""
    return [r for r in results if r.comparable]


def not_plotted(results: Iterable[TrialResult]) -> list[TrialResult]:
    return [r for r in results if not r.comparable]


def series_key(result: TrialResult) -> str:
    """One line per module set; DoRA and LoRA+ are different methods, so they get their own line.
    rsLoRA only changes the scale alpha/sqrt(r) and is shown by the marker fill instead."""
    key = str(result.targets or "?")
    if result.use_dora:
        key += " · DoRA"
    if finite(result.loraplus_lr_ratio):
        key += f" · LoRA+ ×{result.loraplus_lr_ratio:g}"
    return key


def _loss(point: MetricPoint) -> float | None:
    return point.train_loss if isinstance(point, TrainPoint) else point.eval_loss


def series_styles(results: Iterable[TrialResult]) -> dict[str, dict]:
    """A colour, marker and line style per series, in first-seen order, shared by every plot so a
    module set looks the same in all of them."""
    styles: dict[str, dict] = {}
    for r in results:
        key = series_key(r)
        if key not in styles:
            i = len(styles)
            styles[key] = {"color": COLORS[i % len(COLORS)], "marker": MARKERS[i % len(MARKERS)],
                           "linestyle": "--" if "DoRA" in key else LINESTYLES[i % len(LINESTYLES)]}
    return styles


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, loss) that no other point dominates (no worse on both, better on
    one); of identical points the first is kept. Ordered by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def failed_caption(results: Iterable[TrialResult], what: str = "not plotted") -> str | None:
    names = [f"{r.name} ({r.status.value})" for r in results]
    if not names:
        return None
    return textwrap.fill(f"{what}: " + ", ".join(names), width=120)


def eval_loss_vs_rank(results: list[TrialResult], path) -> Path:
    """Eval loss against r on a log2 axis, one line per module set, ±1 standard error bars: the
    seeds' "plot eval loss vs r" (the optimum is the lowest point; past it, overfitting)."""
    return save(eval_loss_vs_rank_figure(results), path)


def eval_loss_vs_rank_figure(results: list[TrialResult]) -> Figure:
    fig, ax = _figure(4.8)
    done = completed(results)
    styles = series_styles(done)
    ranks = sorted({int(r.r) for r in done if finite(r.r)})
    fills = set()
    handles = []
    for i, (key, style) in enumerate(styles.items()):
        points = sorted((r for r in done if series_key(r) == key), key=lambda r: (r.r, r.use_rslora))
        # Series that share a rank are nudged apart (±4% of an octave) so their error bars stay visible.
        dodge = 2 ** (0.04 * (i - (len(styles) - 1) / 2))
        xs = [p.r * dodge for p in points]
        ys = [p.eval_loss for p in points]
        errs = [p.eval_loss_sem if finite(p.eval_loss_sem) else 0.0 for p in points]
        ax.errorbar(xs, ys, yerr=errs, color=style["color"], linestyle=style["linestyle"], linewidth=1.6,
                    capsize=3, marker="none")
        for x, p in zip(xs, points, strict=True):
            rs = p.use_rslora
            fills.add(rs)
            ax.plot([x], [p.eval_loss], linestyle="none", marker=style["marker"], markersize=8,
                    color=style["color"], markeredgewidth=1.6, markerfacecolor=style["color"] if rs else "white")
        handles.append(Line2D([], [], color=style["color"], linestyle=style["linestyle"], marker=style["marker"],
                              markersize=7, linewidth=1.6, label=key))
    if done:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(ranks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        if len(ranks) == 1:
            ax.set_xlim(ranks[0] / 1.6, ranks[0] * 1.6)
        for rs in sorted(fills):
            handles.append(Line2D([], [], linestyle="none", marker="o", color="0.3", markersize=7,
                                  markerfacecolor="0.3" if rs else "white",
                                  label="filled: rsLoRA, scale α/√r" if rs else "hollow: scale α/r"))
        ax.legend(handles=handles, fontsize=8.5, loc="best", framealpha=0.9)
    _finish_loss_axes(fig, ax, results, done, "LoRA rank r (log₂ scale)",
                      "Eval loss vs rank (error bars: ±1 standard error)")
    return fig


def eval_loss_vs_params(results: list[TrialResult], path, recommended: str | None = None,
                        noise: float | None = None) -> Path:
    """Eval loss against trainable parameters (log axis) with the Pareto front; the band above the
    best loss is the noise within which the cheapest trial is recommended."""
    return save(eval_loss_vs_params_figure(results, recommended, noise), path)


def eval_loss_vs_params_figure(results: list[TrialResult], recommended: str | None = None,
                               noise: float | None = None) -> Figure:
    fig, ax = _figure(4.8)
    done = [r for r in completed(results) if finite(r.trainable_params) and r.trainable_params > 0]
    styles = series_styles(done)
    for key, style in styles.items():
        points = [r for r in done if series_key(r) == key]
        ax.errorbar([p.trainable_params for p in points], [p.eval_loss for p in points],
                    yerr=[p.eval_loss_sem if finite(p.eval_loss_sem) else 0.0 for p in points],
                    linestyle="none", marker=style["marker"], markersize=8, color=style["color"],
                    markerfacecolor=style["color"], capsize=3, label=key)
    if done:
        points = [(float(r.trainable_params), float(r.eval_loss)) for r in done]
        front = [points[i] for i in pareto_front(points)]
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="0.15", linestyle=":",
                linewidth=1.4, zorder=1, label="Pareto front (no trial is smaller and better)")
        best = min(p[1] for p in points)
        if finite(noise) and noise > 0:
            ax.axhspan(best, best + noise, facecolor="0.85", edgecolor="0.5", hatch="..", linewidth=0,
                       zorder=0, label=f"within noise of the best (+{noise:.3g})")
        front_names = {done[i].name for i in pareto_front(points)}
        labelled = [r for r in done if len(done) <= 14 or r.name in front_names]
        _label_points(ax, [(r.trainable_params, r.eval_loss, r.name) for r in labelled])
        rec = next((r for r in done if r.name == recommended), None)
        if rec:
            ax.plot([rec.trainable_params], [rec.eval_loss], linestyle="none", marker="o", markersize=17,
                    markerfacecolor="none", markeredgecolor="black", markeredgewidth=1.8,
                    label=f"recommended: {rec.name}")
        ax.set_xscale("log")
        xs = [p[0] for p in points]
        # room on both sides for the names written next to the end points
        ax.set_xlim(min(xs) / 1.6, max(xs) * 1.9)
        ax.legend(fontsize=8.5, loc="best", framealpha=0.9)
    _finish_loss_axes(fig, ax, results, done, "trainable parameters (count, log scale)",
                      "Eval loss vs trainable parameters")
    return fig


def loss_curves(curves: Mapping[str, list[MetricPoint]], path, statuses: Mapping[str, str] | None = None) -> Path:
    """Train loss per step and eval loss at intervals, one small panel per trial on a shared
    loss axis; non-finite losses are marked where they start."""
    return save(loss_curves_figure(curves, statuses), path)


def loss_curves_figure(curves: Mapping[str, list[MetricPoint]], statuses: Mapping[str, str] | None = None) -> Figure:
    statuses = statuses or {}
    names = list(curves)
    ncols = max(1, min(3, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig = Figure(figsize=(WIDTH_IN, 0.6 + 2.5 * nrows), layout="constrained")
    # Shared axes: a pruned or diverged trial visibly stops early, and losses compare across panels.
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    values = [_loss(p) for points in curves.values() for p in points if finite(_loss(p))]
    if values:
        # The top is each trial's first logged loss, not the max: a run that diverges climbs past its
        # start, and must not flatten every other panel.
        starts = [next((_loss(p) for p in points if isinstance(p, kind) and finite(_loss(p))), None)
                  for points in curves.values() for kind in (TrainPoint, EvalPoint)]
        lo, hi = min(values), max(s for s in starts if s is not None)
        pad = 0.06 * (hi - lo or abs(hi) or 1.0)
        axes[0][0].set_ylim(lo - pad, hi + pad)
    for i, name in enumerate(names):
        ax = axes[i // ncols][i % ncols]
        rows = curves[name]
        train = [(p.step, p.train_loss) for p in rows if isinstance(p, TrainPoint)]
        evals = [p for p in rows if isinstance(p, EvalPoint) and finite(p.eval_loss)]
        good = [(s, v) for s, v in train if finite(v)]
        if good:
            ax.plot([s for s, _ in good], [v for _, v in good], color=COLORS[0], linewidth=1.0, label="train loss")
        if evals:
            ax.errorbar([p.step for p in evals], [p.eval_loss for p in evals],
                        yerr=[p.eval_loss_sem if finite(p.eval_loss_sem) else 0.0 for p in evals],
                        color=COLORS[1], linestyle="--", marker="s", markersize=4.5, markerfacecolor="white",
                        capsize=2, linewidth=1.2, label="eval loss ±1 s.e.")
        bad = next((s for s, v in train if not finite(v)), None)
        if bad is not None:
            ax.axvline(bad, color="black", linestyle=":", linewidth=1.2)
            ax.text(bad, 0.5, f" non-finite loss\n at step {bad:g}", transform=ax.get_xaxis_transform(),
                    fontsize=7.5, va="center", ha="left")
        if not good and not evals:
            _empty(ax, "no metrics recorded" if not rows else "no finite loss")
        if i + ncols >= len(names):  # the lowest panel of its column carries the step labels
            ax.xaxis.set_tick_params(labelbottom=True)
        status = statuses.get(name, "completed")
        ax.set_title(name if status == "completed" else f"{name} [{status}]", fontsize=9.5,
                     fontweight="normal" if status == "completed" else "bold")
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for j in range(len(names), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    fig.supxlabel("optimizer step", fontsize=9.5)
    fig.supylabel("loss (nats/token)", fontsize=9.5)
    fig.legend(handles=[Line2D([], [], color=COLORS[0], linewidth=1.0, label="train loss (per step)"),
                        Line2D([], [], color=COLORS[1], linestyle="--", marker="s", markerfacecolor="white",
                               label="eval loss ±1 s.e."),
                        Line2D([], [], color="black", linestyle=":", label="first non-finite train loss")],
               loc="outside upper center", ncols=3, fontsize=8.5, frameon=False)
    return fig


def cost_per_trial(results: list[TrialResult], path) -> Path:
    """Peak memory (GiB) and wall time (s) per trial, side by side; trials that did not complete
    are hatched and carry their status."""
    return save(cost_per_trial_figure(results), path)


def cost_per_trial_figure(results: list[TrialResult]) -> Figure:
    n = max(1, len(results))
    fig = Figure(figsize=(WIDTH_IN, max(2.6, 1.4 + 0.38 * n)), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    names = [r.name for r in results]
    ys = list(range(len(results)))
    panels = ((axes[0], "peak_memory_bytes", GIB, "peak memory (GiB)", "{:.2f}"),
              (axes[1], "wall_s", 1.0, "wall time (s)", "{:.1f}"))
    for ax, key, unit, label, fmt in panels:
        values = [getattr(r, key) / unit if finite(getattr(r, key)) else None for r in results]
        if results and all(v is None for v in values):  # e.g. peak GPU memory on a CPU run
            _empty(ax, "not measured for any trial")
            ax.set_xticks([])
            ax.set_xlabel(label)
            continue
        top = max([v for v in values if v is not None] or [1.0])
        for y, r, v in zip(ys, results, values, strict=True):
            ok = r.status is TrialStatus.COMPLETED
            if v is not None:
                ax.barh(y, v, height=0.65, color=COLORS[0] if ok else "white", edgecolor=COLORS[0] if ok else "0.2",
                        hatch=None if ok else "///", linewidth=1.0)
            text = fmt.format(v) if v is not None else "not measured"
            if not ok:
                text += f"  [{r.status.value}]"
            ax.text((v or 0) + top * 0.015, y, text, va="center", fontsize=7.5)
        ax.set_xlim(0, top * 1.45)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, names, fontsize=8.5)
    axes[0].set_ylim(n - 0.5, -0.5)  # first trial on top; rows without a bar keep their place
    axes[0].set_title("Peak memory per trial", fontsize=10)
    axes[1].set_title("Wall time per trial", fontsize=10)
    if any(r.status is not TrialStatus.COMPLETED for r in results):
        handles = [Patch(facecolor="white", edgecolor="0.2", hatch="///", label="did not complete")]
        if any(r.status is TrialStatus.COMPLETED for r in results):
            handles.insert(0, Patch(facecolor=COLORS[0], label="completed"))
        fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8.5, frameon=False)
    if not results:
        _empty(axes[0], "no trials")
    return fig


def probe_importance(probe: Mapping, path) -> Path:
    """The probe's importance per role and layer (heatmap) and per role (bars), from probe.json."""
    return save(probe_importance_figure(probe), path)


def probe_importance_figure(probe: Mapping) -> Figure:
    import numpy as np

    modules = [m for m in probe.get("modules", []) if finite(m.get("importance"))]
    roles = list(dict.fromkeys(str(m.get("role") or "?") for m in modules))
    layers = sorted({int(m["layer"]) for m in modules if finite(m.get("layer"))})
    fig = Figure(figsize=(WIDTH_IN, 1.6 + 0.42 * max(len(roles), 3)), layout="constrained")
    heat_ax, bar_ax = fig.subplots(1, 2, width_ratios=[3, 1.2])
    grid = np.full((len(roles), len(layers)), np.nan)
    for m in modules:
        if finite(m.get("layer")):
            i, j = roles.index(str(m.get("role") or "?")), layers.index(int(m["layer"]))
            grid[i, j] = (0 if np.isnan(grid[i, j]) else grid[i, j]) + m["importance"]
    total = sum(m["importance"] for m in modules) or 1.0
    grid = 100 * grid / total  # a share in %, the unit of the bar chart too
    if layers:
        # viridis: lightness rises monotonically, so the order survives grayscale printing.
        image = heat_ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=heat_ax, label="share of total importance (%)", shrink=0.9)
        heat_ax.set_yticks(range(len(roles)), roles, fontsize=8.5)
        step = max(1, math.ceil(len(layers) / 16))
        heat_ax.set_xticks(range(0, len(layers), step), [str(x) for x in layers[::step]], fontsize=8)
        heat_ax.set_xlabel("layer index")
        heat_ax.set_ylabel("role")
    else:
        _empty(heat_ax, "no per-layer modules")
    heat_ax.set_title("Importance per role and layer", fontsize=10)
    totals = {role: sum(m["importance"] for m in modules if str(m.get("role") or "?") == role) for role in roles}
    bar_ax.barh(range(len(roles)), [100 * totals[r] / total for r in roles], color=COLORS[0], height=0.6)
    bar_ax.set_yticks(range(len(roles)), roles, fontsize=8.5)
    bar_ax.invert_yaxis()
    bar_ax.set_xlabel("share of total importance (%)")
    bar_ax.set_title("Per role", fontsize=10)
    bar_ax.grid(axis="x", alpha=0.3)
    return fig


def adapter_spectra(spectra: Mapping[str, list[dict]], path) -> Path:
    """Singular values of each trained ΔW, normalised by the largest and averaged per role, one
    panel per trial: a fast drop means the adapter used few of its r directions. `spectra` maps a
    trial to its weights as `loraplan analyze --json` lists them (role, singular_values)."""
    return save(adapter_spectra_figure(spectra), path)


def adapter_spectra_figure(spectra: Mapping[str, list[dict]]) -> Figure:
    trials = {name: weights for name, weights in spectra.items() if mean_spectra(weights or [])}
    names = list(trials)
    ncols = max(1, min(3, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig = Figure(figsize=(WIDTH_IN, 0.7 + 2.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    role_style: dict[str, dict] = {}
    for i, name in enumerate(names):
        ax = axes[i // ncols][i % ncols]
        curves = mean_spectra(trials[name])
        for role, curve in curves.items():
            if role not in role_style:
                k = len(role_style)
                role_style[role] = {"color": COLORS[k % len(COLORS)], "marker": MARKERS[k % len(MARKERS)],
                                    "linestyle": LINESTYLES[k % len(LINESTYLES)]}
            ax.plot(range(1, len(curve) + 1), curve, markersize=4, linewidth=1.2, label=role, **role_style[role])
        ax.set_yscale("log")
        # plain numbers (0.5, not 5×10⁻¹); minor ticks labelled too when the spectra span under a decade
        short = min(min(c) for c in curves.values()) > 0.1
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _, short=short: f"{y:g}" if short else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name, fontsize=9.5)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for j in range(len(names), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    if not names:
        _empty(axes[0][0], "no singular values to plot")
    fig.supxlabel("singular value index i", fontsize=9.5)
    fig.supylabel("σᵢ / σ₁ (log scale, mean over modules)", fontsize=9.5)
    if role_style:
        fig.legend(handles=[Line2D([], [], label=role, **style) for role, style in role_style.items()],
                   loc="outside upper center", ncols=min(8, len(role_style)), fontsize=8.5, frameon=False)
    return fig


def mean_spectra(modules: Iterable[Mapping]) -> dict[str, list[float]]:
    """Per role, the mean over modules of σᵢ/σ₁ (spectra cut to the shortest one of the role)."""
    by_role: dict[str, list[list[float]]] = {}
    for m in modules:
        values = [float(v) for v in m.get("singular_values") or [] if finite(v)]
        if values and values[0] > 0:
            by_role.setdefault(str(m.get("role") or "?"), []).append([v / values[0] for v in values])
    out = {}
    for role, spectra in by_role.items():
        n = min(len(s) for s in spectra)
        out[role] = [max(sum(s[i] for s in spectra) / len(spectra), 1e-12) for i in range(n)]
    return out


def save(fig: Figure, path) -> Path:
    """Write the PNG atomically (a half-written image never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        # No Software tag: the PNG holds nothing but pixels.
        fig.savefig(tmp, dpi=DPI, format="png", metadata={"Software": None}, facecolor="white",
                    bbox_inches="tight", pad_inches=0.12)
    return path


def _label_points(ax, points: list[tuple[float, float, str]]) -> None:
    """Name each point. Points close together (in x order) form a group: the last one's label goes
    to its right, the others' to their left, stacked, so neighbours do not print over each other."""
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    span = (y_hi - y_lo) or 1.0
    groups: list[list[tuple[float, float, str]]] = []
    for p in sorted(points):
        last = groups[-1][-1] if groups else None
        if last and abs(math.log10(p[0] / last[0])) < 0.15 and abs(p[1] - last[1]) < 0.12 * span:
            groups[-1].append(p)
        else:
            groups.append([p])
    for group in groups:
        for k, (x, y, name) in enumerate(group):
            right = k == len(group) - 1
            ax.annotate(name, (x, y), textcoords="offset points", fontsize=7.5, color="0.15",
                        bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
                        xytext=(11, 7) if right else (-11, 7 + 11 * (len(group) - 2 - k)),
                        ha="left" if right else "right")


def _figure(height: float):
    fig = Figure(figsize=(WIDTH_IN, height), layout="constrained")
    ax = fig.subplots()
    ax.grid(alpha=0.3, which="both")
    return fig, ax


def _finish_loss_axes(fig: Figure, ax, results: list[TrialResult], done: list[TrialResult], xlabel: str,
                      title: str) -> None:
    """Labels, title and the caption naming the trials left out, for a plot of eval loss (or a note
    when no trial has one)."""
    if not done:
        _empty(ax, "no completed trial with an eval loss", frame=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title(title)
    _caption(fig, failed_caption(not_plotted(results)))


def _empty(ax, text: str, frame: bool = False) -> None:
    """A message where the data would be; `frame` also drops the axes' meaningless 0–1 ticks."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10, color="0.35")
    if frame:
        ax.set_xticks([])
        ax.set_yticks([])


def _caption(fig: Figure, text: str | None) -> None:
    if text:
        fig.text(0.01, 0.0, text, fontsize=8, color="0.25", va="top", ha="left")

"""plots.py: each plot writes a real PNG, draws the data it is given (checked on the figure's
artists), stays readable without colour, carries units, and survives empty or failed input."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from matplotlib.image import imread

from loraplan.sweeps import plots
from loraplan.sweeps.folder import TrialResult, metric_point


def result(name, targets, r, loss, params, status="completed", sem=0.005, rslora=False, dora=False, **extra):
    return TrialResult.from_json({
        "name": name, "status": status, "targets": targets, "r": r, "lora_alpha": float(r), "use_rslora": rslora,
        "use_dora": dora, "loraplus_lr_ratio": None, "trainable_params": params, "eval_loss": loss,
        "eval_loss_sem": sem, "wall_s": 10.0 * r, "peak_memory_bytes": int((3 + r / 32) * plots.GIB), **extra})


RESULTS = [
    result("qv_r8", "qv", 8, 1.41, 850_000),
    result("attention_r8", "attention", 8, 1.37, 1_700_000),
    result("attention_r16", "attention", 16, 1.349, 3_400_000, rslora=True),
    result("full_r16", "attention,mlp", 16, 1.340, 11_300_000, rslora=True),
    result("full_r32", "attention,mlp", 32, 1.345, 22_500_000, rslora=True),
    result("full_r16_dora", "attention,mlp", 16, 1.343, 11_600_000, rslora=True, dora=True),
    result("full_r32_dora", "attention,mlp", 32, None, 22_900_000, status="oom", sem=None, wall_s=None,
           peak_memory_bytes=None),
    result("full_r64", "attention,mlp", 64, math.nan, 45_000_000, status="diverged", sem=None),
]


def png_size(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(path).shape[:2]
    return width, height


def test_eval_loss_vs_rank_writes_png_with_one_line_per_module_set(tmp_path):
    path = plots.eval_loss_vs_rank(RESULTS, tmp_path / "sub" / "rank.png")
    assert path == tmp_path / "sub" / "rank.png"
    width, height = png_size(path)
    assert 1000 <= width <= 1600 and 500 <= height <= 900  # legible at a laptop's width
    assert not list(path.parent.glob(".*"))  # the temporary file is gone

    fig = plots.eval_loss_vs_rank_figure(RESULTS)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert list(ax.get_xticks()) == [8, 16, 32]
    assert "nats/token" in ax.get_ylabel() and "rank" in ax.get_xlabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:4] == ["qv", "attention", "attention,mlp", "attention,mlp · DoRA"]
    assert "filled: rsLoRA, scale α/√r" in legend and "hollow: scale α/r" in legend
    # grayscale: every series differs by marker and line style, not only by colour
    handles = ax.get_legend().legend_handles[:4]
    styles = {(h.get_marker(), h.get_linestyle()) for h in handles}
    assert len(styles) == 4 and len({h.get_marker() for h in handles}) == 4
    # the markers: the y values plotted are the completed trials' losses; rsLoRA filled, others hollow
    markers = [line for line in ax.lines if line.get_marker() in plots.MARKERS and line.get_linestyle() == "None"]
    assert sorted(m.get_ydata()[0] for m in markers) == sorted(r.eval_loss for r in RESULTS[:6])
    hollow = [m for m in markers if m.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))]
    assert sorted(m.get_ydata()[0] for m in hollow) == [1.37, 1.41]
    # series sharing r=16 are nudged apart, within 5% of the rank
    xs16 = [m.get_xdata()[0] for m in markers if abs(m.get_xdata()[0] - 16) < 1]
    assert len(set(xs16)) == 3 and all(abs(x / 16 - 1) < 0.05 for x in xs16)
    caption = [t.get_text() for t in fig.texts]
    assert caption == ["not plotted: full_r32_dora (oom), full_r64 (diverged)"]


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        pts = [(rng.choice([1, 2, 4, 8, 16]), round(rng.uniform(1, 2), 1)) for _ in range(rng.randint(1, 9))]
        # dominated: another point is no worse on both and better on one; of equal points, the first stays
        oracle = {i for i, (c, l) in enumerate(pts)
                  if not any(c2 <= c and l2 <= l and (c2, l2) != (c, l) for c2, l2 in pts) and
                  not any(j < i and pts[j] == pts[i] for j in range(len(pts)))}
        front = plots.pareto_front(pts)
        assert set(front) == oracle
        assert [pts[i][0] for i in front] == sorted(pts[i][0] for i in front)


def test_eval_loss_vs_params_draws_the_front_noise_band_and_recommendation(tmp_path):
    png_size(plots.eval_loss_vs_params(RESULTS, tmp_path / "p.png", recommended="attention_r16", noise=0.01))
    fig = plots.eval_loss_vs_params_figure(RESULTS, recommended="attention_r16", noise=0.01)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "parameters" in ax.get_xlabel() and "nats/token" in ax.get_ylabel()
    front = next(line for line in ax.lines if line.get_label().startswith("Pareto front"))
    # qv_r8 → attention_r8 → attention_r16 → full_r16; full_r32 and the DoRA trial are dominated
    xs = sorted(set(front.get_xdata()))
    assert xs == [850_000, 1_700_000, 3_400_000, 11_300_000]
    ring = next(line for line in ax.lines if line.get_label() == "recommended: attention_r16")
    assert list(ring.get_xdata()) == [3_400_000] and list(ring.get_ydata()) == [1.349]
    band = next(p for p in ax.patches if p.get_label().startswith("within noise"))
    y0, y1 = band.get_path().get_extents(band.get_patch_transform()).intervaly
    assert (min(y0, y1), max(y0, y1)) == pytest.approx((1.340, 1.350))
    assert sorted(t.get_text() for t in ax.texts) == sorted(r.name for r in RESULTS[:6])


def test_loss_curves_mark_divergence_and_keep_the_scale_of_healthy_trials(tmp_path):
    healthy = [{"kind": "train", "step": s, "train_loss": 2.0 / math.sqrt(s)} for s in range(1, 41)]
    healthy += [{"kind": "eval", "step": s, "eval_loss": 2.1 / math.sqrt(s), "eval_loss_sem": 0.01} for s in (20, 40)]
    exploding = [{"kind": "train", "step": s, "train_loss": 2.0 * 3 ** max(0, s - 20)} for s in range(1, 30)]
    exploding.append({"kind": "train", "step": 30, "train_loss": math.nan})
    curves = {"ok": [metric_point(p) for p in healthy], "boom": [metric_point(p) for p in exploding], "empty": []}
    path = plots.loss_curves(curves, tmp_path / "c.png", statuses={"boom": "diverged", "empty": "oom"})
    png_size(path)
    fig = plots.loss_curves_figure(curves, statuses={"boom": "diverged", "empty": "oom"})
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["ok", "boom [diverged]", "empty [oom]"]
    low, high = axes[0].get_ylim()
    assert high < 2 * 3**8, "one exploding trial must not flatten every panel"
    assert low < min(2.0 / math.sqrt(40), 2.1 / math.sqrt(40))
    vline = [line for line in axes[1].lines if line.get_linestyle() == ":"]
    assert len(vline) == 1 and list(vline[0].get_xdata()) == [30, 30]
    assert any("step 30" in t.get_text() for t in axes[1].texts)
    assert [t.get_text() for t in axes[2].texts] == ["no metrics recorded"]
    train, = [line for line in axes[0].lines if line.get_label() == "train loss"]
    assert list(train.get_xdata()) == list(range(1, 41))
    assert fig.get_supylabel() == "loss (nats/token)" and fig.get_supxlabel() == "optimizer step"


def test_cost_per_trial_shows_gib_and_seconds_and_marks_failures(tmp_path):
    png_size(plots.cost_per_trial(RESULTS, tmp_path / "cost.png"))
    fig = plots.cost_per_trial_figure(RESULTS)
    mem, wall = fig.axes[:2]
    assert mem.get_xlabel() == "peak memory (GiB)" and wall.get_xlabel() == "wall time (s)"
    widths = [p.get_width() for p in mem.patches]
    expected = [r.peak_memory_bytes / plots.GIB for r in RESULTS if r.peak_memory_bytes is not None]
    assert widths == pytest.approx(expected)
    assert [t.get_text() for t in mem.get_yticklabels()] == [r.name for r in RESULTS]
    texts = [t.get_text() for t in mem.texts]
    assert "not measured  [oom]" in texts and any(t.endswith("[diverged]") for t in texts)
    hatched = [p for p in mem.patches if p.get_hatch()]
    assert len(hatched) == 1  # the diverged trial has a memory figure; the oom one has none


def test_probe_importance_heatmap_holds_each_roles_share(tmp_path):
    modules = [{"name": f"l{layer}.{role}", "role": role, "layer": layer, "importance": imp * (layer + 1)}
               for layer in range(3) for role, imp in (("q", 1.0), ("v", 3.0))]
    modules.append({"name": "lm_head", "role": "lm_head", "layer": None, "importance": 6.0})
    png_size(plots.probe_importance({"modules": modules}, tmp_path / "probe.png"))
    fig = plots.probe_importance_figure({"modules": modules})
    heat = fig.axes[0].images[0].get_array()
    total = 6 * 4.0 + 6.0
    expected = np.array([[100 * 1.0 * (k + 1) / total for k in range(3)], [100 * 3.0 * (k + 1) / total for k in range(3)],
                         [math.nan] * 3])
    assert np.allclose(np.asarray(heat.filled(np.nan)), expected, equal_nan=True)
    bars = [p.get_width() for p in fig.axes[1].patches]
    assert bars == pytest.approx([100 * 6 / total, 100 * 18 / total, 100 * 6 / total])


def test_mean_spectra_normalises_by_the_top_singular_value():
    spectra = plots.mean_spectra([{"role": "q", "singular_values": [4.0, 2.0, 1.0]},
                                  {"role": "q", "singular_values": [2.0, 2.0]},
                                  {"role": "v", "singular_values": [0.0, 0.0]}])
    assert spectra == {"q": pytest.approx([1.0, 0.75])}


def test_adapter_spectra_one_panel_per_trial(tmp_path):
    spectra = {"a": [{"role": "q", "singular_values": [1.0, 0.5, 0.25]}],
               "b": [{"role": "q", "singular_values": [2.0, 1.0]}, {"role": "down", "singular_values": [1.0, 0.1]}],
               "skipped": [], "zero": [{"role": "q", "singular_values": [0.0]}]}
    png_size(plots.adapter_spectra(spectra, tmp_path / "s.png"))
    fig = plots.adapter_spectra_figure(spectra)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["a", "b"]
    assert [list(line.get_ydata()) for line in visible[1].lines] == [[1.0, 0.5], [1.0, pytest.approx(0.1)]]
    assert visible[0].get_yscale() == "log"


@pytest.mark.parametrize("data", [[], [result("x", "qv", 8, None, 10, status="oom", sem=None)],
                                  [result("only", "qv", 8, 1.2, 100)]])
def test_every_plot_renders_empty_failed_and_single_trial_input(tmp_path, data):
    for n, (fn, args) in enumerate([(plots.eval_loss_vs_rank, (data,)), (plots.eval_loss_vs_params, (data,)),
                                    (plots.cost_per_trial, (data,)),
                                    (plots.loss_curves, ({r.name: [] for r in data},)),
                                    (plots.probe_importance, ({"modules": []},)),
                                    (plots.adapter_spectra, ({},))]):
        png_size(fn(*args, tmp_path / f"{n}.png"))
    if data and data[0].status == "completed":
        ax = plots.eval_loss_vs_rank_figure(data).axes[0]
        low, high = ax.get_xlim()
        assert low < 8 < high and high / low < 3


def test_series_styles_stay_distinct_for_many_module_sets():
    many = [result(f"t{i}", f"set{i}", 8, 1.0, 10) for i in range(10)]
    styles = plots.series_styles(many)
    assert len({(s["marker"], s["linestyle"]) for s in styles.values()}) == 10
    assert len({s["marker"] for s in styles.values()}) == 10
    for a, b in itertools.combinations(styles.values(), 2):
        assert (a["color"], a["marker"]) != (b["color"], b["marker"])

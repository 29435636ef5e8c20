"""`report`: a sweep folder (docs/sweep-dir.md) as one self-contained HTML page.

The page holds the header (model, data, environment, date), the recommendation with its reason and
noise estimate, the ranked table (failed, pruned, damaged and unfinished trials with their status
and message), the plots as inline PNG data URIs, each trial's settings, and — when the files exist
— the probe's importance (probe.json) and the trained adapters' spectra (analysis.json). No script,
no external asset, no URL: it opens offline and survives being mailed. The PNGs are also written
to `plots/` next to the page, for papers and chats; every number in a plot is also in a table or
in the ledger's JSON/CSV files.

The folder is read by `folder.read_sweep` (the policy for damaged and unfinished trials is there);
this module turns it into the values the page shows, and the Jinja2 template
`templates/report.html.j2` (autoescaped: every value from the folder is text, never markup) lays
them out.
"""

from __future__ import annotations

import base64
import functools
import json
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UsageError
from ..files import check_output, write_atomic
from . import plots
from .folder import Summary, Sweep, TrialResult, TrialStatus, ran_on, read_sweep
from .plots import finite
from .ranking import compare, summary_for

PLOT_NAMES = ("eval_loss_vs_rank", "eval_loss_vs_params", "loss_curves", "cost_per_trial",
              "probe_importance", "adapter_spectra")

CAPTIONS = {
    "eval_loss_vs_rank": "Eval loss against LoRA rank r (log₂ axis), one line per module set; filled markers "
                         "are rsLoRA trials. The lowest point is the best rank; rising loss past it is overfitting.",
    "eval_loss_vs_params": "Eval loss against trainable parameters. The dotted step line is the Pareto front; "
                           "the dotted band is the noise above the best loss; the ring marks the recommendation.",
    "loss_curves": "Train loss per optimizer step and eval loss (±1 standard error) at each evaluation, one panel "
                   "per trial on a shared loss axis (trials/<name>/metrics.jsonl).",
    "cost_per_trial": "Peak memory and wall time per trial, in ranking order; hatched bars did not complete.",
    "probe_importance": "The probe's importance per role and layer, and each role's share (probe.json).",
    "adapter_spectra": "Singular values of each trained ΔW divided by the largest, mean per role (analysis.json). "
                       "A fast drop means the adapter used few of its r directions.",
}
RANKED_COLUMNS = (("#", "n"), ("trial", "name"), ("targets", ""), ("r", "n"), ("α", "n"),
                  ("variant", ""), ("params", "n"), ("eval loss ± s.e.", "n"), ("Δ best", "n"),
                  ("train loss", "n"), ("steps", "n"), ("wall (s)", "n"), ("tokens/s", "n"),
                  ("peak mem (GiB)", "n"))


@dataclass
class WrittenReport:
    page: Path
    images: dict[str, Path]  # plot name -> PNG
    summary: Summary  # what the page shows: summary.json, or computed from the trials
    summary_source: str  # "summary.json" or "computed from result.json"


def report(sweep_dir, out=None) -> Path:
    """Write the sweep's HTML report (default SWEEP_DIR/report.html) and its PNGs (plots/ next to
    it); return the HTML path."""
    return write_report(read_sweep(sweep_dir), out).page


def write_report(sweep: Sweep, out=None) -> WrittenReport:
    """The HTML page and its PNGs for a sweep already read."""
    out = Path(out).expanduser() if out is not None else sweep.path / "report.html"
    if out.is_dir():
        out = out / "report.html"
    check_output(out, "file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"cannot write {out}: {out.parent} is a file", "give --out a path in a folder") from None
    summary, source = summary_for(sweep)
    images = write_plots(sweep, summary, out.parent / "plots")
    write_atomic(out, render_html(sweep, summary, source, images))
    return WrittenReport(out, images, summary, source)


def write_plots(sweep: Sweep, summary: Summary, folder: Path) -> dict[str, Path]:
    results = sweep.trials
    images = {}
    if plots.completed(results):  # with no eval loss to show, the two loss plots would be empty frames
        images["eval_loss_vs_rank"] = plots.eval_loss_vs_rank(results, folder / "eval_loss_vs_rank.png")
        images["eval_loss_vs_params"] = plots.eval_loss_vs_params(
            results, folder / "eval_loss_vs_params.png", recommended=summary.recommended, noise=summary.noise)
    images["loss_curves"] = plots.loss_curves({t.name: t.metrics for t in results}, folder / "loss_curves.png",
                                              statuses={t.name: t.status.value for t in results})
    images["cost_per_trial"] = plots.cost_per_trial(_table_order(sweep, summary), folder / "cost_per_trial.png")
    if sweep.probe:
        images["probe_importance"] = plots.probe_importance(sweep.probe, folder / "probe_importance.png")
    if sweep.analysis:
        images["adapter_spectra"] = plots.adapter_spectra(adapter_spectra(sweep.analysis),
                                                          folder / "adapter_spectra.png")
    for name in PLOT_NAMES:  # an optional plot from an earlier report must not outlive its data
        if name not in images and (folder / f"{name}.png").exists():
            (folder / f"{name}.png").unlink()
    return images


def _table_order(sweep: Sweep, summary: Summary) -> list[TrialResult]:
    """Ranked trials first, then the rest in the sweep's order."""
    by_name = {t.name: t for t in sweep.trials}
    ranked = [by_name[n] for n in summary.ranking if n in by_name]
    seen = {t.name for t in ranked}
    return ranked + [t for t in sweep.trials if t.name not in seen]


# -- the page ---------------------------------------------------------------------------------------


@functools.cache
def _template():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("loraplan.sweeps", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2")


def render_html(sweep: Sweep, summary: Summary, source: str, images: dict[str, Path]) -> str:
    common = _common_training(sweep)
    return _template().render(
        model=str(sweep.model or "?"), path=str(sweep.path), header=_header(sweep, common),
        rec=_recommendation(sweep, summary, source), ranking=_ranking(sweep, summary, source),
        columns=RANKED_COLUMNS, figures=[_figure(n, images[n]) for n in
                                         ("eval_loss_vs_rank", "eval_loss_vs_params", "loss_curves", "cost_per_trial")
                                         if n in images],
        no_loss_plots="eval_loss_vs_rank" not in images,
        probe=_probe(sweep.probe, images.get("probe_importance")) if sweep.probe else None,
        analysis=_analysis(sweep.analysis, images.get("adapter_spectra")) if sweep.analysis else None,
        trials=[_details(t, common) for t in sweep.trials], files=_data_files(sweep), notes=sweep.notes,
        version=_loraplan_version(), date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def _header(sweep: Sweep, training: str | None) -> dict:
    data, env = sweep.data, sweep.environment
    out = {"data": None, "environment": None, "training": training, "created": sweep.created or "?",
           "trials": (f"{len(sweep.trials)}: " + ", ".join(f"{n} {s}" for s, n in sweep.counts().items())
                      if sweep.trials else "none"),
           "spec": (f"hash {sweep.spec_hash}, loraplan {sweep.header.get('loraplan') or '?'}"
                    if sweep.spec_hash else None)}
    if data:
        bits = [f"train {data.get('train')}"]
        if data.get("eval"):
            bits.append(f"eval {data['eval']}")
        bits.append(f"format {data.get('format') or '?'}")
        sizes = [f"{data[k]:,} {label}" for k, label in (("train_examples", "train examples"),
                 ("eval_examples", "eval examples"), ("train_tokens", "train tokens")) if finite(data.get(k))]
        if finite(data.get("max_length")):
            sizes.append(f"max length {data['max_length']}")
        if data.get("truncated"):
            sizes.append(f"{data['truncated']:,} truncated")
        out["data"] = {"text": " · ".join(bits), "sizes": ", ".join(sizes)}
    if env:
        out["environment"] = {
            "text": f"{env.get('device') or '?'} · {env.get('dtype') or '?'}",
            "versions": ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "transformers", "peft") if env.get(k))}
    out["ran_on"] = ran_on(sweep.trials)
    return out


def _common_training(sweep: Sweep) -> str | None:
    """The training settings when every trial shares them (the usual case), in one line."""
    per_config = sweep.spec.get("training", {}).get("lr_policy", "fixed") != "fixed"
    settings = [json.dumps({k: v for k, v in t.plan.training.items() if not (per_config and k == "learning_rate")}
                           if isinstance(t.plan.training, dict) else t.plan.training, sort_keys=True)
                for t in sweep.trials if t.plan]
    if not settings or len(set(settings)) != 1 or settings[0] == "null":
        return None
    training = json.loads(settings[0])
    if per_config:
        from .fair import lr_policy_text

        return _training_text({k: v for k, v in training.items() if not k.startswith("lr_")}) + "; " + \
            lr_policy_text(sweep.spec.get("training", {}))
    return _training_text(training)


def _training_text(t: dict) -> str:
    order = ("max_steps", "batch_size", "learning_rate", "scheduler", "warmup_steps", "eval_every", "max_length", "seed")
    keys = [k for k in order if k in t] + sorted(k for k in t if k not in order)
    return ", ".join(f"{k} {t[k]:g}" if isinstance(t[k], float) else f"{k} {t[k]}" for k in keys if t[k] is not None)


def _recommendation(sweep: Sweep, summary: Summary, source: str) -> dict:
    rec = sweep.trial(summary.recommended) if summary.recommended else None
    if rec is None:
        statuses = ", ".join(f"{n} ({st})" for n, st in summary.failed.items())
        reason = summary.reason or "no trial completed"
        return {"trial": None, "reason": reason + (f": {statuses}" if statuses else "")}
    best = sweep.trial(summary.best) if summary.best else None
    peft = rec.plan.peft_config if rec.plan else None
    return {"trial": rec.name, "settings": _settings_text(rec), "loss": _loss_pm(rec),
            "params": _count(rec.trainable_params),
            "best": ({"name": best.name, "loss": _loss_pm(best), "params": _count(best.trainable_params)}
                     if best is not None and best is not rec else None),
            "reason": summary.reason or "",
            "settle": (("Settled: " if summary.settled else "Not settled: ") + summary.settle_note
                       if summary.settle_note else None),
            "noise": f"{summary.noise:.4g}" if finite(summary.noise) else None,
            "how": summary.noise_method or f"from {source}",
            "peft_code": peft_code(peft) if peft else None}


def _ranking(sweep: Sweep, summary: Summary, source: str) -> dict:
    rows = _table_order(sweep, summary)
    ranked = set(summary.ranking)
    best = sweep.trial(summary.best) if summary.best else None
    done = [t for t in rows if t.name in ranked and finite(t.eval_loss) and finite(t.trainable_params)]
    front = {done[i].name for i in plots.pareto_front([(t.trainable_params, t.eval_loss) for t in done])}
    out = []
    for t in rows:
        tags = []
        if t.name == summary.recommended:
            tags.append("recommended")
        if t.name == summary.best:
            tags.append("best")
        elif t.name in ranked and best is not None and _within_noise(t, best, summary):
            tags.append("near")
        if t.name in front:
            tags.append("pareto")
        if t.name not in ranked:  # ranked means completed; anything else says what it is
            tags.append("status")
        delta = (f"+{t.eval_loss - best.eval_loss:.4f}" if best and t.name in ranked and finite(t.eval_loss) else "")
        numbers = [str(t.r) if t.r is not None else "", f"{t.lora_alpha:g}" if finite(t.lora_alpha) else "",
                   _variant(t), _int(t.trainable_params), _loss_pm(t), delta, _loss(t.train_loss),
                   _int(t.steps), _num(t.wall_s, "{:,.1f}"), _num(t.tokens_per_s, "{:,.0f}"),
                   _gib(t.peak_memory_bytes)]
        out.append({
            "position": summary.ranking.index(t.name) + 1 if t.name in ranked else "",
            "name": t.name, "tags": tags, "status": t.status.value, "badge": _badge_kind(t.status),
            "targets": t.targets or "",
            "cells": [(text or ("" if cls == "" else "—"), cls)
                      for text, (_, cls) in zip(numbers, RANKED_COLUMNS[3:], strict=True)],
            "class": "recommended" if t.name == summary.recommended else ("" if t.name in ranked else "off"),
            "message": t.message if t.message and t.status is not TrialStatus.COMPLETED else None,
        })
    return {"rows": out, "source": ("Ranking and recommendation from summary.json." if source == "summary.json"
                                    else "No summary.json: ranking computed from the trials' result.json.")}


def _within_noise(trial: TrialResult, best: TrialResult, summary: Summary) -> bool:
    """The sweep's own verdict when summary.json carries it, else the same rule applied here."""
    info = summary.trials.get(trial.name)
    return info.within_noise if info is not None else compare(trial, best).within_noise


def _figure(name: str, path: Path) -> dict:
    return {"name": name, "data": base64.b64encode(Path(path).read_bytes()).decode("ascii"),
            "caption": CAPTIONS[name], "file": Path(path).name}


def _probe(probe: dict, image: Path | None) -> dict:
    modules = [m for m in probe.get("modules", []) if finite(m.get("importance"))]
    total = sum(m["importance"] for m in modules) or 1.0
    roles: dict[str, list[dict]] = {}
    for m in modules:
        roles.setdefault(str(m.get("role") or "?"), []).append(m)
    rows = []
    for role, ms in sorted(roles.items(), key=lambda kv: -sum(m["importance"] for m in kv[1])):
        ranks = [m["rank_estimate"] for m in ms if finite(m.get("rank_estimate"))]
        rows.append([role, len(ms), f"{100 * sum(m['importance'] for m in ms) / total:.1f}%",
                     f"{statistics.fmean(m['importance'] for m in ms):.4g}",
                     f"{statistics.median(ranks):g}" if ranks else ""])
    top = [[m.get("name") or "?", m.get("role") or "", m.get("layer") if m.get("layer") is not None else "",
            f"{m['importance']:.4g}", m.get("rank_estimate") if m.get("rank_estimate") is not None else ""]
           for m in sorted(modules, key=lambda m: -m["importance"])[:10]]
    about = [f"{probe[k]:,} {label}" for k, label in (("batches", "batches"), ("tokens", "tokens")) if finite(probe.get(k))]
    if finite(probe.get("energy")):
        about.append(f"rank estimate = smallest k holding {probe['energy']:.0%} of the gradient energy")
    return {"about": "; ".join(about), "figure": _figure("probe_importance", image) if image else None,
            "roles": rows, "top": top}


def adapter_spectra(analysis: dict) -> dict[str, list[dict]]:
    """analysis.json's per-trial weight spectra (`loraplan analyze --json`'s "spectra")."""
    return {name: a.get("spectra") or [] for name, a in (analysis.get("trials") or {}).items() if isinstance(a, dict)}


def _analysis(analysis: dict, image: Path | None) -> dict:
    rows, verdicts = [], []
    for trial, weights in adapter_spectra(analysis).items():
        energy = {id(w): sum(x * x for x in w.get("singular_values") or [] if finite(x)) for w in weights}
        total = sum(energy.values()) or 1.0
        roles: dict[str, list[dict]] = {}
        for w in weights:
            roles.setdefault(str(w.get("role") or "?"), []).append(w)
        for role, ws in roles.items():
            ranks = [w["energy_rank"].get("0.9") for w in ws if isinstance(w.get("energy_rank"), dict)]
            rows.append([trial, role, len(ws), f"{100 * sum(energy[id(w)] for w in ws) / total:.1f}%", _median(ranks),
                         _median([w.get("stable_rank") for w in ws]), _median([w.get("entropy_rank") for w in ws]),
                         _median([w.get("relative_change") for w in ws])])
        for v in (analysis["trials"][trial].get("verdicts") or []):
            if isinstance(v, dict) and v.get("message"):
                verdicts.append((trial, v["message"]))
    return {"figure": _figure("adapter_spectra", image) if image else None, "rows": rows, "verdicts": verdicts}


PEFT_KEYS = ("r", "lora_alpha", "use_rslora", "use_dora", "loraplus_lr_ratio", "lora_dropout", "bias",
             "layers_to_transform", "target_parameters")


def _details(t: TrialResult, common: str | None) -> dict:
    peft = t.plan.peft_config if t.plan else {}
    known = t.status.finished or t.plan is not None  # a pending or damaged trial without plan.json: nothing known
    items = [("targets", t.targets or ""),
             ("target_modules", ", ".join(peft["target_modules"]) if isinstance(peft.get("target_modules"), list)
              else peft.get("target_modules", ""))]
    for key in PEFT_KEYS:
        value = peft.get(key, getattr(t, key, None) if known else None)
        if value is not None and not (key in ("layers_to_transform", "target_parameters") and not value):
            items.append((key, value))
    scale = _scale(peft.get("r", t.r), peft.get("lora_alpha", t.lora_alpha), peft.get("use_rslora", t.use_rslora))
    if scale:
        items.append(("scale on B·A", scale))
    if not common and t.plan and t.plan.training:
        items.append(("training", _training_text(t.plan.training)))
    for key in ("started", "finished", "message"):
        if getattr(t, key):
            items.append((key, getattr(t, key)))
    evals, trains = t.evals, t.train
    items.append(("metrics", f"{len(trains)} train steps, {len(evals)} evaluations logged" if t.metrics
                  else "no metrics.jsonl"))
    return {"name": t.name, "status": t.status.value, "badge": _badge_kind(t.status),
            "settings": _settings_text(t), "items": items,
            "evals": [[_int(e.step), _loss(e.eval_loss), _loss(e.eval_loss_sem), _num(e.elapsed_s, "{:,.1f}")]
                      for e in evals]}


def _data_files(sweep: Sweep) -> list[str]:
    names = ["sweep.json", "results.csv", "summary.json", "summary.md", "probe.json", "analysis.json"]
    return [n for n in names if (sweep.path / n).is_file()] + ["trials/<name>/{plan.json, metrics.jsonl, result.json}"]


def peft_code(kwargs: dict) -> str:
    """`LoraConfig(...)` as Python, one argument a line, ready to paste."""
    return "LoraConfig(\n" + "".join(f"    {k}={v!r},\n" for k, v in kwargs.items()) + ")"


def _settings_text(t: TrialResult) -> str:
    bits = [str(t.targets or "?")]
    if t.r is not None:
        bits.append(f"r={t.r}")
    if finite(t.lora_alpha):
        bits.append(f"α={t.lora_alpha:g}")
    if finite(t.learning_rate):
        bits.append(f"lr={t.learning_rate:g}")
    variant = _variant(t)
    if variant:
        bits.append(variant)
    return " · ".join(bits)


def _scale(r, alpha, rslora) -> str | None:
    """alpha/r, or alpha/√r with rsLoRA (Kalajdzievski 2023): what multiplies B·A."""
    if not (finite(r) and finite(alpha)) or r <= 0:
        return None
    return f"{alpha / r ** 0.5:.4g} (α/√r)" if rslora else f"{alpha / r:.4g} (α/r)"


def _variant(t: TrialResult) -> str:
    bits = [name for on, name in ((t.use_rslora, "rsLoRA"), (t.use_dora, "DoRA")) if on]
    if finite(t.loraplus_lr_ratio):
        bits.append(f"LoRA+ ×{t.loraplus_lr_ratio:g}")
    return ", ".join(bits)


def _badge_kind(status: TrialStatus) -> str:
    """The badge's style: green completed, red failed (or damaged), dashed pruned, dotted unfinished."""
    if status is TrialStatus.COMPLETED or status is TrialStatus.PRUNED:
        return status.value
    return "failed" if status.failed or status is TrialStatus.DAMAGED else "unfinished"


def _loss_pm(t: TrialResult) -> str:
    text = _loss(t.eval_loss)
    if finite(t.eval_loss) and finite(t.eval_loss_sem):
        text += f" ± {t.eval_loss_sem:.4f}"
    return text


def _loss(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if finite(v) else str(v).replace("nan", "NaN")


def _int(v) -> str:
    return f"{int(v):,}" if finite(v) else ""


def _count(v) -> str:
    return f"{int(v):,}" if finite(v) else "?"


def _num(v, fmt: str) -> str:
    return fmt.format(v) if finite(v) else ""


def _gib(v) -> str:
    return f"{v / plots.GIB:.2f}" if finite(v) else ""


def _median(values: list) -> str:
    values = [v for v in values if finite(v)]
    return f"{statistics.median(values):.3g}" if values else ""


def _loraplan_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loraplan")
    except PackageNotFoundError:
        return "(not installed)"

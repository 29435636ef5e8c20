"""`report`: a sweep folder (docs/sweep-dir.md) as one self-contained HTML page.

The page holds the header (model, data, environment, date), the recommendation with its reason and
noise estimate, the ranked table (failed, pruned and unfinished trials with their status and
message), the plots as inline PNG data URIs, each trial's settings, and — when the files exist —
the probe's importance (probe.json) and the trained adapters' spectra (analysis.json). No script,
no external asset, no URL: it opens offline and survives being mailed. The PNGs are also written
to `plots/` next to the page, for papers and chats; every number in a plot is also in a table or
in the ledger's JSON/CSV files.
"""

from __future__ import annotations

import base64
import html
import json
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import UsageError, listing
from ..files import write_atomic
from . import plots
from .plots import finite
from .ranking import summarize

FORMAT = 1
FAILED = ("oom", "diverged", "failed")
PLOT_NAMES = ("eval_loss_vs_rank", "eval_loss_vs_params", "loss_curves", "cost_per_trial",
              "probe_importance", "adapter_spectra")


@dataclass
class Trial:
    name: str
    status: str  # a result.json status, or "unfinished" (metrics, no result) / "pending" (nothing yet)
    result: dict | None = None
    plan: dict | None = None
    metrics: list[dict] = field(default_factory=list)

    @property
    def row(self) -> dict:
        """result.json, or for an unfinished trial what its plan and metrics tell so far."""
        if self.result is not None:
            return {**self.result, "name": self.name, "status": self.status}
        settings = (self.plan or {}).get("plan") or {}
        row = {"name": self.name, "status": self.status,
               "message": "no result.json yet: still running, or interrupted (a rerun of the sweep restarts it)"
               if self.status == "unfinished" else "not started"}
        for key in ("targets", "r", "lora_alpha", "use_rslora", "use_dora", "loraplus_lr_ratio"):
            row[key] = settings.get(key)
        steps = [m["step"] for m in self.metrics if m.get("kind") == "train" and finite(m.get("step"))]
        elapsed = [m["elapsed_s"] for m in self.metrics if finite(m.get("elapsed_s"))]
        row["steps"] = max(steps) if steps else None
        row["wall_s"] = max(elapsed) if elapsed else None
        return row


@dataclass
class Sweep:
    path: Path
    meta: dict
    trials: list[Trial]
    summary: dict
    summary_source: str  # "summary.json" or "computed from result.json"
    probe: dict | None = None
    analysis: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def results(self) -> list[dict]:
        return [t.row for t in self.trials]


def report(sweep_dir, out=None) -> Path:
    """Write the sweep's HTML report (default SWEEP_DIR/report.html) and its PNGs (plots/ next to
    it); return the HTML path."""
    return write_report(read_sweep(sweep_dir), out)[0]


def write_report(sweep: Sweep, out=None) -> tuple[Path, dict[str, Path]]:
    """The HTML page and its PNGs for a sweep already read: (page, {plot name: PNG})."""
    out = Path(out).expanduser() if out is not None else sweep.path / "report.html"
    if out.is_dir():
        out = out / "report.html"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"cannot write {out}: {out.parent} is a file", "give --out a path in a folder") from None
    images = write_plots(sweep, out.parent / "plots")
    write_atomic(out, render_html(sweep, images))
    return out, images


def write_plots(sweep: Sweep, folder: Path) -> dict[str, Path]:
    results = sweep.results
    summary = sweep.summary
    images = {}
    if plots.completed(results):  # with no eval loss to show, the two loss plots would be empty frames
        images["eval_loss_vs_rank"] = plots.eval_loss_vs_rank(results, folder / "eval_loss_vs_rank.png")
        images["eval_loss_vs_params"] = plots.eval_loss_vs_params(
            results, folder / "eval_loss_vs_params.png", recommended=summary.get("recommended"),
            noise=summary.get("noise"))
    images["loss_curves"] = plots.loss_curves({t.name: t.metrics for t in sweep.trials}, folder / "loss_curves.png",
                                              statuses={t.name: t.status for t in sweep.trials})
    images["cost_per_trial"] = plots.cost_per_trial(_table_order(sweep), folder / "cost_per_trial.png")
    if sweep.probe:
        images["probe_importance"] = plots.probe_importance(sweep.probe, folder / "probe_importance.png")
    if sweep.analysis:
        images["adapter_spectra"] = plots.adapter_spectra(adapter_spectra(sweep.analysis),
                                                          folder / "adapter_spectra.png")
    for name in PLOT_NAMES:  # an optional plot from an earlier report must not outlive its data
        if name not in images and (folder / f"{name}.png").exists():
            (folder / f"{name}.png").unlink()
    return images


def read_sweep(sweep_dir) -> Sweep:
    path = Path(sweep_dir).expanduser()
    if path.is_file() and path.name == "sweep.json":
        path = path.parent
    if not path.exists():
        raise UsageError(f"{path} does not exist", "give the folder that `loraplan sweep … --out DIR` wrote")
    if not path.is_dir():
        raise UsageError(f"{path} is a file, not a sweep folder", "give the folder that holds sweep.json")
    if not (path / "sweep.json").is_file():
        inside = sorted(p.parent.name for p in path.glob("*/sweep.json"))
        above = next((p for p in path.resolve().parents if (p / "sweep.json").is_file()), None)
        hint = (f"sweep folders inside it: {listing(inside)}" if inside
                else f"it is inside the sweep folder {above}" if above
                else "give the folder that `loraplan sweep … --out DIR` wrote")
        raise UsageError(f"{path} is not a sweep folder: it has no sweep.json", hint)
    meta = read_json(path / "sweep.json", path)
    if not isinstance(meta, dict):
        raise UsageError(f"{path / 'sweep.json'} is not a JSON object", "is it a loraplan sweep.json?")
    if meta.get("format", FORMAT) != FORMAT:
        raise UsageError(f"{path / 'sweep.json'} has format {meta.get('format')!r}; this loraplan reads "
                         f"format {FORMAT}", "use the loraplan version that wrote the sweep")
    notes: list[str] = []
    trials = [read_trial(path, name, notes) for name in trial_names(path, meta, notes)]
    summary, source = None, "computed from result.json"
    if (path / "summary.json").is_file():
        summary = read_json(path / "summary.json", path)
        if isinstance(summary, dict) and "ranking" in summary:
            source = "summary.json"
        else:
            notes.append("summary.json has no ranking: the ranking below is computed from the results")
            summary = None
    if summary is None:
        summary = summarize([t.row for t in trials])
    probe = _optional_json(path / "probe.json", path, "modules", notes)
    analysis = _optional_json(path / "analysis.json", path, "trials", notes)
    return Sweep(path, meta, trials, summary, source, probe, analysis, notes)


def trial_names(path: Path, meta: dict, notes: list[str]) -> list[str]:
    """The trials sweep.json lists, in its order, then any other folder under trials/."""
    listed = [n for n in meta.get("trials") or [] if isinstance(n, str)]
    on_disk = sorted(p.name for p in (path / "trials").glob("*") if p.is_dir()) if (path / "trials").is_dir() else []
    names = []
    for name in dict.fromkeys(listed + on_disk):
        if not name or Path(name).name != name or name in (".", ".."):
            notes.append(f"trial name {name!r} is not a folder name: skipped")
            continue
        names.append(name)
    return names


def read_trial(sweep: Path, name: str, notes: list[str]) -> Trial:
    folder = sweep / "trials" / name
    plan = read_json(folder / "plan.json", sweep) if (folder / "plan.json").is_file() else None
    metrics = read_metrics(folder / "metrics.jsonl", sweep, notes)
    if (folder / "result.json").is_file():
        result = read_json(folder / "result.json", sweep)
        if not isinstance(result, dict):
            raise UsageError(f"{folder / 'result.json'} is not a JSON object", "a result.json holds one object")
        return Trial(name, str(result.get("status") or "failed"), result, plan, metrics)
    started = (folder / "plan.json").is_file() or (folder / "metrics.jsonl").is_file()
    return Trial(name, "unfinished" if started else "pending", None, plan, metrics)


def read_json(file: Path, sweep: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{file.relative_to(sweep)} in {sweep} is not valid JSON ({e})",
                         "a rerun of the sweep rewrites a broken trial; or delete the file") from None


def read_metrics(file: Path, sweep: Path, notes: list[str]) -> list[dict]:
    """metrics.jsonl rows; a line that does not parse (the last one of a trial being written) is
    skipped with a note, not fatal."""
    if not file.is_file():
        return []
    rows, bad = [], 0
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"{file.relative_to(sweep)}: {bad} unreadable line{'s' * (bad > 1)} skipped")
    return rows


def _optional_json(file: Path, sweep: Path, key: str, notes: list[str]) -> dict | None:
    if not file.is_file():
        return None
    data = read_json(file, sweep)
    if not isinstance(data, dict) or key not in data:
        notes.append(f"{file.name} has no '{key}' (see docs/sweep-dir.md): section left out")
        return None
    return data


def _table_order(sweep: Sweep) -> list[dict]:
    """Ranked trials first, then the rest in the sweep's order."""
    rows = {r["name"]: r for r in sweep.results}
    ranked = [rows[n] for n in sweep.summary.get("ranking") or [] if n in rows]
    seen = {r["name"] for r in ranked}
    return ranked + [r for r in sweep.results if r["name"] not in seen]


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1b1b;margin:0;background:#fff}
main{max-width:1240px;margin:0 auto;padding:20px 24px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px}
.sub{color:#555;margin:0 0 14px}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:0}
dl.meta dt{font-weight:600;color:#444}dl.meta dd{margin:0}
.rec{border:2px solid #1b1b1b;border-radius:6px;padding:12px 16px;background:#f6f6f6}
.rec .big{font-size:19px;font-weight:600}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;margin:4px 0}
th,td{padding:4px 6px;border-bottom:1px solid #e2e2e2;text-align:left;vertical-align:top}
th{background:#efefef;font-weight:600}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.recommended td{font-weight:600;background:#fffbe6}
tr.msg td{color:#444;font-size:12.5px;border-bottom:1px solid #ccc;padding-top:0}
tr.off td{color:#666}
.badge{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;font-weight:600;border:1px solid}
.b-completed{background:#e6f2ea;border-color:#2e7d4f;color:#1d5a37}
.b-failed{background:#fde8e8;border-color:#b3261e;color:#8c1d18}
.b-pruned{background:#f1f1f1;border-color:#777;color:#444;border-style:dashed}
.b-unfinished{background:#e8effa;border-color:#2f5fa7;color:#234a84;border-style:dotted}
.tag{white-space:nowrap;font-size:11px;font-weight:600;color:#333;border:1px solid #999;border-radius:3px;padding:0 4px;margin-right:4px}
figure{margin:18px 0 26px}figure img{max-width:100%;height:auto;border:1px solid #e4e4e4}
figcaption{font-size:13.5px;color:#444;margin-top:4px}
pre{background:#f4f4f4;padding:8px 10px;overflow-x:auto;font-size:12.5px}
details{margin:6px 0;border:1px solid #e2e2e2;border-radius:4px;padding:4px 10px}
summary{cursor:pointer}
.notes li{color:#7a4b00}
footer{margin-top:40px;color:#666;font-size:12.5px}
"""

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


def render_html(sweep: Sweep, images: dict[str, Path]) -> str:
    model = str(sweep.meta.get("model") or "?")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>loraplan sweep report: {_e(model)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        _header(sweep),
        _recommendation(sweep),
        _ranking(sweep),
        _plots(sweep, images),
    ]
    if sweep.probe:
        parts.append(_probe(sweep.probe, images.get("probe_importance")))
    if sweep.analysis:
        parts.append(_analysis(sweep.analysis, images.get("adapter_spectra")))
    parts += [_details(sweep), _data_files(sweep)]
    if sweep.notes:
        parts.append("<h2>Notes</h2><ul class='notes'>" + "".join(f"<li>{_e(n)}</li>" for n in sweep.notes) + "</ul>")
    parts.append(f"<footer>Written by loraplan {_e(_loraplan_version())} on "
                 f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from {_e(sweep.path)}.</footer>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _header(sweep: Sweep) -> str:
    meta = sweep.meta
    env = meta.get("environment") or {}
    data = meta.get("data") or {}
    counts: dict[str, int] = {}
    for t in sweep.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    items = [("Model", _e(meta.get("model") or "?"))]
    if data:
        bits = [f"train {_e(data.get('train'))}"]
        if data.get("eval"):
            bits.append(f"eval {_e(data['eval'])}")
        bits.append(f"format {_e(data.get('format') or '?')}")
        sizes = [f"{data[k]:,} {label}" for k, label in (("train_examples", "train examples"),
                 ("eval_examples", "eval examples"), ("train_tokens", "train tokens")) if finite(data.get(k))]
        if finite(data.get("max_length")):
            sizes.append(f"max length {data['max_length']}")
        if data.get("truncated"):
            sizes.append(f"{data['truncated']:,} truncated")
        items.append(("Data", " · ".join(bits) + ("<br>" + ", ".join(sizes) if sizes else "")))
    if env:
        versions = ", ".join(f"{k} {_e(env[k])}" for k in ("python", "torch", "transformers", "peft") if env.get(k))
        items.append(("Environment", f"{_e(env.get('device') or '?')} · {_e(env.get('dtype') or '?')}"
                      + (f"<br>{versions}" if versions else "")))
    training = _common_training(sweep)
    if training:
        items.append(("Training", _e(training)))
    items.append(("Created", _e(meta.get("created") or "?")))
    items.append(("Trials", _e(f"{len(sweep.trials)}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
                  if sweep.trials else "none"))
    if meta.get("spec_hash"):
        items.append(("Spec", f"hash {_e(meta['spec_hash'])}, loraplan {_e(meta.get('loraplan') or '?')}"))
    rows = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items)
    return (f"<header><h1>LoRA sweep: {_e(meta.get('model') or '?')}</h1>"
            f"<p class='sub'>{_e(sweep.path)}</p><dl class='meta'>{rows}</dl></header>")


def _common_training(sweep: Sweep) -> str | None:
    """The training settings when every trial shares them (the usual case), in one line."""
    settings = [json.dumps((t.plan or {}).get("training"), sort_keys=True) for t in sweep.trials if t.plan]
    if not settings or len(set(settings)) != 1 or settings[0] == "null":
        return None
    return _training_text(json.loads(settings[0]))


def _training_text(t: dict) -> str:
    order = ("max_steps", "batch_size", "learning_rate", "scheduler", "warmup_steps", "eval_every", "max_length", "seed")
    keys = [k for k in order if k in t] + sorted(k for k in t if k not in order)
    return ", ".join(f"{k} {t[k]:g}" if isinstance(t[k], float) else f"{k} {t[k]}" for k in keys if t[k] is not None)


def _recommendation(sweep: Sweep) -> str:
    s = sweep.summary
    rows = {r["name"]: r for r in sweep.results}
    rec = rows.get(s.get("recommended")) if s.get("recommended") else None
    noise = s.get("noise")
    how = s.get("noise_method") or f"from {sweep.summary_source}"
    if rec is None:
        statuses = ", ".join(f"{n} ({st})" for n, st in (s.get("failed") or {}).items())
        return ("<section id='recommendation'><h2>Recommendation</h2><div class='rec'>"
                f"<div class='big'>No recommendation</div><p>{_e(s.get('reason') or 'no trial completed')}"
                + (f": {_e(statuses)}" if statuses else "") + ".</p></div></section>")
    best = rows.get(s.get("best"))
    lines = [f"<div class='big'>{_e(rec['name'])}: {_e(_settings_text(rec))}</div>",
             f"<p>eval loss {_loss_pm(rec)}, {_e(_count(rec.get('trainable_params')))} trainable parameters"]
    if best and best is not rec:
        lines[-1] += (f"; best: {_e(best['name'])} at {_loss_pm(best)} with "
                      f"{_e(_count(best.get('trainable_params')))} trainable parameters")
    lines[-1] += ".</p>"
    lines.append(f"<p><b>Why:</b> {_e(s.get('reason') or '')}.</p>")
    if finite(noise):
        lines.append(f"<p><b>Noise estimate:</b> ±{noise:.4g} nats/token ({_e(how)}).</p>")
    peft = (next((t.plan for t in sweep.trials if t.name == rec["name"]), None) or {}).get("peft_config")
    if peft:
        lines.append("<p>This trial's PEFT config:</p>"
                     f"<pre>{_e(peft_code(peft))}</pre>")
    return "<section id='recommendation'><h2>Recommendation</h2><div class='rec'>" + "".join(lines) + "</div></section>"


def _ranking(sweep: Sweep) -> str:
    s = sweep.summary
    rows = _table_order(sweep)
    ranked = set(s.get("ranking") or [])
    by_name = {r["name"]: r for r in rows}
    best = by_name.get(s.get("best"))
    noise = s.get("noise") if finite(s.get("noise")) else None
    per_trial = s.get("trials") or {}  # the sweep's own per-trial delta and noise, when it wrote them
    done = [r for r in rows if r["name"] in ranked and finite(r.get("eval_loss")) and finite(r.get("trainable_params"))]
    front = {done[i]["name"] for i in plots.pareto_front([(r["trainable_params"], r["eval_loss"]) for r in done])}
    head = "<tr>" + "".join(f"<th class='{c}'>{h}</th>" for h, c in RANKED_COLUMNS) + "</tr>"
    body = []
    for r in rows:
        position = (s.get("ranking") or []).index(r["name"]) + 1 if r["name"] in ranked else ""
        tags = []
        if r["name"] == s.get("recommended"):
            tags.append("<span class='tag'>recommended</span>")
        if r["name"] == s.get("best"):
            tags.append("<span class='tag'>best</span>")
        elif r["name"] in ranked and _within_noise(r, best, per_trial.get(r["name"]), noise):
            tags.append("<span class='tag' title='within noise of the best'>≈ best</span>")
        if r["name"] in front:
            tags.append("<span class='tag' title='no trial has fewer parameters and a lower eval loss'>Pareto</span>")
        if r["name"] not in ranked:  # ranked means completed; anything else says what it is
            tags.append(_badge(r["status"]))
        tags = f"<div>{''.join(tags)}</div>" if tags else ""
        delta = (f"+{r['eval_loss'] - best['eval_loss']:.4f}" if best and r["name"] in ranked
                 and finite(r.get("eval_loss")) else "")
        cls = "recommended" if r["name"] == s.get("recommended") else ("" if r["name"] in ranked else "off")
        alpha = r.get("lora_alpha")
        numbers = [_e(r.get("r") if r.get("r") is not None else ""), _e(f"{alpha:g}" if finite(alpha) else ""),
                   _e(_variant(r)), _int(r.get("trainable_params")), _loss_pm(r), delta, _loss(r.get("train_loss")),
                   _int(r.get("steps")), _num(r.get("wall_s"), "{:,.1f}"), _num(r.get("tokens_per_s"), "{:,.0f}"),
                   _gib(r.get("peak_memory_bytes"))]
        cells = "".join(f"<td class='{c}'>{text or ('' if c == '' else '—')}</td>"
                        for text, (_, c) in zip(numbers, RANKED_COLUMNS[3:], strict=True))
        body.append(f"<tr class='{cls}'><td class='n'>{position}</td><td class='name'>{_e(r['name'])}{tags}</td>"
                    f"<td>{_e(r.get('targets') or '')}</td>{cells}</tr>")
        if r.get("message") and r["status"] != "completed":
            body.append(f"<tr class='msg'><td></td><td colspan='{len(RANKED_COLUMNS) - 1}'>{_e(r['status'])}: {_e(r['message'])}</td></tr>")
    source = ("Ranking and recommendation from summary.json." if sweep.summary_source == "summary.json"
              else "No summary.json: ranking computed from the trials' result.json.")
    return ("<section id='ranking'><h2>Ranked trials</h2>"
            f"<p class='sub'>Completed trials by eval loss (lower is better; nats/token). {_e(source)} Trials that "
            "did not complete follow, with their status and message. Same data: results.csv and "
            "trials/&lt;name&gt;/result.json.</p>"
            f"<div class='scroll'><table id='ranked'><thead>{head}</thead><tbody>{''.join(body)}</tbody></table></div>"
            "</section>")


RANKED_COLUMNS = (("#", "n"), ("trial", "name"), ("targets", ""), ("r", "n"), ("α", "n"),
                  ("variant", ""), ("params", "n"), ("eval loss ± s.e.", "n"), ("Δ best", "n"),
                  ("train loss", "n"), ("steps", "n"), ("wall (s)", "n"), ("tokens/s", "n"),
                  ("peak mem (GiB)", "n"))


def _within_noise(r: dict, best: dict | None, info: dict | None, noise: float | None) -> bool:
    if info and "within_noise" in info:
        return bool(info["within_noise"])
    return (best is not None and noise is not None and finite(r.get("eval_loss"))
            and r["eval_loss"] - best["eval_loss"] <= noise)


def _plots(sweep: Sweep, images: dict[str, Path]) -> str:
    figures = []
    for name in ("eval_loss_vs_rank", "eval_loss_vs_params", "loss_curves", "cost_per_trial"):
        if name in images:
            figures.append(_figure(name, images[name], CAPTIONS[name]))
    if "eval_loss_vs_rank" not in images:
        figures.insert(0, "<p class='sub'>No trial completed with an eval loss: the loss-vs-rank and "
                          "loss-vs-parameters plots are left out.</p>")
    return "<section id='plots'><h2>Plots</h2>" + "".join(figures) + "</section>"


def _figure(name: str, path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f"<figure id='fig-{name}'><img src='data:image/png;base64,{data}' alt='{_e(caption)}'>"
            f"<figcaption>{_e(caption)} File: plots/{_e(Path(path).name)}</figcaption></figure>")


def _probe(probe: dict, image: Path | None) -> str:
    modules = [m for m in probe.get("modules", []) if finite(m.get("importance"))]
    total = sum(m["importance"] for m in modules) or 1.0
    roles: dict[str, list[dict]] = {}
    for m in modules:
        roles.setdefault(str(m.get("role") or "?"), []).append(m)
    head = ("<tr><th>role</th><th class='n'>modules</th><th class='n'>share of importance</th>"
            "<th class='n'>mean importance</th><th class='n'>median rank estimate</th></tr>")
    rows = []
    for role, ms in sorted(roles.items(), key=lambda kv: -sum(m["importance"] for m in kv[1])):
        ranks = [m["rank_estimate"] for m in ms if finite(m.get("rank_estimate"))]
        rows.append(f"<tr><td>{_e(role)}</td><td class='n'>{len(ms)}</td>"
                    f"<td class='n'>{100 * sum(m['importance'] for m in ms) / total:.1f}%</td>"
                    f"<td class='n'>{statistics.fmean(m['importance'] for m in ms):.4g}</td>"
                    f"<td class='n'>{_e(f'{statistics.median(ranks):g}' if ranks else '')}</td></tr>")
    top = sorted(modules, key=lambda m: -m["importance"])[:10]
    top_rows = "".join(f"<tr><td>{_e(m.get('name') or '?')}</td><td>{_e(m.get('role') or '')}</td>"
                       f"<td class='n'>{_e(m.get('layer') if m.get('layer') is not None else '')}</td>"
                       f"<td class='n'>{m['importance']:.4g}</td>"
                       f"<td class='n'>{_e(m.get('rank_estimate') if m.get('rank_estimate') is not None else '')}</td></tr>"
                       for m in top)
    about = [f"{probe[k]:,} {label}" for k, label in (("batches", "batches"), ("tokens", "tokens")) if finite(probe.get(k))]
    if finite(probe.get("energy")):
        about.append(f"rank estimate = smallest k holding {probe['energy']:.0%} of the gradient energy")
    return ("<section id='probe'><h2>Probe: importance per role and layer</h2>"
            + (f"<p class='sub'>{_e('; '.join(about))}.</p>" if about else "")
            + (_figure("probe_importance", image, CAPTIONS["probe_importance"]) if image else "")
            + f"<div class='scroll'><table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></div>"
            + "<h3>Most important modules</h3><div class='scroll'><table><thead><tr><th>module</th><th>role</th>"
            "<th class='n'>layer</th><th class='n'>importance</th><th class='n'>rank estimate</th></tr></thead>"
            f"<tbody>{top_rows}</tbody></table></div></section>")


def adapter_spectra(analysis: dict) -> dict[str, list[dict]]:
    """analysis.json's per-trial weight spectra (`loraplan analyze --json`'s "spectra")."""
    return {name: a.get("spectra") or [] for name, a in (analysis.get("trials") or {}).items() if isinstance(a, dict)}


def _analysis(analysis: dict, image: Path | None) -> str:
    head = ("<tr><th>trial</th><th>role</th><th class='n'>weights</th><th class='n'>share of Σ‖ΔW‖²</th>"
            "<th class='n'>energy rank (90%)</th><th class='n'>stable rank</th><th class='n'>entropy rank</th>"
            "<th class='n'>‖ΔW‖/‖W‖</th></tr>")
    rows, verdicts = [], []
    for trial, weights in adapter_spectra(analysis).items():
        energy = {id(w): sum(x * x for x in w.get("singular_values") or [] if finite(x)) for w in weights}
        total = sum(energy.values()) or 1.0
        roles: dict[str, list[dict]] = {}
        for w in weights:
            roles.setdefault(str(w.get("role") or "?"), []).append(w)
        for role, ws in roles.items():
            ranks = [w["energy_rank"].get("0.9") for w in ws if isinstance(w.get("energy_rank"), dict)]
            rows.append(f"<tr><td>{_e(trial)}</td><td>{_e(role)}</td><td class='n'>{len(ws)}</td>"
                        f"<td class='n'>{100 * sum(energy[id(w)] for w in ws) / total:.1f}%</td>"
                        f"<td class='n'>{_median(ranks)}</td><td class='n'>{_median([w.get('stable_rank') for w in ws])}</td>"
                        f"<td class='n'>{_median([w.get('entropy_rank') for w in ws])}</td>"
                        f"<td class='n'>{_median([w.get('relative_change') for w in ws])}</td></tr>")
        for v in (analysis["trials"][trial].get("verdicts") or []):
            if isinstance(v, dict) and v.get("message"):
                verdicts.append(f"<li><b>{_e(trial)}</b>: {_e(v['message'])}</li>")
    return ("<section id='analysis'><h2>Trained adapters: spectra of ΔW</h2>"
            + (_figure("adapter_spectra", image, CAPTIONS["adapter_spectra"]) if image else "")
            + "<p class='sub'>Per role, medians over the adapted weights (from <code>loraplan analyze --json</code>).</p>"
            + f"<div class='scroll'><table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></div>"
            + (f"<h3>Verdicts</h3><ul>{''.join(verdicts)}</ul>" if verdicts else "") + "</section>")


def _details(sweep: Sweep) -> str:
    common = _common_training(sweep)
    blocks = []
    for t in sweep.trials:
        r = t.row
        plan = t.plan or {}
        peft = plan.get("peft_config") or {}
        items = [("status", _badge(t.status)), ("targets", _e(r.get("targets") or "")),
                 ("target_modules", _e(", ".join(peft["target_modules"]) if isinstance(peft.get("target_modules"), list)
                                       else peft.get("target_modules", "")))]
        for key in ("r", "lora_alpha", "use_rslora", "use_dora", "loraplus_lr_ratio", "lora_dropout", "bias",
                    "layers_to_transform", "target_parameters"):
            value = peft.get(key, r.get(key))
            if value is not None and not (key in ("layers_to_transform", "target_parameters") and not value):
                items.append((key, _e(value)))
        scale = _scale(peft.get("r", r.get("r")), peft.get("lora_alpha", r.get("lora_alpha")),
                       peft.get("use_rslora", r.get("use_rslora")))
        if scale:
            items.append(("scale on B·A", _e(scale)))
        if not common and plan.get("training"):
            items.append(("training", _e(_training_text(plan["training"]))))
        for key in ("started", "finished", "message"):
            if r.get(key):
                items.append((key, _e(r[key])))
        evals = [m for m in t.metrics if m.get("kind") == "eval"]
        trains = [m for m in t.metrics if m.get("kind") == "train"]
        items.append(("metrics", f"{len(trains)} train steps, {len(evals)} evaluations logged"
                      if t.metrics else "no metrics.jsonl"))
        kv = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in items)
        eval_table = ""
        if evals:
            eval_table = ("<table><thead><tr><th class='n'>step</th><th class='n'>eval loss</th>"
                          "<th class='n'>± s.e.</th><th class='n'>elapsed (s)</th></tr></thead><tbody>"
                          + "".join(f"<tr><td class='n'>{_e(_int(m.get('step')))}</td><td class='n'>{_loss(m.get('eval_loss'))}</td>"
                                    f"<td class='n'>{_loss(m.get('eval_loss_sem'))}</td>"
                                    f"<td class='n'>{_num(m.get('elapsed_s'), '{:,.1f}')}</td></tr>" for m in evals)
                          + "</tbody></table>")
        blocks.append(f"<details id='trial-{_e(t.name)}'><summary><b>{_e(t.name)}</b> {_badge(t.status)} "
                      f"{_e(_settings_text(r))}</summary><table>{kv}</table>{eval_table}</details>")
    return "<section id='trials'><h2>Trials</h2>" + "".join(blocks) + "</section>"


def _data_files(sweep: Sweep) -> str:
    names = ["sweep.json", "results.csv", "summary.json", "summary.md", "probe.json", "analysis.json"]
    present = [n for n in names if (sweep.path / n).is_file()]
    present.append("trials/<name>/{plan.json, metrics.jsonl, result.json}")
    return ("<section id='data'><h2>Data</h2><p>Every number above is in the sweep folder: "
            + ", ".join(f"<code>{_e(n)}</code>" for n in present) + ". The plots are also PNG files in "
            "<code>plots/</code> next to this page.</p></section>")


def peft_code(kwargs: dict) -> str:
    """`LoraConfig(...)` as Python, one argument a line, ready to paste."""
    return "LoraConfig(\n" + "".join(f"    {k}={v!r},\n" for k, v in kwargs.items()) + ")"


def _settings_text(r: dict) -> str:
    bits = [str(r.get("targets") or "?")]
    if r.get("r") is not None:
        bits.append(f"r={r['r']}")
    if finite(r.get("lora_alpha")):
        bits.append(f"α={r['lora_alpha']:g}")
    variant = _variant(r)
    if variant:
        bits.append(variant)
    return " · ".join(bits)


def _scale(r, alpha, rslora) -> str | None:
    """alpha/r, or alpha/√r with rsLoRA (Kalajdzievski 2023): what multiplies B·A."""
    if not (finite(r) and finite(alpha)) or r <= 0:
        return None
    return f"{alpha / r ** 0.5:.4g} (α/√r)" if rslora else f"{alpha / r:.4g} (α/r)"


def _variant(r: dict) -> str:
    bits = [name for key, name in (("use_rslora", "rsLoRA"), ("use_dora", "DoRA")) if r.get(key)]
    if finite(r.get("loraplus_lr_ratio")):
        bits.append(f"LoRA+ ×{r['loraplus_lr_ratio']:g}")
    return ", ".join(bits)


def _badge(status: str) -> str:
    kind = ("completed" if status == "completed" else "failed" if status in FAILED
            else "pruned" if status == "pruned" else "unfinished")
    return f"<span class='badge b-{kind}'>{_e(status)}</span>"


def _loss_pm(r: dict) -> str:
    text = _loss(r.get("eval_loss"))
    if finite(r.get("eval_loss")) and finite(r.get("eval_loss_sem")):
        text += f" ± {r['eval_loss_sem']:.4f}"
    return text


def _loss(v) -> str:
    if v is None:
        return ""
    return f"{v:.4f}" if finite(v) else _e(str(v).replace("nan", "NaN"))


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


def _e(value) -> str:
    return html.escape(str(value), quote=True)



def _loraplan_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loraplan")
    except PackageNotFoundError:
        return "(not installed)"

"""`loraplan report`: synthetic ledgers built exactly per docs/sweep-dir.md, rendered to HTML, checked
as text and in a real headless Chromium (DOM dump + screenshot)."""

from __future__ import annotations

import base64
import html as htmllib
import json
import math
import os
import random
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from support.cli import run_cli

import loraplan
from loraplan.cli import main
from loraplan.sweeps.folder import read_sweep
from loraplan.sweeps.ranking import summary_for

# Llama-3.2-1B: 16 layers, hidden 2048, k/v 512 (8 kv heads × 64), MLP 8192. LoRA adds r·(in + out)
# per Linear; DoRA adds one magnitude entry per output feature.
LAYERS = 16
PER_R = {"qv": 4096 + 2560, "attention": 4096 + 2560 + 2560 + 4096, "attention,mlp": 13312 + 3 * 10240}
DORA_OUT = 2048 + 512 + 512 + 2048 + 8192 + 8192 + 2048
TARGET_MODULES = {"qv": ["q_proj", "v_proj"], "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
                  "attention,mlp": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
GIB = 2**30

# The seeds' six configs, then one trial per way of not finishing.
GRID = [
    dict(name="qv_r8", targets="qv", r=8, alpha=16, eval_loss=1.4120),
    dict(name="attention_r8", targets="attention", r=8, alpha=16, eval_loss=1.3710),
    dict(name="attention_r16", targets="attention", r=16, alpha=16, rslora=True, eval_loss=1.3490),
    dict(name="full_r16", targets="attention,mlp", r=16, alpha=16, rslora=True, eval_loss=1.3405),
    dict(name="full_r32", targets="attention,mlp", r=32, alpha=32, rslora=True, eval_loss=1.3448),
    dict(name="full_r16_dora", targets="attention,mlp", r=16, alpha=16, rslora=True, dora=True, eval_loss=1.3432),
    dict(name="full_r32_dora", targets="attention,mlp", r=32, alpha=32, rslora=True, dora=True, status="oom",
         message="CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)"),
    dict(name="full_r64", targets="attention,mlp", r=64, alpha=64, eval_loss=float("nan"), status="diverged",
         message="train loss is NaN at step 37"),
    dict(name="qv_r4", targets="qv", r=4, alpha=8, eval_loss=1.4710, status="pruned",
         message="successive halving: eval loss 1.4710 at step 50 is in the worst half"),
]
SEM = 0.006
RANKING = ["full_r16", "full_r16_dora", "full_r32", "attention_r16", "attention_r8", "qv_r8"]


def trainable(t: dict) -> int:
    return LAYERS * (PER_R[t["targets"]] * t["r"] + (DORA_OUT if t.get("dora") else 0))


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def build_sweep(folder: Path, trials: list[dict] = GRID, summary: bool = True, running: tuple[str, ...] = (),
                no_metrics: tuple[str, ...] = (), max_steps: int = 100) -> Path:
    """A sweep folder as `loraplan sweep` writes it: sweep.json, trials/*/{plan,metrics,result},
    results.csv and (optionally) summary.json. Trials named in `running` have metrics but no
    result.json; those in `no_metrics` have no metrics.jsonl."""
    training = {"max_steps": max_steps, "batch_size": 8, "learning_rate": 2e-4, "warmup_steps": 10,
                "scheduler": "cosine", "seed": 0, "eval_every": 25, "max_length": 512}
    write_json(folder / "sweep.json", {
        "format": 1, "loraplan": "0.1.0", "created": "2026-11-22T12:00:00+00:00", "model": "builtin:llama-3.2-1b",
        "spec": {"grid": "seeds", "training": training}, "spec_hash": "3f9a1c0d5e7b2a64",
        "environment": {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.17.0", "peft": "0.21.0",
                        "device": "NVIDIA H100 80GB HBM3", "dtype": "bf16"},
        "data": {"train": "data/support_chats.jsonl", "eval": None, "format": "chat", "train_examples": 1000,
                 "eval_examples": 100, "train_tokens": 412388, "truncated": 3, "max_length": 512},
        "trials": [t["name"] for t in trials]})
    results = []
    for i, t in enumerate(trials):
        status = t.get("status", "completed")
        folder_t = folder / "trials" / t["name"]
        plan = {"targets": t["targets"], "r": t["r"], "lora_alpha": float(t["alpha"]),
                "use_rslora": t.get("rslora", False), "use_dora": t.get("dora", False),
                "loraplus_lr_ratio": None, "lora_dropout": 0.05}
        write_json(folder_t / "plan.json", {
            "name": t["name"], "plan": plan, "training": training,
            "peft_config": {"r": t["r"], "lora_alpha": float(t["alpha"]), "target_modules": TARGET_MODULES[t["targets"]],
                            "use_rslora": plan["use_rslora"], "use_dora": plan["use_dora"], "lora_dropout": 0.05,
                            "bias": "none", "task_type": "CAUSAL_LM"}})
        steps = {"pruned": 50, "oom": 0, "diverged": 37}.get(status, max_steps)
        if t["name"] in running:
            steps = max_steps // 2
        rows = curve(t, steps, seed=i, diverged=status == "diverged")
        if t["name"] not in no_metrics:
            (folder_t / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if t["name"] in running:
            continue
        finite_loss = t.get("eval_loss") is not None and math.isfinite(t["eval_loss"])
        train = [r["train_loss"] for r in rows if r["kind"] == "train"]
        tail = train[-max(1, len(train) // 10):]
        result = {
            "name": t["name"], "status": status, "message": t.get("message"),
            "targets": t["targets"], "r": t["r"], "lora_alpha": float(t["alpha"]),
            "use_rslora": plan["use_rslora"], "use_dora": plan["use_dora"], "loraplus_lr_ratio": None,
            "trainable_params": trainable(t),
            "eval_loss": t.get("eval_loss"), "eval_loss_sem": SEM if finite_loss else None,
            "train_loss": sum(tail) / len(tail) if tail else None,
            "steps": steps, "wall_s": None if status == "oom" else round(0.55 * steps * (1 + trainable(t) / 4e7), 1),
            "tokens_per_s": None if status == "oom" else 7400.0 - 900 * i,
            "peak_memory_bytes": None if status == "oom" else int((4.1 + trainable(t) / 2e7) * GIB),
            "started": "2026-11-22T12:01:00+00:00", "finished": "2026-11-22T12:03:00+00:00"}
        write_json(folder_t / "result.json", result)
        results.append(result)
    columns = [k for k in results[0] if k not in ("message",)] if results else []
    lines = [",".join(columns)] + [",".join("" if r[c] is None else str(r[c]) for c in columns) for r in results]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")
    if summary and results:
        write_json(folder / "summary.json", {
            "ranking": [n for n in RANKING if n in {t["name"] for t in trials}],
            "best": "full_r16", "recommended": "attention_r16", "noise": 0.012,
            "reason": "fewest trainable parameters (3.4M) among trials within noise (±0.012) of the best eval loss",
            "failed": {"full_r32_dora": "oom", "full_r64": "diverged", "qv_r4": "pruned"}})
    return folder


def curve(t: dict, steps: int, seed: int, diverged: bool) -> list[dict]:
    """A realistic loss curve: exponential decay to the trial's final loss, step noise, evals every 25."""
    rng = random.Random(seed)
    final = t.get("eval_loss") if t.get("eval_loss") is not None and math.isfinite(t["eval_loss"]) else 1.40
    rows = []
    for step in range(1, steps + 1):
        loss = final - 0.03 + 1.1 * math.exp(-step / 18) + rng.gauss(0, 0.035)
        if diverged and step >= 30:
            loss = float("nan") if step == steps else loss * 1.6 ** (step - 29)
        rows.append({"kind": "train", "step": step, "train_loss": loss, "lr": 2e-4 * min(1, step / 10),
                     "tokens": 4096, "elapsed_s": round(0.55 * step, 2)})
        if step % 25 == 0 and not diverged:
            ev = final + 1.0 * math.exp(-step / 18) if step < steps else final
            rows.append({"kind": "eval", "step": step, "eval_loss": ev, "eval_loss_sem": SEM, "eval_batches": 8,
                         "elapsed_s": round(0.55 * step + 1.2, 2)})
    return rows


def write_probe(folder: Path) -> None:
    roles = {"q": 0.8, "k": 0.3, "v": 1.6, "o": 1.1, "gate": 0.9, "up": 1.0, "down": 1.4}
    modules = []
    for layer in range(LAYERS):
        for role, base in roles.items():
            part = "self_attn" if role in "qkvo" else "mlp"
            modules.append({"name": f"model.layers.{layer}.{part}.{role}_proj", "role": role, "layer": layer,
                            "importance": round(base * (1 + 0.5 * math.sin(layer / 3)) * 1e-3, 6),
                            "rank_estimate": 4 + (layer % 3) * 4})
    write_json(folder / "probe.json", {"format": 1, "model": "builtin:llama-3.2-1b", "batches": 8, "tokens": 16384,
                                       "energy": 0.9, "modules": modules})


@pytest.fixture(scope="module")
def adapter_analysis(tmp_path_factory) -> dict:
    """`loraplan analyze --json` of a real (tiny, randomly initialised) PEFT adapter: analysis.json
    holds exactly this per trial."""
    from peft import LoraConfig, get_peft_model
    from support.tiny import make_model

    from loraplan.adapter.analyze import analyze

    folder = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(make_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                           init_lora_weights=False))  # B ≠ 0: a ΔW to analyse
    model.save_pretrained(folder)
    return analyze(folder).to_json()


def write_analysis(folder: Path, analysis: dict, trials: tuple[str, ...] = ("full_r16", "attention_r16")) -> None:
    write_json(folder / "analysis.json", {"format": 1, "trials": {name: analysis for name in trials}})


class Page(HTMLParser):
    """Table rows of #ranked (cell texts), image sources and all href/src attributes of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self._table = self._row = self._cell = None
        self._depth = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "table" and attrs.get("id") == "ranked":
            self._table = True
        if self._table and tag == "tr":
            self._row = []
        if self._row is not None and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def trial_rows(page: Page) -> list[list[str]]:
    """The ranked table's trial rows (the header and the message rows have other cell counts)."""
    return [r for r in page.rows if len(r) == 14][1:]


def trial_name(row: list[str]) -> str:
    return re.sub(r"(recommended|≈ best|best|Pareto|oom|diverged|failed|pruned|unfinished|pending)+$", "", row[1])


def check_self_contained(text: str) -> Page:
    page = Page(text)
    assert "<script" not in text.lower()
    assert "http://" not in text and "https://" not in text, "no URL may appear anywhere in the page"
    for link in page.links:
        assert link.startswith(("data:image/png;base64,", "#")), link
    assert "url(" not in text
    return page


def test_without_summary_json_the_sweeps_own_ranking_is_computed(tmp_path):
    sweep = read_sweep(build_sweep(tmp_path / "s", summary=False))
    s, source = summary_for(sweep)
    assert sweep.summary is None and source == "computed from result.json"
    assert s.ranking == RANKING and s.best == "full_r16"
    # noise on a difference of two means with s.e. 0.006 each: 2·√2·0.006 ≈ 0.017; attention_r16 is
    # +0.0085 (within, and the cheapest of those), attention_r8 +0.0305 (not)
    assert s.recommended == "attention_r16"
    assert s.failed == {"full_r32_dora": "oom", "full_r64": "diverged", "qv_r4": "pruned"}
    assert [t.status for t in sweep.trials] == ["completed"] * 6 + ["oom", "diverged", "pruned"]


def test_report_cli_writes_a_self_contained_page_with_every_trial_and_plot(tmp_path, capsys):
    folder = build_sweep(tmp_path / "sweep")
    rc, out, err = run_cli(["report", str(folder)], capsys)
    assert rc == 0, err
    html = (folder / "report.html").read_text()
    page = check_self_contained(html)
    assert out.startswith(f"wrote {folder / 'report.html'} (9 trials: 6 completed, 1 oom, 1 diverged, 1 pruned)")
    assert "recommended attention_r16: fewest trainable parameters (3.4M)" in out

    pngs = sorted(p.name for p in (folder / "plots").glob("*.png"))
    assert pngs == ["cost_per_trial.png", "eval_loss_vs_params.png", "eval_loss_vs_rank.png", "loss_curves.png"]
    inlined = sorted(base64.b64decode(src.split(",", 1)[1]) for src in page.images)
    assert inlined == sorted((folder / "plots" / p).read_bytes() for p in pngs)

    rows = trial_rows(page)
    assert [trial_name(r) for r in rows] == RANKING + ["full_r32_dora", "full_r64", "qv_r4"]
    by_name = {trial_name(r): r for r in rows}
    assert by_name["full_r16"][0] == "1" and "best" in by_name["full_r16"][1]
    assert "recommended" in by_name["attention_r16"][1]
    assert [trial_name(r) for r in rows if r[1].endswith("Pareto")] == ["full_r16", "attention_r16", "attention_r8", "qv_r8"]
    assert by_name["attention_r16"][6] == f"{trainable(GRID[2]):,}" == "3,407,872"
    assert by_name["attention_r16"][7] == "1.3490 ± 0.0060" and by_name["attention_r16"][8] == "+0.0085"
    assert by_name["full_r64"][7] == "NaN" and by_name["full_r64"][10] == "37"
    assert [by_name[n][1] for n in ("full_r32_dora", "full_r64", "qv_r4")] == \
        ["full_r32_doraoom", "full_r64diverged", "qv_r4pruned"]  # name, then the status badge
    assert by_name["full_r32_dora"][0] == ""  # not ranked
    assert "rsLoRA, DoRA" in by_name["full_r16_dora"][5]
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in html
    assert "train loss is NaN at step 37" in html
    # the reason and noise from summary.json, the environment, the data and the PEFT config
    assert "fewest trainable parameters (3.4M) among trials within noise (±0.012)" in html
    assert "±0.012 nats/token (from summary.json)" in html
    assert "NVIDIA H100 80GB HBM3" in html and "data/support_chats.jsonl" in html and "412,388 train tokens" in html
    assert "LoraConfig(\n    r=16,\n    lora_alpha=16.0,\n    target_modules=['q_proj', 'k_proj'" in htmllib.unescape(html)
    assert html.count("<details") == 9
    assert "<th>scale on B·A</th><td>4 (α/√r)</td>" in html  # attention_r16: 16/√16
    assert "<th>scale on B·A</th><td>2 (α/r)</td>" in html  # attention_r8: 16/8


@pytest.mark.slow
def test_report_api_with_out_probe_and_analysis(tmp_path, adapter_analysis):
    folder = build_sweep(tmp_path / "sweep")
    write_probe(folder)
    write_analysis(folder, adapter_analysis)
    out = loraplan.report(folder, out=tmp_path / "pub" / "qwen.html")
    assert out == tmp_path / "pub" / "qwen.html"
    assert not (folder / "report.html").exists()
    assert len(list((tmp_path / "pub" / "plots").glob("*.png"))) == 6
    html = out.read_text()
    page = check_self_contained(html)
    assert len(page.images) == 6
    assert "Probe: importance per role and layer" in html and "Trained adapters: spectra of ΔW" in html
    # v has the largest base importance: first row of the per-role table, with its share
    v_share = 1.6 / (0.8 + 0.3 + 1.6 + 1.1 + 0.9 + 1.0 + 1.4)
    assert re.search(r"<tr><td>v</td><td class='n'>16</td><td class='n'>" + f"{100 * v_share:.1f}%", html)
    assert "rank estimate = smallest k holding 90% of the gradient energy" in html
    # the analysis table: per trial and role, the tiny llama's 2 layers; shares add up to 100%
    section = html[html.index("<section id='analysis'>"):]
    analysis_rows = re.findall(r"<tr><td>(\w+)</td><td>(\w+)</td><td class='n'>(\d+)</td><td class='n'>([\d.]+)%", section)
    assert sorted({(t, role, int(n)) for t, role, n, _ in analysis_rows}) == [
        (t, role, 2) for t in ("attention_r16", "full_r16") for role in ("down", "q", "v")]
    assert sum(float(share) for t, *_, share in analysis_rows if t == "full_r16") == pytest.approx(100, abs=0.2)

    # --out naming a folder puts report.html in it
    assert loraplan.report(folder, out=tmp_path / "pub") == tmp_path / "pub" / "report.html"
    # the probe goes away: its PNG and section go with it
    (folder / "probe.json").unlink()
    loraplan.report(folder, out=out)
    assert not (tmp_path / "pub" / "plots" / "probe_importance.png").exists()
    assert "Probe:" not in out.read_text()


@pytest.mark.parametrize("case", ["one_trial", "all_failed", "running", "no_summary"])
def test_report_renders_degenerate_sweeps(tmp_path, capsys, case):
    if case == "one_trial":
        folder = build_sweep(tmp_path / "s", trials=[GRID[3]], summary=False)
    elif case == "all_failed":
        folder = build_sweep(tmp_path / "s", trials=GRID[6:8], summary=False)
    elif case == "running":
        folder = build_sweep(tmp_path / "s", trials=GRID[:4], summary=False, running=("full_r16",),
                             no_metrics=("attention_r8",))
        meta = json.loads((folder / "sweep.json").read_text())
        write_json(folder / "sweep.json", {**meta, "trials": meta["trials"] + ["full_r32"]})
        with open(folder / "trials" / "full_r16" / "metrics.jsonl", "a") as f:
            f.write('{"kind": "train", "step": 51, "train_lo')  # the half-written line of a live trial
    else:
        folder = build_sweep(tmp_path / "s", summary=False)
    rc, out, err = run_cli(["report", str(folder), "--json"], capsys)
    assert rc == 0, err
    info = json.loads(out)
    html = (folder / "report.html").read_text()
    page = check_self_contained(html)
    assert len(page.images) == (2 if case == "all_failed" else 4)
    rows = trial_rows(page)
    if case == "one_trial":
        assert info["recommended"] == "full_r16" and info["ranking"] == ["full_r16"]
        assert len(rows) == 1 and rows[0][0] == "1"
    elif case == "all_failed":
        assert info["recommended"] is None and info["ranking"] == []
        assert "No recommendation" in html and "full_r32_dora (oom)" in html
        assert sorted(p.name for p in (folder / "plots").glob("*.png")) == ["cost_per_trial.png", "loss_curves.png"]
        assert [r[1] for r in rows] == ["full_r32_doraoom", "full_r64diverged"]
    elif case == "running":
        assert info["trials"] == {"qv_r8": "completed", "attention_r8": "completed", "attention_r16": "completed",
                                  "full_r16": "unfinished", "full_r32": "pending"}
        assert info["ranking"] == ["attention_r16", "attention_r8", "qv_r8"]
        assert info["recommended"] == "attention_r16"
        assert "still running, or interrupted" in html and "not started" in html
        assert ("trials/full_r16/metrics.jsonl: the last line is cut (the trial stopped while writing it): skipped"
                in info["notes"])
        assert "no metrics.jsonl" in html
    else:
        assert info["summary_source"] == "computed from result.json" and info["recommended"] == "attention_r16"
        assert f"±{info['noise']:.4g} nats/token (2σ of the paired per-batch eval-loss difference" in html
        assert "within noise" in html and "No summary.json: ranking computed" in html


def test_report_bad_input_is_one_line_exit_2(tmp_path, capsys):
    rc, out, err = run_cli(["report", str(tmp_path / "nope")], capsys)
    assert rc == 2 and err.startswith("error: ") and "does not exist" in err and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_cli(["report", str(empty)], capsys)
    assert rc == 2 and "not a sweep folder: it has no sweep.json" in err
    build_sweep(tmp_path / "runs" / "a", trials=GRID[:1])
    build_sweep(tmp_path / "runs" / "b", trials=GRID[:1])
    rc, _, err = run_cli(["report", str(tmp_path / "runs")], capsys)
    assert rc == 2 and "(hint: sweep folders inside it: a, b)" in err
    rc, _, err = run_cli(["report", str(tmp_path / "runs" / "a" / "trials")], capsys)
    assert rc == 2 and f"(hint: it is inside the sweep folder {tmp_path.resolve() / 'runs' / 'a'})" in err
    broken = build_sweep(tmp_path / "broken", trials=GRID[:2])
    (broken / "trials" / "qv_r8" / "result.json").write_text('{"name": "qv_r8", "status": ')
    rc, out, err = run_cli(["report", str(broken)], capsys)  # a cut result.json: a damaged trial, not an error
    assert rc == 0 and "(2 trials: 1 damaged, 1 completed)" in out, err
    (broken / "sweep.json").write_text('{"format": 7}')
    rc, _, err = run_cli(["report", str(broken)], capsys)
    assert rc == 2 and "has format 7" in err
    rc, _, err = run_cli(["report", str(broken / "sweep.json"), "--out", str(broken / "sweep.json" / "r.html")], capsys)
    assert rc == 2 and err.startswith("error: ")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); "
                                    "CI installs it in .ci/run")


def chromium(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", *extra, page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, env={**os.environ, "HOME": str(tmp_path)})


@needs_chromium
@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "one_trial", "all_failed"])
def test_report_renders_in_headless_chromium(tmp_path, case, adapter_analysis):
    trials = {"full": GRID, "one_trial": GRID[3:4], "all_failed": GRID[6:9]}[case]
    folder = build_sweep(tmp_path / "sweep", trials=trials, summary=case == "full")
    if case == "full":
        write_probe(folder)
        write_analysis(folder, adapter_analysis)
    report = loraplan.report(folder)
    dom = chromium(report, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page(dom.stdout)
    names = [t["name"] for t in trials]
    assert sorted(trial_name(r) for r in trial_rows(page)) == sorted(names)
    expected = sorted(p.read_bytes() for p in (folder / "plots").glob("*.png"))
    assert sorted(base64.b64decode(src.split(",", 1)[1]) for src in page.images) == expected
    assert len(expected) == {"full": 6, "one_trial": 4, "all_failed": 2}[case]

    shot = tmp_path / f"{case}.png"
    run = chromium(report, tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars")
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        colors = image.convert("L").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50, "the screenshot is blank"
    if os.environ.get("LORAPLAN_KEEP_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["LORAPLAN_KEEP_SCREENSHOTS"]) / shot.name)

"""`loraplan sweep`: spec -> pre-flight -> data -> ledger -> engine -> ranking -> report.

Everything that can be wrong with the input (targets that do not exist, a bad spec, unreadable data)
is found before the model loads. The schedule is here (one trial after another, or successive
halving); the engine trains, the sweep folder (folder.py) records and reads back.
"""

from __future__ import annotations

import hashlib
import math
import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..data.batches import eval_batches, training_steps
from ..errors import UsageError
from ..files import check_output, read_json, safe_name
from ..plan.count import count_plan, human_bytes, human_count
from .executors import Placement, Work, make_executor, place
from .fair import certificate_ranks, cost_per_config, lr_arms, lr_policy_text, rate_edge_warnings, run_schedule, with_budget
from .folder import (
    LEDGER_FORMAT,
    Summary,
    Sweep,
    SweepFolder,
    TrialResult,
    TrialStatus,
    now,
    ran_on,
    spec_hash,
)
from .ranking import summarize
from .spec import SweepSpec, Trial, alpha_warnings, expand, load_spec


@dataclass
class SweepResult:
    out: Path
    trials: list[Trial]
    results: list[TrialResult]
    summary: Summary | None
    warnings: list[str]
    dry_run: bool = False
    preview: list[dict] | None = None
    data: list[str] | None = None  # one line per split: examples, tokens, truncated, dropped
    schedule: str | None = None  # the learning-rate policy and the steps it costs, in words

    def to_json(self) -> dict:
        return {"out": str(self.out), "summary": self.summary.to_json() if self.summary else {},
                "warnings": self.warnings,
                "results": [{k: v for k, v in r.to_json().items() if k != "eval_batches"} for r in self.results],
                "preview": self.preview}


def package_versions(packages: tuple[str, ...] = ("loraplan", "torch", "transformers", "peft", "accelerate")) -> dict:
    """Python's and these packages' versions (None for one not installed): what a result was made with."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _fingerprint(path: str | None) -> str | None:
    """Size, mtime and the first MiB of a data file: a resumed sweep must train on the same data."""
    if not path or not Path(path).is_file():
        return path
    p = Path(path)
    stat = p.stat()
    with open(p, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    return f"{stat.st_size}:{head}"


def preflight(spec: SweepSpec, model: str, trials: list[Trial]) -> tuple[object, list[dict]]:
    """Resolve every trial against the model before anything loads; all problems reported at once."""
    from ..model.loading import load_structure

    structure = load_structure(model, trust_remote_code=spec.trust_remote_code)
    problems, preview = [], []
    for t in trials:
        try:
            kwargs = t.plan.to_peft_kwargs(structure)
            counted = count_plan(structure, t.plan)
        except UsageError as e:
            hint = (e.hint or "").split("?")[0] + "?" if (e.hint or "").startswith("did you mean") else ""
            problems.append(f"{t.name}: {e.message}" + (f" ({hint})" if hint else ""))
            continue
        row = {"name": t.name, "targets": t.plan.targets, "r": t.plan.r, "lora_alpha": t.plan.alpha,
               "use_rslora": t.plan.use_rslora, "use_dora": t.plan.use_dora,
               "loraplus_lr_ratio": t.plan.loraplus_lr_ratio, "trainable_params": counted.trainable_params,
               "target_modules": kwargs["target_modules"]}
        row["memory_bytes"] = _memory_estimate(structure, t, spec)
        preview.append(row)
    if problems:
        raise UsageError(f"{len(problems)} trial{'s' if len(problems) > 1 else ''} cannot run on {structure.architecture}: "
                         + "; ".join(problems), "fix the targets in the spec (see `loraplan inspect MODEL`)")
    return structure, preview


def _memory_estimate(structure, trial: Trial, spec: SweepSpec) -> int | None:
    try:
        from ..plan.memory import estimate_memory
    except ImportError:
        return None
    t = spec.training
    try:
        est = estimate_memory(structure, trial.plan, t.micro_batch_size or t.batch_size, spec.data.max_length,
                              dtype="bf16" if t.dtype == "auto" else t.dtype, quant=t.quantization,
                              grad_ckpt=t.grad_ckpt)
    except (UsageError, ValueError, KeyError, TypeError):
        return None
    return est.total_bytes


def sweep(model: str | None = None, data: str | None = None, *, eval: str | None = None,
          config: str | Path | None = None, out: str | Path = "sweep", overrides: dict | None = None,
          from_file: str | Path | None = None, from_probe: str | Path | None = None, dry_run: bool = False,
          progress: bool = True, random_init: bool = False) -> SweepResult:
    """Run (or resume) a sweep: `loraplan sweep` as a function. `from_file` adds an existing config
    (PEFT adapter_config.json, axolotl / LLaMA-Factory YAML) as one more trial."""
    overrides = dict(overrides or {})
    overrides.setdefault("model", model)
    overrides.setdefault("data.train", data)
    overrides.setdefault("data.eval", eval)
    probe_data = None
    if from_probe is not None:
        probe_data = _read_probe(from_probe)
        if overrides.get("grid") or overrides.get("trials"):
            raise UsageError("give either --grid/trials or --from-probe", "--from-probe builds the grid around the probe's plan")
        overrides["grid"] = grid_from_probe(probe_data)
    spec = load_spec(config, overrides)
    if from_file is not None:
        spec = with_trial_from_file(spec, from_file)
    if not spec.model:
        raise UsageError("no model given", "loraplan sweep MODEL --data FILE")
    if not spec.data.train:
        raise UsageError("no training data given", "--data FILE (JSONL, JSON, CSV, parquet or a Hub dataset)")
    configs = expand(spec)
    warnings = alpha_warnings(configs)
    structure, preview = preflight(spec, spec.model, configs)
    spec = with_budget(spec, len(configs))
    trials = lr_arms(configs, spec.training)  # each config once per learning rate of the policy
    t = spec.training
    schedule = (f"{len(configs)} configs × {t.max_steps} steps; {lr_policy_text(t.model_dump())}: about "
                f"{round(len(configs) * t.max_steps * cost_per_config(t)):,} optimizer steps in all")
    placement = place(spec.executor, len(trials))
    out = Path(out) if dry_run else check_output(out)
    if dry_run:
        for row, where in zip(preview, placement.plan(preview), strict=True):
            row.update(where)
        return SweepResult(out, trials, [], None, warnings, dry_run=True, preview=preview, schedule=schedule)
    with SweepFolder(out) as ledger:
        if out.exists():
            ledger.lock()  # a folder another sweep is using is refused before the data loads
        return _run(spec, trials, warnings, ledger, probe_data, progress, random_init, placement)


def _run(spec: SweepSpec, trials: list[Trial], warnings: list[str], ledger: SweepFolder, probe_data: dict | None,
         progress: bool, random_init: bool, placement: Placement) -> SweepResult:
    """Load the data, open the ledger (the lock is held from here to the end) and run what is left."""
    from ..data.load import load_data
    from ..model.loading import load_tokenizer

    tokenizer = load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
    d = spec.data
    splits = load_data(d.train, tokenizer, eval=d.eval, fmt=d.format, max_length=d.max_length,
                       eval_fraction=d.eval_fraction, seed=spec.training.seed, max_examples=d.max_examples)
    canonical = spec.model_dump(mode="json", exclude={"executor"})  # where trials run is not what they are
    canonical["data"]["train_fingerprint"] = _fingerprint(d.train)
    canonical["data"]["eval_fingerprint"] = _fingerprint(d.eval)
    environment = package_versions()
    header = {
        "format": LEDGER_FORMAT,
        "loraplan": environment["loraplan"],
        "created": now(),
        "model": spec.model,
        "spec": canonical,
        "spec_hash": spec_hash(canonical),
        "environment": environment,
        "data": {"train": d.train, "eval": d.eval or splits.eval_source, "format": splits.train_summary.format,
                 "train_examples": len(splits.train), "eval_examples": len(splits.eval),
                 "train_tokens": splits.train_summary.tokens, "truncated": splits.train_summary.truncated,
                 "dropped": splits.train_summary.dropped, "max_length": d.max_length},
        "warnings": warnings,
    }
    existing = ledger.open(header, [t.name for t in trials])
    done = {r.name for r in existing.trials if r.status.finished}  # damaged, unfinished: run (again)
    if probe_data is not None:
        ledger.write_probe(probe_data)  # the report shows the probe next to the sweep
    pending = [t for t in trials if t.name not in done]
    t = spec.training
    steps = training_steps(splits.train, t.max_steps, t.batch_size, t.micro_batch_size, t.seed)
    eval_examples = splits.eval[: t.max_eval_examples] if t.max_eval_examples else splits.eval
    eval_set = eval_batches(eval_examples, t.micro_batch_size or t.batch_size)
    if pending:
        model = str(Path(spec.model).resolve()) if Path(spec.model).exists() else spec.model
        work = Work(model, t, t.model_dump(mode="json"), tokenizer.pad_token_id, steps, eval_set,
                    spec.trust_remote_code, random_init, cuts=certificate_ranks(trials))
        executor = make_executor(placement, work, None)
        jobs = [(trial, ledger.trial(trial.name)) for trial in pending]
        bars = None
        try:
            executor.start()
            # the bars after the load: a model that does not load is one error line, no bar above it
            bars = executor.bars = _Progress(len(trials), len(done), t.max_steps, enabled=progress)
            header["environment"].update(_devices(executor.workers))
            ledger.update_header(environment=header["environment"],
                                 executor={"kind": executor.kind, "workers": [w["placement"] for w in executor.workers]})
            run_schedule(executor, jobs, spec)
        finally:
            executor.close()
            if bars is not None:
                bars.close()
        warnings = warnings + executor.notes  # trials the fast engine handed to PEFT, and why
    folder = ledger.read()
    names = {t.name for t in trials}
    results = [r for r in folder.trials if r.name in names]
    summary = summarize(results, lr_policy=t.lr_policy)
    summary.warnings = warnings + rate_edge_warnings(results, t)
    write_outputs(ledger, folder, results, summary)
    return SweepResult(ledger.root, trials, results, summary, warnings,
                       data=[splits.train_summary.describe(), f"eval ({splits.eval_source}): "
                             + splits.eval_summary.describe()])


def _read_probe(path: str | Path) -> dict:
    try:
        data = read_json(Path(path))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the probe result {path}: {e}", "write it with `loraplan probe … --out probe.json`") from None
    if not isinstance(data, dict) or not data.get("plan"):
        raise UsageError(f"{path} holds no probe plan", "write it with `loraplan probe … --out probe.json`")
    return data


def grid_from_probe(data: dict) -> dict:
    """The probe's plan with both sides of what it cannot tell (its `uncertain` list; a probe.json
    without one is the same method): attention and the MLP each, next to the plan's own targets and
    every linear layer, at a quarter, half, once and twice its rank."""
    plan = data["plan"]
    r = int(plan["r"])
    uncertain = data.get("uncertain", ["targets: attention or mlp", "rank"])
    both = ["attention", "mlp"] if any(u.startswith("targets") for u in uncertain) else []
    ranks = {max(1, r // 4), max(1, r // 2)} if "rank" in uncertain else {max(1, r // 2)}
    return {"targets": list(dict.fromkeys([plan["targets"], *both, "all-linear"])),
            "r": sorted(ranks | {r, 2 * r}), "alpha": ["r"]}


def with_trial_from_file(spec: SweepSpec, path: str | Path) -> SweepSpec:
    """The spec plus the config in PATH as a trial named `from_<file>` (with the seeds' grid when the
    spec names no trials of its own)."""
    from ..plan.read_config import read_plan_fields
    from .spec import TRIAL_FIELDS, TrialSpec, seed_grid

    fields = read_plan_fields(path)
    unsupported = {k: v for k, v in fields.items()
                   if k in ("bias", "modules_to_save", "rank_pattern", "alpha_pattern", "lora_bias") and v}
    if unsupported:
        raise UsageError(f"{path}: the sweep does not vary {', '.join(unsupported)}",
                         "remove them from the file, or count/train that config outside the sweep")
    trial = TrialSpec(name=safe_name(f"from_{Path(path).stem}"),
                      **{k: v for k, v in fields.items() if k in TRIAL_FIELDS and v is not None})
    base = list(spec.trials or []) or ([] if spec.grid is not None else seed_grid())
    return spec.model_copy(update={"trials": base + [trial]})


def _devices(workers: list[dict]) -> dict:
    """sweep.json's device and dtype: the one device, or `2 × NVIDIA H200` for a pool of workers."""
    names = list(dict.fromkeys(w["device"] for w in workers))
    device = names[0] if len(workers) == 1 else (f"{len(workers)} × {names[0]}" if len(names) == 1
                                                 else ", ".join(w["device"] for w in workers))
    return {"device": device, "dtype": workers[0]["dtype"]}


def write_outputs(ledger: SweepFolder, folder: Sweep, results: list[TrialResult], summary: Summary) -> None:
    ledger.write_outputs(results, summary, summary_markdown(folder, results, summary))
    from .report import report

    report(ledger.root)  # report.html, and the plots as PNG in plots/ (eval loss vs rank among them)


def _fmt(x, spec: str = ".4f") -> str:
    return format(x, spec) if isinstance(x, int | float) and math.isfinite(x) else "—"


def result_rows(results: list[TrialResult], summary: Summary) -> list[list[str]]:
    order = {n: i for i, n in enumerate(summary.ranking)}
    ranked = sorted(results, key=lambda r: (order.get(r.name, len(order)), r.name))
    rows = []
    for r in ranked:
        info = summary.trials.get(r.name)
        mark = "◀ recommended" if r.name == summary.recommended else ("best" if r.name == summary.best else "")
        delta = "" if not info else ("0" if r.name == summary.best else
                                     f"+{info.delta:.4f}" + ("" if info.within_noise else
                                                             " (cut ✓)" if r.name in summary.certified else " *"))
        loss = (f"{_fmt(r.eval_loss)} ± {_fmt(r.eval_loss_sem)}" if r.status is TrialStatus.COMPLETED
                else r.status.value)
        rows.append([r.name, r.targets, r.r, f"{r.lora_alpha:g}" if r.lora_alpha is not None else "—",
                     f"{r.learning_rate:g}" if r.learning_rate else "—",
                     "✓" if r.use_rslora else "", "✓" if r.use_dora else "",
                     human_count(r.trainable_params) if r.trainable_params else "—",
                     loss, delta, _fmt(r.train_loss), _fmt(r.wall_s, ".1f"), _fmt(r.tokens_per_s, ",.0f"),
                     human_bytes(r.peak_memory_bytes) if r.peak_memory_bytes else "—", mark])
    return rows


RESULT_HEADERS = ["trial", "targets", "r", "alpha", "lr", "rsLoRA", "DoRA", "params", "eval loss ± sem", "Δ best",
                  "train loss", "time s", "tok/s", "peak mem", ""]


def summary_markdown(sweep: Sweep, results: list[TrialResult], summary: Summary) -> str:
    lines = [f"# LoRA sweep: {sweep.model}", ""]
    data, env = sweep.data, sweep.environment
    lines.append(f"Data: {data.get('train')} ({data.get('format')}, {data.get('train_examples')} train / "
                 f"{data.get('eval_examples')} eval examples). Device: {env.get('device', '?')} "
                 f"({env.get('dtype', '?')}); torch {env.get('torch')}, transformers {env.get('transformers')}, "
                 f"peft {env.get('peft')}.")
    training = sweep.spec.get("training", {})
    lines.append(f"Training per trial: {training.get('max_steps')} steps × batch {training.get('batch_size')}, "
                 f"{training.get('scheduler')} schedule, seed {training.get('seed')}; {lr_policy_text(training)}.")
    if ran_on(results):
        lines.append(f"Ran on: {ran_on(results)}.")
    lines += ["", "| " + " | ".join(RESULT_HEADERS) + " |", "|" + "---|" * len(RESULT_HEADERS)]
    for row in result_rows(results, summary):
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    lines.append("")
    if summary.recommended:
        lines.append(f"**Recommended: {summary.recommended}** — {summary.reason}.")
        lines.append("")
        lines.append(f"Noise: {summary.noise_method}. `*` marks a trial outside the noise of the best; `(cut ✓)` "
                     "one whose rank a larger trial's ΔW, cut to it by SVD, shows to be enough.")
        for name, why in summary.certified.items():
            lines.append(f"- {name}: {why}")
        if summary.settle_note:
            lines += ["", f"{'Settled' if summary.settled else 'Not settled'}: {summary.settle_note}."]
    else:
        lines.append(f"No recommendation: {summary.reason}.")
    messages = {r.name: r.message for r in results}
    for name, status in summary.failed.items():
        lines.append(f"- {name}: {status} — {messages.get(name) or ''}")
    for w in summary.warnings:
        lines.append(f"- warning: {w}")
    return "\n".join(lines) + "\n"


class _Progress:
    """One bar for the sweep, one for the current trial (with its loss); on stderr; off with --json."""

    def __init__(self, total: int, done: int, steps: int, enabled: bool):
        self.enabled = enabled and sys.stderr is not None
        self.steps = steps
        self.outer = self.inner = None
        if self.enabled:
            from tqdm.auto import tqdm

            self._tqdm = tqdm
            self.outer = tqdm(total=total, initial=done, desc="sweep", unit="trial", position=0, leave=True)

    def trial(self, name: str) -> None:
        if not self.enabled:
            return
        if self.inner is not None:
            self.inner.close()
        self.inner = self._tqdm(total=self.steps, desc=name, unit="step", position=1, leave=False)

    def step(self, state) -> None:
        if self.inner is not None:
            self.inner.n = state.step
            loss = state.losses[-1] if state.losses else float("nan")
            ev = state.last_eval.eval_loss if state.last_eval else None
            self.inner.set_postfix_str(f"loss {loss:.4f}" + (f" eval {ev:.4f}" if ev else ""), refresh=True)

    def done(self, result: TrialResult) -> None:
        if self.outer is not None:
            self.outer.update(1)
            self.outer.write(f"{result.name}: {result.status.value}"
                             + (f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
                             + (f" ({result.message})" if result.message else ""))

    def close(self) -> None:
        for bar in (self.inner, self.outer):
            if bar is not None:
                bar.close()

"""Compare loraplan's memory estimates with the peaks measure.py recorded, and write RESULTS.md.

The estimate is computed again with the loraplan of this checkout (the one recorded at measuring
time is kept in the rows and shown when it differs), so the estimator can change and be checked
against the same measurements without a GPU.

    python benchmarks/memory/compare.py                       # reads benchmarks/memory/results/*.json
    python benchmarks/memory/compare.py $OUT/memory_*.json --out /tmp/RESULTS.md --max-error 0.10

Exit code 1 when a measured config is off by more than --max-error (default 0.10).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))
sys.path.insert(0, str(HERE))

GiB = 1024**3


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"{path}:{number}: not a JSON row, skipped (a run killed mid-write?)", file=sys.stderr)
    return rows


def estimate_row(row: dict, structures: dict):
    from measure import TINY

    from loraplan.model.loading import load_structure, make_config
    from loraplan.model.structure import build_structure
    from loraplan.plan.lora_plan import LoraPlan
    from loraplan.plan.memory import estimate_memory

    model, c = row["model"], row["config"]
    key = (model, c.get("layers"), c.get("tiny", False))
    if key not in structures:
        if c.get("layers"):  # moe.py: an MoE layout cut to a few layers
            from moe import structure_of

            structures[key] = structure_of(model, c.get("tiny", False))
        else:
            structures[key] = (build_structure(make_config(dict(TINY)), source="tiny") if model == "tiny"
                               else load_structure(model))
    plan = LoraPlan(**c["plan"]) if "plan" in c else LoraPlan(targets=c["targets"], r=c["r"], use_dora=c["dora"])
    return estimate_memory(structures[key], plan, c["batch_size"], c["seq_len"], grad_ckpt=c["grad_ckpt"],
                           quant=c["quant"], double_quant=c["double_quant"])


def gib(n: int | None) -> str:
    return "—" if n is None else f"{n / GiB:.2f}"


def pct(x: float | None) -> str:
    return "—" if x is None else f"{x:+.1%}"


def saved_measured(row: dict) -> int | None:
    """What autograd kept after the forward of the second step (the first with optimizer state)."""
    steps = row.get("steps") or []
    if len(steps) < 2 or steps[1].get("after_forward") is None:
        return None
    return steps[1]["after_forward"] - steps[1]["before"]


def build_report(rows: list[dict]) -> tuple[str, float | None]:
    structures: dict = {}
    lines_ok, table = [], []
    errors, saved_errors, ratios = [], [], []
    verdicts = Counter()
    envs = {json.dumps(r.get("env", {}), sort_keys=True) for r in rows}
    for row in sorted(rows, key=lambda r: (r["model"], bool(r["config"]["quant"]), r["name"])):
        e = estimate_row(row, structures)
        measured, reserved = row.get("allocated_peak"), row.get("reserved_peak")
        capacity = (row.get("env") or {}).get("device_total_bytes")
        error = (e.total_bytes - measured) / measured if row["status"] == "ok" and measured else None
        if error is not None:
            errors.append((abs(error), row["model"], row["name"], error))
            if reserved:
                ratios.append(reserved / measured)
        saved = saved_measured(row)
        saved_error = (e.saved_bytes - saved) / saved if saved else None
        if saved_error is not None:
            saved_errors.append(abs(saved_error))
        if capacity:
            predicted_fit = e.fits(capacity)
            actual_fit = row["status"] == "ok"
            if row["status"] in ("ok", "oom"):
                verdicts["right" if predicted_fit == actual_fit else
                         ("said fits, ran out" if predicted_fit else "said no, it fit")] += 1
        recorded = (row.get("estimate") or {}).get("total_bytes")
        note = f" (recorded {gib(recorded)})" if recorded and recorded != e.total_bytes else ""
        table.append(f"| {row['model'].removeprefix('builtin:')} | {row['name']} | {row['status']} | {gib(measured)} | "
                     f"{gib(reserved)} | {gib(e.total_bytes)}{note} | {pct(error)} | {pct(saved_error)} | "
                     f"{e.peak_phase} | {row.get('seconds', 0):.1f} |")
        if row["status"] != "ok":
            lines_ok.append(f"- {row['model']} {row['name']}: {row['status']}: {row.get('error')}")
    worst = max(errors)[0] if errors else None
    env = json.loads(sorted(envs)[0]) if envs else {}
    dates = sorted(r.get("date", "") for r in rows if r.get("date"))
    out = ["# Peak GPU memory: loraplan's estimate vs measured", ""]
    out.append("Generated by `python benchmarks/memory/compare.py` from the rows `benchmarks/memory/measure.py` "
               "wrote (see README.md). The estimate predicts `torch.cuda.max_memory_allocated()` over the first "
               "3 steps; it is recomputed with this checkout's loraplan.")
    out.append("")
    out.append(f"- device: {env.get('device')} ({gib(env.get('device_total_bytes'))} GiB), capability "
               f"{env.get('capability')}")
    out.append(f"- versions: python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}, cuDNN "
               f"{env.get('cudnn')}), transformers {env.get('transformers')}, peft {env.get('peft')}, "
               f"bitsandbytes {env.get('bitsandbytes')}")
    if len(envs) > 1:
        out.append(f"- note: the rows come from {len(envs)} different environments")
    out.append(f"- measured: {dates[0] if dates else '?'} … {dates[-1] if dates else '?'}")
    out.append("")
    out.append("## Summary")
    out.append("")
    if not errors:
        out.append("- no measured peaks in these rows (a CPU smoke run records none)")
    if errors:
        within = sum(1 for a, *_ in errors if a <= 0.10)
        out.append(f"- {len(errors)} configs measured: worst-case error {pct(max(errors)[3])} "
                   f"({max(errors)[1].removeprefix('builtin:')} {max(errors)[2]}), median |error| "
                   f"{statistics.median(a for a, *_ in errors):.1%}, {within}/{len(errors)} within ±10%")
        for label, quant in (("LoRA", False), ("QLoRA", True)):
            part = [a for a, m, n, _ in errors if ("4bit" in n) == quant]
            if part:
                out.append(f"  - {label}: {len(part)} configs, worst |error| {max(part):.1%}, median "
                           f"{statistics.median(part):.1%}")
    if saved_errors:
        out.append(f"- activations kept after the forward (step 2, `memory_allocated` after − before the forward) "
                   f"vs the estimate's saved bytes: median |error| {statistics.median(saved_errors):.1%}, worst "
                   f"{max(saved_errors):.1%}")
    if ratios:
        out.append(f"- max_memory_reserved / max_memory_allocated: median {statistics.median(ratios):.3f}, max "
                   f"{max(ratios):.3f} (the verdict's allocator margin is 10%)")
    if verdicts:
        out.append(f"- fits / does-not-fit verdict on this GPU: {dict(verdicts)}")
    out += ["", "## Configs", "",
            "| model | config | status | allocated GiB | reserved GiB | estimate GiB | error | saved-activation "
            "error | predicted peak moment | seconds |",
            "|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    out += table
    if lines_ok:
        out += ["", "## Configs that did not run to the end", ""] + lines_ok
    return "\n".join(out) + "\n", worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", type=Path, help="memory_*.json rows (default: results/*.json)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--max-error", type=float, default=0.10)
    args = p.parse_args()
    files = args.files or sorted((HERE / "results").glob("memory_*.json"))
    if not files:
        print("no rows: run measure.py on a GPU and copy its memory_*.json into benchmarks/memory/results/",
              file=sys.stderr)
        return 2
    rows = read_rows(files)
    report, worst = build_report(rows)
    args.out.write_text(report)
    summary = report.split("## Configs")[0].split("## Summary")[-1].strip()
    print(summary)
    print(f"wrote {args.out}")
    return 1 if worst is not None and worst > args.max_error else 0


if __name__ == "__main__":
    sys.exit(main())

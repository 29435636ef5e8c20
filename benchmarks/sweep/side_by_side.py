"""The side-by-side of issue 27 in one lease, as ratios: the seeds' method and the fast engine on the
seeds' six-config grid (Llama-3.2-1B shape, 100 steps × 8 sequences of 64–512 tokens), the
Llama-3.1-8B shape with all seven projections at r=16 (fast engine 100 steps, PEFT engine 10 for its
rate and peak), the planted task in bf16 on both engines (same answers), and today's engine (PEFT) on
the 1B grid with the time left; the bf16 matmul ceiling measured first. Runs inside a time budget:
a part that does not fit is cut short (its finished configs kept) or skipped, and the table says so.

    # on the GPU machine, from the repository root; BENCH holds seed_method_sweep.py and matmul_ceiling.py
    python3 benchmarks/sweep/side_by_side.py --bench BENCH --out $OUT                  # ≈ 9.5 min
    python3 benchmarks/sweep/side_by_side.py --bench BENCH --parts planted,peft1b --out $OUT  # what did not fit

Writes $OUT/side_by_side.md (the table: device, versions, date; wall, tokens/s, share of the
ceiling, peak memory), side_by_side.log and the raw JSON of every part.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = ["baseline_qv_r8", "attention_all_r8", "attention_all_r16", "full_r16", "full_r32", "full_r16_dora"]
SEED_TOKENS = 100 * 8 * (64 + 512) / 2  # the seeds' script's real-token count per config (expected, not counted)


def run(cmd: list[str], limit: float, log, env=None) -> str:
    """Run a part with a time limit; its output goes to the log and comes back."""
    log.write(f"\n$ {' '.join(cmd)}   (limit {limit:.0f} s)\n")
    log.flush()
    t0 = time.time()
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=max(limit, 1), env={**os.environ, **(env or {})})
        out = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += f"\n[stopped at its time limit, {limit:.0f} s]\n"
    out = "\n".join(line for line in out.splitlines() if not line.startswith("Writing"))
    log.write(out + f"\n[{time.time() - t0:.1f} s]\n")
    log.flush()
    print(out[-3000:], flush=True)
    return out


def json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


PARTS = ("ceiling", "seeds", "fast1b", "8b", "planted", "peft1b")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bench", default=str(HERE.parents[2] / "shared" / "bench"), help="folder of seed_method_sweep.py")
    p.add_argument("--budget", type=float, default=570, help="seconds for the whole run")
    p.add_argument("--parts", default=",".join(PARTS), help="which parts, in this order: " + ",".join(PARTS))
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    args = p.parse_args()
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    left = lambda: args.budget - (time.time() - start)
    parts = args.parts.split(",")
    py = sys.executable
    ceiling, seeds, skipped = 760e12, "", []
    one_b = ["--shape", "llama-1b", "--steps", "100", "--out", str(out)]
    # what the parts after each one need (s): the seeds' method goes first and must finish (≈ 400 s,
    # its wall time is the goal's yardstick); later parts are cut short, keeping what they finished
    after_seeds = sum(n for part, n in (("fast1b", 70), ("8b", 55)) if part in parts)
    with open(out / "side_by_side.log", "a") as log:
        if "ceiling" in parts:
            match = re.search(r"(\d+) TFLOP/s", run([py, str(Path(args.bench) / "matmul_ceiling.py")], 30, log))
            ceiling = float(match.group(1)) * 1e12 if match else ceiling
        if "seeds" in parts:
            seeds = run([py, str(Path(args.bench) / "seed_method_sweep.py"), "llama-1b", "100"],
                        left() - after_seeds, log, env={"OUT": str(out)})
        if "fast1b" in parts:
            run([py, str(HERE / "bench_sweep.py"), "--engine", "fast", *one_b],
                min(120, left() - (55 if "8b" in parts else 3)), log)
        if "8b" in parts:
            run([py, str(HERE / "ab_fast.py"), "--shape", "llama-8b", "--runs", "fast:full_r16@100,peft:full_r16@10",
                 "--profiles", "", "--out", str(out)], min(120, left() - 20), log)
        if "planted" in parts:
            if left() > 25:
                run([py, str(HERE / "planted_bf16.py"), "--steps", "100", "--trials", "qv_r8,mlp_r2,mlp_r4,mlp_r4_dora",
                     "--out", str(out)], left() - 3, log)
            else:
                skipped.append("the planted bf16 check (no time left)")
        if "peft1b" in parts:
            if left() > 30:
                run([py, str(HERE / "bench_sweep.py"), "--engine", "peft", *one_b], left() - 3, log)
            else:
                skipped.append("today's engine on the 1B grid (no time left: `--parts peft1b`)")
    seed_rows = json_lines(seeds) or (_read(out / "seed_method_llama-1b.json") or {}).get("rows", [])
    table = render(out, seed_rows, ceiling, time.time() - start, skipped)
    (out / "side_by_side.md").write_text(table)
    print(table)


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def render(out: Path, seed_rows: list[dict], ceiling: float, elapsed: float, skipped: list[str] = ()) -> str:
    import torch

    fast, peft = _read(out / "loraplan_sweep_llama-1b_fast.json"), _read(out / "loraplan_sweep_llama-1b_peft.json")
    big = _read(out / "ab_llama-8b.json")
    seed_wall = next((r["sweep_s"] for r in seed_rows if "sweep_s" in r), None)
    seed_configs = {r["config"]: r for r in seed_rows if "config" in r}
    import peft as peft_pkg
    import transformers

    any_run = fast or peft or {}
    n1b = any_run.get("params", 1_235_814_400)
    lines = [f"# Side by side, {time.strftime('%Y-%m-%d')}", "",
             (f"Device: {any_run.get('device') or torch.cuda.get_device_name(0)}; torch {torch.__version__}, "
             f"transformers {transformers.__version__}, peft {peft_pkg.__version__}; bf16 matmul ceiling measured "
             f"now: {ceiling / 1e12:.0f} TFLOP/s. Share of the ceiling = 4·N FLOPs per real token (N = "
             f"{n1b / 1e9:.2f}B at 1B) × real tokens/s ÷ ceiling. Whole run {elapsed:.0f} s."), "",
             "## Llama-3.2-1B shape, the seeds' six configs × 100 steps", "",
             "| method | whole grid s (load incl.) | vs seeds | per config train s (" + " / ".join(CONFIGS) + ") "
             "| real tok/s (min–max) | best share of ceiling | peak GiB (max) |", "|---|---:|---:|---|---|---:|---:|"]

    def share(tok_per_s: float | None, n: int) -> float:
        return 4 * n * (tok_per_s or 0) / ceiling

    if seed_configs:
        rates = [SEED_TOKENS / r["train_s"] for r in seed_configs.values()]
        lines.append(f"| the seeds' method | {seed_wall if seed_wall is not None else '(cut short)'} | 1.0× | "
                     + " / ".join(f"{seed_configs[c]['train_s']:.1f}" if c in seed_configs else "—" for c in CONFIGS)
                     + f" | {min(rates):,.0f}–{max(rates):,.0f} (expected tokens) | {100 * share(max(rates), n1b):.1f}% "
                     f"| {max(r['peak_gib'] for r in seed_configs.values()):.1f} |")
    for label, data in (("today's engine (PEFT)", peft), ("the fast engine", fast)):
        if not data:
            lines.append(f"| {label} | (not run) | | | | | |")
            continue
        rows = {r["config"]: r for r in data["rows"]}
        wall = data["sweep_plus_load_s"] if data.get("finished") else None
        ratio = f"{seed_wall / wall:.1f}×" if wall and seed_wall else "—"
        rates = [r["real_tok_per_s"] for r in rows.values() if r.get("real_tok_per_s")]
        lines.append(f"| {label} | {wall if wall else '(cut short at ' + str(data['sweep_plus_load_s']) + ')'} "
                     f"({data['load_s']} load) | {ratio} | "
                     + " / ".join(f"{rows[c]['train_s']:.1f}" if c in rows else "—" for c in CONFIGS)
                     + f" | {min(rates):,.0f}–{max(rates):,.0f} | {100 * share(max(rates), data['params']):.1f}% "
                     f"| {max(r['peak_gib'] for r in rows.values()):.1f} |")
    if fast:
        rows = {r["config"]: r for r in fast["rows"]}
        if "full_r16" in rows and "full_r16_dora" in rows:
            lines += ["", (f"DoRA: full_r16_dora / full_r16 train time on the fast engine = "
                          f"{rows['full_r16_dora']['train_s'] / rows['full_r16']['train_s']:.2f}×.")]
        if fast.get("notes"):
            lines += ["", "Fast engine notes: " + "; ".join(fast["notes"])]
    lines += ["", "## Llama-3.1-8B shape, all seven projections r=16", "",
              "| engine | steps | ms/step | real tok/s | share of ceiling (4·N per real token) | peak GiB | eval loss |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in (big or {}).get("rows", []):
        if "ms_per_step" not in r:
            lines.append(f"| {r['run']} | | {r.get('status')} | | | | |")
            continue
        lines.append(f"| {r['run']} | {r['steps']} | {r['ms_per_step']:.0f} | {r['real_tok_per_s']:,.0f} "
                     f"| {100 * share(r['real_tok_per_s'], r['params']):.1f}% "
                     f"| {r['peak_gib']:.1f} | {r['eval_loss']:.4f} |")
    planted = _read(out / "planted_bf16.json")
    if planted:
        lines += ["", f"## Same answers: the planted task in {planted['dtype']}, PEFT engine vs fast engine", "",
                  "| trial | PEFT eval loss | fast eval loss | relative difference |", "|---|---:|---:|---:|"]
        lines += [f"| {r['trial']} | {r['peft_eval_loss']:.4f} | {r['fast_eval_loss']:.4f} | {r['relative_difference']:.2%} |"
                  for r in planted["rows"]]
        reload = planted["reload"]
        lines += ["", (f"Largest difference {planted['max_relative_difference']:.2%} (goal ≤ 1%); the configs span "
                      f"{planted['config_spread']:.1%}; recommended: {planted['recommended']}. A fast-engine adapter "
                      f"({reload['trial']}) loaded with PeftModel.from_pretrained: eval loss {reload['peft_from_pretrained']:.4f} "
                      f"against {reload['recorded']:.4f} recorded ({reload['relative_difference']:.2%}).")]
    if skipped:
        lines += ["", "Not run in this budget: " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

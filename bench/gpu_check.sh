#!/usr/bin/env bash
# One short check of vlit on a machine with a GPU: bf16 training step, flash attention,
# MFU of a ~1.3B LLaVA, a one-GPU SFT job, and the tiny model served through Ray Serve
# LLM (vLLM). Under 8 minutes; what it measured is printed and written to
# ${OUT:-a temp folder}/gpu_check.json. Record the figures in BENCHMARKS.md.
#   bench/gpu_check.sh            # with the repository's venv, or any python with torch
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
       MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
exec timeout 470 "$PY" bench/gpu_check.py --seconds 420 ${OUT:+--out "$OUT"}

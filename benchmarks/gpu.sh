#!/usr/bin/env bash
# GPU readiness check: speculative decoding speedup vs draft acceptance rate, and the verify-cost curve, on a
# random-weight Qwen3-0.6B-shaped model with a static KV cache and CUDA graphs. Needs no network and no model files;
# takes well under 5 minutes on one GPU and prints one short table. See benchmarks/gpu.py for what is measured.
#
#   benchmarks/gpu.sh                          # on a CUDA machine (bfloat16)
#   benchmarks/gpu.sh --json gpu.json          # also keep the numbers
#   benchmarks/gpu.sh --tiny --device cpu      # a toy shape on CPU (what the tests run)
#
# PYTHON selects the interpreter (default: python3 on PATH, e.g. the project's activated venv).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${PYTHON:-python3}" -m benchmarks.gpu "$@"

#!/usr/bin/env bash
# GPU readiness check: speculative decoding speedup vs draft acceptance rate, and the verify-cost curve, on a
# random-weight Qwen3-0.6B-shaped model, through the engine's own decode loop and, beside it, a static KV cache
# with CUDA graphs (the bound). Needs no network and no model files; takes well under 5 minutes on one GPU and prints
# one short table. See benchmarks/gpu.py for what is measured.
#
# On the lent device machine (no network, torch 2.11 and transformers 5.17 preinstalled), carry the wheels the
# engine needs: here `pip download --no-deps -d .device-wheels transformers==5.24.0 huggingface_hub gguf
# platformdirs` (.device-wheels in .git/info/exclude, named in `carry`), there
# `pip install --no-deps --no-index --find-links .device-wheels transformers huggingface_hub gguf platformdirs`.
#
#   benchmarks/gpu.sh                          # on a CUDA machine (bfloat16)
#   benchmarks/gpu.sh --json gpu.json          # also keep the numbers
#   benchmarks/gpu.sh --tiny --device cpu      # a toy shape on CPU (what the tests run)
#
# PYTHON selects the interpreter (default: python3 on PATH, e.g. the project's activated venv).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${PYTHON:-python3}" -m mtp_mcp.benchmarks.gpu "$@"

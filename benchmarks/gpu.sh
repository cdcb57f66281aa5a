#!/usr/bin/env bash
# GPU readiness check: the engine itself (Engine, loaded as the server loads a checkpoint) on the shipped code and
# summarise prompts with the none, ngram and suffix drafters; an oracle drafter's speedup against acceptance; and,
# beside them, a static KV cache with CUDA graphs (the bound) and the verify-cost curve. A random-weight
# Qwen3-0.6B-shaped model: no network and no model files; well under 5 minutes on one GPU, one short table. See
# benchmarks/gpu.py for what is measured.
#
# On the lent device machine (no network, torch 2.11 and transformers 5.17 preinstalled), carry the wheels the
# engine needs: here `pip download --no-deps -d .device-wheels transformers==5.25.0 huggingface_hub gguf
# platformdirs` (.device-wheels in .git/info/exclude, named in `carry`), there
# `pip install --no-deps --no-index --find-links .device-wheels transformers huggingface_hub gguf platformdirs`.
# A copy of the tree (as the device machine gets) is installed here in place, without dependencies, which also
# builds the CPU kernels' extension (engine/native); an installed checkout is used as it is.
#
#   benchmarks/gpu.sh                          # on a CUDA machine (bfloat16)
#   benchmarks/gpu.sh --json gpu.json          # also keep the numbers
#   benchmarks/gpu.sh --tiny --device cpu      # a toy shape on CPU (what the tests run)
#
# PYTHON selects the interpreter (default: python3 on PATH, e.g. the project's activated venv).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import mtp_mcp.engine._native" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >&2
fi
exec "$PYTHON" -m mtp_mcp.benchmarks.gpu "$@"

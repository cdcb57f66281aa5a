"""The prefix cache's time to first token: a prompt that extends the previous call's by ~100 tokens, against the
same prompt prefilled cold. Run: python -m mtp_mcp.benchmarks.prefix_cache [--threads 1] [--model PATH]

Prompts come from the shipped code workload (a standard-library file): the previous call reads its first
PREVIOUS_TOKENS tokens, the next one PREVIOUS_TOKENS + GROWTH. Warm and cold runs are interleaved, `--repeats` times.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from mtp_mcp.benchmarks.report import machine_info
from mtp_mcp.benchmarks.workloads import workloads_dir
from mtp_mcp.engine.cpu_kernels import use_cpu_kernels
from mtp_mcp.engine.drafters.autoregressive import NoDrafter
from mtp_mcp.engine.engine import Engine
from mtp_mcp.engine.loading import load_model
from mtp_mcp.engine.request import GenerationRequest

PREVIOUS_TOKENS = 1400
GROWTH = 100


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="default: the embedded Gemma 3 270M")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")
    use_cpu_kernels(loaded.model)  # as Engine.load does: without it both sides ran transformers' stock modules
    source = (workloads_dir() / "code" / "queue.py").read_text() * 2
    ids = loaded.tokenizer(source, add_special_tokens=False)["input_ids"]
    previous = loaded.tokenizer.decode(ids[:PREVIOUS_TOKENS])
    grown = loaded.tokenizer.decode(ids[: PREVIOUS_TOKENS + GROWTH])
    cold = Engine(loaded, NoDrafter(), prefix_cache=False)
    warm_s, cold_s, reused = [], [], []
    try:
        for _ in range(args.repeats):
            # A fresh warm engine each time: it holds only the previous call, not the grown prompt of a repeat.
            warm = Engine(loaded, NoDrafter())
            try:
                warm.generate(GenerationRequest(previous, max_new_tokens=1))
                result = warm.generate(GenerationRequest(grown, max_new_tokens=1))
            finally:
                warm.close()
            warm_s.append(result.stats.time_to_first_token_s)
            reused.append(result.stats.prompt_tokens_reused)
            cold_s.append(cold.generate(GenerationRequest(grown, max_new_tokens=1)).stats.time_to_first_token_s)
    finally:
        cold.close()
    info = machine_info()
    print(f"{loaded.name}, {loaded.quantization} weights, {torch.get_num_threads()} threads, {info['processor']}")
    print(f"prompt {result.stats.prompt_tokens} tokens, {reused[-1]} reused from the previous call's "
          f"{PREVIOUS_TOKENS + 1}")
    print(f"time to first token: warm median {statistics.median(warm_s):.3f} s (range {min(warm_s):.3f}-"
          f"{max(warm_s):.3f}), cold median {statistics.median(cold_s):.3f} s (range {min(cold_s):.3f}-"
          f"{max(cold_s):.3f}); warm/cold {statistics.median(warm_s) / statistics.median(cold_s):.3f}")


if __name__ == "__main__":
    main()

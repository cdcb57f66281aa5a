"""Run from the repository root: python -m mtp_mcp.benchmarks.int8_quality [--threads 1] [--model FILE.gguf]

How close the int8 model (what the engine loads from a GGUF by default, engine/int8_weights.py) stays to the float
model dequantized from the same file, and what each costs, on the shipped workloads (the bench's prompts):
- greedy agreement: the tokens both generate, one per pass, and how many leading tokens are equal;
- perplexity of each on the workload texts themselves (teacher forcing, the first --ppl-tokens tokens of each);
- plain decoding speed (tok/s, prefill included) of each through the engine, interleaved, and the resident memory
  each load adds to the process (as the OS counts it).
"""

from __future__ import annotations

import argparse
import math
import time

import psutil
import torch

from mtp_mcp.benchmarks.workloads import WORKLOAD_NAMES, load_prompts
from mtp_mcp.engine.cpu_kernels import use_cpu_kernels
from mtp_mcp.engine.drafters.autoregressive import NoDrafter
from mtp_mcp.engine.engine import Engine
from mtp_mcp.engine.loading import load_model
from mtp_mcp.engine.request import GenerationRequest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--model", default=None, help="a .gguf file (default: the embedded Gemma 3 270M)")
    parser.add_argument("--prompts-per-workload", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ppl-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    process = psutil.Process()
    rss, models = {}, {}
    for weights in ("none", "int8"):
        before = process.memory_info().rss
        models[weights] = load_model(args.model, device="cpu", dtype="float32", quantize=weights, progress=False)
        use_cpu_kernels(models[weights].model)  # as Engine.load does
        rss[weights] = (process.memory_info().rss - before) / 2**20
    tokenizer = models["none"].tokenizer
    prompts = load_prompts(list(WORKLOAD_NAMES), tokenizer, args.prompts_per_workload)
    engines = {weights: Engine(loaded, NoDrafter()) for weights, loaded in models.items()}
    tokens = {w: [] for w in engines}
    seconds = {w: 0.0 for w in engines}
    for prompt in prompts:
        request = GenerationRequest(prompt.text, max_new_tokens=args.max_new_tokens,
                                    add_special_tokens=prompt.add_special_tokens)
        for weights, engine in engines.items():  # interleaved: both see the same machine load
            started = time.perf_counter()
            tokens[weights].append(engine.generate(request).token_ids)
            seconds[weights] += time.perf_counter() - started
    for engine in engines.values():
        engine.close()

    equal = sum(a == b for a, b in zip(tokens["none"], tokens["int8"]))
    prefixes = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                for a, b in zip(tokens["none"], tokens["int8"])]
    print(f"{len(prompts)} prompts ({', '.join(WORKLOAD_NAMES)}), {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"greedy: {equal}/{len(prompts)} generations identical; equal leading tokens per prompt: {prefixes}")
    for weights, loaded in models.items():
        nll, count = 0.0, 0
        for prompt in prompts:
            ids = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens,
                            return_tensors="pt")["input_ids"][:, : args.ppl_tokens]
            with torch.inference_mode():
                loss = loaded.model(ids, labels=ids).loss
            nll += float(loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
        generated = sum(len(t) for t in tokens[weights])
        print(f"{weights:>5}: perplexity {math.exp(nll / count):.3f} over {count} tokens; plain decoding "
              f"{generated / seconds[weights]:.1f} tok/s; resident memory added by its load {rss[weights]:.0f} MB")


if __name__ == "__main__":
    main()

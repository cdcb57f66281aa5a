"""Run from the repository root: python -m mtp_mcp.benchmarks.quality [--threads 2] [--model FILE.gguf]

How close the quantized model (what the engine loads from a GGUF by default: its blocks as stored, on the native
kernels, engine/quantized.py) stays to the float model dequantized from the same file, and to llama.cpp's reading
of that file, on the shipped workloads (the bench's prompts):
- greedy agreement: the tokens each generates, one per pass, and how many leading tokens are equal;
- perplexity of each on the workload texts themselves (teacher forcing through the engine's own target, the first
  --ppl-tokens tokens of each);
- plain decoding speed (tok/s, prefill included) of each through the engine, interleaved, and the resident memory
  each load adds to the process (as the OS counts it);
- with node-llama-cpp installed (benchmarks/llama_cpp.py), llama.cpp's greedy tokens on the same prompts, same file
  and threads, and how many leading tokens each of the two engine models shares with them.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import psutil
import torch

from mtp_mcp.benchmarks.llama_cpp import DEFAULT_PREFIX, LlamaCppMethod, llama_cpp_missing
from mtp_mcp.benchmarks.workloads import WORKLOAD_NAMES, load_prompts
from mtp_mcp.engine.cpu_kernels import use_cpu_kernels
from mtp_mcp.engine.drafters.autoregressive import NoDrafter
from mtp_mcp.engine.engine import Engine
from mtp_mcp.engine.loading import load_model
from mtp_mcp.engine.request import GenerationRequest
from mtp_mcp.engine.target import TargetModel


def leading_equal(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def perplexity(target: TargetModel, token_lists: list[list[int]]) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of each text's tokens given the ones before, as the engine's target
    computes its logits (the lean pass and the kernels for a quantized model)."""
    nll, count = 0.0, 0
    for ids in token_lists:
        hidden = target.prefill(ids)  # row i predicts token i + 1
        log_probs = torch.log_softmax(target.logits(hidden[:-1]), dim=-1)
        nll -= float(log_probs.gather(1, torch.tensor(ids[1:])[:, None]).sum())
        count += len(ids) - 1
        target.release()
    return math.exp(nll / count), count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--model", default=None, help="a .gguf file (default: the embedded Gemma 3 270M)")
    parser.add_argument("--prompts-per-workload", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ppl-tokens", type=int, default=512)
    parser.add_argument("--llama-cpp", type=Path, default=DEFAULT_PREFIX, help="where node-llama-cpp is installed")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    process = psutil.Process()
    rss, models = {}, {}
    for weights in ("none", "auto"):
        before = process.memory_info().rss
        models[weights] = load_model(args.model, device="cpu", dtype="float32", quantize=weights, progress=False)
        use_cpu_kernels(models[weights].model)  # as Engine.load does
        rss[weights] = (process.memory_info().rss - before) / 2**20
    names = {"none": "float", "auto": models["auto"].quantization}
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

    equal = sum(a == b for a, b in zip(tokens["none"], tokens["auto"]))
    prefixes = [leading_equal(a, b) for a, b in zip(tokens["none"], tokens["auto"])]
    print(f"{len(prompts)} prompts ({', '.join(WORKLOAD_NAMES)}), {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"greedy, {names['auto']} against float: {equal}/{len(prompts)} generations identical; equal leading "
          f"tokens per prompt: {prefixes}")
    texts = [tokenizer(p.text, add_special_tokens=p.add_special_tokens)["input_ids"][: args.ppl_tokens]
             for p in prompts]
    torch.set_num_threads(1)  # the kernels' own threads compute the quantized model (as in the engine's worker)
    for weights, loaded in models.items():
        with torch.inference_mode():
            value, count = perplexity(TargetModel(loaded.model), texts)
        generated = sum(len(t) for t in tokens[weights])
        print(f"{names[weights]:>5}: perplexity {value:.3f} over {count} tokens; plain decoding "
              f"{generated / seconds[weights]:.1f} tok/s; resident memory added by its load {rss[weights]:.0f} MB")

    missing = llama_cpp_missing(args.llama_cpp)
    if missing or not models["auto"].path.endswith(".gguf"):
        print(f"llama.cpp not compared: {missing or 'the model is not a GGUF file'}")
        return
    llama = LlamaCppMethod(Path(models["auto"].path), args.llama_cpp, args.threads or torch.get_num_threads())
    try:
        theirs = [llama.run(prompt, args.max_new_tokens).token_ids for prompt in prompts]
    finally:
        llama.close()
    for weights in ("auto", "none"):
        shared = [leading_equal(a, b) for a, b in zip(tokens[weights], theirs)]
        print(f"llama.cpp {llama.version} against {names[weights]}: {sum(a == b for a, b in zip(tokens[weights], theirs))}"
              f"/{len(prompts)} generations identical; equal leading tokens per prompt: {shared}")


if __name__ == "__main__":
    main()

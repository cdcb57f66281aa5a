"""Run from the repository root: python -m mtp_mcp.benchmarks.prefill_cost [--threads 1] [--model PATH]

What a prompt costs to feed (the prefill, most of the time to first token) at several prompt lengths, in one piece
against chunks of several sizes (engine.target.PREFILL_CHUNK_TOKENS is the engine's). The prompts are the code
workload's Python sources joined, cut to each length; every variant runs on the same ids, interleaved, and its final
hidden states are compared with the one-piece prefill's.
"""

from __future__ import annotations

import argparse
import time

import torch

from mtp_mcp.benchmarks.workloads import workloads_dir
from mtp_mcp.engine.cpu_kernels import use_cpu_kernels
from mtp_mcp.engine.loading import load_model
from mtp_mcp.engine.target import PREFILL_CHUNK_TOKENS, TargetModel

LENGTHS = (500, 1357, 4000)
CHUNKS = tuple(sorted({128, 256, 512, 1024, PREFILL_CHUNK_TOKENS}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--model", default=None, help="model path (default: the embedded Gemma 3 270M)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                        help="prompt lengths in tokens, comma-separated")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype="float32", progress=False)
    use_cpu_kernels(loaded.model)  # as Engine.load does
    text = "".join(path.read_text(encoding="utf-8") for path in sorted((workloads_dir() / "code").glob("*.py")))
    all_ids = loaded.tokenizer(text)["input_ids"]
    print(f"prefill seconds (best of {args.repeats}), {torch.get_num_threads()} thread(s); "
          "max |difference| of the final hidden states from the one-piece prefill in brackets")
    print("tokens | one piece | " + " | ".join(f"chunks of {chunk}" for chunk in CHUNKS))
    for length in map(int, args.lengths.split(",")):
        ids = all_ids[:length]
        targets = {chunk: TargetModel(loaded.model, prefill_chunk_tokens=chunk) for chunk in (length, *CHUNKS)}
        whole = targets[length].prefill(ids)
        seconds: dict[int, list[float]] = {chunk: [] for chunk in targets}
        difference = {}
        for _ in range(args.repeats):
            for chunk, target in targets.items():
                started = time.perf_counter()
                hidden = target.prefill(ids)
                seconds[chunk].append(time.perf_counter() - started)
                difference[chunk] = float((hidden - whole).abs().max())
                target.release()
        cells = [f"{min(seconds[chunk]):.2f} ({difference[chunk]:.0e})" for chunk in CHUNKS]
        print(f"{len(ids)} | {min(seconds[length]):.2f} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()

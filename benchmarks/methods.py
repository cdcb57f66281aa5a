"""The generation methods a benchmark compares; each runs one prompt greedily and reports what it did.

    transformers          model.generate(do_sample=False): the reference output and the baseline speed
    transformers-lookup   model.generate(do_sample=False, prompt_lookup_num_tokens=10)
    engine-<drafter>      this engine (engine.Engine) with that drafter, through the same worker thread as the server

All timings cover the whole request, prefill included, and exclude tokenization.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from mtp_mcp.benchmarks.workloads import Prompt
from mtp_mcp.engine.drafters.base import Drafter
from mtp_mcp.engine.engine import Engine
from mtp_mcp.engine.loading import LoadedModel
from mtp_mcp.engine.request import GenerationRequest

# What the transformers documentation and the issue use for prompt lookup.
TRANSFORMERS_LOOKUP_TOKENS = 10


@dataclass(frozen=True, slots=True)
class MethodRun:
    token_ids: list[int]  # generated ids only, an EOS that ended generation included
    seconds: float
    target_passes: int  # forward passes of the target model


class Method(Protocol):
    name: str

    def run(self, prompt: Prompt, max_new_tokens: int) -> MethodRun: ...

    def close(self) -> None: ...


class TransformersMethod:
    """Stock `generate`; counts the model's forward calls (the prefill, which yields the first token, included)."""

    def __init__(self, loaded: LoadedModel, prompt_lookup_tokens: int | None):
        self.name = "transformers" if prompt_lookup_tokens is None else "transformers-lookup"
        self._loaded = loaded
        self._prompt_lookup_tokens = prompt_lookup_tokens
        self._forward_calls = 0
        self._hook = loaded.model.register_forward_pre_hook(self._count_forward)

    def _count_forward(self, module: torch.nn.Module, args: tuple) -> None:
        self._forward_calls += 1

    @torch.inference_mode()
    def run(self, prompt: Prompt, max_new_tokens: int) -> MethodRun:
        tokenizer, model = self._loaded.tokenizer, self._loaded.model
        input_ids = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens, return_tensors="pt")[
            "input_ids"
        ].to(self._loaded.device)
        lookup = {} if self._prompt_lookup_tokens is None else {"prompt_lookup_num_tokens": self._prompt_lookup_tokens}
        self._forward_calls = 0
        started = time.perf_counter()
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **lookup,
        )
        synchronize(self._loaded.device)
        seconds = time.perf_counter() - started
        return MethodRun(output[0, input_ids.shape[1] :].tolist(), seconds, self._forward_calls)

    def close(self) -> None:
        self._hook.remove()


class EngineMethod:
    """The engine as the server runs it: requests go through Engine.generate (worker thread, FIFO queue)."""

    def __init__(self, loaded: LoadedModel, drafter: Drafter):
        self.name = f"engine-{drafter.name}"
        # Every prompt runs several times: without the prefix cache each run reads its prompt in full, as the
        # transformers and llama.cpp rows do (bench --agent-trace measures the cache).
        self._engine = Engine(loaded, drafter, prefix_cache=False)

    def run(self, prompt: Prompt, max_new_tokens: int) -> MethodRun:
        request = GenerationRequest(
            prompt=prompt.text, max_new_tokens=max_new_tokens, add_special_tokens=prompt.add_special_tokens
        )
        result = self._engine.generate(request)
        return MethodRun(result.token_ids, result.stats.total_time_s, result.stats.target_passes)

    def close(self) -> None:
        self._engine.close()


def synchronize(device: torch.device) -> None:
    """Waits for queued accelerator work, so that a timer read after it covers the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

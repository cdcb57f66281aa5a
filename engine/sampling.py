"""Turning logits into the distribution that is sampled from.

The target and every drafter warp their logits with the same function, so the draft distribution q and the target
distribution p in the rejection rule are defined the same way (temperature, then top-k, then top-p).
"""

from __future__ import annotations

import torch

from mtp_mcp.engine.request import SamplingParams


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits: [N, V] -> probs: [N, V] (float32), after temperature, top-k and top-p filtering.

    Only meaningful for sampling (temperature > 0); greedy decoding never needs probabilities.
    """
    logits = logits.float() / params.temperature
    vocab_size = logits.shape[-1]
    if 0 < params.top_k < vocab_size:
        kth_largest = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p (the token that crosses it is kept).
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """probs: [V] -> one token id drawn from it."""
    return int(torch.multinomial(probs, 1, generator=generator))

"""The drafter protocol: propose some next tokens cheaply; learn how many the target kept.

Drafters never decide what is accepted (engine.verify does) and never touch the target's cache position
(engine.target owns it). A drafter that reads the target's hidden states or KV cache gets them through DraftContext.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import torch

from mtp_mcp.engine.request import SamplingParams
from mtp_mcp.engine.target import TargetModel


@dataclass(frozen=True, slots=True)
class Draft:
    tokens: list[int]
    # [len(tokens), V]: the distribution each token was sampled from. None means deterministic (one-hot q), which
    # is also what every drafter returns under greedy decoding.
    probs: torch.Tensor | None = None
    # confidence[i]: the drafter's estimate of the chance that tokens[: i + 1] are all accepted, where it has one
    # (the suffix drafter's occurrence counts); engine.draft_payoff uses it to decide how much to verify.
    confidence: list[float] | None = None

    def first(self, n: int) -> Draft:
        """The draft cut to its first n tokens."""
        if n >= len(self.tokens):
            return self
        return Draft(self.tokens[:n], None if self.probs is None else self.probs[:n],
                     None if self.confidence is None else self.confidence[:n])


NO_DRAFT = Draft(tokens=[])


@dataclass(frozen=True, slots=True)
class DraftContext:
    token_ids: list[int]  # every committed token, prompt first; the last one is not in the target's cache yet
    max_tokens: int  # propose at most this many (what the request and the context still allow)
    # Target hidden states that arrived since the last proposal: new_hidden[j] is the state at the position before
    # token_ids[-len(new_hidden) + j], i.e. the one that predicted it. MTP heads consume these (h_t, x_{t+1}) pairs.
    new_hidden: torch.Tensor
    target: TargetModel  # read-only: for drafters that attend to the target's KV cache or share its output layer
    # Set when the request is cancelled: a drafter with a long feed of its own (a draft model's first pass over the
    # prompt) checks it between chunks and gives up, proposing nothing.
    cancel: threading.Event | None = None
    # False for sampling with a seed, whose text must come out the same every time: a drafter then drafts from this
    # request alone, not from what it remembers of earlier ones (which would change how the random numbers are used).
    use_memory: bool = True


class Drafter(Protocol):
    name: str
    # True for drafters that consume the target's hidden state at every prompt position (MTP heads, Gemma 4
    # assistants): the prompt is then prefilled whole, never partly reused from the prefix cache.
    reads_prompt_hidden_states: bool

    def begin(self, prompt_ids: list[int], sampling: SamplingParams, generator: torch.Generator) -> None:
        """Resets per-request state; called once before the first proposal of every request."""

    def propose(self, context: DraftContext) -> Draft:
        """Returns up to context.max_tokens tokens that would follow context.token_ids."""

    def observe(self, proposed: int, accepted: int) -> None:
        """Learns from the verdict on the last proposal (e.g. to adapt the draft length)."""

    def release(self) -> None:
        """Frees what the drafter holds for the request that just ended (caches), so its memory does not outlive
        the request; the engine calls it after every request, finished, failed or cancelled."""

    def remember(self, token_ids: list[int]) -> None:
        """Learns from a request that ended without error (its prompt and output tokens); the engine calls it after
        the caller has the result. Only drafters with a memory across requests (suffix) keep anything."""


class AdaptiveDraftLength:
    """The transformers heuristic: +2 after a fully accepted draft, -1 otherwise; between 1 and `maximum`."""

    def __init__(self, maximum: int):
        self.maximum = maximum
        self.current = maximum

    def update(self, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        if accepted == proposed:
            self.current = min(self.maximum, self.current + 2)
        else:
            self.current = max(1, self.current - 1)

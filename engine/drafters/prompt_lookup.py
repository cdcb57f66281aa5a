"""The `ngram` drafter (prompt lookup): copy what followed the latest earlier occurrence of the text's tail.

Longest match first: the last `max_ngram` tokens are looked up, then shorter tails down to one token. An index from
n-gram to its latest end position is extended incrementally, so a proposal costs O(max_ngram), not O(text).
"""

from __future__ import annotations

import torch

from mtp_mcp.engine.drafters.base import NO_DRAFT, AdaptiveDraftLength, Draft, DraftContext
from mtp_mcp.engine.request import SamplingParams


class PromptLookupDrafter:
    name = "ngram"
    reads_prompt_hidden_states = False

    def __init__(self, num_draft_tokens: int, max_ngram: int = 3):
        self.length = AdaptiveDraftLength(num_draft_tokens)
        self.max_ngram = max_ngram
        self._latest_end: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending before this position are in the index

    def begin(self, prompt_ids: list[int], sampling: SamplingParams, generator: torch.Generator) -> None:
        self.length.current = self.length.maximum
        self._latest_end.clear()
        self._indexed = 0

    def propose(self, context: DraftContext) -> Draft:
        tokens = context.token_ids
        # Index every n-gram that ends before the last token, so the tail never matches itself.
        for end in range(self._indexed, len(tokens) - 1):
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                self._latest_end[tuple(tokens[end - n + 1 : end + 1])] = end
        self._indexed = max(self._indexed, len(tokens) - 1)

        limit = min(self.length.current, context.max_tokens)
        if limit <= 0:
            return NO_DRAFT
        for n in range(min(self.max_ngram, len(tokens)), 0, -1):
            end = self._latest_end.get(tuple(tokens[-n:]))
            if end is not None:
                return Draft(tokens=tokens[end + 1 : end + 1 + limit])
        return NO_DRAFT

    def observe(self, proposed: int, accepted: int) -> None:
        self.length.update(proposed, accepted)

    def release(self) -> None:
        self._latest_end.clear()
        self._indexed = 0

    def remember(self, token_ids: list[int]) -> None:
        pass

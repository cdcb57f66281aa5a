"""The `none` drafter: proposes nothing, so each target pass yields exactly one token (the plain baseline)."""

from __future__ import annotations

import torch

from mtp_mcp.engine.drafters.base import NO_DRAFT, Draft, DraftContext
from mtp_mcp.engine.request import SamplingParams


class NoDrafter:
    name = "none"
    reads_prompt_hidden_states = False

    def begin(self, prompt_ids: list[int], sampling: SamplingParams, generator: torch.Generator) -> None:
        pass

    def propose(self, context: DraftContext) -> Draft:
        return NO_DRAFT

    def observe(self, proposed: int, accepted: int) -> None:
        pass

    def release(self) -> None:
        pass

    def remember(self, token_ids: list[int]) -> None:
        pass

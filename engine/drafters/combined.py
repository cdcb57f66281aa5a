"""The model's own MTP and the suffix drafter together (what `auto` runs for a model with native MTP): both propose
at every step, and the suffix draft is verified instead of the MTP one when its confident part is longer.

MTP heads guess the next few tokens of any text well; the suffix drafter knows long stretches that occurred before
(a retry, a file completed again) and says how sure it is. The MTP drafter proposes at every step even when its
draft is not used, because it must read the target's states as they come (DraftContext.new_hidden); its drafting
leaves nothing behind that a rejected or unused draft would have to undo (engine/drafters/mtp_heads.py,
gemma4_assistant.py). Whichever draft is verified carries its own q, so sampling stays exact.
"""

from __future__ import annotations

import torch

from mtp_mcp.engine.drafters.base import Draft, DraftContext, Drafter
from mtp_mcp.engine.drafters.suffix import SuffixDrafter
from mtp_mcp.engine.request import SamplingParams

# A suffix-drafted token counts as confident when at least this share of the earlier occurrences agree up to it.
CONFIDENT = 0.5


class MtpWithSuffixDrafter:
    reads_prompt_hidden_states = True

    def __init__(self, mtp: Drafter, suffix: SuffixDrafter):
        self.mtp = mtp
        self.suffix = suffix
        self.name = f"{mtp.name}+suffix"
        self._suffix_chosen = False

    def begin(self, prompt_ids: list[int], sampling: SamplingParams, generator: torch.Generator) -> None:
        self.mtp.begin(prompt_ids, sampling, generator)
        self.suffix.begin(prompt_ids, sampling, generator)

    def propose(self, context: DraftContext) -> Draft:
        from_model = self.mtp.propose(context)
        remembered = self.suffix.propose(context)
        confident = sum(1 for c in remembered.confidence or () if c >= CONFIDENT)
        self._suffix_chosen = confident > len(from_model.tokens)
        return remembered.first(confident) if self._suffix_chosen else from_model

    def observe(self, proposed: int, accepted: int) -> None:
        # The MTP drafter's adaptive length learns only from its own drafts.
        if not self._suffix_chosen:
            self.mtp.observe(proposed, accepted)

    def release(self) -> None:
        self.mtp.release()
        self.suffix.release()

    def remember(self, token_ids: list[int]) -> None:
        self.suffix.remember(token_ids)

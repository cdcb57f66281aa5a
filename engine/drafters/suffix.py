"""The `suffix` drafter (SuffixDecoding): draft from what followed the text's tail before, in this request or in
earlier ones.

Two indexes are searched at every step (engine/drafters/suffix_index.py): the current request's prompt and output,
and a global one over earlier requests' prompts and outputs (a growing file completed again, a text summarised in
another style, a retry). The continuation with the higher score (expected accepted tokens) wins; its per-token
confidence goes with the draft, so engine.draft_payoff verifies only as much of it as pays.

The global index is the drafter's memory: the engine hands it every request that ended without error
(`remember`), and, unless turned off, it is saved to a file in the user cache directory after each one and read back
at the next start, keyed by model and tokenizer. A file that cannot be read or written costs a warning, never a
request.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from mtp_mcp.engine.drafters.base import NO_DRAFT, Draft, DraftContext
from mtp_mcp.engine.drafters.suffix_index import MAX_MATCH, NO_CONTINUATION, GlobalIndex, RequestIndex
from mtp_mcp.engine.request import SamplingParams

log = logging.getLogger(__name__)

# The global index's budget: 2**18 tokens is a 1 MB file and a lookup of about 0.3 ms on 2 CPU cores.
MEMORY_TOKEN_BUDGET = 1 << 18
MEMORY_DIR = "drafter-memory"


class SuffixDrafter:
    name = "suffix"
    reads_prompt_hidden_states = False

    def __init__(self, num_draft_tokens: int, memory: GlobalIndex, memory_file: Path | None = None,
                 memory_key: str = ""):
        self.num_draft_tokens = num_draft_tokens
        self.memory = memory
        self.memory_file = memory_file  # None: the memory lives as long as the engine
        self.memory_key = memory_key
        self._request = RequestIndex()
        self._save_failed = False

    def begin(self, prompt_ids: list[int], sampling: SamplingParams, generator: torch.Generator) -> None:
        self._request.reset()

    def propose(self, context: DraftContext) -> Draft:
        limit = min(self.num_draft_tokens, context.max_tokens)
        if limit <= 0:
            return NO_DRAFT
        self._request.extend_to(context.token_ids)
        tail = context.token_ids[-MAX_MATCH:]
        own = self._request.continuation(tail, limit)
        earlier = self.memory.continuation(tail, limit) if context.use_memory else NO_CONTINUATION
        best = earlier if earlier.score > own.score else own
        if not best.tokens:
            return NO_DRAFT
        return Draft(tokens=best.tokens, confidence=best.confidence)

    def observe(self, proposed: int, accepted: int) -> None:
        pass  # the draft length comes from the match and the counts, the cut from engine.draft_payoff

    def release(self) -> None:
        self._request.reset()

    def remember(self, token_ids: list[int]) -> None:
        self.memory.add(token_ids)
        if self.memory_file is None:
            return
        try:
            self.memory.save(self.memory_file, self.memory_key)
        except OSError as error:
            if not self._save_failed:  # one warning, not one per request
                log.warning("cannot save the drafter memory to %s (%s); it lasts until the server stops",
                            self.memory_file, error)
            self._save_failed = True


def load_suffix_drafter(num_draft_tokens: int, tokenizer: PreTrainedTokenizerBase, model_identity: str,
                        memory_dir: Path | None) -> SuffixDrafter:
    """memory_dir None: no memory across restarts (--no-drafter-memory)."""
    memory = GlobalIndex(MEMORY_TOKEN_BUDGET)
    if memory_dir is None:
        return SuffixDrafter(num_draft_tokens, memory)
    key = memory_key(tokenizer, model_identity)
    memory_file = memory_dir / f"{key[:32]}.safetensors"
    if memory.load(memory_file, key):
        log.info("drafter memory: %d tokens of %d earlier texts from %s", memory.tokens, memory.documents,
                 memory_file)
    return SuffixDrafter(num_draft_tokens, memory, memory_file, key)


def memory_key(tokenizer: PreTrainedTokenizerBase, model_identity: str) -> str:
    """What a memory file is for: the model and every token of its tokenizer's vocabulary (token ids mean nothing
    under another tokenizer)."""
    digest = hashlib.sha256(model_identity.encode())
    for text, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{token_id}\t{text}\n".encode())
    return digest.hexdigest()

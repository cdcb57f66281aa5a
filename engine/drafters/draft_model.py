"""The `draft-model` drafter: a small causal LM with the same tokenizer drafts autoregressively in its own cache."""

from __future__ import annotations

import threading

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from mtp_mcp.engine.drafters.base import NO_DRAFT, AdaptiveDraftLength, Draft, DraftContext
from mtp_mcp.engine.errors import InvalidRequestError
from mtp_mcp.engine.request import SamplingParams
from mtp_mcp.engine.sampling import probabilities, sample
from mtp_mcp.engine.target import PREFILL_CHUNK_TOKENS


class DraftModelDrafter:
    name = "draft-model"
    reads_prompt_hidden_states = False

    def __init__(self, model: PreTrainedModel, num_draft_tokens: int, prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS):
        self.model = model
        # A long feed (the prompt, at the first proposal) goes in chunks of this many tokens: see engine.target.
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.length = AdaptiveDraftLength(num_draft_tokens)
        self._cache: DynamicCache | None = None
        self._cached_ids: list[int] = []  # the tokens whose states are in self._cache, in order
        self._sampling = SamplingParams()
        self._generator: torch.Generator | None = None

    def begin(self, prompt_ids: list[int], sampling: SamplingParams, generator: torch.Generator) -> None:
        self.length.current = self.length.maximum
        self._cache = DynamicCache(config=self.model.config)
        # Past recording keeps what `propose` may crop. A hybrid draft model's recurrent state can be cropped back
        # only to the start of a one-token forward (whose state before it the cache records), and that is as far
        # as `propose` crops: to the tokens now committed, of which the last feed was the start. So no positions
        # of a longer feed need recording (recurrent_states_to_keep=0).
        self._cache.activate_past_recording(recurrent_states_to_keep=0)
        self._cached_ids = []
        self._sampling = sampling
        self._generator = generator

    @torch.inference_mode()
    def propose(self, context: DraftContext) -> Draft:
        limit = min(self.length.current, context.max_tokens)
        if limit <= 0:
            return NO_DRAFT
        tokens = context.token_ids
        # Roll the draft cache back to the longest prefix it shares with the committed tokens, then catch up.
        common = 0
        for cached, committed in zip(self._cached_ids, tokens):
            if cached != committed:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # always re-feed at least one token to get fresh logits
        if self._cached_ids:  # (an empty cache has no layers to crop yet)
            self._cache.crop(common - len(self._cached_ids))
            self._cached_ids = tokens[:common]

        feed = tokens[common:]
        drafted: list[int] = []
        draft_probs: list[torch.Tensor] = []
        for _ in range(limit):
            logits = self._forward(feed, context.cancel)
            if logits is None:  # cancelled during a long feed
                return NO_DRAFT
            if self._sampling.greedy:
                token = int(logits.argmax())
            else:
                q = probabilities(logits[None], self._sampling)[0]
                token = sample(q, self._generator)
                draft_probs.append(q)
            drafted.append(token)
            feed = [token]
        if not draft_probs:
            return Draft(tokens=drafted)
        probs = torch.stack(draft_probs)
        # A draft head may be padded to a different width than the target's; q must live on p's vocabulary.
        width = context.target.vocab_size
        probs = torch.nn.functional.pad(probs, (0, max(0, width - probs.shape[-1])))[:, :width]
        return Draft(tokens=drafted, probs=probs.to(context.target.device))

    def _forward(self, token_ids: list[int], cancel: threading.Event | None = None) -> torch.Tensor | None:
        """Feeds token_ids into the draft cache; returns the logits after the last one ([V], float32), or None if
        `cancel` was set between two chunks (the cache then holds the chunks fed so far, as _cached_ids says)."""
        for start in range(0, len(token_ids), self.prefill_chunk_tokens):
            if start and cancel is not None and cancel.is_set():
                return None
            chunk = token_ids[start : start + self.prefill_chunk_tokens]
            input_ids = torch.tensor([chunk], dtype=torch.long, device=self.model.device)
            out = self.model(input_ids=input_ids, cache=self._cache, use_cache=True, logits_to_keep=1)
            self._cached_ids.extend(chunk)
        return out.logits[0, -1].float()

    def observe(self, proposed: int, accepted: int) -> None:
        self.length.update(proposed, accepted)

    def release(self) -> None:
        self._cache = None
        self._cached_ids = []

    def remember(self, token_ids: list[int]) -> None:
        pass


def check_same_vocabulary(target: PreTrainedTokenizerBase, draft: PreTrainedTokenizerBase, draft_name: str) -> None:
    """A draft model is only useful (and only correct to verify token by token) if both map text to the same ids."""
    if target.get_vocab() != draft.get_vocab():
        raise InvalidRequestError(
            f"draft model '{draft_name}' uses a different tokenizer from the target "
            f"({len(draft.get_vocab())} vs {len(target.get_vocab())} tokens); "
            "a draft model must share the target's vocabulary exactly"
        )

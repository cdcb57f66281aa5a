"""From accepted token ids to streamed text: incremental detokenization and stop strings.

Several tokens can be accepted in one target pass, so tokens are fed one at a time: a stop string that completes
in the middle of an accepted block ends the text (and the token list) exactly there.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

# Shown by tokenizers for an incomplete UTF-8 sequence: the token(s) that complete the character are still to come.
_INCOMPLETE_CHARACTER = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing list of token ids into text deltas, with no broken characters and no lost spaces.

    Decoding one token alone loses context (SentencePiece drops a leading space; a multi-byte character may span
    tokens), so each step decodes a short window that starts a few tokens back, and emits only what the new tokens
    added (the technique of vLLM / TGI). Cost per token is O(window), not O(text).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # tokens before this have been emitted as text

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes (possibly empty while a character is incomplete)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_INCOMPLETE_CHARACTER):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class StopStringMatcher:
    """Finds stop strings in streamed text and holds back text that might be the start of one.

    Invariant: text handed out never contains a stop string nor any part of one that later completes.
    """

    def __init__(self, stop_strings: tuple[str, ...]):
        self._stops = tuple(s for s in stop_strings if s)
        self._pending = ""  # text received but not yet released

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to release now, whether a stop string was found). After a stop, nothing more comes."""
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            released, self._pending = self._pending[:cut], ""
            return released, True
        hold = self._longest_suffix_that_starts_a_stop()
        released = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(released) :]
        return released, False

    def flush(self) -> str:
        """At the end of generation the held-back text is final."""
        released, self._pending = self._pending, ""
        return released

    def _longest_suffix_that_starts_a_stop(self) -> int:
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if stop.startswith(self._pending[-n:]):
                    longest = n
                    break
        return longest

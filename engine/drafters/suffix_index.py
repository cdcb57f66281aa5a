"""Token indexes for the `suffix` drafter: find where the text's tail occurred before, and what followed it how often.

Both indexes are flat int32 arrays of token ids in which -1 separates documents (and opens and closes the array), so
that a match never runs across two documents and a continuation stops at the end of one:

    [-1, t t t t, -1, t t t, -1]

A lookup is SuffixDecoding's (Oliinyk et al., NeurIPS 2025) walk of a suffix tree, done on the array with numpy:
  1. match: the positions where the longest suffix of the tail (up to MAX_MATCH tokens) occurs, found by comparing
     the last token everywhere and then extending each survivor one token further back;
  2. continue: from the most recent MAX_OCCURRENCES of those positions, follow the most frequent next token, then
     the most frequent among the occurrences that agree so far, and so on. The share of occurrences that agree up to
     token i estimates the chance that the first i drafted tokens are all accepted; the walk stops when it falls
     below MIN_TOKEN_PROBABILITY or after as many tokens as the match is long (a short match earns a short draft).
A lookup costs a few passes over the array (about 0.1 ms per 100k tokens here), small next to a target pass.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

log = logging.getLogger(__name__)

SEPARATOR = -1
MAX_MATCH = 32  # longest tail matched; also bounds a draft's length through the match-length rule
MAX_OCCURRENCES = 64  # most recent occurrences of the matched tail whose continuations are counted
MIN_TOKEN_PROBABILITY = 0.1  # SuffixDecoding's default (vLLM's suffix_decoding_min_token_prob)
MEMORY_FORMAT = "mtp-mcp-suffix-memory-v1"


@dataclass(frozen=True, slots=True)
class Continuation:
    tokens: list[int]
    # confidence[i]: the share of matched occurrences that continue with tokens[: i + 1], non-increasing
    confidence: list[float]
    match_length: int
    source_positions: np.ndarray  # where the agreeing occurrences' continuations start (for least-recently-used)

    @property
    def score(self) -> float:
        """Expected number of accepted tokens (SuffixDecoding's tree score)."""
        return float(sum(self.confidence))


NO_CONTINUATION = Continuation([], [], 0, np.empty(0, dtype=np.int64))


def best_continuation(corpus: np.ndarray, tail: list[int], max_tokens: int, exclude_from: int | None = None
                      ) -> Continuation:
    """The most frequent continuation of the longest suffix of `tail` that occurs in `corpus` (separated as above).
    exclude_from: ignore occurrences that end at or after this index (the tail's own place in the corpus)."""
    if max_tokens <= 0 or not tail:
        return NO_CONTINUATION
    end = len(corpus) - 1 if exclude_from is None else min(exclude_from, len(corpus) - 1)
    # Occurrences of the last token that have at least one token after them in the same document.
    ends = np.flatnonzero(corpus[:end] == tail[-1])
    ends = ends[corpus[ends + 1] != SEPARATOR]
    match_length = 1
    # The array opens with a separator and no token is -1, so extending back never reads before index 0.
    while ends.size and match_length < min(len(tail), MAX_MATCH):
        longer = ends[corpus[ends - match_length] == tail[-1 - match_length]]
        if not longer.size:
            break
        ends, match_length = longer, match_length + 1
    if not ends.size:
        return NO_CONTINUATION
    starts = ends[-MAX_OCCURRENCES:] + 1
    depth = min(max_tokens, match_length)
    window = corpus[np.minimum(starts[:, None] + np.arange(depth), len(corpus) - 1)]
    # A continuation ends at its document's end: mark everything from the first separator on as not a token.
    window[np.cumsum(window == SEPARATOR, axis=1) > 0] = SEPARATOR
    agreeing = np.ones(len(starts), dtype=bool)
    tokens: list[int] = []
    confidence: list[float] = []
    for column in window.T:
        candidates = column[agreeing & (column != SEPARATOR)]
        if not candidates.size:
            break
        values, counts = np.unique(candidates, return_counts=True)
        best = counts.max()
        # Ties go to the most recent occurrence's token.
        tied = values[counts == best]
        token = int(tied[0]) if tied.size == 1 else int(candidates[np.isin(candidates, tied)][-1])
        probability = best / len(starts)
        if probability < MIN_TOKEN_PROBABILITY:
            break
        tokens.append(token)
        confidence.append(float(probability))
        agreeing &= column == token
    return Continuation(tokens, confidence, match_length, starts[agreeing])


class RequestIndex:
    """The current request's tokens (prompt and output so far) as a growing array, searched for its own tail."""

    def __init__(self) -> None:
        self._array = np.full(1024, SEPARATOR, dtype=np.int32)
        self._length = 1  # the leading separator

    def reset(self) -> None:
        self._length = 1

    def extend_to(self, token_ids: list[int]) -> None:
        """Appends what token_ids holds beyond what is indexed (committed tokens only ever grow within a request)."""
        new = token_ids[self._length - 1 :]
        needed = self._length + len(new) + 1  # the closing separator
        if needed > len(self._array):
            grown = np.full(max(needed, 2 * len(self._array)), SEPARATOR, dtype=np.int32)
            grown[: self._length] = self._array[: self._length]
            self._array = grown
        self._array[self._length : self._length + len(new)] = new
        self._length += len(new)
        self._array[self._length] = SEPARATOR

    def continuation(self, tail: list[int], max_tokens: int) -> Continuation:
        # The tail's own last token sits at _length - 1: occurrences must end before it.
        return best_continuation(self._array[: self._length + 1], tail, max_tokens, exclude_from=self._length - 1)


class GlobalIndex:
    """Earlier requests' prompts and outputs, one document each, within a token budget: the least recently used
    documents (added, or last drafted from) go first. A new document that extends or repeats a kept one (a growing
    file, a retry) replaces it, so the budget holds distinct text."""

    def __init__(self, token_budget: int):
        self.token_budget = token_budget
        self._documents: OrderedDict[int, np.ndarray] = OrderedDict()  # least recently used first
        self._next_id = 0
        self._tokens = 0
        self._corpus = np.array([SEPARATOR], dtype=np.int32)
        self._starts = np.empty(0, dtype=np.int64)  # corpus index of each document's first token, in order
        self._ids: list[int] = []

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def documents(self) -> int:
        return len(self._documents)

    def add(self, token_ids: list[int]) -> None:
        if self.token_budget <= 0:  # a memory that keeps nothing
            return
        document = np.asarray(token_ids[-self.token_budget :], dtype=np.int32)
        if not document.size:
            return
        for key, kept in list(self._documents.items()):
            if len(kept) <= len(document) and np.array_equal(kept, document[: len(kept)]):
                self._tokens -= len(kept)
                del self._documents[key]
            elif len(kept) > len(document) and np.array_equal(kept[: len(document)], document):
                self._documents.move_to_end(key)  # already held whole: only refresh it
                self._rebuild()
                return
        self._append([document])

    def _append(self, documents: list[np.ndarray]) -> None:
        """Adds documents as the most recently used, then drops the least recently used beyond the budget."""
        for document in documents:
            self._documents[self._next_id] = document
            self._next_id += 1
            self._tokens += len(document)
        while self._tokens > self.token_budget:
            _, evicted = self._documents.popitem(last=False)
            self._tokens -= len(evicted)
        self._rebuild()

    def continuation(self, tail: list[int], max_tokens: int) -> Continuation:
        found = best_continuation(self._corpus, tail, max_tokens)
        if found.tokens:
            # The documents drafted from are recently used; the corpus order is rebuilt at the next add.
            for index in np.unique(np.searchsorted(self._starts, found.source_positions, side="right") - 1):
                self._documents.move_to_end(self._ids[index])
        return found

    def _rebuild(self) -> None:
        documents = list(self._documents.items())
        self._ids = [key for key, _ in documents]
        lengths = np.array([len(d) for _, d in documents], dtype=np.int64)
        self._starts = 1 + np.concatenate(([0], np.cumsum(lengths + 1)[:-1])) if documents else lengths
        parts = [np.array([SEPARATOR], dtype=np.int32)]
        for _, document in documents:
            parts += [document, np.array([SEPARATOR], dtype=np.int32)]
        self._corpus = np.concatenate(parts)

    # -- memory across restarts ---------------------------------------------------------------------------------

    def save(self, path: Path, key: str) -> None:
        """Writes the documents (least recently used first) atomically, readable by the user alone."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lengths = np.array([len(d) for d in self._documents.values()], dtype=np.int64)
        tokens = np.concatenate(list(self._documents.values())) if self._documents else np.empty(0, np.int32)
        # mkstemp creates the file with mode 0600; the rename keeps it.
        handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(handle)
        try:
            save_file({"tokens": tokens, "lengths": lengths}, scratch, metadata={"format": MEMORY_FORMAT, "key": key})
            os.replace(scratch, path)
        except BaseException:
            Path(scratch).unlink(missing_ok=True)
            raise

    def load(self, path: Path, key: str) -> bool:
        """Reads documents saved by `save` for the same key; a missing file is no memory yet, and a damaged or
        foreign one is ignored with a warning (it is replaced at the next save). Returns whether any were read."""
        if not path.is_file():
            return False
        try:
            # The metadata first: a foreign file's tensors are never read.
            with safe_open(str(path), framework="numpy") as opened:
                metadata = opened.metadata() or {}
            if metadata.get("format") != MEMORY_FORMAT or metadata.get("key") != key:
                log.warning("ignoring the drafter memory %s: it was written for another model, tokenizer or "
                            "version; it will be replaced", path)
                return False
            tensors = load_file(str(path))
            tokens, lengths = tensors["tokens"], tensors["lengths"]
            if (tokens.dtype != np.int32 or lengths.dtype != np.int64 or lengths.sum() != len(tokens)
                    or (lengths <= 0).any() or (tokens < 0).any()):
                raise ValueError("its tensors do not describe documents of token ids")
        except (OSError, SafetensorError, ValueError, KeyError) as error:
            log.warning("ignoring the damaged drafter memory %s (%s); it will be replaced", path, error)
            return False
        # Saved documents are distinct already; the budget may have shrunk since.
        self._append(np.split(tokens, np.cumsum(lengths)[:-1]))
        return True

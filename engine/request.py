"""What a caller asks the engine for, and what it gets back."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

from mtp_mcp.engine.errors import InvalidRequestError
from mtp_mcp.engine.stats import GenerationStats

# The longest output one request may ask for, whatever the model's context; the engine also checks the context.
MAX_NEW_TOKENS_LIMIT = 32768
MAX_STOP_STRINGS = 16

FinishReason = Literal["eos", "stop_string", "length", "cancelled"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens. temperature == 0 means greedy (argmax); top_k == 0 and top_p == 1.0 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0



@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation. Validated on construction: a bad value raises InvalidRequestError with one clear sentence."""

    prompt: str
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # False when the prompt already holds the special tokens (e.g. rendered by a chat template).
    add_special_tokens: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidRequestError("the prompt is empty; give some text to continue")
        _require(
            isinstance(self.max_new_tokens, int) and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT,
            f"max_new_tokens is {self.max_new_tokens!r}; it must be a whole number from 1 to {MAX_NEW_TOKENS_LIMIT}",
        )
        _require(
            _is_number(self.temperature) and 0.0 <= self.temperature <= 100.0,
            f"temperature is {self.temperature!r}; it must be from 0 (greedy) to 100",
        )
        _require(
            _is_number(self.top_p) and 0.0 < self.top_p <= 1.0,
            f"top_p is {self.top_p!r}; it must be greater than 0 and at most 1",
        )
        _require(
            isinstance(self.top_k, int) and self.top_k >= 0,
            f"top_k is {self.top_k!r}; it must be a whole number, 0 meaning no limit",
        )
        _require(
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
            f"seed is {self.seed!r}; it must be a whole number from 0 to 2**63-1, or left out",
        )
        object.__setattr__(self, "stop", tuple(self.stop))
        _require(
            len(self.stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in self.stop),
            f"stop must be at most {MAX_STOP_STRINGS} non-empty strings",
        )

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=float(self.temperature), top_p=float(self.top_p), top_k=self.top_k)


@dataclass(slots=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only (an EOS that ended generation included, as transformers does)
    finish_reason: FinishReason
    stats: GenerationStats = field(default_factory=GenerationStats)

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }


# (new text, tokens generated so far): called as text is accepted, on the thread that runs the generation.
TextCallback = Callable[[str, int], None]


class GenerationHandle:
    """A submitted request: cancel it, or wait for its result."""

    def __init__(self, request: GenerationRequest, on_text: TextCallback | None):
        self.request = request
        self.on_text = on_text
        self.cancelled = threading.Event()
        self.prompt_ids: list[int] = []  # set by the worker once it has encoded the prompt
        self.future: Future[GenerationResult] = Future()

    def cancel(self) -> None:
        """Stops the generation within one engine step (or before it starts); the result has finish_reason
        'cancelled' and holds the text generated so far."""
        self.cancelled.set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        return self.future.result(timeout)


def check_fits_context(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """Raises the one-sentence error for a prompt that, with the tokens asked for, does not fit the context."""
    if prompt_tokens == 0:
        raise InvalidRequestError("the prompt encodes to no tokens; give some text to continue")
    if prompt_tokens >= context:
        raise InvalidRequestError(
            f"the prompt is {prompt_tokens} tokens, beyond the model's context of {context} tokens; shorten it"
        )
    if prompt_tokens + max_new_tokens > context:
        raise InvalidRequestError(
            f"the prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {context} tokens; ask for at most {context - prompt_tokens} new tokens"
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequestError(message)

"""What the MCP tools need of whatever generates the text, so one server fronts either backend:

- the resident engine (engine/engine.py): the model in this process, one request at a time, speculative decoding here;
- an OpenAI-compatible upstream (engine/openai_upstream.py): vLLM or another server that batches many requests and
  may speculate itself.

Both keep totals over their finished requests and refuse requests once closing has begun, the same way: here.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any

from mtp_mcp.engine.request import GenerationHandle, GenerationRequest, GenerationResult, TextCallback
from mtp_mcp.engine.stats import EngineTotals, GenerationStats


class GenerationBackend(ABC):
    # A transformers tokenizer, or one that asks the upstream (engine/upstream_tokenizer.py): prompts are built with
    # its chat template, and it counts tokens for context checks and summary chunks.
    tokenizer: Any
    context_length: int

    def __init__(self) -> None:
        self.totals = EngineTotals()
        self._totals_lock = threading.Lock()
        # Guards _closed against submit: a request taken after closing began would never be answered.
        self._closing_lock = threading.Lock()
        self._closed = False

    @property
    @abstractmethod
    def info(self) -> dict:
        """What is loaded, for the engine://model resource."""

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    @abstractmethod
    def submit(self, request: GenerationRequest, on_text: TextCallback | None = None) -> GenerationHandle:
        """Starts a generation; raises EngineBusyError at once when too many are waiting, EngineClosedError once
        closing has begun. on_text runs on a thread of the backend's own."""

    @abstractmethod
    def close(self) -> None:
        """Finishes or cancels what runs, refuses what comes later."""

    def generate(self, request: GenerationRequest, on_text: TextCallback | None = None) -> GenerationResult:
        return self.submit(request, on_text).result()

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text, add_special_tokens=False))

    def totals_snapshot(self) -> dict:
        """Counts over every finished request, for the engine://stats resource."""
        with self._totals_lock:
            return self.totals.to_dict()

    def _count_finished(self, stats: GenerationStats) -> None:
        with self._totals_lock:
            self.totals.add(stats)

    def _begin_closing(self) -> bool:
        """True for the one caller that begins closing; submit refuses from then on."""
        with self._closing_lock:
            if self._closed:
                return False
            self._closed = True
            return True

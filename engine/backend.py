"""What the MCP tools need of whatever generates the text, so one server fronts either backend:

- the resident engine (engine/engine.py): the model in this process, one request at a time, speculative decoding here;
- an OpenAI-compatible upstream (engine/openai_upstream.py): vLLM or another server that batches many requests and
  may speculate itself.
"""

from __future__ import annotations

from typing import Any, Protocol

from mtp_mcp.engine.request import GenerationHandle, GenerationRequest, GenerationResult, TextCallback


class GenerationBackend(Protocol):
    # A transformers tokenizer, or one that asks the upstream (engine/upstream_tokenizer.py): prompts are built with
    # its chat template, and it counts tokens for context checks and summary chunks.
    tokenizer: Any
    context_length: int

    @property
    def info(self) -> dict:
        """What is loaded, for the engine://model resource."""

    def totals_snapshot(self) -> dict:
        """Counts over every finished request, for the engine://stats resource."""

    def count_tokens(self, text: str) -> int: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def submit(self, request: GenerationRequest, on_text: TextCallback | None = None) -> GenerationHandle:
        """Starts a generation; raises EngineBusyError at once when too many are waiting. on_text runs on a
        thread of the backend's own."""

    def generate(self, request: GenerationRequest, on_text: TextCallback | None = None) -> GenerationResult: ...

    def close(self) -> None:
        """Finishes or cancels what runs, refuses what comes later."""

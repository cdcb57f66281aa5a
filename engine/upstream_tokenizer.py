"""The upstream model's own tokenizer, asked over HTTP, for a server that has no copy of the model's files.

vLLM (and SGLang) serve `/tokenize` and `/detokenize` beside `/v1`. Through them the tools count tokens (context
checks, summary chunks), find fill-in-the-middle tokens, and render chat templates exactly as the upstream model
would: the conversation is tokenized with the upstream's template and the tokens turned back into text, the same
text a local transformers tokenizer's `apply_chat_template(..., tokenize=False)` gives.

It offers the part of the transformers tokenizer interface that the tools use (`__call__`, `chat_template`,
`apply_chat_template`, `decode`). Calls block the calling thread; the tools make them from worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import httpx2

from mtp_mcp.engine.errors import EngineError, InvalidRequestError, ModelLoadError
from mtp_mcp.engine.upstream_http import upstream_failure

# Renders a chat only when the upstream model has a template; a base model's upstream answers 400.
_PROBE_CHAT = [{"role": "user", "content": "Hello"}]


class UpstreamTokenizer:
    def __init__(self, client: httpx2.Client, model: str, where: str, timeout_s: float):
        """client: a client whose base URL is the upstream's root (where /tokenize is) and that sends the key."""
        self._client = client
        self._model = model
        self._where = where
        self._timeout_s = timeout_s
        self._lock = threading.Lock()  # one client, used from any thread: keep its calls in order
        # Truthy when the upstream model renders chats (probe() finds out); the tools read it like a transformers
        # tokenizer's `chat_template` attribute.
        self.chat_template: str | None = None

    def probe(self) -> int:
        """Checks that the upstream tokenizes, learns whether it has a chat template, and returns its context length
        (vLLM's /tokenize reports `max_model_len`)."""
        try:
            answer = self._post("/tokenize", {"model": self._model, "prompt": "Hello"})
        except EngineError as error:
            raise ModelLoadError(
                f"the upstream at {self._where} does not tokenize text through /tokenize ({error}); vLLM and SGLang "
                "do, for other servers give --tokenizer with a folder holding the upstream model's tokenizer files"
            ) from None
        try:
            self._post("/tokenize", {"model": self._model, "messages": _PROBE_CHAT})
            self.chat_template = "the upstream model's"
        except InvalidRequestError:
            self.chat_template = None  # a base model: the tools write a plain transcript instead
        return int(answer.get("max_model_len") or 0)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        answer = self._post("/tokenize", {"model": self._model, "prompt": text,
                                          "add_special_tokens": add_special_tokens})
        return {"input_ids": _token_ids(answer, self._where)}

    def apply_chat_template(self, messages: Sequence[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            continue_final_message: bool = False) -> str | list[int]:
        answer = self._post("/tokenize", {"model": self._model, "messages": list(messages),
                                          "add_generation_prompt": add_generation_prompt,
                                          "continue_final_message": continue_final_message})
        ids = _token_ids(answer, self._where)
        return ids if tokenize else self.decode(ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        answer = self._post("/detokenize", {"model": self._model, "tokens": list(token_ids)})
        if not isinstance(answer.get("prompt"), str):
            raise EngineError(f"the upstream at {self._where} answered /detokenize without the text")
        return answer["prompt"]

    def _post(self, path: str, body: dict) -> dict:
        try:
            with self._lock:
                response = self._client.post(path, json=body)
            response.raise_for_status()
            answer = response.json()
        except (httpx2.HTTPError, ValueError) as error:
            raise upstream_failure(error, self._where, self._timeout_s) from None
        if not isinstance(answer, dict):
            raise EngineError(f"the upstream at {self._where} answered {path} with something other than an object")
        return answer


def _token_ids(answer: dict, where: str) -> list[int]:
    tokens = answer.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise EngineError(f"the upstream at {where} answered /tokenize without a list of token ids")
    return tokens

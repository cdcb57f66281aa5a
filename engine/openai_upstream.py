"""An OpenAI-compatible completions server as the backend behind the MCP tools: vLLM first (continuous batching,
CUDA graphs, tensor and pipeline parallelism, MTP under load); SGLang, llama.cpp's llama-server and Ollama speak the
same API.

    tool -> GenerationRequest -> submit() -> POST /v1/completions (stream) -> chunks -> on_text -> result

The tools build prompts exactly as for the local engine (chat template, FIM framing, stop strings) with the
upstream model's tokenizer: a local copy (--tokenizer PATH) or the upstream's own /tokenize
(engine/upstream_tokenizer.py). Unlike the resident engine, requests do not wait in a queue here: up to
max_queued_requests run at once upstream, where they are batched; beyond that, submit() says busy at once.

Requests run as tasks on one event loop in a thread of this object's own. Cancelling a request closes its stream,
and vLLM aborts a request whose client has gone. Speculation statistics come from vLLM's /metrics counters
(engine/upstream_metrics.py): exact when the request ran alone, marked approximate when others overlapped it, and
"not reported" when the upstream has no such counters.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import httpx2
from pydantic import BaseModel, ValidationError

from mtp_mcp.engine.backend import GenerationBackend
from mtp_mcp.engine.errors import EngineBusyError, EngineClosedError, EngineError, ModelLoadError
from mtp_mcp.engine.options import UpstreamOptions, check_upstream_options, redacted
from mtp_mcp.engine.request import (
    FinishReason,
    GenerationHandle,
    GenerationRequest,
    GenerationResult,
    TextCallback,
    check_fits_context,
)
from mtp_mcp.engine.stats import GenerationStats
from mtp_mcp.engine.upstream_http import one_line, server_root, upstream_failure
from mtp_mcp.engine.upstream_metrics import SpeculationCounters, parse_speculation_counters
from mtp_mcp.engine.upstream_tokenizer import UpstreamTokenizer

log = logging.getLogger(__name__)
# httpx2 logs every request at INFO: a line per call that says nothing a tool result does not.
logging.getLogger("httpx2").setLevel(logging.WARNING)

# A server started beside its upstream may come up first: vLLM takes minutes to load a large model. Until the
# upstream answers (or this long has passed), the load waits and tool calls hear that it is waiting.
UPSTREAM_START_WAIT_S = 900.0
START_POLL_INTERVAL_S = 1.0
START_LOG_INTERVAL_S = 30.0
CONNECT_TIMEOUT_S = 10.0
# Used only for the tools' own checks when the upstream states no context length (the upstream still enforces its).
ASSUMED_CONTEXT_LENGTH = 4096


class _Choice(BaseModel):
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token that ended it; None for EOS


class _Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Chunk(BaseModel):
    """One streamed completion chunk: what this backend reads of it (other fields are ignored)."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict | None = None  # vLLM reports a failure after the stream has begun as an event of its own


class UpstreamHandle(GenerationHandle):
    """A request running upstream: cancelling it also cancels its task, which closes the stream at once."""

    def __init__(self, request: GenerationRequest, on_text: TextCallback | None, loop: asyncio.AbstractEventLoop):
        super().__init__(request, on_text)
        self._loop = loop
        self.task: asyncio.Task | None = None  # set on the loop

    def cancel(self) -> None:
        super().cancel()
        self._loop.call_soon_threadsafe(self._cancel_task)

    def _cancel_task(self) -> None:
        if self.task is not None:
            self.task.cancel()


class UpstreamBackend(GenerationBackend):
    def __init__(self, options: UpstreamOptions, *, transport: httpx2.AsyncBaseTransport | None = None,
                 sync_transport: httpx2.BaseTransport | None = None):
        """Connects nothing yet; load() asks the upstream what it serves. The transports are for tests."""
        super().__init__()
        self.options = options
        self.where = redacted(options.base_url)
        headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        timeout = httpx2.Timeout(options.timeout_s, connect=min(CONNECT_TIMEOUT_S, options.timeout_s))
        root = server_root(options.base_url)
        self._api = httpx2.AsyncClient(base_url=options.base_url.rstrip("/") + "/", headers=headers, timeout=timeout,
                                       transport=transport)
        self._root = httpx2.AsyncClient(base_url=root + "/", headers=headers, timeout=timeout, transport=transport)
        self._sync_root = httpx2.Client(base_url=root + "/", headers=headers, timeout=timeout,
                                        transport=sync_transport)
        self.model = options.model or ""
        self.tokenizer = None
        self.context_length = 0  # set by load(): the upstream's, else ASSUMED_CONTEXT_LENGTH
        self.reports_speculation = False
        self.upstream_version = ""
        self._running: dict[UpstreamHandle, bool] = {}  # on the loop: running request -> whether another overlapped
        self._slots = threading.BoundedSemaphore(options.max_queued_requests)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mtp-upstream", daemon=True)
        self._thread.start()

    @classmethod
    def load(cls, options: UpstreamOptions, start_wait_s: float = UPSTREAM_START_WAIT_S,
             **transports) -> UpstreamBackend:
        check_upstream_options(options)
        backend = cls(options, **transports)
        try:
            backend._call(backend._discover(start_wait_s))
            backend._load_tokenizer()
        except BaseException:
            backend.close()
            raise
        log.info("upstream ready: %s at %s (context %d tokens, tokenizer %s, speculation %s)", backend.model,
                 backend.where, backend.context_length, backend.tokenizer_source,
                 "reported" if backend.reports_speculation else "not reported")
        return backend

    @property
    def drafter_name(self) -> str:
        if self.reports_speculation:
            version = f" {self.upstream_version}" if self.upstream_version else ""
            return f"upstream: vLLM{version} speculative decoding"
        return "upstream (speculation not reported)"

    @property
    def tokenizer_source(self) -> str:
        return f"local {self.options.tokenizer}" if self.options.tokenizer else "the upstream's /tokenize"

    @property
    def info(self) -> dict:
        return {
            "backend": "openai",
            "upstream": self.where,
            "model": self.model,
            "upstream_version": self.upstream_version or None,
            "context_length": self.context_length,
            "tokenizer": self.tokenizer_source,
            "drafter": self.drafter_name,
            "speculation": "reported by the upstream (vLLM /metrics)" if self.reports_speculation
            else "not reported by the upstream",
            "has_chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
            "max_concurrent_requests": self.options.max_queued_requests,
        }

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def submit(self, request: GenerationRequest, on_text: TextCallback | None = None) -> GenerationHandle:
        with self._closing_lock:
            if self._closed:
                raise EngineClosedError("the server is shutting down and takes no more requests")
            if not self._slots.acquire(blocking=False):
                raise EngineBusyError(f"the upstream already runs {self.options.max_queued_requests} requests from "
                                      "this server; try again shortly")
            handle = UpstreamHandle(request, on_text, self._loop)
            self._loop.call_soon_threadsafe(self._start, handle)
        return handle

    def close(self) -> None:
        """Cancels the requests that run (their streams close, so the upstream stops them) and stops the loop."""
        if not self._begin_closing():
            return
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shut_down(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._sync_root.close()

    # --- on the loop --------------------------------------------------------------------------------------------

    def _call(self, coroutine):
        """Runs a coroutine on the loop and waits for it (from another thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    async def _discover(self, start_wait_s: float) -> None:
        """Which model the upstream serves, its context length, its version, and whether it reports speculation.
        Waits up to start_wait_s for an upstream that is not up yet (refuses connections, or answers 503)."""
        deadline = time.monotonic() + start_wait_s
        next_log = time.monotonic()
        while True:
            try:
                response = await self._api.get("models")
                response.raise_for_status()
                served = [entry for entry in response.json().get("data", []) if isinstance(entry, dict)]
                break
            except (httpx2.HTTPError, ValueError, AttributeError) as error:
                failure = upstream_failure(error, self.where, self.options.timeout_s)
                not_up = isinstance(error, httpx2.ConnectError) or (
                    isinstance(error, httpx2.HTTPStatusError) and error.response.status_code in (502, 503, 504))
                if not not_up or time.monotonic() >= deadline:
                    raise ModelLoadError(f"the upstream's model list could not be read: {failure}") from None
                if time.monotonic() >= next_log:
                    log.info("waiting for the upstream at %s to answer: %s", self.where, failure)
                    next_log = time.monotonic() + START_LOG_INTERVAL_S
                await asyncio.sleep(START_POLL_INTERVAL_S)
        names = [str(entry.get("id")) for entry in served]
        if not names:
            raise ModelLoadError(f"the upstream at {self.where} serves no model")
        if not self.model:
            if len(names) > 1:
                raise ModelLoadError(f"the upstream at {self.where} serves {len(names)} models ({', '.join(names)}); "
                                     "choose one with --upstream-model")
            self.model = names[0]
        elif self.model not in names:
            raise ModelLoadError(f"the upstream at {self.where} does not serve {self.model!r}; it serves: "
                                 f"{', '.join(names)}")
        entry = served[names.index(self.model)]
        if isinstance(entry.get("max_model_len"), int):
            self.context_length = entry["max_model_len"]
        self.upstream_version = await self._version()
        self.reports_speculation = await self._speculation_counters() is not None

    async def _version(self) -> str:
        try:
            response = await self._root.get("version")
            response.raise_for_status()
            return str(response.json().get("version", ""))
        except (httpx2.HTTPError, ValueError, AttributeError):
            return ""

    async def _speculation_counters(self) -> SpeculationCounters | None:
        """vLLM's counters now, or None when the upstream has none (or /metrics fails: statistics never fail a call)."""
        try:
            response = await self._root.get("metrics")
            response.raise_for_status()
            return parse_speculation_counters(response.text, self.model)
        except (httpx2.HTTPError, ValueError) as error:
            log.debug("reading the upstream's /metrics failed: %s", error)
            return None

    def _start(self, handle: UpstreamHandle) -> None:
        for other in self._running:  # statistics of overlapping requests are shares of shared counters
            self._running[other] = True
        self._running[handle] = bool(self._running)
        handle.task = self._loop.create_task(self._run(handle))

    async def _run(self, handle: UpstreamHandle) -> None:
        try:
            outcome: GenerationResult | EngineError = await self._generate(handle)
        except EngineError as error:
            outcome = error
        except asyncio.CancelledError:  # cancelled after its stream had ended, while the statistics were read
            outcome = GenerationResult("", [], "cancelled", GenerationStats(drafter=self.drafter_name))
        except Exception as error:  # a failed request must never take the backend down
            log.exception("the upstream request failed")
            outcome = EngineError(f"the upstream request failed inside this server ({type(error).__name__}: {error})")
        finally:
            self._running.pop(handle, None)
            self._slots.release()
        if isinstance(outcome, EngineError):
            handle.future.set_exception(outcome)
        else:
            self._count_finished(outcome.stats)
            handle.future.set_result(outcome)

    async def _generate(self, handle: UpstreamHandle) -> GenerationResult:
        request = handle.request
        stats = GenerationStats(drafter=self.drafter_name)
        started = time.perf_counter()
        parts: list[str] = []
        finish: FinishReason | None = None
        counters_before = None
        try:
            if handle.cancelled.is_set():
                raise asyncio.CancelledError
            prompt_ids = await asyncio.to_thread(self.encode, request.prompt, request.add_special_tokens)
            check_fits_context(len(prompt_ids), request.max_new_tokens, self.context_length)
            handle.prompt_ids = prompt_ids
            stats.prompt_tokens = len(prompt_ids)
            if self.reports_speculation:
                counters_before = await self._speculation_counters()
            async with self._api.stream("POST", "completions", json=self.completion_body(request)) as response:
                if response.is_error:
                    await response.aread()
                    response.raise_for_status()
                async for event in httpx2.EventSource(response):
                    if event.data.strip() == "[DONE]":
                        break
                    chunk = _Chunk.model_validate_json(event.data)
                    if chunk.error is not None:
                        raise EngineError(f"the upstream at {self.where} failed mid-generation: "
                                          f"{one_line(str(chunk.error.get('message', chunk.error)))}")
                    if chunk.usage is not None:
                        stats.prompt_tokens = chunk.usage.prompt_tokens or stats.prompt_tokens
                        stats.new_tokens = chunk.usage.completion_tokens
                    for choice in chunk.choices:
                        if choice.text:
                            if chunk.usage is None:  # no per-chunk counts: a chunk is about one token
                                stats.new_tokens += 1
                            if not parts:
                                stats.time_to_first_token_s = time.perf_counter() - started
                            parts.append(choice.text)
                            if handle.on_text is not None:
                                handle.on_text(choice.text, stats.new_tokens)
                        if choice.finish_reason is not None:
                            finish = _finish_reason(choice)
            if finish is None:
                raise EngineError(f"the upstream at {self.where} ended its stream before the generation finished")
        except asyncio.CancelledError:
            finish = "cancelled"  # leaving the `async with` closed the stream: the upstream aborts the request
        except EngineError:
            raise  # already one sentence (InvalidRequestError is a ValueError too)
        except (httpx2.HTTPError, ValidationError, ValueError) as error:
            raise upstream_failure(error, self.where, self.options.timeout_s) from None
        stats.total_time_s = time.perf_counter() - started
        await self._add_speculation(stats, counters_before, overlapped=self._running.get(handle, True))
        return GenerationResult(text="".join(parts), token_ids=[], finish_reason=finish, stats=stats)

    def completion_body(self, request: GenerationRequest) -> dict:
        """The /v1/completions body for `request`, streamed."""
        body = {
            "model": self.model,
            "prompt": request.prompt,
            "max_tokens": request.max_new_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stream": True,
            # vLLM: token counts in every chunk, so progress counts tokens, not chunks.
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            # As the local engine does, special tokens come back as text: a FIM end marker such as <|file_separator|>
            # must reach the stop strings that end the infill (vLLM and SGLang skip them by default).
            "skip_special_tokens": False,
        }
        if request.top_k:
            body["top_k"] = request.top_k
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        if not request.add_special_tokens:  # a rendered chat template holds its own <bos>
            body["add_special_tokens"] = False
        return body

    async def _add_speculation(self, stats: GenerationStats, before: SpeculationCounters | None,
                               overlapped: bool) -> None:
        """The call's share of the upstream's counters; before is None when there were none to read."""
        after = None if before is None else await self._speculation_counters()
        if after is None:
            stats.target_passes = stats.new_tokens  # not reported: the counts say nothing about speculation
            stats.speculation_counts = "not_reported"
            return
        share = after.since(before)
        stats.draft_tokens_proposed = share.draft_tokens
        stats.draft_tokens_accepted = min(share.accepted_tokens, stats.new_tokens)
        # Every pass yields one token of the target's own plus the accepted drafts (the prefill's pass included).
        stats.target_passes = max(stats.new_tokens - stats.draft_tokens_accepted, 1 if stats.new_tokens else 0)
        stats.steps_without_draft = max(stats.target_passes - share.drafts, 0)
        stats.speculation_counts = "upstream_approximate" if overlapped else "upstream"

    async def _shut_down(self) -> None:
        for handle in list(self._running):
            handle.cancel()
        pending = [handle.task for handle in self._running if handle.task is not None]
        if pending:
            await asyncio.wait(pending, timeout=5)
        await self._api.aclose()
        await self._root.aclose()

    def _load_tokenizer(self) -> None:
        """The tokenizer from --tokenizer, else the upstream's; the context length from the upstream when it says."""
        if self.options.tokenizer:
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(Path(self.options.tokenizer).expanduser(),
                                                               local_files_only=True)
            except (OSError, ValueError) as error:
                raise ModelLoadError(f"the tokenizer in {self.options.tokenizer} could not be loaded: "
                                     f"{one_line(str(error))}") from None
        else:
            self.tokenizer = UpstreamTokenizer(self._sync_root, self.model, self.where, self.options.timeout_s)
            stated = self.tokenizer.probe()  # also learns whether the upstream model has a chat template
            self.context_length = self.context_length or stated
        if not self.context_length:
            self.context_length = ASSUMED_CONTEXT_LENGTH
            log.warning("the upstream states no context length; assuming %d tokens for the tools' own checks",
                        ASSUMED_CONTEXT_LENGTH)


def _finish_reason(choice: _Choice) -> FinishReason:
    if choice.finish_reason == "length":
        return "length"
    if choice.finish_reason == "abort":
        raise EngineError("the upstream aborted the generation")
    # "stop": vLLM names the stop string that ended it; an EOS (or a stop token id) leaves no string.
    return "stop_string" if isinstance(choice.stop_reason, str) else "eos"

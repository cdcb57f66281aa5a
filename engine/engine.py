"""The resident engine: holds the models, owns the device through one worker thread, serves requests FIFO.

Callers on any thread or event loop `submit` a request and get a handle (cancel, wait for the result, receive text
as it is accepted through a callback run on the worker thread). The queue is bounded: when it is full, `submit`
fails at once with EngineBusyError instead of making the caller wait without end. A request that fails is
reported to its caller alone; the worker goes on with the next one.
"""

from __future__ import annotations

import logging
import queue
import threading

import torch

from mtp_mcp.engine.backend import GenerationBackend
from mtp_mcp.engine.cpu_kernels import cpu_kernels_in_use, use_cpu_kernels
from mtp_mcp.engine.decode import generate
from mtp_mcp.engine.draft_payoff import VerifyCostCurve
from mtp_mcp.engine.drafters import create_drafter
from mtp_mcp.engine.drafters.base import Drafter
from mtp_mcp.engine.drafters.suffix import MEMORY_DIR
from mtp_mcp.engine.errors import EngineBusyError, EngineClosedError, EngineError
from mtp_mcp.engine.loading import LoadedModel, cache_root, load_model
from mtp_mcp.engine.memory import release_freed_memory
from mtp_mcp.engine.options import DEFAULT_MAX_QUEUED_REQUESTS, EngineOptions, check_options
from mtp_mcp.engine.quantized import is_quantized
from mtp_mcp.engine.request import (
    GenerationHandle,
    GenerationRequest,
    GenerationResult,
    TextCallback,
    check_fits_context,
)
from mtp_mcp.engine.stats import GenerationStats
from mtp_mcp.engine.target import TargetModel

log = logging.getLogger(__name__)

# The prefix cache keeps recent requests' target caches within this many bytes, least recently used dropped first
# (the lean Gemma 3 270M cache: 36 KB per token, reserved 1,024 tokens at a time; a large model's long context is
# dropped instead).
PREFIX_CACHE_MAX_BYTES = 1 << 30

class Engine(GenerationBackend):
    def __init__(
        self, loaded: LoadedModel, drafter: Drafter, max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS,
        prefix_cache: bool = True, draft_when_it_pays: bool = True,
    ):
        super().__init__()
        self.loaded = loaded
        self.drafter = drafter
        self.prefix_cache = prefix_cache
        # The measured cost of a target pass per number of positions, learned across requests by the decode loop;
        # None verifies every drafted token (--always-draft).
        self.verify_cost = VerifyCostCurve() if draft_when_it_pays else None
        self._target = TargetModel(loaded.model)
        self._target.check_output_path()
        self._eos_ids = _eos_ids(loaded)
        self._tokenizer_lock = threading.Lock()  # fast tokenizers must not encode from two threads at once
        self._queue: queue.Queue[GenerationHandle | None] = queue.Queue(maxsize=max_queued_requests)
        self._worker = threading.Thread(target=self._serve, name="mtp-engine", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, options: EngineOptions) -> Engine:
        check_options(options)
        loaded = load_model(options.model, device=options.device, dtype=options.dtype, quantize=options.quantize)
        # CPU speed-up (engine/cpu_kernels.py): a prepacked copy of the output layer makes verifying several drafted
        # positions cost about as much as one; a no-op unless the model is float32 on CPU. Done before the drafter
        # is built, so drafters that share the target's output layer get it too.
        use_cpu_kernels(loaded.model)
        memory_dir = cache_root() / MEMORY_DIR if options.drafter_memory else None
        drafter = create_drafter(options.drafter, loaded, options.draft_model, options.num_draft_tokens, memory_dir)
        engine = cls(loaded, drafter, options.max_queued_requests, options.prefix_cache, options.draft_when_it_pays)
        # Loading and packing freed large temporaries; give them back before the engine serves (engine/memory.py).
        release_freed_memory()
        log.info("engine ready: %s on %s (%s), drafter %s", loaded.name, loaded.device, loaded.dtype, drafter.name)
        return engine

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def context_length(self) -> int:
        return self.loaded.context_length

    @property
    def info(self) -> dict:
        return {
            "backend": "local",
            "model": self.loaded.name,
            "path": self.loaded.path,
            "device": str(self.loaded.device),
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "weights": self.loaded.quantization,
            "context_length": self.loaded.context_length,
            "drafter": self.drafter.name,
            "prefix_cache": self.prefix_cache,
            "draft_when_it_pays": self.verify_cost is not None,
            "has_chat_template": bool(getattr(self.loaded.tokenizer, "chat_template", None)),
            "cpu_kernels": cpu_kernels_in_use(self.loaded.model),
        }

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._tokenizer_lock:
            return self.loaded.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def submit(self, request: GenerationRequest, on_text: TextCallback | None = None) -> GenerationHandle:
        handle = GenerationHandle(request, on_text)
        with self._closing_lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down and takes no more requests")
            try:
                self._queue.put_nowait(handle)
            except queue.Full:
                raise EngineBusyError(
                    f"the engine is busy: {self._queue.maxsize} requests are already waiting; try again shortly"
                ) from None
        return handle

    def close(self) -> None:
        """Finishes the request in progress, cancels those still queued, and stops the worker."""
        if not self._begin_closing():
            return
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None:
                pending.future.set_exception(EngineClosedError("the engine was shut down before this request ran"))
        self._queue.put(None)
        self._worker.join()

    def _serve(self) -> None:
        if is_quantized(self.loaded.model):
            # The native kernels run on threads of their own (engine/native/pool.c, as many as torch had at load);
            # torch's threads, spinning after each of the few torch operations left, would take their cores. Set
            # here, torch's count applies to this thread alone.
            torch.set_num_threads(1)
        while (handle := self._queue.get()) is not None:
            if not handle.future.set_running_or_notify_cancel():
                continue
            try:
                outcome: GenerationResult | EngineError = self._run(handle)
            except EngineError as error:
                outcome = error
            except Exception as error:  # a failed request must never take the engine down
                log.exception("generation failed")
                if isinstance(error, torch.OutOfMemoryError):
                    message = "the device ran out of memory; try a shorter prompt or fewer new tokens"
                else:
                    message = f"generation failed inside the engine ({type(error).__name__}: {error})"
                outcome = EngineError(message)
            # Caches are freed before the caller hears back, so a result never arrives with the memory still held;
            # the prefix cache keeps the target's after a request that ended normally, within its budget.
            if self.prefix_cache and not isinstance(outcome, EngineError):
                self._target.trim_kept(PREFIX_CACHE_MAX_BYTES)
            else:
                self._target.release()
            self.drafter.release()
            if isinstance(outcome, EngineError):
                handle.future.set_exception(outcome)
                continue
            handle.future.set_result(outcome)
            # After the caller has its answer: a drafter with a memory learns the request (and may save it).
            if handle.prompt_ids:
                self.drafter.remember([*handle.prompt_ids, *outcome.token_ids])

    def _run(self, handle: GenerationHandle) -> GenerationResult:
        request = handle.request
        if handle.cancelled.is_set():
            return GenerationResult(text="", token_ids=[], finish_reason="cancelled", stats=GenerationStats())
        prompt_ids = self.encode(request.prompt, request.add_special_tokens)
        handle.prompt_ids = prompt_ids
        context = self.loaded.context_length
        check_fits_context(len(prompt_ids), request.max_new_tokens, context)
        result = generate(
            self._target,
            self.drafter,
            self.loaded.tokenizer,
            request,
            prompt_ids,
            self._eos_ids,
            context,
            cancel=handle.cancelled,
            on_text=handle.on_text,
            reuse_prefix=self.prefix_cache,
            verify_cost=self.verify_cost,
        )
        self._count_finished(result.stats)
        return result


def _eos_ids(loaded: LoadedModel) -> frozenset[int]:
    """Every id that ends a sequence: the generation config's (possibly a list) and the tokenizer's."""
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(loaded.tokenizer.eos_token_id)
    return frozenset(i for i in ids if i is not None)

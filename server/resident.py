"""The server's one engine: loaded in the background when the server starts, shared by every client, closed at
shutdown.

Loading takes seconds (more than a minute the first time a GGUF is described), longer than hosts wait for a server
to start, so the server answers at once (tool lists, resources) while a thread loads the model; tool calls wait for
it. A load failure is logged and every tool call then reports it: the server stays up to say what is wrong.

The loading thread starts once the host has the tool list (or LOAD_START_DELAY_S after start, or at the first call
that needs the model, whichever comes first). Importing torch and transformers holds Python's GIL and import locks
for seconds, and a host's `tools/list` answered meanwhile took 1.3-1.9 s instead of 0.3 s.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Literal

import anyio

from mtp_mcp.engine.errors import EngineError, ModelLoadError
from mtp_mcp.engine.request import GenerationRequest
from mtp_mcp.server.prompts import FimStyle, detect_fim_style

if TYPE_CHECKING:
    from mtp_mcp.engine.backend import GenerationBackend

log = logging.getLogger(__name__)

# A few tokens through the whole path (prefill, drafting, verification, detokenization) before the first real call,
# so it does not pay for first-use allocations.
WARM_UP_REQUEST = GenerationRequest("Hello", max_new_tokens=4)
LOADING_REPORT_INTERVAL_S = 2.0
LOAD_START_DELAY_S = 2.0


class LoadedEngine:
    """An engine that is ready, with what the tools need to know about its tokenizer, computed once."""

    def __init__(self, engine: GenerationBackend):
        self.engine = engine
        self.fim_style: FimStyle | None = detect_fim_style(lambda text: engine.encode(text, add_special_tokens=False))


class ResidentEngine:
    def __init__(self, source: GenerationBackend | Callable[[], GenerationBackend]):
        """source: a ready engine (the caller keeps ownership and closes it), or a function that loads one (called
        once, in a background thread; the engine it returns is warmed up here and closed by close())."""
        self._source = source
        self._owned = callable(source)  # a backend is not callable; a loader is
        self._loaded: Future[LoadedEngine] = Future()
        # Running from the start: a cancelled waiter must never cancel the shared load.
        self._loaded.set_running_or_notify_cancel()
        self._load_started = False  # read and set on the event loop only
        self.started_at = time.time()

    def start(self) -> None:
        """Begins loading now; see start_loading_after for a server that has just started."""
        if not self._owned:
            if not self._loaded.done():
                self._loaded.set_result(LoadedEngine(self._source))
            return
        if not self._load_started:
            self._load_started = True
            threading.Thread(target=self._load, name="mtp-load", daemon=True).start()

    async def start_loading_after(self, tools_listed: asyncio.Event) -> None:
        """Starts loading once `tools_listed` is set (the host has the tool list) or after LOAD_START_DELAY_S; a ready
        engine is ready at once."""
        if not self._owned:
            self.start()
            return
        try:
            await asyncio.wait_for(tools_listed.wait(), LOAD_START_DELAY_S)
            await asyncio.sleep(0.05)  # the tool list is being written out: let it go first
        except TimeoutError:
            pass
        self.start()

    @property
    def state(self) -> Literal["loading", "ready", "failed"]:
        if not self._loaded.done():
            return "loading"
        return "failed" if self._loaded.exception() is not None else "ready"

    @property
    def load_error(self) -> str | None:
        return str(self._loaded.exception()) if self.state == "failed" else None

    def ready(self) -> LoadedEngine | None:
        """The engine if it is ready now, without waiting."""
        return self._loaded.result() if self.state == "ready" else None

    async def get(self, while_loading: Callable[[float], Awaitable[None]] | None = None) -> LoadedEngine:
        """Waits for the engine (without blocking the event loop); raises ModelLoadError if it could not be loaded.
        while_loading(seconds since the load started) is awaited every LOADING_REPORT_INTERVAL_S while it loads:
        a call that waits minutes in silence makes many hosts give up (a 60 s timeout is common)."""
        self.start()
        loaded = asyncio.wrap_future(self._loaded)
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(loaded), LOADING_REPORT_INTERVAL_S)
            except TimeoutError:
                if while_loading is not None:
                    await while_loading(time.time() - self.started_at)

    async def close(self) -> None:
        """Closes an engine this object loaded: the request in progress finishes, queued ones are refused."""
        if not self._owned:
            return
        if not self._loaded.done():
            log.warning("shutting down while the model is still loading")
            return
        if (loaded := self.ready()) is not None:
            await anyio.to_thread.run_sync(loaded.engine.close)

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            engine = self._source()
        except Exception as error:
            if not isinstance(error, EngineError):
                log.exception("loading the model failed")
            message = f"the model could not be loaded: {error}"
            log.error("%s; tool calls will report this", message)
            self._loaded.set_exception(ModelLoadError(message))
            return
        try:
            engine.generate(WARM_UP_REQUEST)
        except EngineError as error:
            # The engine itself is up; the first real call will show whether it works.
            log.warning("the warm-up generation failed: %s", error)
        log.info("model ready in %.1f s", time.perf_counter() - started)
        self._loaded.set_result(LoadedEngine(engine))

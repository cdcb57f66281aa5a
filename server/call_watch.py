"""Over HTTP, a running tool call is stopped when its client goes away or the server begins to shut down, so that
its generation stops within one engine step.

On stdio the MCP session ends with the host's pipe and cancels its calls itself. Over streamable HTTP a call's
result travels on the response stream of its POST. When the client disconnects, that stream ends but the call goes
on (with the 2025 handshake protocol, which hosts speak, nothing else tells it), and its progress notifications are
dropped without an error; the ASGI server reports the disconnect on the request's receive channel, which is watched
here.

At shutdown, sse-starlette would end every open stream at once, calls in flight included, whose clients then got "SSE
stream ended without a response". Its automatic drain is turned off (`mtp-mcp serve --transport http`) and done here
in order instead: running calls end with an error their clients receive, then the remaining streams are closed.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastmcp.exceptions import ToolError
from fastmcp.server.dependencies import get_http_request
from sse_starlette.sse import AppStatus

log = logging.getLogger(__name__)

# How often a running call checks on its client and the server: the engine keeps generating for at most this long
# after either goes.
WATCH_INTERVAL_S = 0.25
# At shutdown: how long running calls get to send their error before the remaining streams are closed anyway.
SHUTDOWN_DRAIN_S = 2.0


class CallWatch:
    """Owns the count of running HTTP calls and whether the server is shutting down."""

    def __init__(self):
        self.shutting_down = False
        self._running = 0

    @asynccontextmanager
    async def stopped_when_client_leaves_or_server_stops(self) -> AsyncIterator[None]:
        """Runs the body; over HTTP, cancels it and raises a ToolError once the client has disconnected or the
        server is shutting down."""
        try:
            request = get_http_request()
        except RuntimeError:  # stdio, or an in-process client: no HTTP request to watch
            yield
            return
        reason = None
        self._running += 1
        try:
            async with anyio.create_task_group() as watch_group:

                async def watch() -> None:
                    nonlocal reason
                    while reason is None:
                        await anyio.sleep(WATCH_INTERVAL_S)
                        if await request.is_disconnected():
                            reason = "the client disconnected before the result was ready"
                        elif self.shutting_down:
                            reason = "the server is shutting down; try again when it is back"
                    log.info("stopping a running call: %s", reason)
                    watch_group.cancel_scope.cancel()

                watch_group.start_soon(watch)
                try:
                    yield
                finally:
                    watch_group.cancel_scope.cancel()  # the body ended (or failed): stop watching
        finally:
            self._running -= 1
        if reason is not None:
            raise ToolError(reason)

    async def drain_at_shutdown(self) -> None:
        """Runs for the server's lifetime. Once uvicorn begins to shut down: stops the running calls, waits (at most
        SHUTDOWN_DRAIN_S) for their errors to go out, then lets sse-starlette close the streams still open."""
        while not _uvicorn_is_shutting_down():
            await anyio.sleep(0.1)
        self.shutting_down = True
        with anyio.move_on_after(SHUTDOWN_DRAIN_S):
            while self._running:
                await anyio.sleep(0.05)
        AppStatus.should_exit = True


def _uvicorn_is_shutting_down() -> bool:
    """uvicorn's should_exit, found through the signal handler it installs (its Server is not reachable otherwise;
    sse-starlette finds it the same way). False on stdio, where uvicorn does not run."""
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(getattr(server, "should_exit", False))

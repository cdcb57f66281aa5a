"""A tool call over HTTP whose client went away is cancelled, so that its generation stops within one engine step
and the next caller does not wait for text nobody will read.

On stdio the MCP session ends with the host's pipe and cancels its calls itself. Over streamable HTTP a call's
result travels on the response stream of its POST; when the client disconnects, that stream ends but the call goes
on, and its progress notifications are dropped without an error. The ASGI server reports the disconnect on the
request's receive channel, which is what is watched here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastmcp.exceptions import ToolError
from fastmcp.server.dependencies import get_http_request

log = logging.getLogger(__name__)

# How often a running call checks that its client is still there: the engine keeps generating for at most this long
# after a disconnect.
DISCONNECT_POLL_S = 0.25


class ClientGoneError(ToolError):
    """The call's client disconnected; nobody receives this error, it ends the call."""


@asynccontextmanager
async def cancelled_when_client_leaves() -> AsyncIterator[None]:
    """Runs the body; over HTTP, cancels it (raising ClientGoneError) once the client has disconnected."""
    try:
        request = get_http_request()
    except RuntimeError:  # stdio, or an in-process client: no HTTP request to watch
        yield
        return
    gone = False
    async with anyio.create_task_group() as watch_group:

        async def watch() -> None:
            nonlocal gone
            while not await request.is_disconnected():
                await anyio.sleep(DISCONNECT_POLL_S)
            gone = True
            log.info("the HTTP client of a running call disconnected; stopping its generation")
            watch_group.cancel_scope.cancel()

        watch_group.start_soon(watch)
        try:
            yield
        finally:
            watch_group.cancel_scope.cancel()  # the body ended (or failed): stop watching
    if gone:
        raise ClientGoneError("the client disconnected before the result was ready")

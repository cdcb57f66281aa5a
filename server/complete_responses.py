"""ASGI middleware for the HTTP transport: a response that was started but not finished when the app returns is
finished with an empty last chunk.

At shutdown, sse-starlette ends every open event stream (a client's standing GET stream, a call in flight) by
cancelling it, without the last chunk of the chunked response; uvicorn then logged "ASGI callable returned without
completing response." once per connected client and cut the connection. With the last chunk sent, each client sees
its stream end normally. A call still running when uvicorn's graceful-shutdown time is up is cancelled by uvicorn; its
stream is finished the same way instead of ending in a traceback.
"""

from __future__ import annotations

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class CompleteResponses:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = False

        async def tracking_send(message: Message) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except anyio.get_cancelled_exc_class():
            if not started:
                raise
            # Only the ASGI server cancels a request at this level, and only to shut down: the stream is finished
            # below, and the request ends there.
        finally:
            if started and not finished:
                # Shielded: this runs while the stream's own task is being cancelled. A client that is already
                # gone makes the server drop the message.
                with anyio.CancelScope(shield=True):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})

"""Talking to an upstream server over HTTP: where it is, and one sentence for each way a call to it can fail.

The API key travels in a header only; messages name the upstream by its address with any user:password part
removed, so neither a key nor a password reaches a log or a tool result.
"""

from __future__ import annotations

import json

import httpx2

from mtp_mcp.engine.errors import EngineError, InvalidRequestError

MAX_UPSTREAM_MESSAGE_CHARS = 300


def server_root(base_url: str) -> str:
    """vLLM serves /tokenize, /detokenize, /metrics and /version beside /v1, not under it."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


def upstream_failure(error: Exception, where: str, timeout_s: float) -> EngineError:
    """The sentence for a failed exchange with the upstream at `where` (already redacted)."""
    if isinstance(error, httpx2.HTTPStatusError):
        status = error.response.status_code
        detail = _error_message(error.response)
        if status in (401, 403):
            return EngineError(f"the upstream at {where} refused the API key (HTTP {status}); set "
                               "MTP_MCP_UPSTREAM_API_KEY (or --api-key) to a key it accepts")
        if 400 <= status < 500:
            # The request itself: too long for its context, a value it does not take, an unknown model.
            return InvalidRequestError(f"the upstream at {where} rejected the request (HTTP {status}): {detail}")
        return EngineError(f"the upstream at {where} failed (HTTP {status}): {detail}")
    if isinstance(error, httpx2.TimeoutException):
        return EngineError(f"the upstream at {where} sent nothing for {timeout_s:g} s, so the call was given up; "
                           "raise --upstream-timeout if it is just slow")
    if isinstance(error, httpx2.ConnectError):
        return EngineError(f"the upstream at {where} could not be reached ({one_line(str(error))}); is it running?")
    if isinstance(error, httpx2.RemoteProtocolError | httpx2.ReadError):
        return EngineError(f"the connection to the upstream at {where} broke off mid-answer "
                           f"({one_line(str(error))}); the upstream may have stopped")
    if isinstance(error, httpx2.HTTPError):
        return EngineError(f"the exchange with the upstream at {where} failed ({type(error).__name__}: "
                           f"{one_line(str(error))})")
    return EngineError(f"the upstream at {where} sent an answer that is not what an OpenAI-compatible server sends "
                       f"({one_line(str(error))})")


def _error_message(response: httpx2.Response) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}} or {"message": ...}), else its text.
    The body must have been read (a streamed response: `await response.aread()`)."""
    try:
        body = response.json()
    except ValueError:  # not JSON (an HTML error page from a proxy, say)
        return one_line(response.text) or "no message"
    except httpx2.StreamError:
        return "no message"
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if isinstance(message, str) and message:
            return one_line(message)
    return one_line(json.dumps(body))


def one_line(text: str) -> str:
    """A message from elsewhere, as one bounded line."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_UPSTREAM_MESSAGE_CHARS else text[: MAX_UPSTREAM_MESSAGE_CHARS - 3] + "..."

"""From the engine's worker thread to the event loop: accepted text becomes progress notifications, and a cancelled
tool call cancels its generation.

    engine worker thread                      event loop (the tool call)
    on_text(delta, tokens) --call_soon_threadsafe--> queue --> filter --> await report(tokens, delta)
    future done            --call_soon_threadsafe--> END       (last in the queue: nothing follows it)

The worker never waits for the loop (the queue is unbounded and filled with call_soon_threadsafe), so a slow client
cannot slow the engine down; the loop never waits for the worker (it awaits the queue), so one long generation
never blocks other calls, tool listings or resource reads. Deltas that pile up while a notification is being sent go
out together in the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from mtp_mcp.engine.request import GenerationRequest
from mtp_mcp.engine.stats import GenerationStats
from mtp_mcp.server.schemas import FinishReason

if TYPE_CHECKING:
    from mtp_mcp.engine.backend import GenerationBackend

# (tokens generated so far, new text): sends one progress notification.
ProgressReport = Callable[[int, str], Awaitable[None]]

_END = object()


class TextFilter(Protocol):
    """Cuts streamed text where it should end, by a rule stop strings cannot express (server.prompts.CodeBoundary).

    Invariant: text handed out by push() is final; once push() says stop, the generation is cancelled and nothing
    more is handed out."""

    finish_reason: FinishReason

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to release now, whether the text ends here)."""

    def flush(self) -> str:
        """The held-back text that is final now that generation has ended."""


@dataclass(frozen=True, slots=True)
class StreamedGeneration:
    text: str  # exactly the concatenation of the reported deltas
    finish_reason: FinishReason
    stats: GenerationStats


async def generate_streamed(
    engine: GenerationBackend, request: GenerationRequest, report: ProgressReport, text_filter: TextFilter | None = None
) -> StreamedGeneration:
    """Runs one request on the engine, reporting text as it is accepted. Raises EngineBusyError at once when the queue
    is full, and the engine's error when the generation fails. When the awaiting task is cancelled (the client
    cancelled or went away), the generation stops within one engine step."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    call_open = True  # False once this call is over: late text from the worker is dropped, not queued

    def on_text(text: str, tokens: int) -> None:  # runs on the engine worker thread
        if call_open:
            loop.call_soon_threadsafe(queue.put_nowait, (text, tokens))

    def on_done(_) -> None:  # on the worker, after its last on_text for this request
        if call_open:
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    handle = engine.submit(request, on_text)
    handle.future.add_done_callback(on_done)
    released: list[str] = []
    filter_stopped = False
    try:
        ended = False
        while not ended:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            ended = batch[-1] is _END
            deltas = [item for item in batch if item is not _END]
            if not deltas or filter_stopped:
                continue
            text, tokens = "".join(text for text, _ in deltas), deltas[-1][1]
            if text_filter is not None:
                text, filter_stopped = text_filter.push(text)
                if filter_stopped:
                    handle.cancel()
            if text:
                released.append(text)
                await report(tokens, text)
        result = handle.result()  # done: END came after the future completed; raises the engine's error if any
        if text_filter is not None and not filter_stopped and (tail := text_filter.flush()):
            released.append(tail)
            await report(result.stats.new_tokens, tail)
    except BaseException:
        handle.cancel()  # the call is over (cancelled, client gone, or failed): free the engine for the next one
        raise
    finally:
        call_open = False
    finish_reason = text_filter.finish_reason if filter_stopped else result.finish_reason
    return StreamedGeneration(text="".join(released), finish_reason=finish_reason, stats=result.stats)

"""The MCP surface: three read-only tools and two resources over one resident engine.

Each tool builds a prompt (server.prompts), submits it to the engine and streams the accepted text back as progress
notifications (server.streaming); summarise adds chunking (server.summarise). Engine errors become tool errors with
their one-sentence message; nothing else about the server's insides reaches the host.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import TYPE_CHECKING, Annotated, Literal

import anyio
from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.server.auth import AuthProvider
from fastmcp.server.lifespan import lifespan
from fastmcp.server.middleware import Middleware, MiddlewareContext
from mcp.types import ToolAnnotations
from pydantic import Field

from mtp_mcp.engine.errors import EngineError, InvalidRequestError
from mtp_mcp.server.argument_errors import OneSentenceArgumentErrors
from mtp_mcp.server.call_watch import CallWatch
from mtp_mcp.server.prompts import CodeBoundary, Prompt, chat_prompt, continuation_prompt
from mtp_mcp.server.resident import LoadedEngine, ResidentEngine
from mtp_mcp.server.schemas import (
    MAX_PROMPT_CHARS,
    MAX_SUMMARY_INPUT_CHARS,
    CodeCompletion,
    GenerationOutput,
    MaxNewTokens,
    Messages,
    PromptText,
    StopStrings,
    Summary,
)
from mtp_mcp.server.streaming import ProgressReport, generate_streamed
from mtp_mcp.server.summarise import count_words
from mtp_mcp.server.summarise import summarise as summarise_text

if TYPE_CHECKING:
    from mtp_mcp.engine.backend import GenerationBackend

INSTRUCTIONS = (
    "Local text generation with a small language model made faster by speculative decoding (multi-token "
    "prediction). generate continues a prompt or replies to messages; complete_code fills in code at a cursor; "
    "summarise condenses long text. Generated text arrives early in progress notifications (message = new text) and "
    "in full in the result, with token counts, speculation statistics and timing."
)
READ_ONLY = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=False, openWorldHint=False)


class ToolsListed(Middleware):
    """Sets `event` once a client has listed the tools: the model may start loading (server/resident.py)."""

    def __init__(self):
        self.event = asyncio.Event()

    async def on_list_tools(self, context: MiddlewareContext, call_next):
        try:
            return await call_next(context)
        finally:
            self.event.set()


@asynccontextmanager
async def tool_call(call_watch: CallWatch) -> AsyncIterator[None]:
    """The frame of every tool call: engine errors carry one sentence meant for the user and become the tool error;
    over HTTP, a client that goes away or a server that shuts down stops the call (server/call_watch.py)."""
    async with call_watch.stopped_when_client_leaves_or_server_stops():
        try:
            yield
        except EngineError as error:
            raise ToolError(str(error)) from None


LOCAL_LOADING_NOTE = "a first start ever reads the GGUF's metadata once, about 45 s on 2 cores"


def create_server(engine: GenerationBackend | Callable[[], GenerationBackend], *, auth: AuthProvider | None = None,
                  loading_note: str | None = None) -> FastMCP:
    """engine: a ready engine or upstream backend (tests inject one; the caller closes it), or a function that loads
    one, called once in the background when the server starts; that one is closed when the server stops.
    loading_note: what a call that waits for the load is told besides how long it has waited (default: about the
    local engine's load)."""
    loading_note = loading_note or LOCAL_LOADING_NOTE

    tools_listed = ToolsListed()
    call_watch = CallWatch()

    @lifespan
    async def engine_lifespan(server: FastMCP):
        resident = ResidentEngine(engine)
        background = [asyncio.create_task(resident.start_loading_after(tools_listed.event)),
                      asyncio.create_task(call_watch.drain_at_shutdown())]
        try:
            yield {"engine": resident}
        finally:
            for task in background:
                task.cancel()
            await resident.close()

    mcp = FastMCP("mtp-mcp", instructions=INSTRUCTIONS, version=version("mtp-mcp"), lifespan=engine_lifespan,
                  mask_error_details=True, auth=auth, middleware=[OneSentenceArgumentErrors(), tools_listed])

    async def loaded_engine(ctx: Context) -> LoadedEngine:
        async def still_loading(seconds: float) -> None:
            # Progress must grow and the generation's own reports count tokens from 1: while loading it stays
            # below 1 (seconds / 1000). Each notification also resets the host's request timeout.
            await ctx.report_progress(min(seconds / 1000, 0.999), None,
                                      f"the model is still loading ({seconds:.0f} s so far; {loading_note})")

        return await ctx.lifespan_context["engine"].get(still_loading)

    def progress_to(ctx: Context, total: int) -> ProgressReport:
        async def report(tokens: int, delta: str) -> None:
            await ctx.report_progress(tokens, total, delta)

        return report

    @mcp.tool(annotations=READ_ONLY)
    async def generate(
        ctx: Context,
        prompt: Annotated[PromptText | None, Field(description="text to continue (give this or messages)")] = None,
        messages: Annotated[Messages | None, Field(description="a conversation to reply to (give this or prompt); "
                                                   "uses the model's chat template, or a plain transcript")] = None,
        max_new_tokens: MaxNewTokens = 256,
        temperature: Annotated[float, Field(ge=0.0, le=2.0, description="0 is greedy (deterministic)")] = 0.0,
        top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0,
        top_k: Annotated[int, Field(ge=0, description="0 means no limit")] = 0,
        seed: Annotated[int | None, Field(ge=0, le=2**63 - 1, description="for reproducible sampling")] = None,
        stop: StopStrings | None = None,
    ) -> GenerationOutput:
        """Generate text with the resident model: continue `prompt`, or reply to `messages`."""
        async with tool_call(call_watch):
            if (prompt is None) == (messages is None):
                raise InvalidRequestError("give exactly one of prompt (text to continue) and messages (a conversation)")
            loaded = await loaded_engine(ctx)
            if prompt is not None:
                built = Prompt(text=prompt, add_special_tokens=True)
            else:
                # A tokenizer may ask the upstream to render the template (engine/upstream_tokenizer.py): off the loop.
                built = await anyio.to_thread.run_sync(chat_prompt, loaded.engine.tokenizer, messages)
            request = built.request(max_new_tokens, stop or (), temperature=temperature, top_p=top_p, top_k=top_k,
                                    seed=seed)
            streamed = await generate_streamed(loaded.engine, request, progress_to(ctx, max_new_tokens))
        return GenerationOutput.build(streamed.text, streamed.finish_reason, streamed.stats)

    @mcp.tool(annotations=READ_ONLY)
    async def complete_code(
        ctx: Context,
        prefix: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS,
                                     description="the code before the cursor")],
        suffix: Annotated[str, Field(max_length=MAX_PROMPT_CHARS, description="the code after the cursor")] = "",
        language: Annotated[str | None, Field(max_length=40, pattern=r"^[\w#+.-]+$", description="e.g. python; a "
                                              "hint for models without fill-in-the-middle")] = None,
        max_new_tokens: MaxNewTokens = 128,
        stop: StopStrings | None = None,
    ) -> CodeCompletion:
        """Complete code at a cursor (greedy). With a fill-in-the-middle model the suffix is used; otherwise the
        prefix is continued and cut where the current block or statement group ends. Returns only the new code."""
        async with tool_call(call_watch):
            loaded = await loaded_engine(ctx)
            if loaded.fim_style is not None:
                built, text_filter, mode = loaded.fim_style.prompt(prefix, suffix), None, "fill_in_the_middle"
            else:
                built, text_filter = continuation_prompt(prefix, suffix, language), CodeBoundary(prefix)
                mode = "continuation"
            request = built.request(max_new_tokens, stop or ())
            streamed = await generate_streamed(loaded.engine, request, progress_to(ctx, max_new_tokens), text_filter)
        return CodeCompletion.build(streamed.text, streamed.finish_reason, streamed.stats, mode=mode)

    @mcp.tool(annotations=READ_ONLY)
    async def summarise(
        ctx: Context,
        text: Annotated[str, Field(min_length=1, max_length=MAX_SUMMARY_INPUT_CHARS, description="the text to "
                                   "summarise; beyond the model's context it is summarised in chunks")],
        style: Annotated[Literal["paragraph", "bullets", "tldr"], Field(description="paragraph, a bulleted list, "
                                                                       "or one sentence")] = "paragraph",
        max_words: Annotated[int, Field(ge=10, le=1000, description="most words in the summary")] = 120,
    ) -> Summary:
        """Summarise text. Progress counts tokens over all steps; only the final summary's text is streamed."""
        async with tool_call(call_watch):
            if not text.strip():
                raise InvalidRequestError("the text is empty; give some text to summarise")
            loaded = await loaded_engine(ctx)
            outcome = await summarise_text(loaded.engine, text, style, max_words, ctx.report_progress)
        return Summary.build(outcome.text, outcome.finish_reason, outcome.stats, chunks=outcome.chunks,
                             words=count_words(outcome.text))

    @mcp.resource("engine://model", mime_type="application/json",
                  description="the loaded model: name, device, dtype, context length, drafter")
    def model_info(ctx: Context) -> dict:
        resident: ResidentEngine = ctx.lifespan_context["engine"]
        if (loaded := resident.ready()) is None:
            return {"status": resident.state, "error": resident.load_error}
        fim = loaded.fim_style.name if loaded.fim_style else None
        return {"status": "ready", **loaded.engine.info, "fill_in_the_middle": fim}

    @mcp.resource("engine://stats", mime_type="application/json",
                  description="totals since the server started: requests, tokens, acceptance, tokens/s")
    def engine_stats(ctx: Context) -> dict:
        resident: ResidentEngine = ctx.lifespan_context["engine"]
        uptime = round(time.time() - resident.started_at, 1)
        if (loaded := resident.ready()) is None:
            return {"status": resident.state, "uptime_s": uptime}
        return {"status": "ready", "uptime_s": uptime, **loaded.engine.totals_snapshot()}

    return mcp


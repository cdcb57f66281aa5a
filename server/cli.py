"""`mtp-mcp serve`: the MCP server over stdio (for hosts that start it) or streamable HTTP (a long-running service).

On stdio, stdout carries only the protocol; logs go to stderr. Over HTTP, a bearer token can be required
(--auth-token or MTP_MCP_TOKEN); a server reachable from other machines must have one.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from functools import partial

from mtp_mcp.engine.errors import InvalidRequestError
from mtp_mcp.engine.options import (
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_UPSTREAM_TIMEOUT_S,
    UPSTREAM_KEY_ENV,
    EngineOptions,
    UpstreamOptions,
    check_options,
    check_upstream_options,
    redacted,
)

TOKEN_ENV = "MTP_MCP_TOKEN"

log = logging.getLogger(__name__)


def add_serve_arguments(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The serve subcommand with its own options; the caller adds the engine's."""
    serve = commands.add_parser(
        "serve", help="run the MCP server (stdio by default)",
        description="Run the MCP server with tools generate, complete_code and summarise. The model loads in the "
        "background; the server answers at once.",
    )
    serve.add_argument("--transport", choices=["stdio", "http"], default="stdio",
                       help="stdio for hosts that start the server (default); http for a streamable-HTTP service")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    serve.add_argument("--path", default="/mcp", help="HTTP path of the MCP endpoint (default: /mcp)")
    serve.add_argument("--auth-token", help=f"bearer token HTTP clients must send (default: ${TOKEN_ENV}, which is "
                       "better: a token on the command line is visible to other users in `ps`); required when --host "
                       "is not a loopback address. A token that starts with '-' must be written --auth-token=TOKEN")
    serve.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
                       help="generations that may wait for the engine (with --backend openai: that may run upstream "
                       f"at once); beyond this, calls fail at once (default: {DEFAULT_MAX_QUEUED_REQUESTS})")
    add_upstream_arguments(serve)
    serve.set_defaults(run=run_serve)
    return serve


def add_upstream_arguments(parser: argparse.ArgumentParser, *, with_key: bool = True) -> None:
    """--backend and the upstream's options (serve, and install, which writes no key into a host's file)."""
    upstream = parser.add_argument_group("upstream (--backend openai)")
    upstream.add_argument("--backend", choices=["local", "openai"], default="local",
                          help="local: the engine in this process (default); openai: send generation to an "
                          "OpenAI-compatible server such as vLLM, SGLang, llama-server or Ollama")
    upstream.add_argument("--base-url", help="the upstream's API address, e.g. http://127.0.0.1:8000/v1")
    if with_key:
        upstream.add_argument("--api-key", help=f"key for the upstream (default: ${UPSTREAM_KEY_ENV}, which is better: "
                              "a key on the command line is visible in `ps`)")
    upstream.add_argument("--upstream-model", help="the upstream's model name (default: the one model it serves)")
    upstream.add_argument("--tokenizer", help="a folder with the upstream model's tokenizer files, for token counts "
                          "and chat templates here (default: ask the upstream's /tokenize, which vLLM and SGLang "
                          "serve)")
    upstream.add_argument("--upstream-timeout", type=float, default=DEFAULT_UPSTREAM_TIMEOUT_S,
                          help="seconds the upstream may stay silent (connecting, or between two pieces of text) "
                          f"before a call is given up (default: {DEFAULT_UPSTREAM_TIMEOUT_S:g})")


def run_serve(args: argparse.Namespace) -> int:
    # Checked before anything slow starts; each problem is one sentence (main() exits with status 2). What needs
    # torch or the model's files to check (is CUDA there, does the file load) is reported by every tool call.
    token = args.auth_token or os.environ.get(TOKEN_ENV) or None
    upstream = checked_backend_options(args, args.engine_options)
    if upstream is not None:
        load = partial(_load_upstream, upstream)
        loading_note = f"waiting for the upstream at {redacted(upstream.base_url)} to answer"
    else:
        # The engine (torch and transformers with it) is imported and loaded in the background, after the server
        # already answers the MCP handshake and tool listings.
        load, loading_note = partial(_load_engine, args.engine_options), None
    if args.transport == "http":
        if not 1 <= args.port <= 65535:
            raise InvalidRequestError(f"--port is {args.port}; it must be from 1 to 65535")
        if not args.path.startswith("/"):
            raise InvalidRequestError(f"--path is {args.path!r}; it must start with '/', like /mcp")
        if token is None and not is_loopback(args.host):
            raise InvalidRequestError(
                f"refusing to serve on {args.host} without a token, since anyone who can reach it could use the "
                f"model: set --auth-token or {TOKEN_ENV}, or bind to 127.0.0.1"
            )
    elif token is not None:
        log.warning("the auth token applies to HTTP only; stdio is reachable only by the process that started it")

    # Imported here: every `mtp-mcp` invocation builds this parser and should not pay for importing fastmcp.
    from fastmcp.server.auth.providers.jwt import StaticTokenVerifier

    from mtp_mcp.server.app import create_server

    auth = None
    if args.transport == "http" and token is not None:
        auth = StaticTokenVerifier(tokens={token: {"client_id": "mtp-mcp-client", "scopes": []}})
    server = create_server(load, auth=auth, loading_note=loading_note)
    if args.transport == "stdio":
        server.run("stdio", show_banner=False)
    else:
        from sse_starlette.sse import AppStatus
        from starlette.middleware import Middleware

        from mtp_mcp.server.complete_responses import CompleteResponses

        # Streams are closed at shutdown by server/call_watch.py, after the running calls have answered.
        AppStatus.disable_automatic_graceful_drain()
        server.run("http", show_banner=False, host=args.host, port=args.port, path=args.path,
                   middleware=[Middleware(CompleteResponses)])
    return 0


def checked_backend_options(args: argparse.Namespace, engine: EngineOptions) -> UpstreamOptions | None:
    """The upstream's options with --backend openai, None for the local engine; raises the one-sentence error for
    anything wrong with either."""
    if args.backend == "openai":
        return upstream_options(args, engine)
    for flag, value in (("--base-url", args.base_url), ("--upstream-model", args.upstream_model),
                        ("--tokenizer", args.tokenizer)):
        if value is not None:
            raise InvalidRequestError(f"{flag} is for --backend openai; the local backend runs --model itself")
    check_options(engine)
    return None


def upstream_options(args: argparse.Namespace, engine: EngineOptions) -> UpstreamOptions:
    """The checked upstream options of a command line with --backend openai."""
    if args.base_url is None:
        raise InvalidRequestError("--backend openai needs --base-url, the upstream's API address such as "
                                  "http://127.0.0.1:8000/v1")
    if engine.model is not None or engine.draft_model is not None:
        raise InvalidRequestError("--model and --draft-model are for the local backend; with --backend openai the "
                                  "upstream serves the model (choose among its models with --upstream-model)")
    options = UpstreamOptions(
        base_url=args.base_url, api_key=getattr(args, "api_key", None) or os.environ.get(UPSTREAM_KEY_ENV) or None,
        model=args.upstream_model, tokenizer=args.tokenizer,
        # install leaves options not given as None: serve's defaults
        timeout_s=DEFAULT_UPSTREAM_TIMEOUT_S if args.upstream_timeout is None else args.upstream_timeout,
        max_queued_requests=(DEFAULT_MAX_QUEUED_REQUESTS if args.max_queued_requests is None
                             else args.max_queued_requests))
    check_upstream_options(options)
    return options


def _load_upstream(options: UpstreamOptions):
    from mtp_mcp.engine.openai_upstream import UpstreamBackend

    return UpstreamBackend.load(options)


def _load_engine(options: EngineOptions):
    from mtp_mcp.engine.engine import Engine

    return Engine.load(options)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything

"""`mtp-mcp serve`: the MCP server over stdio (for hosts that start it) or streamable HTTP (a long-running service).

On stdio, stdout carries only the protocol; logs go to stderr. Over HTTP, a bearer token can be required
(--auth-token or MTP_MCP_TOKEN); a server reachable from other machines must have one.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from dataclasses import replace
from functools import partial

from engine.cli import add_engine_options, engine_options
from engine.engine import DEFAULT_MAX_QUEUED_REQUESTS, Engine, check_options
from engine.errors import InvalidRequestError

TOKEN_ENV = "MTP_MCP_TOKEN"

log = logging.getLogger(__name__)


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
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
                       help="generations that may wait for the engine; beyond this, calls fail at once "
                       f"(default: {DEFAULT_MAX_QUEUED_REQUESTS})")
    add_engine_options(serve)
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    # Checked before anything slow starts; each problem is one sentence (main() exits with status 2).
    token = args.auth_token or os.environ.get(TOKEN_ENV) or None
    options = replace(engine_options(args), max_queued_requests=args.max_queued_requests)
    check_options(options)
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

    # Imported here: `mtp-mcp generate` builds this parser too and should not pay for importing fastmcp.
    from fastmcp.server.auth.providers.jwt import StaticTokenVerifier

    from server.app import create_server

    auth = None
    if args.transport == "http" and token is not None:
        auth = StaticTokenVerifier(tokens={token: {"client_id": "mtp-mcp-client", "scopes": []}})
    server = create_server(partial(Engine.load, options), auth=auth)
    if args.transport == "stdio":
        server.run("stdio", show_banner=False)
    else:
        server.run("http", show_banner=False, host=args.host, port=args.port, path=args.path)
    return 0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything

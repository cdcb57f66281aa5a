"""Calls mtp-mcp over streamable HTTP with a bearer token, printing the text as it streams in.

Start the server first, with the same token:

    MTP_MCP_TOKEN=change-me mtp-mcp serve --transport http --port 8000
    MTP_MCP_TOKEN=change-me python examples/client_http.py [http://127.0.0.1:8000/mcp]
"""

import asyncio
import os
import sys

from fastmcp import Client


async def print_streamed_text(progress: float, total: float | None, message: str | None) -> None:
    if message and progress < 1:  # the model is still loading: a status line, not text
        print(message, file=sys.stderr)
    elif message:
        print(message, end="", flush=True)


async def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/mcp"
    token = os.environ.get("MTP_MCP_TOKEN")
    if not token:
        sys.exit("set MTP_MCP_TOKEN to the token the server was started with")
    async with Client(url, auth=token) as client:  # a string is sent as "Authorization: Bearer <token>"
        result = await client.call_tool(
            "generate", {"prompt": "A short poem about the sea:\n", "max_new_tokens": 48},
            progress_handler=print_streamed_text,
        )
        out = result.structured_content
        print(f"\n--- {out['completion_tokens']} tokens, {out['timing']['tokens_per_second']:.1f} tokens/s, "
              f"{out['speculation']['mean_tokens_per_pass']:.2f} tokens per target pass")
        stats = await client.read_resource("engine://stats")
        print(f"engine://stats: {stats[0].text}")


if __name__ == "__main__":
    asyncio.run(main())

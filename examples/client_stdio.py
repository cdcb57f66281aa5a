"""Calls all three tools of mtp-mcp over stdio, printing the text as it streams in.

    python examples/client_stdio.py                      # the embedded model
    python examples/client_stdio.py --model ~/models/qwen2.5-coder-1.5b --device cuda

Extra arguments go to `mtp-mcp serve`. This starts the server itself, as a host like Claude Desktop does; the model
loads once and serves all three calls.
"""

import asyncio
import os
import shutil
import sys

from fastmcp import Client
from fastmcp.client.transports import StdioTransport

ARTICLE = (
    "The city council voted on Tuesday to expand the public bicycle program, adding 40 new docking stations across "
    "the eastern districts by next summer. The expansion, which will cost about 3.2 million dollars, is funded mainly "
    "by a regional transport grant. Supporters argued that the program has reduced short car trips in the city centre "
    "by almost a fifth since it started four years ago. Critics on the council questioned the maintenance costs, "
    "noting that a quarter of the existing bicycles were out of service last winter."
)
CALLS = [
    ("generate", {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_new_tokens": 32}),
    ("complete_code", {"prefix": 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
                       "language": "python", "max_new_tokens": 96}),
    ("summarise", {"text": ARTICLE, "style": "bullets", "max_words": 60}),
]


async def print_streamed_text(progress: float, total: float | None, message: str | None) -> None:
    if message and progress < 1:  # the model is still loading: a status line, not text
        print(message, file=sys.stderr)
    elif message:  # the new text; a message-less notification only moves the progress count
        print(message, end="", flush=True)


async def main() -> None:
    # A host passes only the environment it is configured with: forward the cache location if one is set.
    env = {name: os.environ[name] for name in ("MTP_MCP_CACHE_DIR", "HF_HOME") if name in os.environ}
    command = shutil.which("mtp-mcp") or sys.exit("mtp-mcp is not on PATH: activate the environment it is installed in")
    transport = StdioTransport(command=command, args=["serve", *sys.argv[1:]], env=env)
    async with Client(transport) as client:
        for tool, arguments in CALLS:
            print(f"\n=== {tool} ===")
            result = await client.call_tool(tool, arguments, progress_handler=print_streamed_text)
            out = result.structured_content
            speculation, timing = out["speculation"], out["timing"]
            print(f"\n--- {out['finish_reason']}, {out['completion_tokens']} tokens, "
                  f"{speculation['mean_tokens_per_pass']:.2f} tokens per target pass ({speculation['drafter']}), "
                  f"{timing['tokens_per_second']:.1f} tokens/s, "
                  f"first token after {timing['time_to_first_token_s']:.2f} s")
        model = await client.read_resource("engine://model")
        print(f"\nengine://model: {model[0].text}")


if __name__ == "__main__":
    asyncio.run(main())

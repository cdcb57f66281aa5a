"""`mtp-mcp serve` as hosts run it: a real stdio subprocess on the embedded model (official mcp SDK client), and
streamable HTTP with a bearer token on a tiny model. Each test starts one server process."""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fastmcp import Client
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from tiny_checkpoints import build_tiny_checkpoint

from mtp_mcp.cli import main
from mtp_mcp.engine.loading import CACHE_DIR_ENV

MTP_MCP = shutil.which("mtp-mcp") or str(Path(sys.executable).with_name("mtp-mcp"))
TOKEN = "test-token-7f3a"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with status {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the server did not listen on port {port} within {timeout_s} s")


@pytest.fixture(scope="module")
def long_running_checkpoint(tmp_path_factory):
    # A long context and no reachable EOS, so that a generation runs long enough to be cut short.
    return build_tiny_checkpoint(tmp_path_factory.mktemp("http") / "tiny", context_length=8192, eos="not_by_greedy")


@contextlib.contextmanager
def serving_http(checkpoint, log: Path):
    """An `mtp-mcp serve --transport http` process with a token; yields (its URL, the process)."""
    port = free_port()
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [MTP_MCP, "serve", "--transport", "http", "--port", str(port), "--model", str(checkpoint),
             "--device", "cpu", "--dtype", "float32", "--max-queued-requests", "8"],
            env=os.environ | {"MTP_MCP_TOKEN": TOKEN}, stdout=subprocess.DEVNULL, stderr=stderr,
        )
    try:
        wait_for_port(port, process)
        yield f"http://127.0.0.1:{port}/mcp", process
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def http_server(long_running_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("http-log") / "server.log"
    with serving_http(long_running_checkpoint, log) as (url, _):
        yield url, log


def test_http_refuses_a_request_without_the_token(http_server):
    http_server, _ = http_server
    request = urllib.request.Request(http_server, method="POST", data=b"{}",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as wrong:
        urllib.request.urlopen(urllib.request.Request(
            http_server, method="POST", data=b"{}", headers={"Authorization": "Bearer wrong"}), timeout=30)
    assert wrong.value.code == 401


async def test_http_with_the_token_answers_concurrent_calls(http_server):
    http_server, _ = http_server
    async with Client(http_server, auth=TOKEN) as client:
        calls = [client.call_tool("generate", {"prompt": f"Call {i}", "max_new_tokens": 6}) for i in range(5)]
        results = await asyncio.gather(*calls)
        model = json.loads((await client.read_resource("engine://model"))[0].text)
    assert [r.structured_content["completion_tokens"] for r in results] == [6] * 5
    assert model["status"] == "ready" and model["model"] == "tiny"


# A client process that starts a long generation and reports the first text that reaches it. mode "legacy" speaks
# the 2025 handshake protocol (what hosts speak today), whose wire has no cancellation by closing the stream.
LONG_CALL_CLIENT = """
import asyncio, sys
from fastmcp import Client

async def main():
    async with Client(sys.argv[1], auth=sys.argv[2], mode=sys.argv[3]) as client:
        async def on_progress(progress, total, message):
            if progress >= 1:
                print("text arrived", flush=True)
        await client.call_tool("generate", {"prompt": "Once upon a time", "max_new_tokens": 8000},
                               progress_handler=on_progress)

asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_an_http_client_that_is_killed_mid_call_stops_its_generation(http_server, mode):
    http_server, log = http_server
    async with Client(http_server, auth=TOKEN) as watcher:
        async def totals() -> dict:
            return json.loads((await watcher.read_resource("engine://stats"))[0].text)

        await watcher.call_tool("generate", {"prompt": "Warm", "max_new_tokens": 1})  # the model is ready
        before = await totals()
        client = subprocess.Popen([sys.executable, "-c", LONG_CALL_CLIENT, http_server, TOKEN, mode],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert await asyncio.to_thread(client.stdout.readline) == "text arrived\n"
        finally:
            client.kill()
            client.wait()
        deadline = time.monotonic() + 300
        while (after := await totals())["requests"] == before["requests"] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        # The engine is free again long before the 8,000 tokens asked for (the tiny model keeps going without EOS).
        answer = await watcher.call_tool("generate", {"prompt": "Next caller", "max_new_tokens": 4})
    assert after["requests"] == before["requests"] + 1
    assert after["new_tokens"] - before["new_tokens"] < 4000
    assert answer.structured_content["completion_tokens"] == 4
    if mode == "legacy":  # the 2026 protocol's own disconnect handling may come first
        assert "stopping a running call: the client disconnected" in log.read_text()


async def test_shutdown_with_clients_connected_ends_their_calls_and_streams_cleanly(long_running_checkpoint, tmp_path):
    log = tmp_path / "server.log"
    with serving_http(long_running_checkpoint, log) as (url, server):
        async with Client(url, auth=TOKEN, mode="legacy") as idle, Client(url, auth=TOKEN, mode="legacy") as busy:
            await idle.call_tool("generate", {"prompt": "Warm", "max_new_tokens": 1})
            started = asyncio.Event()

            async def on_progress(progress, total, message):
                started.set()

            call = asyncio.create_task(busy.call_tool(
                "generate", {"prompt": "Once upon a time", "max_new_tokens": 8000}, progress_handler=on_progress,
                raise_on_error=False))
            await asyncio.wait_for(started.wait(), 120)
            server.send_signal(signal.SIGTERM)  # as a service manager stops it
            result = await asyncio.wait_for(call, 60)
        await asyncio.to_thread(server.wait, 60)
    assert result.is_error and "the server is shutting down" in result.content[0].text
    text = log.read_text()
    assert "Finished server process" in text
    assert "ERROR" not in text  # e.g. "ASGI callable returned without completing response."


def test_serving_beyond_loopback_without_a_token_is_refused(monkeypatch, capsys):
    monkeypatch.delenv("MTP_MCP_TOKEN", raising=False)
    assert main(["serve", "--transport", "http", "--host", "0.0.0.0"]) == 2
    error = capsys.readouterr().err
    assert "refusing to serve on 0.0.0.0 without a token" in error
    assert error.count("\n") == 1  # one sentence, no traceback


async def test_stdio_server_on_the_embedded_model(embedded_model, mtp_mcp_cache_dir, tmp_path):
    """Started the way a host starts it; the embedded model is already converted in the session cache."""
    params = StdioServerParameters(command=MTP_MCP, args=["serve"], env={CACHE_DIR_ENV: str(mtp_mcp_cache_dir)})
    progress: list[tuple[float, str | None]] = []

    async def on_progress(tokens, total, message):
        progress.append((tokens, message))

    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        async with stdio_client(params, errlog=stderr) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            assert {tool.name for tool in (await session.list_tools()).tools} == {"generate", "complete_code",
                                                                                "summarise"}
            question = [{"role": "user", "content": "What is the capital of France?"}]
            result = await session.call_tool("generate", {"messages": question, "max_new_tokens": 16},
                                             progress_callback=on_progress)
    out = result.structured_content
    assert not result.is_error
    assert "Paris" in out["text"]  # greedy on a fixed model: the base model answers this one through the transcript
    assert out["finish_reason"] == "stop_string"  # it ended at the next "User:" turn
    assert out["speculation"]["drafter"] == "suffix" and out["speculation"]["target_passes"] >= 1
    # Text comes with progress >= 1 (tokens); while the model loads, reports below 1 say so.
    assert "".join(message for tokens, message in progress if tokens >= 1 and message) == out["text"]
    assert all("still loading" in message for tokens, message in progress if tokens < 1)
    assert "model ready" in log.read_text()  # logs went to stderr, and stdout held only the protocol

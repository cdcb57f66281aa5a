"""The MCP server in memory (fastmcp Client) over tiny random checkpoints: tools, streaming, cancellation,
concurrency, errors and resources. Random weights generate gibberish: these tests check plumbing, not quality."""

import asyncio
import dataclasses
import json

import pytest
from fastmcp import Client
from fastmcp.exceptions import ToolError
from tiny_checkpoints import GEMMA_STYLE_CHAT_TEMPLATE, build_tiny_checkpoint

from mtp_mcp.engine.drafters import create_drafter
from mtp_mcp.engine.engine import Engine
from mtp_mcp.engine.errors import EngineClosedError, ModelLoadError
from mtp_mcp.engine.loading import load_model
from mtp_mcp.server.app import create_server
from mtp_mcp.server.summarise import count_words

CONTEXT = 512


def tiny_engine(path, max_queued_requests: int = 16) -> Engine:
    loaded = load_model(str(path), device="cpu", dtype="float32")
    return Engine(loaded, create_drafter("auto", loaded, None, 4), max_queued_requests)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-checkpoints")
    return {
        "plain": build_tiny_checkpoint(root / "plain", context_length=CONTEXT),
        "chat": build_tiny_checkpoint(root / "chat", chat_template=GEMMA_STYLE_CHAT_TEMPLATE, arch="llama"),
        "fim": build_tiny_checkpoint(root / "fim", fim=True),
        "short": build_tiny_checkpoint(root / "short", context_length=256),
    }


@pytest.fixture(scope="module")
def engines(checkpoints):
    engines = {name: tiny_engine(path) for name, path in checkpoints.items()}
    engines["busy"] = tiny_engine(checkpoints["plain"], max_queued_requests=1)
    yield engines
    for engine in engines.values():
        engine.close()


@pytest.fixture
async def client(engines):
    async with Client(create_server(engines["plain"])) as client:
        yield client


class Progress:
    """Collects progress notifications: (progress, total, message)."""

    def __init__(self):
        self.events: list[tuple[float, float | None, str | None]] = []
        self.first = asyncio.Event()

    async def __call__(self, progress, total, message):
        self.events.append((progress, total, message))
        self.first.set()

    @property
    def text(self) -> str:
        return "".join(message for _, _, message in self.events if message)


def spy_on_submissions(engine: Engine, monkeypatch) -> list:
    """Records the handle of every request the server submits to `engine`."""
    handles = []
    submit = engine.submit

    def recording_submit(*args, **kwargs):
        handles.append(submit(*args, **kwargs))
        return handles[-1]

    monkeypatch.setattr(engine, "submit", recording_submit)
    return handles


# --- the surface --------------------------------------------------------------------------------------------------

async def test_tools_are_listed_read_only_with_limits_in_their_schemas(client):
    tools = {tool.name: tool for tool in await client.list_tools()}
    assert set(tools) == {"generate", "complete_code", "summarise"}
    for tool in tools.values():
        assert tool.annotations.read_only_hint is True
        output = tool.output_schema["properties"]
        assert {"text", "finish_reason", "prompt_tokens", "completion_tokens", "speculation", "timing"} <= set(output)
    generate = tools["generate"].input_schema["properties"]
    assert generate["max_new_tokens"]["minimum"] == 1 and generate["max_new_tokens"]["maximum"] == 32768
    assert generate["temperature"]["maximum"] == 2.0
    assert tools["summarise"].input_schema["properties"]["style"]["enum"] == ["paragraph", "bullets", "tldr"]
    assert tools["complete_code"].input_schema["required"] == ["prefix"]


async def test_resources_describe_the_model_and_count_requests(client):
    model = json.loads((await client.read_resource("engine://model"))[0].text)
    assert model["status"] == "ready"
    assert model["context_length"] == CONTEXT and model["drafter"] == "suffix" and model["device"] == "cpu"
    # built by Engine(), not load: no kernels applied
    assert model["cpu_kernels"]["prepacked_layers"] == 0 and model["cpu_kernels"]["argmax_screen"] is False
    before = json.loads((await client.read_resource("engine://stats"))[0].text)
    await client.call_tool("generate", {"prompt": "Hello", "max_new_tokens": 5})
    after = json.loads((await client.read_resource("engine://stats"))[0].text)
    assert after["requests"] == before["requests"] + 1
    assert after["new_tokens"] >= before["new_tokens"] + 1
    assert {"acceptance_rate", "mean_tokens_per_pass", "tokens_per_second", "uptime_s"} <= set(after)


# --- generate -----------------------------------------------------------------------------------------------------

async def test_generate_streams_deltas_that_add_up_to_the_text(client):
    progress = Progress()
    result = await client.call_tool("generate", {"prompt": "def add(a, b):", "max_new_tokens": 40},
                                    progress_handler=progress)
    out = result.structured_content
    assert out["finish_reason"] == "length" and out["completion_tokens"] == 40
    assert progress.text == out["text"] != ""
    counts = [p for p, _, _ in progress.events]
    assert counts == sorted(counts) and counts[-1] <= 40
    assert all(total == 40 for _, total, _ in progress.events)
    speculation, timing = out["speculation"], out["timing"]
    assert speculation["drafter"] == "suffix"
    assert 1 <= speculation["target_passes"] <= 40
    assert speculation["mean_tokens_per_pass"] == pytest.approx(40 / speculation["target_passes"], abs=1e-3)
    assert 0.0 <= speculation["acceptance_rate"] <= 1.0
    assert timing["tokens_per_second"] > 0 and 0 < timing["time_to_first_token_s"] <= timing["total_time_s"]


async def test_generate_with_a_seed_is_reproducible_and_stops_at_stop_strings(client):
    args = {"prompt": "The quick brown fox", "max_new_tokens": 30, "temperature": 1.0, "top_k": 50, "seed": 7}
    first = (await client.call_tool("generate", args)).structured_content["text"]
    assert (await client.call_tool("generate", args)).structured_content["text"] == first
    stop = first[5:7]
    stopped = (await client.call_tool("generate", args | {"stop": [stop]})).structured_content
    assert stopped["finish_reason"] == "stop_string"
    assert stopped["text"] == first[: first.index(stop)]


async def test_messages_use_the_chat_template_without_a_second_bos(engines):
    engine = engines["chat"]
    messages = [{"role": "user", "content": "hi there"}]
    async with Client(create_server(engine)) as client:
        out = (await client.call_tool("generate", {"messages": messages, "max_new_tokens": 5})).structured_content
    tokenizer = engine.loaded.tokenizer
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert out["prompt_tokens"] == len(expected["input_ids"])
    assert tokenizer.decode(expected["input_ids"]).count("<bos>") == 1


async def test_messages_to_a_base_model_become_a_transcript(client, engines):
    messages = [{"role": "user", "content": "hi there"}]
    out = (await client.call_tool("generate", {"messages": messages, "max_new_tokens": 5})).structured_content
    assert out["prompt_tokens"] == len(engines["plain"].encode("User: hi there\nAssistant:"))


# --- complete_code ------------------------------------------------------------------------------------------------

async def test_complete_code_continues_and_streams_what_it_returns(client):
    progress = Progress()
    result = await client.call_tool("complete_code", {"prefix": "def add(a, b):\n", "language": "python",
                                                      "max_new_tokens": 40}, progress_handler=progress)
    out = result.structured_content
    assert out["mode"] == "continuation"
    assert progress.text == out["text"]
    assert out["finish_reason"] in {"length", "eos", "code_boundary", "stop_string"}


async def test_complete_code_fills_in_the_middle_when_the_model_can(engines):
    engine = engines["fim"]
    args = {"prefix": "def add(a, b):\n    ", "suffix": "\n\nprint(add(1, 2))\n", "max_new_tokens": 10}
    async with Client(create_server(engine)) as client:
        model = json.loads((await client.read_resource("engine://model"))[0].text)
        out = (await client.call_tool("complete_code", args)).structured_content
    assert model["fill_in_the_middle"] == "qwen-coder/codegemma"
    assert out["mode"] == "fill_in_the_middle"
    fim_prompt = f"<|fim_prefix|>{args['prefix']}<|fim_suffix|>{args['suffix']}<|fim_middle|>"
    assert out["prompt_tokens"] == len(engine.encode(fim_prompt))


# --- summarise ----------------------------------------------------------------------------------------------------

async def test_summarise_a_short_text_in_one_generation(client):
    progress = Progress()
    result = await client.call_tool("summarise", {"text": "The fox ran. The dog slept. " * 5, "style": "tldr",
                                                  "max_words": 10}, progress_handler=progress)
    out = result.structured_content
    assert out["chunks"] == 1
    assert progress.text == out["text"]
    assert out["words"] == count_words(out["text"])
    assert out["text"] == out["text"].strip()  # the guard drops the space a base model starts its answer with


@pytest.mark.parametrize(("empty_answers", "style"), [(1, "bullets"), (1, "paragraph"), (2, "tldr")])
async def test_an_empty_summary_is_asked_again_under_another_framing_or_refused(client, monkeypatch, empty_answers,
                                                                                style):
    # The 270M base model sometimes ends its answer at once (a short announcement with bullet points gave text "").
    import mtp_mcp.server.summarise as summarise_module

    real = summarise_module.generate_streamed
    styles = []

    async def ends_at_once(engine, request, report, text_filter=None):
        styles.append(request.prompt)
        streamed = await real(engine, request, report, text_filter)
        if len(styles) <= empty_answers:
            return dataclasses.replace(streamed, text="")
        return streamed

    monkeypatch.setattr(summarise_module, "generate_streamed", ends_at_once)
    result = await client.call_tool("summarise", {"text": "The fox ran. The dog slept. " * 5, "style": style},
                                    raise_on_error=False)
    assert len(styles) == 2 and styles[0] != styles[1]  # asked twice, under two framings
    if empty_answers == 1:
        assert not result.is_error and result.structured_content["text"]
    else:
        assert result.is_error
        assert result.content[0].text == ("the model wrote no summary of this text: it ended its answer at once when "
                                          "asked for a TL;DR, and again when asked for bullet points; try another "
                                          "model")


async def test_summarise_beyond_the_context_maps_and_reduces_with_progress(engines):
    engine = engines["short"]  # context 256: a few hundred tokens of text need several chunks
    text = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(30))
    assert engine.count_tokens(text) > 256
    progress = Progress()
    async with Client(create_server(engine)) as client:
        result = await client.call_tool("summarise", {"text": text, "max_words": 10}, progress_handler=progress)
    out = result.structured_content
    assert out["chunks"] >= 2
    assert progress.text == out["text"]  # only the final summary is streamed as text
    counts = [p for p, _, _ in progress.events]
    assert counts == sorted(counts) and counts[-1] <= progress.events[-1][1]
    assert any(message is None for _, _, message in progress.events)  # the map steps report progress only
    assert out["prompt_tokens"] > engine.count_tokens(text)  # every chunk was read, plus the reduce step


# --- cancellation and concurrency ---------------------------------------------------------------------------------

async def test_cancelling_a_call_stops_its_generation_and_the_engine_goes_on(client, engines, monkeypatch):
    handles = spy_on_submissions(engines["plain"], monkeypatch)
    progress = Progress()
    call = asyncio.create_task(client.call_tool("generate", {"prompt": "Once", "max_new_tokens": 480},
                                                progress_handler=progress))
    await progress.first.wait()
    # A slow generation does not block listing tools or reading resources.
    assert len(await client.list_tools()) == 3
    assert json.loads((await client.read_resource("engine://stats"))[0].text)["status"] == "ready"
    assert not call.done()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    cancelled = await asyncio.wrap_future(handles[0].future)
    assert cancelled.finish_reason == "cancelled" and cancelled.stats.new_tokens < 480
    after = await client.call_tool("generate", {"prompt": "Once", "max_new_tokens": 5})
    assert after.structured_content["finish_reason"] == "length"


async def test_a_full_queue_is_refused_at_once(engines, monkeypatch):
    engine = engines["busy"]  # one request may wait while one runs
    handles = spy_on_submissions(engine, monkeypatch)
    async with Client(create_server(engine)) as client:
        progress = Progress()
        running = asyncio.create_task(client.call_tool("generate", {"prompt": "a", "max_new_tokens": 480},
                                                       progress_handler=progress))
        await progress.first.wait()  # the first is on the engine now, out of the queue
        waiting = asyncio.create_task(client.call_tool("generate", {"prompt": "b", "max_new_tokens": 5}))
        while len(handles) < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(ToolError, match="the engine is busy: 1 requests are already waiting"):
            await client.call_tool("generate", {"prompt": "c", "max_new_tokens": 5})
        running.cancel()
        assert (await waiting).structured_content["completion_tokens"] == 5  # served once the first gave way
        with pytest.raises(asyncio.CancelledError):
            await running


async def test_concurrent_calls_are_all_answered(client):
    calls = [client.call_tool("generate", {"prompt": f"Call {i}", "max_new_tokens": 8}) for i in range(4)]
    results = await asyncio.gather(*calls)
    assert [r.structured_content["completion_tokens"] for r in results] == [8, 8, 8, 8]


# --- errors -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("tool", "args", "message"), [
    ("generate", {}, "give exactly one of prompt"),
    ("generate", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "give exactly one of prompt"),
    ("generate", {"prompt": ""}, "prompt is ''; it must be text of 1 to 1,000,000 characters (or left out)"),
    ("generate", {"prompt": "   "}, "the prompt is empty"),
    ("generate", {"prompt": "x", "max_new_tokens": 0}, "max_new_tokens is 0; it must be a whole number from 1 to "),
    ("generate", {"prompt": "x", "temperature": 3}, "temperature is 3; it must be a finite number from 0 to 2"),
    ("generate", {"prompt": "x", "temperature": "nan"}, "temperature is 'nan'; it must be a finite number from 0 to 2"),
    ("generate", {"prompt": "x", "top_p": 0}, "top_p is 0; it must be a finite number greater than 0 and at most 1"),
    ("generate", {"prompt": "x", "stop": [""]}, "at least 1 character"),
    ("generate", {"prompt": "x", "max_new_tokens": "many"}, "max_new_tokens is 'many'; it must be a whole number"),
    ("generate", {"messages": []}, "messages is []; it must be a list of 1 to 256 items (or left out)"),
    ("generate", {"messages": [{"role": "robot", "content": "x"}]}, "'system', 'user' or 'assistant'"),
    ("generate", {"messages": [{"role": "system", "content": "x"}]}, "only system text"),
    ("generate", {"prompt": "hello " * 600}, "beyond the model's context of 512 tokens"),
    ("generate", {"prompt": "x", "max_new_tokens": 600}, "ask for at most 510 new tokens"),
    ("complete_code", {"prefix": ""}, "prefix is ''; it must be text of 1 to 1,000,000 characters"),
    ("complete_code", {"prefix": "x", "language": "py thon"}, "language is 'py thon'; it must be text of at most 40"),
    ("summarise", {"text": " \n "}, "the text is empty"),
    ("summarise", {"text": "x", "style": "poem"}, "style is 'poem'; it must be one of: paragraph, bullets, tldr"),
    ("summarise", {"text": "x", "max_words": 5}, "max_words is 5; it must be a whole number from 10 to "),
    ("summarise", {"text": "x", "max_words": 1000}, "leaves no room for the text in the model's context of 512"),
    ("nonexistent", {}, "Unknown tool"),
])
async def test_bad_calls_get_one_clear_error_and_the_server_carries_on(client, tool, args, message):
    result = await client.call_tool(tool, args, raise_on_error=False)
    assert result.is_error
    assert message in result.content[0].text
    assert "Traceback" not in result.content[0].text
    assert "\n" not in result.content[0].text and "pydantic" not in result.content[0].text  # one sentence
    assert not (await client.call_tool("generate", {"prompt": "ok", "max_new_tokens": 2})).is_error


async def test_engine_failures_become_tool_errors(checkpoints):
    engine = tiny_engine(checkpoints["plain"])
    engine.close()
    async with Client(create_server(engine)) as client:
        with pytest.raises(ToolError, match="the engine is shut down"):
            await client.call_tool("generate", {"prompt": "x"})


# --- the resident engine ------------------------------------------------------------------------------------------

async def test_a_loader_runs_once_in_the_background_and_its_engine_is_closed_at_shutdown(checkpoints):
    loaded = []

    def load():
        loaded.append(tiny_engine(checkpoints["plain"]))
        return loaded[-1]

    async with Client(create_server(load)) as client:
        assert len(await client.list_tools()) == 3  # answered whether or not the model is loaded yet
        out = (await client.call_tool("generate", {"prompt": "x", "max_new_tokens": 3})).structured_content
        stats = json.loads((await client.read_resource("engine://stats"))[0].text)
    assert out["completion_tokens"] == 3
    assert len(loaded) == 1
    assert stats["requests"] == 2  # the warm-up generation, then the call
    with pytest.raises(EngineClosedError):
        loaded[0].submit(None)


async def test_a_call_that_waits_for_the_model_gets_progress_while_it_loads(checkpoints, monkeypatch):
    import time

    import mtp_mcp.server.resident

    monkeypatch.setattr(mtp_mcp.server.resident, "LOADING_REPORT_INTERVAL_S", 0.1)

    def slow_load():
        time.sleep(1.0)
        return tiny_engine(checkpoints["plain"])

    progress = Progress()
    async with Client(create_server(slow_load)) as client:
        out = (await client.call_tool("generate", {"prompt": "x", "max_new_tokens": 3},
                                      progress_handler=progress)).structured_content
    loading = [event for event in progress.events if event[2] and "still loading" in event[2]]
    assert len(loading) >= 3 and out["completion_tokens"] == 3
    counts = [p for p, _, _ in progress.events]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)  # always growing, as MCP requires
    # Text deltas come with progress >= 1 (tokens); the loading reports stay below 1.
    assert "".join(message for p, _, message in progress.events if p >= 1 and message) == out["text"]
    assert all(p < 1 for p, _, _ in loading)


async def test_a_model_that_fails_to_load_is_reported_by_every_call():
    def load():
        raise ModelLoadError("model path '/nowhere' does not exist")

    async with Client(create_server(load)) as client:
        with pytest.raises(ToolError, match="the model could not be loaded: model path '/nowhere' does not exist"):
            await client.call_tool("generate", {"prompt": "x"})
        model = json.loads((await client.read_resource("engine://model"))[0].text)
    assert model["status"] == "failed" and "/nowhere" in model["error"]

"""--backend openai when the upstream misbehaves: down, slow, erroring, sending malformed streams, or reporting no
speculation. A real vLLM cannot be made to do most of this on purpose, so these tests answer in its place through an
in-process HTTP transport; the working path is tested against a real vLLM (tests/test_openai_upstream.py)."""

import json
import logging
import socket

import httpx2
import pytest
from fastmcp import Client

from mtp_mcp.engine.errors import EngineError, InvalidRequestError, ModelLoadError
from mtp_mcp.engine.openai_upstream import UpstreamBackend
from mtp_mcp.engine.options import UpstreamOptions
from mtp_mcp.engine.request import GenerationRequest
from mtp_mcp.server.app import create_server
from mtp_mcp.server.cli import run_serve

SECRET = "sk-very-secret-key"


def sse(*events: dict | str) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def chunk(text: str, tokens: int, finish: str | None = None, stop_reason=None) -> dict:
    return {"choices": [{"text": text, "finish_reason": finish, "stop_reason": stop_reason}],
            "usage": {"prompt_tokens": 3, "completion_tokens": tokens}}


GOOD_STREAM = sse(chunk("Hel", 1), chunk("lo", 2), chunk(" there", 3, "stop", None), "[DONE]")


class FakeUpstream:
    """Answers like a vLLM without speculation counters; `completions` is what /v1/completions answers."""

    def __init__(self, completions=None, not_up_for: int = 0):
        self.completions = completions or (lambda request: stream_response(GOOD_STREAM))
        self.not_up_for = not_up_for  # model listings refused before it is up
        self.seen: list[httpx2.Request] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.seen.append(request)
        path = request.url.path
        if path == "/v1/models":
            if self.not_up_for > 0:
                self.not_up_for -= 1
                raise httpx2.ConnectError("connection refused", request=request)
            return httpx2.Response(200, json={"data": [{"id": "fake", "max_model_len": 512}]})
        if path == "/tokenize":
            body = json.loads(request.content)
            if "messages" in body:
                return httpx2.Response(400, json={"error": {"message": "no chat template"}})
            return httpx2.Response(200, json={"tokens": list(range(len(body["prompt"].split()))), "count": 0,
                                              "max_model_len": 512})
        if path == "/v1/completions":
            return self.completions(request)
        return httpx2.Response(404, text="Not Found")  # /metrics, /version: not vLLM

    def backend(self, wait: float = 0, **options) -> UpstreamBackend:
        transport = httpx2.MockTransport(self)
        return UpstreamBackend.load(UpstreamOptions(**({"base_url": "http://upstream.test/v1"} | options)),
                                    transport=transport, sync_transport=transport, start_wait_s=wait)


def stream_response(body: str, status: int = 200) -> httpx2.Response:
    return httpx2.Response(status, text=body, headers={"content-type": "text/event-stream"})


def generate(backend: UpstreamBackend, prompt: str = "say hello", **options):
    try:
        return backend.generate(GenerationRequest(prompt, max_new_tokens=10, **options))
    finally:
        backend.close()


def test_a_working_stream_without_speculation_counters_says_they_are_not_reported():
    result = generate(FakeUpstream().backend())
    assert (result.text, result.finish_reason, result.stats.new_tokens) == ("Hello there", "eos", 3)
    assert result.stats.speculation_counts == "not_reported" and result.stats.drafter.startswith("upstream")


def test_a_stop_string_named_by_the_upstream_is_a_stop_string():
    stream = sse(chunk("Hi", 1), chunk("", 1, "stop", "\n\n"), "[DONE]")
    upstream = FakeUpstream(lambda request: stream_response(stream))
    result = generate(upstream.backend(), stop=("\n\n",))
    assert result.finish_reason == "stop_string"
    assert json.loads(upstream.seen[-1].content)["stop"] == ["\n\n"]


@pytest.mark.parametrize(("answer", "error", "message"), [
    (lambda r: stream_response("data: {not json\n\n"), EngineError, "not what an OpenAI-compatible server sends"),
    (lambda r: stream_response(sse(chunk("Hel", 1))), EngineError, "ended its stream before the generation finished"),
    (lambda r: httpx2.Response(500, json={"error": {"message": "CUDA out of memory"}}), EngineError,
     r"failed \(HTTP 500\): CUDA out of memory"),
    (lambda r: httpx2.Response(400, json={"error": {"message": "top_p must be in (0, 1]"}}), InvalidRequestError,
     r"rejected the request \(HTTP 400\): top_p must be in"),
    (lambda r: httpx2.Response(401, json={"error": "unauthorised"}), EngineError, "refused the API key"),
    (lambda r: httpx2.Response(502, text="<html>Bad Gateway</html>"), EngineError, r"HTTP 502\): <html>Bad Gateway"),
    (lambda r: stream_response(sse({"error": {"message": "engine died"}})), EngineError,
     "failed mid-generation: engine died"),
    (lambda r: httpx2.Response(200, json={"choices": []}), EngineError, "text/event-stream"),
])
def test_each_failure_of_the_upstream_is_one_sentence(answer, error, message):
    with pytest.raises(error, match=message) as raised:
        generate(FakeUpstream(answer).backend())
    assert "\n" not in str(raised.value)


def test_an_upstream_that_stays_silent_is_given_up_after_the_timeout():
    def silent(request):
        raise httpx2.ReadTimeout("timed out", request=request)

    with pytest.raises(EngineError, match=r"sent nothing for 7 s.*--upstream-timeout"):
        generate(FakeUpstream(silent).backend(timeout_s=7))


def test_the_backend_stays_up_after_a_failure_and_answers_the_next_call():
    answers = iter([httpx2.Response(500, json={"error": {"message": "busy"}}), stream_response(GOOD_STREAM)])
    backend = FakeUpstream(lambda request: next(answers)).backend()
    with pytest.raises(EngineError, match="busy"):
        backend.generate(GenerationRequest("hi", max_new_tokens=5))
    assert generate(backend, "hi").text == "Hello there"


def test_the_key_is_sent_as_a_header_and_never_logged_or_shown(caplog):
    def refuse(request):
        return httpx2.Response(500, json={"error": {"message": "down"}})

    caplog.set_level(logging.DEBUG)
    upstream = FakeUpstream(refuse)
    backend = upstream.backend(api_key=SECRET)
    with pytest.raises(EngineError) as raised:
        generate(backend)
    assert upstream.seen[-1].headers["authorization"] == f"Bearer {SECRET}"
    with pytest.raises(InvalidRequestError) as in_address:  # a password in the address is refused, and not repeated
        upstream.backend(base_url="http://admin:hunter2@upstream.test/v1?token=abc")
    shown = caplog.text + str(raised.value) + str(in_address.value) + repr(backend.options) + json.dumps(backend.info)
    for secret in (SECRET, "hunter2", "admin", "token=abc"):
        assert secret not in shown
    assert "http://upstream.test/v1" in str(raised.value) and "holds credentials" in str(in_address.value)


def test_a_server_started_before_its_upstream_waits_for_it():
    backend = FakeUpstream(not_up_for=2).backend(wait=30)
    assert backend.model == "fake" and backend.context_length == 512 and backend.tokenizer.chat_template is None
    backend.close()


def test_an_upstream_that_is_not_there_is_one_sentence_at_load():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ModelLoadError, match=rf"127.0.0.1:{port}/v1 could not be reached .*is it running\?"):
        UpstreamBackend.load(UpstreamOptions(base_url=f"http://127.0.0.1:{port}/v1"), start_wait_s=0)


def test_a_model_the_upstream_does_not_serve_is_named():
    with pytest.raises(ModelLoadError, match=r"does not serve 'other'; it serves: fake"):
        FakeUpstream().backend(model="other")


def test_a_prompt_beyond_the_upstream_context_is_refused_here():
    with pytest.raises(InvalidRequestError, match="beyond the model's context of 512 tokens"):
        generate(FakeUpstream().backend(), "word " * 600)


async def test_tool_errors_from_the_upstream_are_one_sentence_and_logged(caplog):
    backend = FakeUpstream(lambda r: httpx2.Response(503, json={"error": {"message": "overloaded"}})).backend()
    try:
        async with Client(create_server(backend)) as client:
            result = await client.call_tool("generate", {"prompt": "hi"}, raise_on_error=False)
            assert result.is_error and result.content[0].text.endswith("failed (HTTP 503): overloaded")
            assert len(await client.list_tools()) == 3
    finally:
        backend.close()


@pytest.mark.parametrize(("argv", "message"), [
    (["--backend", "openai"], "needs --base-url"),
    (["--backend", "openai", "--base-url", "ftp://x/v1"], "must be an http:// or https:// address"),
    (["--backend", "openai", "--base-url", "http://x/v1", "--model", "m"], "--model and --draft-model are for the local"),
    (["--backend", "openai", "--base-url", "http://x/v1", "--upstream-timeout", "0"], "must be more than 0 seconds"),
    (["--backend", "openai", "--base-url", "http://x/v1", "--tokenizer", "/no/such/dir"], "must be a folder"),
    (["--base-url", "http://x/v1"], "--base-url is for --backend openai"),
])
def test_serve_checks_upstream_options_before_starting(argv, message):
    from mtp_mcp.cli import build_parser, engine_options

    args = build_parser().parse_args(["serve", *argv])
    args.engine_options = engine_options(args)
    with pytest.raises(InvalidRequestError, match=message):
        run_serve(args)

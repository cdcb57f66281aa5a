"""`mtp-mcp generate`: text or JSON on stdout, exit code 2 and one sentence on stderr for bad input."""

import json
import threading

import pytest
from tiny_checkpoints import build_tiny_checkpoint

from mtp_mcp.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def test_generate_json_has_text_token_ids_finish_reason_and_stats(tiny_dir, capsys):
    code = main(["generate", "The quick brown fox", "--model", tiny_dir, "--max-new-tokens", "7", "--drafter",
                 "ngram", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out)
    assert len(result["token_ids"]) == 7 and result["finish_reason"] == "length"
    stats = result["stats"]
    for field in ("prompt_tokens", "new_tokens", "target_passes", "mean_tokens_per_pass", "acceptance_by_position",
                  "time_to_first_token_s", "tokens_per_second", "drafting_time_s", "verifying_time_s"):
        assert field in stats
    assert stats["drafter"] == "ngram" and stats["new_tokens"] == 7


def test_generate_streams_plain_text_to_stdout(tiny_dir, capsys):
    assert main(["generate", "def add(a, b):", "--model", tiny_dir, "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and "{" not in captured.out[:1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", ""], "prompt is empty"),
        (["generate", "hi", "--max-new-tokens", "0"], "max_new_tokens is 0"),
        (["generate", "hi", "--temperature", "-2"], "temperature"),
        (["generate", "hi", "--top-p", "1.5"], "top_p"),
        (["generate", "hi", "--model", "/no/such/model"], "does not exist"),
        (["generate", "hi", "--drafter", "magic"], "unknown drafter 'magic'"),
    ],
)
def test_bad_input_exits_2_with_one_sentence(args, message, tiny_dir, capsys):
    if "--model" not in args:
        args = [*args, "--model", tiny_dir]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and err.startswith("mtp-mcp: ")


def test_a_draft_model_with_another_tokenizer_is_refused(tiny_dir, tmp_path, capsys):
    other = build_tiny_checkpoint(tmp_path / "other", vocab_size=280)
    code = main(["generate", "hi", "--model", tiny_dir, "--drafter", "draft-model", "--draft-model", str(other)])
    assert code == 2
    assert "different tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--model", "/no/such/model"], "does not exist"),
        (["serve", "--drafter", "magic"], "unknown drafter 'magic'"),
        (["serve", "--num-draft-tokens", "99"], "num_draft_tokens is 99"),
        (["serve", "--max-queued-requests", "0"], "max_queued_requests is 0"),
    ],
)
def test_serve_refuses_bad_options_before_starting(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_an_auth_token_that_starts_with_a_dash_is_taken_in_the_equals_form():
    from mtp_mcp.cli import build_parser

    args = build_parser().parse_args(["serve", "--transport", "http", "--auth-token=-starts-with-a-dash"])
    assert args.auth_token == "-starts-with-a-dash"


def test_ctrl_c_cancels_the_running_generation(tiny_dir, monkeypatch):
    # Ctrl-C arrives as KeyboardInterrupt while the main thread waits for the result: the generation must be
    # cancelled (stopping within a step) before the engine is closed, not left to run to max_new_tokens.
    from mtp_mcp.engine.request import GenerationHandle

    handles = []
    wait = GenerationHandle.result

    def interrupted(self, timeout=None):
        handles.append(self)
        self.on_text_seen.wait(30)  # the generation is running
        raise KeyboardInterrupt

    def watch_text(self, request, on_text):
        original_init(self, request, on_text)
        self.on_text_seen = threading.Event()
        user = self.on_text
        self.on_text = lambda text, n: (self.on_text_seen.set(), user and user(text, n))

    original_init = GenerationHandle.__init__
    monkeypatch.setattr(GenerationHandle, "__init__", watch_text)
    monkeypatch.setattr(GenerationHandle, "result", interrupted)
    code = main(["generate", "The quick brown fox", "--model", tiny_dir, "--max-new-tokens", "400", "--drafter",
                 "none", "--json"])
    assert code == 130
    result = wait(handles[0], timeout=30)
    assert result.finish_reason == "cancelled" and len(result.token_ids) < 400

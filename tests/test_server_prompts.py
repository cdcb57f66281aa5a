"""Prompt building and the text rules of the server, on plain strings and the tiny tokenizers: no model runs."""

import pytest
from tiny_checkpoints import GEMMA_STYLE_CHAT_TEMPLATE, build_tiny_checkpoint
from transformers import AutoTokenizer

from mtp_mcp.engine.errors import InvalidRequestError
from mtp_mcp.server.prompts import (
    FIM_STYLES,
    CodeBoundary,
    chat_prompt,
    continuation_prompt,
    detect_fim_style,
    summary_prompt,
    transcript_prompt,
)
from mtp_mcp.server.schemas import ChatMessage
from mtp_mcp.server.summarise import SummaryGuard, count_words, pack_into_groups, split_into_chunks


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        name: AutoTokenizer.from_pretrained(build_tiny_checkpoint(root / name, **kwargs))
        for name, kwargs in {"plain": {}, "chat": {"chat_template": GEMMA_STYLE_CHAT_TEMPLATE},
                             "fim": {"fim": True}}.items()
    }


def stream(rule, pieces: list[str]) -> tuple[str, bool]:
    """Feeds pieces one by one, as the engine would; returns (text released, whether the rule stopped)."""
    out = []
    for piece in pieces:
        released, stopped = rule.push(piece)
        out.append(released)
        if stopped:
            return "".join(out), True
    return "".join(out) + rule.flush(), False


def chars(text: str) -> list[str]:
    return list(text)


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


# --- chat ---------------------------------------------------------------------------------------------------------

def test_chat_template_renders_with_its_own_bos(tokenizers):
    prompt = chat_prompt(tokenizers["chat"], [user("hi")])
    assert prompt.text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert prompt.add_special_tokens is False  # the tokenizer must not add a second <bos>


def test_chat_template_continues_a_final_assistant_message(tokenizers):
    prompt = chat_prompt(tokenizers["chat"], [user("hi"), ChatMessage(role="assistant", content="Hello, I")])
    assert prompt.text.endswith("<start_of_turn>assistant\nHello, I")


def test_template_errors_become_one_sentence(tokenizers, tmp_path):
    strict = AutoTokenizer.from_pretrained(build_tiny_checkpoint(
        tmp_path, chat_template="{{ raise_exception('Conversation roles must alternate') }}"))
    with pytest.raises(InvalidRequestError, match="chat template rejected these messages: Conversation roles"):
        chat_prompt(strict, [user("hi")])


def test_base_model_gets_a_transcript(tokenizers):
    messages = [ChatMessage(role="system", content="Be brief."), user("Hi"),
                ChatMessage(role="assistant", content="Hello."), user("Capital of France?")]
    prompt = chat_prompt(tokenizers["plain"], messages)
    assert prompt.text == "Be brief.\n\nUser: Hi\nAssistant: Hello.\nUser: Capital of France?\nAssistant:"
    assert prompt.add_special_tokens is True
    assert prompt.stop == ("\nUser:",)


def test_transcript_continues_a_final_assistant_message():
    prompt = transcript_prompt([user("Count"), ChatMessage(role="assistant", content="1, 2,")])
    assert prompt.text == "User: Count\nAssistant: 1, 2,"


def test_transcript_needs_more_than_system_text():
    with pytest.raises(InvalidRequestError, match="only system text"):
        transcript_prompt([ChatMessage(role="system", content="Be brief.")])


# --- fill in the middle -------------------------------------------------------------------------------------------

def test_fim_detected_only_when_markers_are_single_tokens(tokenizers):
    def encoder(name):
        return lambda text: tokenizers[name](text, add_special_tokens=False)["input_ids"]

    assert detect_fim_style(encoder("fim")) is FIM_STYLES[0]
    assert detect_fim_style(encoder("plain")) is None  # the markers are plain text to this tokenizer


def test_fim_prompt_is_prefix_suffix_middle():
    prompt = FIM_STYLES[0].prompt("def f(x):\n    ", "\n    return y\n")
    assert prompt.text == "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return y\n<|fim_middle|>"
    assert "<|file_separator|>" in prompt.stop


def test_continuation_prompt_fences_the_code_and_stops_at_the_suffix():
    prompt = continuation_prompt("x = 1\n", "\n\nprint(x)\n", "python")
    assert prompt.text == "```python\nx = 1\n"
    assert prompt.stop == ("\n```", "\nprint(x)")


# --- code boundary ------------------------------------------------------------------------------------------------

FUNCTION = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


@pytest.mark.parametrize("pieces", [chars, lambda text: [text]], ids=["char by char", "all at once"])
def test_code_boundary_stops_at_a_dedent(pieces):
    generated = "    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\ndef main():\n"
    text, stopped = stream(CodeBoundary(FUNCTION), pieces(generated))
    assert stopped
    assert text == "    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)"


def test_code_boundary_stops_at_a_blank_line():
    text, stopped = stream(CodeBoundary(FUNCTION), chars("    a = 1\n    b = 2\n    \n    c = 3\n"))
    assert (text, stopped) == ("    a = 1\n    b = 2", True)


def test_code_boundary_keeps_leading_blank_lines_and_the_cursor_line():
    # The cursor is mid-line after an opener: the line is completed, then the body (deeper) is kept.
    text, stopped = stream(CodeBoundary("def f(x):"), chars("  # doc\n\n    return x\nprint(f(1))"))
    assert (text, stopped) == ("  # doc\n\n    return x", True)


def test_code_boundary_stops_before_a_closing_brace():
    text, stopped = stream(CodeBoundary("function f() {\n  "), chars("return 1;\n}\n"))
    assert (text, stopped) == ("return 1;", True)


def test_code_boundary_drops_trailing_indentation_at_the_end():
    assert stream(CodeBoundary(FUNCTION), chars("    return n\n    ")) == ("    return n", False)


# --- summaries ----------------------------------------------------------------------------------------------------

def test_summary_prompts_for_a_base_model(tokenizers):
    bullets = summary_prompt(tokenizers["plain"], "Some text.", "bullets", 50)
    assert bullets.prompt.text == "Some text.\n\nKey points:\n- " and bullets.lead == "- "
    tldr = summary_prompt(tokenizers["plain"], "Some text.", "tldr", 50)
    assert tldr.prompt.text == "Some text.\n\nTL;DR:" and tldr.prompt.stop == ("\n",)


def test_summary_prompt_uses_the_chat_template(tokenizers):
    prompt = summary_prompt(tokenizers["chat"], "Some text.", "paragraph", 50)
    assert prompt.prompt.text.startswith("<bos><start_of_turn>user\nSummarise the following text as one paragraph")
    assert "at most 50 words" in prompt.prompt.text and not prompt.prompt.add_special_tokens


def test_summary_guard_cuts_a_repeated_sentence(tokenizers):
    guard = SummaryGuard(summary_prompt(tokenizers["plain"], "t", "paragraph", 100), 100)
    text, stopped = stream(guard, chars(" The model is fast. It is small. The model is fast. More."))
    assert (text, stopped, guard.finish_reason) == ("The model is fast. It is small.", True, "repetition")


def test_summary_guard_keeps_to_the_word_budget(tokenizers):
    guard = SummaryGuard(summary_prompt(tokenizers["plain"], "t", "paragraph", 6), 6)
    text, stopped = stream(guard, chars(" One two three. Four five. Six seven eight. Nine."))
    assert (text, stopped, guard.finish_reason) == ("One two three. Four five.", True, "length")


def test_summary_guard_bullets_start_with_the_lead_and_skip_repeats(tokenizers):
    guard = SummaryGuard(summary_prompt(tokenizers["plain"], "t", "bullets", 100), 100)
    text, stopped = stream(guard, chars("Costs rise.\n- Usage grows.\n- 1. costs rise.\n- More"))
    assert (text, stopped) == ("- Costs rise.\n- Usage grows.", True)


def test_words_are_counted_without_list_markers_and_dashes():
    assert count_words("- Costs rise — a lot.\n- Usage grows.") == 6


def test_summary_guard_drops_a_sentence_cut_by_the_token_limit(tokenizers):
    guard = SummaryGuard(summary_prompt(tokenizers["plain"], "t", "paragraph", 100), 100)
    assert stream(guard, chars(" Done here. And then the")) == ("Done here.", False)


# --- chunking -----------------------------------------------------------------------------------------------------

def one_token_per_word(text: str) -> int:  # a stand-in tokenizer
    return len(text.split())


def test_chunks_fit_the_budget_and_cut_at_paragraphs():
    paragraphs = [" ".join(f"w{p}_{i}" for i in range(30)) + "." for p in range(10)]
    text = "\n\n".join(paragraphs)
    chunks = split_into_chunks(text, 100, one_token_per_word)
    assert "".join(chunks) == text
    assert all(one_token_per_word(c) <= 100 for c in chunks)
    assert all(c.endswith(".\n\n") for c in chunks[:-1])
    assert len(chunks) == 4  # 300 words in chunks of three paragraphs


def test_text_within_the_budget_is_one_chunk():
    assert split_into_chunks("a b c", 100, one_token_per_word) == ["a b c"]


def test_partial_summaries_are_packed_in_order():
    groups = pack_into_groups(["a b c", "d e", "f g h i", "j"], 9, one_token_per_word)  # each counts 2 more: the join
    assert groups == ["a b c\n\nd e", "f g h i\n\nj"]

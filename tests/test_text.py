"""Incremental detokenization and stop strings."""

import pytest
from tiny_models import train_tiny_tokenizer

from mtp_mcp.engine.text import IncrementalDetokenizer, StopStringMatcher

SAMPLES = [
    "The quick brown fox 🙂🚀 jumps over 日本語 テキスト and “quotes”.",
    "def add(a, b):\n    return a + b\n",
    "ÜnïcödéÜnïcödé ß ß ß 🙂",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_deltas_add_up_to_the_decoded_text_and_never_hold_broken_characters(text):
    tokenizer = train_tiny_tokenizer()
    ids = tokenizer(text)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(token) for token in ids]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in delta for delta in deltas)
    if not text.isascii():  # some tokens hold half a character: nothing is emitted for them
        assert any(delta == "" for delta in deltas)


def test_stop_string_cuts_the_text_exactly_before_it():
    matcher = StopStringMatcher(("STOP",))
    released = []
    for piece in ["hello S", "T", "OP and more"]:
        text, stopped = matcher.push(piece)
        released.append(text)
        if stopped:
            break
    assert "".join(released) == "hello " and stopped


def test_text_that_only_starts_a_stop_string_is_held_back_then_released():
    matcher = StopStringMatcher(("\n\n",))
    assert matcher.push("line one\n") == ("line one", False)
    assert matcher.push("line two") == ("\nline two", False)
    assert matcher.flush() == ""


def test_earliest_of_several_stop_strings_wins():
    matcher = StopStringMatcher(("world", "lo w"))
    assert matcher.push("hello world") == ("hel", True)


def test_held_back_text_is_released_at_the_end():
    matcher = StopStringMatcher(("END",))
    assert matcher.push("almost EN") == ("almost ", False)
    assert matcher.flush() == "EN"

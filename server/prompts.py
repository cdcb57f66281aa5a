"""Turning tool arguments into prompts the loaded model continues well.

- Chat: the tokenizer's chat template when it has one (the rendered text holds its own special tokens, so the
  tokenizer must not add <bos> again); otherwise a plain "User:/Assistant:" transcript that a base model continues,
  with a stop string at the next user turn.
- Code: fill-in-the-middle when the tokenizer has FIM tokens (Qwen2.5-Coder / CodeGemma, StarCoder, DeepSeek-Coder
  spellings), otherwise a continuation of the prefix cut at a code boundary (CodeBoundary below).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mtp_mcp.engine.errors import InvalidRequestError
from mtp_mcp.engine.request import GenerationRequest
from mtp_mcp.server.schemas import ChatMessage, FinishReason

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    add_special_tokens: bool  # False when the text already holds them (a rendered chat template)
    stop: tuple[str, ...] = ()  # stop strings the prompt format itself needs, added to the caller's

    def request(self, max_new_tokens: int, stop: Sequence[str] = (), **sampling) -> GenerationRequest:
        """The engine request that continues this prompt; `sampling`: temperature, top_p, top_k, seed."""
        return GenerationRequest(self.text, max_new_tokens=max_new_tokens, stop=(*stop, *self.stop),
                                 add_special_tokens=self.add_special_tokens, **sampling)


TRANSCRIPT_NAMES = {"user": "User", "assistant": "Assistant"}


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[ChatMessage]) -> Prompt:
    """The prompt whose continuation is the next assistant turn (or the rest of a final assistant message)."""
    continue_last = messages[-1].role == "assistant"
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                [m.model_dump() for m in messages], tokenize=False,
                add_generation_prompt=not continue_last, continue_final_message=continue_last,
            )
        except Exception as error:  # jinja raises for conversations the template does not allow
            raise InvalidRequestError(f"the model's chat template rejected these messages: {error}") from None
        return Prompt(text=text, add_special_tokens=False)
    return transcript_prompt(messages)


def transcript_prompt(messages: Sequence[ChatMessage]) -> Prompt:
    """A base model has no chat format: a plain transcript, system text first, ending where the reply goes.

        <system text>

        User: <content>
        Assistant: <content>
        User: <content>
        Assistant:
    """
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    turns = [m for m in messages if m.role != "system"]
    if not turns:
        raise InvalidRequestError("messages hold only system text; add a user message to reply to")
    lines = [f"{TRANSCRIPT_NAMES[m.role]}: {m.content}" for m in turns]
    if turns[-1].role == "user":
        lines.append("Assistant:")
    text = "\n".join(lines)
    return Prompt(text=f"{system}\n\n{text}" if system else text, add_special_tokens=True, stop=("\nUser:",))


@dataclass(frozen=True, slots=True)
class FimStyle:
    name: str
    prefix: str
    suffix: str
    middle: str
    # Tokens that end the infill besides the model's EOS: decoding keeps special tokens, so they arrive as text.
    end_markers: tuple[str, ...]

    def prompt(self, prefix: str, suffix: str) -> Prompt:
        # Prefix-suffix-middle order, the one all three families were trained with.
        return Prompt(text=f"{self.prefix}{prefix}{self.suffix}{suffix}{self.middle}", add_special_tokens=True,
                      stop=self.end_markers)


FIM_STYLES = (
    FimStyle("qwen-coder/codegemma", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
             ("<|endoftext|>", "<|file_separator|>", "<|fim_pad|>", "<|file_sep|>")),
    FimStyle("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", ("<|endoftext|>", "<fim_pad>", "<file_sep>")),
    FimStyle("deepseek-coder", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>",
             ("<｜end▁of▁sentence｜>", "<|EOT|>")),
)


def detect_fim_style(encode: Callable[[str], list[int]]) -> FimStyle | None:
    """The FIM style whose three markers the tokenizer reads as single tokens, or None.

    `encode(text)` must tokenize without adding special tokens. A marker that splits into several tokens is plain
    text to this model: it was not trained to fill in the middle with it.
    """
    for style in FIM_STYLES:
        if all(len(encode(marker)) == 1 for marker in (style.prefix, style.suffix, style.middle)):
            return style
    return None


def continuation_prompt(prefix: str, suffix: str, language: str | None) -> Prompt:
    """Without FIM the model can only continue the prefix. Framing it as a fenced markdown code block helps a base
    model keep to code, and the closing fence it writes when the code is done is a natural end."""
    stop = ["\n```"]
    # The suffix's first line coming out of the model means the gap is filled.
    if first_suffix_line := next((line for line in suffix.splitlines() if line.strip()), None):
        stop.append("\n" + first_suffix_line)
    return Prompt(text=f"```{language or ''}\n{prefix}", add_special_tokens=True, stop=tuple(stop))


BLOCK_OPENERS = (":", "{", "(", "[")


class CodeBoundary:
    """Ends a code continuation where the code the cursor is in ends. The rule, line by line:

    1. The text up to the first newline completes the cursor's line: always kept.
    2. Each later line is judged when its first non-blank character arrives. A line indented less than the block
       being written ends that block: stop before it (so a closing '}' of the enclosing block, or the next
       top-level 'def', is not included). The block's indentation: one deeper than the last non-blank prefix line
       when that line opens a block (ends with ':', '{', '(' or '['); else the cursor line's indentation when the
       cursor line is not empty (the cursor was placed there); else (the prefix ends with a newline) the last
       non-blank line's.
    3. A blank line after a line of new code ends the statement group: stop there. (Finishing a line the prefix
       had started does not count as new code, so 'def f(x):' can be followed by a blank line and the body.)

    The text handed out ends at the end of the last line kept (its newline is not included). Indentation counts
    tabs as 4 columns.
    """

    finish_reason: FinishReason = "code_boundary"

    def __init__(self, prefix: str):
        lines = prefix.split("\n")
        cursor_line = lines[-1]
        anchor = next((line for line in reversed(lines) if line.strip()), "")
        if anchor.rstrip().endswith(BLOCK_OPENERS):
            self.block_indent = _indent(anchor) + 1
        elif cursor_line:
            self.block_indent = _indent(cursor_line)
        else:
            self.block_indent = _indent(anchor)
        self._in_kept_line = True
        self._cursor_line_is_new = not cursor_line.strip()  # finishing a started line is not new code
        self._wrote_code = False
        self._held = ""  # a newline and the indentation of a line not judged yet

    def push(self, text: str) -> tuple[str, bool]:
        released: list[str] = []
        for char in text:
            if self._in_kept_line:
                if char != "\n":
                    released.append(char)
                    self._wrote_code |= self._cursor_line_is_new and not char.isspace()
                    continue
                self._in_kept_line = False
            if not self._held:  # only a newline starts a held line
                self._held = char
                continue
            if char == "\n":
                if self._wrote_code:
                    return "".join(released), True  # a blank line
                released.append(self._held)  # blank lines before any code are kept
                self._held = char
            elif char in " \t":
                self._held += char
            elif _indent(self._held[1:]) < self.block_indent:
                return "".join(released), True
            else:
                released.append(self._held + char)
                self._held = ""
                self._wrote_code = True
                self._in_kept_line = True  # the rest of this line is kept, up to its newline
        return "".join(released), False

    def flush(self) -> str:
        return ""  # what is held is only a newline and indentation: no code


def _indent(line: str) -> int:
    expanded = line.expandtabs(4)
    return len(expanded) - len(expanded.lstrip(" "))


SummaryStyle = Literal["paragraph", "bullets", "tldr"]


@dataclass(frozen=True, slots=True)
class SummaryPrompt:
    prompt: Prompt
    lead: str  # text the prompt already started the answer with (a bullet marker); part of the summary
    unit: Literal["sentence", "line"]  # what SummaryGuard holds back and checks as one piece


def summary_prompt(tokenizer: PreTrainedTokenizerBase, text: str, style: SummaryStyle, max_words: int) -> SummaryPrompt:
    """An instruction through the chat template when there is one. Otherwise a prompt a base model continues with
    a summary: tried on Gemma 3 270M base, "TL;DR:" after the text gives a real summary sentence where "Summary:"
    mostly copies the text, and "Key points:\\n- " gives a bullet list."""
    unit = "line" if style == "bullets" else "sentence"
    if getattr(tokenizer, "chat_template", None):
        shape = {"paragraph": "as one paragraph", "bullets": "as a bulleted list, one '- ' line per point",
                 "tldr": "in one sentence"}[style]
        request = f"Summarise the following text {shape}, in at most {max_words} words.\n\n{text}"
        return SummaryPrompt(chat_prompt(tokenizer, [ChatMessage(role="user", content=request)]), "", unit)
    if style == "bullets":
        return SummaryPrompt(Prompt(f"{text}\n\nKey points:\n- ", True, ("\n\n",)), "- ", unit)
    # tldr ends with its first line; a paragraph may run over several sentences until a blank line.
    stop = ("\n",) if style == "tldr" else ("\n\n",)
    return SummaryPrompt(Prompt(f"{text}\n\nTL;DR:", True, stop), "", unit)

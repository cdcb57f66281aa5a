"""summarise: one generation when the text fits, map-reduce when it does not.

    text --split at paragraph/sentence breaks--> chunks --summarise each (map)--> partial summaries
         --pack into groups that fit, summarise each group (reduce), until one group is left--> final summary

Only the final generation streams its text; the earlier ones report progress without text, so the text messages
of the notifications always add up to the final summary. Progress counts tokens: each finished generation counts
for its whole token budget, so progress only grows; the total is the budget of all generations planned so far.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from mtp_mcp.engine.errors import EngineError, InvalidRequestError
from mtp_mcp.engine.stats import GenerationStats
from mtp_mcp.server.prompts import SummaryPrompt, SummaryStyle, summary_prompt
from mtp_mcp.server.schemas import FinishReason
from mtp_mcp.server.streaming import generate_streamed

if TYPE_CHECKING:
    from mtp_mcp.engine.backend import GenerationBackend

# English runs ~1.2-1.4 tokens per word on the Gemma/Llama/Qwen tokenizers; the margin lets the word budget
# (SummaryGuard), not the token budget, end most summaries on a whole sentence.
TOKENS_PER_WORD = 2
# Beyond this many tokens of input, small models lose the thread and prefill cost grows fast: longer text is
# summarised in chunks even when the context could take more.
MAX_CHUNK_TOKENS = 4096
# A partial summary gets this share of the input budget, so at least this many partials fit in one reduce step.
PARTIALS_PER_REDUCE = 4
MIN_INPUT_TOKENS = 64  # below this a chunk is too small to summarise usefully
_STYLE_WORDS = {"paragraph": "a paragraph", "bullets": "bullet points", "tldr": "a TL;DR"}

# (progress in tokens, planned total, text delta or None)
SummaryProgress = Callable[[int, int, str | None], Awaitable[None]]


@dataclass(slots=True)
class SummaryOutcome:
    text: str
    finish_reason: FinishReason
    stats: GenerationStats  # all generations of the call together
    chunks: int


async def summarise(
    engine: GenerationBackend, text: str, style: SummaryStyle, max_words: int, report: SummaryProgress
) -> SummaryOutcome:
    tokenizer = engine.tokenizer
    final_tokens = max_words * TOKENS_PER_WORD

    def prompt_overhead(piece_style: SummaryStyle) -> int:
        return engine.count_tokens(summary_prompt(tokenizer, "", piece_style, max_words).prompt.text)

    # The prompt around the text, for the final style and the paragraphs of partial summaries. Off the loop: a
    # tokenizer may ask the upstream (engine/upstream_tokenizer.py).
    overhead = max([await anyio.to_thread.run_sync(prompt_overhead, s) for s in {style, "paragraph"}])
    room = engine.context_length - overhead - 8  # for the text and the summary; 8: merges at the joins
    # The final summary needs its text plus final_tokens to fit; a partial one its chunk plus a quarter of a chunk.
    input_budget = min(room - final_tokens, room * PARTIALS_PER_REDUCE // (PARTIALS_PER_REDUCE + 1), MAX_CHUNK_TOKENS)
    if input_budget < MIN_INPUT_TOKENS:
        fitting_words = max((room - MIN_INPUT_TOKENS) // TOKENS_PER_WORD, 0)
        raise InvalidRequestError(
            f"max_words {max_words} leaves no room for the text in the model's context of "
            f"{engine.context_length} tokens; ask for at most {fitting_words} words"
        )
    chunks = await anyio.to_thread.run_sync(split_into_chunks, text, input_budget, engine.count_tokens)
    partial_tokens = input_budget // PARTIALS_PER_REDUCE
    tracker = _ProgressTracker(report, planned=final_tokens + (partial_tokens * len(chunks) if len(chunks) > 1 else 0))

    async def summarise_one(source: str, piece_style: SummaryStyle, words: int, tokens: int, final: bool):
        prompt = await anyio.to_thread.run_sync(summary_prompt, tokenizer, source, piece_style, words)
        request = prompt.prompt.request(tokens)
        streamed = await generate_streamed(engine, request, tracker.reporter(final), SummaryGuard(prompt, words))
        tracker.finished(tokens, streamed.stats)
        return streamed

    partials = list(chunks)
    while len(partials) > 1:  # map (first round), then reduce rounds until one group holds everything
        pieces = [await summarise_one(p, "paragraph", partial_tokens // TOKENS_PER_WORD, partial_tokens, False)
                  for p in partials]
        written = [p.text for p in pieces if p.text]
        if not written:
            raise EngineError("the model wrote no summary for any part of this text, so there is nothing to combine; "
                              "try another style or model")
        partials = await anyio.to_thread.run_sync(pack_into_groups, written, input_budget, engine.count_tokens)
        if len(partials) > 1:
            tracker.plan(partial_tokens * len(partials))
    final = await summarise_one(partials[0], style, max_words, final_tokens, True)
    if not final.text:
        # A small base model sometimes ends its answer at once under one framing (seen with a short announcement
        # and its bullet points): ask once more under another rather than return an empty summary.
        # (paragraph and tldr share one framing on base models, so the other is bullets unless bullets failed.)
        other: SummaryStyle = "bullets" if style != "bullets" else "paragraph"
        tracker.plan(final_tokens)
        final = await summarise_one(partials[0], other, max_words, final_tokens, True)
        if not final.text:
            raise EngineError(f"the model wrote no summary of this text: it ended its answer at once when asked for "
                              f"{_STYLE_WORDS[style]}, and again when asked for {_STYLE_WORDS[other]}; try another "
                              "model")
    return SummaryOutcome(final.text, final.finish_reason, tracker.stats, len(chunks))


class SummaryGuard:
    """Streams a summary a unit (sentence or line) at a time, and ends it before a unit that repeats an earlier one
    (small models loop) or that would take it past max_words. A unit's leading whitespace, newline included, goes
    out with it, so the summary never ends in whitespace; the lead the prompt started the answer with comes first."""

    def __init__(self, prompt: SummaryPrompt, max_words: int):
        self.finish_reason: FinishReason = "length"
        line_end = r"[^\n](?=\n)"
        self._unit_end = re.compile(line_end if prompt.unit == "line" else rf"[.!?][\"')\]]*(?=\s)|{line_end}")
        self._whole_lines = prompt.unit == "line"
        self._max_words = max_words
        self._lead = prompt.lead
        self._held = ""
        self._space = ""  # whitespace-only units, sent with the next unit that is kept
        self._seen: set[str] = set()
        self._words = 0
        self._released_any = False

    def push(self, text: str) -> tuple[str, bool]:
        self._held += text
        released: list[str] = []
        while match := self._unit_end.search(self._held):
            unit, self._held = self._held[: match.end()], self._held[match.end() :]
            if not unit.strip():
                self._space += unit
                continue
            if not self._accept(unit):
                return "".join(released), True
            released.append(self._take(self._space + unit))
            self._space = ""
        return "".join(released), False

    def flush(self) -> str:
        """The last unit when generation ended: kept if whole (a line, or a sentence with its end mark) and within
        the rules, or if it is all there is; a sentence cut off by the token limit is dropped."""
        unit, self._held, self._space = (self._space + self._held).rstrip(), "", ""
        if not unit.strip():
            return ""
        if not self._released_any:
            return self._take(unit)
        whole = self._whole_lines or unit.endswith((".", "!", "?", '"', "'", ")"))
        return self._take(unit) if whole and self._accept(unit) else ""

    def _accept(self, unit: str) -> bool:
        key = _normalised(unit)
        if key in self._seen:
            self.finish_reason = "repetition"
            return False
        words = count_words(unit)
        if self._words + words > self._max_words and self._released_any:
            self.finish_reason = "length"
            return False
        self._seen.add(key)
        self._words += words
        return True

    def _take(self, unit: str) -> str:
        if not self._released_any:
            unit = self._lead + unit.lstrip()
            self._released_any = True
        return unit


def count_words(text: str) -> int:
    """Words as a reader counts them: list markers and lone punctuation are not words."""
    return sum(1 for word in text.split() if any(char.isalnum() for char in word))


def _normalised(unit: str) -> str:
    """A sentence or bullet without its list marker, case and spacing: what counts as a repeat."""
    return re.sub(r"^\s*(?:(?:[-*•]|\d+[.)])\s*)+", "", unit).strip().lower()


class _ProgressTracker:
    def __init__(self, report: SummaryProgress, planned: int):
        self._report = report
        self.planned = planned
        self.done = 0  # token budgets of the finished generations
        self.stats: GenerationStats | None = None  # of every finished generation; the first keeps its drafter, TTFT

    def plan(self, tokens: int) -> None:
        self.planned += tokens

    def reporter(self, final: bool):
        async def report(tokens: int, delta: str) -> None:
            await self._report(self.done + tokens, self.planned, delta if final else None)

        return report

    def finished(self, budget: int, stats: GenerationStats) -> None:
        self.done += budget
        if self.stats is None:
            self.stats = GenerationStats(drafter=stats.drafter, time_to_first_token_s=stats.time_to_first_token_s)
        self.stats.add(stats)


def split_into_chunks(text: str, budget: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Cuts text into pieces of at most `budget` tokens, at paragraph breaks where possible, else sentence ends,
    else spaces. Each cut is aimed by the text's own characters-per-token ratio and then checked by counting."""
    chunks: list[str] = []
    rest, rest_tokens = text, count_tokens(text)
    while rest_tokens > budget:
        aim = int(len(rest) * budget / rest_tokens * 0.95)
        chunk = rest[: _break_before(rest, aim)]
        chunk_tokens = count_tokens(chunk)
        while chunk_tokens > budget:
            chunk = chunk[: _break_before(chunk, int(len(chunk) * 0.9))]
            chunk_tokens = count_tokens(chunk)
        chunks.append(chunk)
        rest = rest[len(chunk) :]
        # Counting the whole rest after every cut made long texts quadratic (2M characters: 70 s). The difference is
        # off only by a token or so per cut, so count exactly only where the rest may fit the budget.
        rest_tokens -= chunk_tokens
        if rest_tokens <= 2 * budget:
            rest_tokens = count_tokens(rest)
    chunks.append(rest)
    return [c for c in chunks if c.strip()]


def _break_before(text: str, limit: int) -> int:
    """The end of the last paragraph, sentence or word that ends by `limit`, looking back at most half of it."""
    for pattern in (r"\n\s*\n", r"[.!?]\s", r"\s"):
        ends = [m.end() for m in re.finditer(pattern, text[limit // 2 : limit])]
        if ends:
            return limit // 2 + ends[-1]
    return max(limit, 1)


def pack_into_groups(summaries: list[str], budget: int, count_tokens: Callable[[str], int]) -> list[str]:
    """Joins consecutive partial summaries into texts of at most `budget` tokens each (in order)."""
    groups: list[str] = []
    current, current_tokens = "", 0
    for summary in summaries:
        tokens = count_tokens(summary) + 2  # the blank line between summaries
        if current and current_tokens + tokens > budget:
            groups.append(current)
            current, current_tokens = "", 0
        current = f"{current}\n\n{summary}" if current else summary
        current_tokens += tokens
    groups.append(current)
    return groups


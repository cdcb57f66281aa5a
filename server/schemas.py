"""What the tools take and return. Limits live here, in the types, so they reach the JSON schema the host sees."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from mtp_mcp.engine.request import MAX_NEW_TOKENS_LIMIT, MAX_STOP_STRINGS
from mtp_mcp.engine.stats import GenerationStats

# Bounds on what one call may send, far above what fits any supported context: they only stop absurd payloads.
MAX_PROMPT_CHARS = 1_000_000
MAX_SUMMARY_INPUT_CHARS = 2_000_000
MAX_MESSAGES = 256
MAX_STOP_CHARS = 200
# Room for the stop strings a prompt format adds (transcript turns, FIM end markers) within the engine's limit.
MAX_USER_STOP_STRINGS = MAX_STOP_STRINGS - 4

PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
MaxNewTokens = Annotated[
    int,
    Field(ge=1, le=MAX_NEW_TOKENS_LIMIT, description="most tokens to generate; the prompt plus this must fit the "
          "model's context (see the engine://model resource)"),
]
StopStrings = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
    Field(max_length=MAX_USER_STOP_STRINGS, description="generation ends before the first of these strings; it is not "
          "included in the text"),
]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


Messages = Annotated[
    list[ChatMessage],
    Field(min_length=1, max_length=MAX_MESSAGES, description="a conversation; the reply continues it (a final "
          "assistant message is continued, not answered)"),
]

FinishReason = Literal["eos", "stop_string", "length", "cancelled", "code_boundary", "repetition"]


SPECULATION_COUNTED_BY = {
    "engine": "this server's engine",
    "upstream": "the upstream's counters (vLLM /metrics), over this call alone",
    "upstream_approximate": "the upstream's counters (vLLM /metrics) while other calls ran too: approximate",
    "not_reported": "not reported by the upstream",
}


class Speculation(BaseModel):
    """How much multi-token prediction helped: every target pass yields between 1 and k+1 tokens. A count is null
    where whoever generated the text does not report it (an upstream server, --backend openai)."""

    drafter: str = Field(description="what proposed the draft tokens (none: plain decoding)")
    counted_by: str = Field(description="where these counts come from: " + "; ".join(SPECULATION_COUNTED_BY.values()))
    target_passes: int | None = Field(description="forward passes of the full model while decoding")
    mean_tokens_per_pass: float | None = Field(description="tokens accepted per target pass, drafts kept plus the "
                                               "model's own token; 1.0 means no gain over plain decoding")
    acceptance_rate: float | None = Field(description="share of draft tokens the model agreed with")
    draft_tokens_proposed: int | None
    draft_tokens_accepted: int | None
    steps_without_draft: int | None = Field(description="target passes that verified no drafted token: the drafter "
                                            "had none, was paused, or none was expected to pay")
    drafter_pauses: int | None = Field(description="times the drafter was paused for losing to plain decoding")
    drafting_ms_per_pass: float | None = Field(description="what proposing cost per target pass, in milliseconds")

    @classmethod
    def from_stats(cls, stats: GenerationStats) -> Speculation:
        counts = stats.to_dict()
        if stats.speculation_counts == "not_reported":
            unknown = set(cls.model_fields) - {"drafter", "counted_by"}
        elif stats.speculation_counts != "engine":  # vLLM has no pauses, and its drafting time is not its own
            unknown = {"drafter_pauses", "drafting_ms_per_pass"}
        else:
            unknown = set()
        counts |= dict.fromkeys(unknown)
        return cls.model_validate(counts | {"counted_by": SPECULATION_COUNTED_BY[stats.speculation_counts]})


class Timing(BaseModel):
    time_to_first_token_s: float
    tokens_per_second: float = Field(description="generated tokens over the whole generation time, prefill included")
    total_time_s: float = Field(description="time the engine spent on this call (not counting time in the queue)")


class GenerationOutput(BaseModel):
    text: str = Field(description="the generated text (for complete_code: only the inserted code)")
    finish_reason: FinishReason = Field(description="eos: the model ended; stop_string: a stop string was reached; "
                                        "length: max_new_tokens (or the word budget) was reached; code_boundary: "
                                        "the current code block or statement group ended; repetition: the "
                                        "summary began repeating itself and the repeat was cut; cancelled")
    prompt_tokens: int
    prompt_tokens_reused: int = Field(description="leading prompt tokens the prefix cache already held from an "
                                      "earlier call, so they were not read again")
    completion_tokens: int = Field(description="tokens the model generated, including any cut off after a stop")
    speculation: Speculation
    timing: Timing

    @classmethod
    def build(cls, text: str, finish_reason: FinishReason, stats: GenerationStats, **extra) -> GenerationOutput:
        return cls(
            text=text,
            finish_reason=finish_reason,
            prompt_tokens=stats.prompt_tokens,
            prompt_tokens_reused=stats.prompt_tokens_reused,
            completion_tokens=stats.new_tokens,
            speculation=Speculation.from_stats(stats),
            timing=Timing(
                time_to_first_token_s=round(stats.time_to_first_token_s, 4),
                tokens_per_second=round(stats.tokens_per_second, 3),
                total_time_s=round(stats.total_time_s, 4),
            ),
            **extra,
        )


class CodeCompletion(GenerationOutput):
    mode: Literal["fill_in_the_middle", "continuation"] = Field(
        description="fill_in_the_middle when the model has FIM tokens (the suffix was used); continuation otherwise"
    )


class Summary(GenerationOutput):
    chunks: int = Field(description="parts the text was split into to fit the model's context (1: summarised whole)")
    words: int = Field(description="words in the summary")

"""Per-request speculation and timing statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

# Who counted the speculation statistics: this engine; an upstream server's counters for this request alone, or
# while other requests ran too (shares of shared counters); or nobody (the upstream does not report them).
SpeculationCounts = Literal["engine", "upstream", "upstream_approximate", "not_reported"]
_LEAST_CERTAIN_LAST: tuple[SpeculationCounts, ...] = ("engine", "upstream", "upstream_approximate", "not_reported")


@dataclass(slots=True)
class GenerationStats:
    drafter: str = ""
    prompt_tokens: int = 0
    prompt_tokens_reused: int = 0  # leading prompt tokens whose states the prefix cache already held
    new_tokens: int = 0
    target_passes: int = 0  # target forward passes while decoding (the prefill is not counted)
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    # Target passes that verified no drafted token: the drafter had none, was paused, or none was worth verifying.
    steps_without_draft: int = 0
    drafter_pauses: int = 0  # times the drafter was paused for losing to plain decoding (engine/draft_payoff.py)
    speculation_counts: SpeculationCounts = "engine"
    # proposed_at[i] / accepted_at[i]: drafts offered / kept at draft position i (0 = first token after the last one)
    proposed_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    prefill_time_s: float = 0.0
    drafting_time_s: float = 0.0
    verifying_time_s: float = 0.0
    time_to_first_token_s: float = 0.0
    total_time_s: float = 0.0

    def record_step(self, proposed: int, accepted: int) -> None:
        self.target_passes += 1
        self.steps_without_draft += proposed == 0
        self.draft_tokens_proposed += proposed
        self.draft_tokens_accepted += accepted
        while len(self.proposed_at) < proposed:
            self.proposed_at.append(0)
            self.accepted_at.append(0)
        for i in range(proposed):
            self.proposed_at[i] += 1
            self.accepted_at[i] += i < accepted

    def add(self, other: GenerationStats) -> None:
        """Adds another generation's counts and times to these (for one answer made of several generations).
        The drafter and the time to first token stay this one's; the counts are as certain as the less certain."""
        self.speculation_counts = max(self.speculation_counts, other.speculation_counts, key=_LEAST_CERTAIN_LAST.index)
        for name in ("prompt_tokens", "prompt_tokens_reused", "new_tokens", "target_passes", "draft_tokens_proposed",
                     "draft_tokens_accepted", "steps_without_draft", "drafter_pauses", "prefill_time_s",
                     "drafting_time_s", "verifying_time_s", "total_time_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.proposed_at, other.proposed_at), (self.accepted_at, other.accepted_at)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, count in enumerate(theirs):
                mine[i] += count

    @property
    def mean_tokens_per_pass(self) -> float:
        """New tokens per target pass: 1.0 for plain decoding, up to k+1 with k drafts."""
        return self.new_tokens / self.target_passes if self.target_passes else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.draft_tokens_accepted / self.draft_tokens_proposed if self.draft_tokens_proposed else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted_at, self.proposed_at)]

    @property
    def drafting_ms_per_pass(self) -> float:
        """What proposing cost per target pass (a suffix lookup, a draft model's forwards)."""
        return 1000 * self.drafting_time_s / self.target_passes if self.target_passes else 0.0

    @property
    def tokens_per_second(self) -> float:
        """End to end: new tokens over the whole request time, the prefill included."""
        return self.new_tokens / self.total_time_s if self.total_time_s > 0 else 0.0

    def to_dict(self) -> dict:
        fields = asdict(self)
        del fields["proposed_at"], fields["accepted_at"]
        return fields | {
            "mean_tokens_per_pass": round(self.mean_tokens_per_pass, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "acceptance_by_position": [round(r, 4) for r in self.acceptance_by_position],
            "drafting_ms_per_pass": round(self.drafting_ms_per_pass, 3),
            "tokens_per_second": round(self.tokens_per_second, 3),
        }


@dataclass(slots=True)
class EngineTotals:
    """Cumulative counts over every finished request since the engine started."""

    requests: int = 0
    prompt_tokens: int = 0
    prompt_tokens_reused: int = 0
    new_tokens: int = 0
    target_passes: int = 0
    draft_tokens_proposed: int = 0
    draft_tokens_accepted: int = 0
    steps_without_draft: int = 0
    generation_time_s: float = 0.0

    def add(self, stats: GenerationStats) -> None:
        self.requests += 1
        self.prompt_tokens += stats.prompt_tokens
        self.prompt_tokens_reused += stats.prompt_tokens_reused
        self.new_tokens += stats.new_tokens
        self.target_passes += stats.target_passes
        self.draft_tokens_proposed += stats.draft_tokens_proposed
        self.draft_tokens_accepted += stats.draft_tokens_accepted
        self.steps_without_draft += stats.steps_without_draft
        self.generation_time_s += stats.total_time_s

    def to_dict(self) -> dict:
        return asdict(self) | {
            "mean_tokens_per_pass": round(self.new_tokens / self.target_passes, 4) if self.target_passes else 0.0,
            "acceptance_rate": (
                round(self.draft_tokens_accepted / self.draft_tokens_proposed, 4) if self.draft_tokens_proposed else 0.0
            ),
            "tokens_per_second": (
                round(self.new_tokens / self.generation_time_s, 3) if self.generation_time_s > 0 else 0.0
            ),
        }

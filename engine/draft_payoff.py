"""Speculate only when it pays: how many drafted tokens the next target pass verifies, zero included.

A pass over n positions costs c(n) seconds (VerifyCostCurve: measured by the decode loop itself, kept across
requests). Verifying the first n drafted tokens yields 1 + E(n) tokens on average, E(n) = P_1 + ... + P_n, where P_i
is the chance that drafted tokens 1..i are all accepted: this request's record at draft position i, or the drafter's
own confidence where it gives one (the suffix drafter's occurrence counts) and it is lower. The rule verifies the n
that maximises (1 + E(n)) / c(n + 1). The drafting time is spent by then, so it does not count here; it counts in
the pause rule: a drafter whose recent steps, drafting included, yield fewer tokens per second than plain decoding
would is not asked for PAUSE_STEPS steps, then for twice as many after each further loss.

The record learns from every draft, verified or cut: once the tokens the draft guessed are committed, the length of
their common prefix is what verification would have accepted (exactly so under greedy decoding; under sampling the
chance of a deterministic token being kept equals the chance of the target sampling it). So a cut draft still
teaches the rule whether cutting was right.

None of this touches what is accepted: verification of the (shorter) draft is unchanged, so the output is too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Before any measurement of n > 1 positions, a pass is assumed to cost this much more per extra position, relative
# to one position (about what a 270M model's step shows on 2 CPU cores; a GPU's curve is flatter and is learned).
PRIOR_COST_SLOPE = 0.1
COST_AVERAGING = 0.2  # weight of a new measurement in VerifyCostCurve's running mean per n
MEASURED_AFTER = 3  # passes over n positions after which their own mean, not the line, gives c(n)
RECORD_DECAY = 0.9  # weight of the earlier record each time a draft position's outcome is learned
PAUSE_STEPS = 16
MAX_PAUSE_STEPS = 256
STEPS_BEFORE_PAUSE = 8
RECENT_DECAY = 0.8
LOSS_MARGIN = 0.9  # a drafter loses when its recent rate is below this share of plain decoding's


class VerifyCostCurve:
    """Seconds one target pass takes over n positions: a running mean per n measured by the decode loop, used once n
    was seen MEASURED_AFTER times, and a line c(n) = a + b (n - 1) fitted through all of them (weighted by how often
    each n was seen) for the others. The means matter where the true curve is not a line: on CPU the greedy head
    screens at most 8 positions, beyond which it computes the full logits (Gemma 3 270M: a pass over 17 positions
    costs about 3x one over 9). Owned by the engine; only its worker thread touches it."""

    def __init__(self) -> None:
        self._mean: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self._fitted: tuple[float, float] | None = None  # the line, fitted once per new measurement

    def record(self, positions: int, seconds: float) -> None:
        self._fitted = None
        if positions not in self._mean:
            self._mean[positions], self._count[positions] = seconds, 1
            return
        self._mean[positions] += COST_AVERAGING * (seconds - self._mean[positions])
        self._count[positions] += 1

    def line(self) -> tuple[float, float] | None:
        """(a, b) of c(n) = a + b (n - 1); None before the first measurement."""
        if self._fitted is None and self._mean:
            self._fitted = self._fit()
        return self._fitted

    def _fit(self) -> tuple[float, float]:
        if len(self._mean) == 1:
            (n, seconds), = self._mean.items()
            one = seconds / (1 + PRIOR_COST_SLOPE * (n - 1))
            return one, PRIOR_COST_SLOPE * one
        weights = {n: min(c, 20) for n, c in self._count.items()}
        total = sum(weights.values())
        mean_x = sum(w * (n - 1) for n, w in weights.items()) / total
        mean_y = sum(w * self._mean[n] for n, w in weights.items()) / total
        spread = sum(w * (n - 1 - mean_x) ** 2 for n, w in weights.items())
        slope = sum(w * (n - 1 - mean_x) * (self._mean[n] - mean_y) for n, w in weights.items()) / spread
        slope = max(slope, 0.0)  # more positions never cost less; noise can make the fit say so
        return max(mean_y - slope * mean_x, 1e-6), slope

    def seconds(self, positions: int) -> float | None:
        if self._count.get(positions, 0) >= MEASURED_AFTER:
            return self._mean[positions]
        line = self.line()
        return None if line is None else line[0] + line[1] * (positions - 1)


def best_draft_length(acceptance: list[float], cost: VerifyCostCurve) -> int:
    """The number of drafted tokens (0..len(acceptance)) to verify: argmax of (1 + E(n)) / c(n + 1).
    acceptance[i]: chance that drafted tokens 1..i+1 are all accepted. Pure; without measurements, all of them."""
    one = cost.seconds(1)
    if one is None:
        return len(acceptance)
    best, best_rate, expected = 0, 1.0 / one, 1.0
    for n, probability in enumerate(acceptance, start=1):
        expected += probability
        rate = expected / cost.seconds(n + 1)
        if rate > best_rate:
            best, best_rate = n, rate
    return best


@dataclass(slots=True)
class _PendingDraft:
    start: int  # index in the request's tokens of the first drafted token's place
    tokens: list[int]


@dataclass(slots=True)
class DraftPayoff:
    """One request's rule: how much of each draft to verify, and whether to ask the drafter at all."""

    cost: VerifyCostCurve
    # Decayed counts per draft position i: drafts that reached it, and those whose tokens 1..i+1 all held.
    offered: list[float] = field(default_factory=list)
    held: list[float] = field(default_factory=list)
    pending: list[_PendingDraft] = field(default_factory=list)
    paused_for: int = 0  # steps left without asking the drafter
    next_pause: int = PAUSE_STEPS
    pauses: int = 0
    steps_asked: int = 0  # since the start or the last pause
    recent_tokens: float = 0.0
    recent_seconds: float = 0.0

    def should_draft(self) -> bool:
        """False while the drafter is paused; counts the step."""
        if self.paused_for > 0:
            self.paused_for -= 1
            return False
        return True

    def cut(self, tokens: list[int], confidence: list[float] | None, first_index: int) -> int:
        """How many of the drafted `tokens` to verify; remembers the whole draft to learn from. first_index: where
        the first drafted token would sit among the request's tokens."""
        if not tokens:
            return 0
        self.pending.append(_PendingDraft(first_index, list(tokens)))
        acceptance = self._acceptance(len(tokens))
        if confidence is not None:
            # The drafter's confidence, tempered by what its drafts actually achieved in this request: a suffix match
            # seen once has confidence 1, which is often not so (on code prompts, trusting it alone cost ~10% of the
            # decoding speed against taking the smaller of the two, in one interleaved run).
            acceptance = [min(c, a) for c, a in zip(confidence, acceptance)]
        return best_draft_length(acceptance, self.cost)

    def learn(self, token_ids: list[int]) -> None:
        """Compares the pending drafts with the committed tokens and records each one whose outcome is known."""
        still = []
        for draft in self.pending:
            committed = token_ids[draft.start : draft.start + len(draft.tokens)]
            held = 0
            while held < len(committed) and committed[held] == draft.tokens[held]:
                held += 1
            if held < len(committed) or held == len(draft.tokens):
                self._record(len(draft.tokens), held)
            else:
                still.append(draft)
        self.pending = still

    def step(self, asked: bool, new_tokens: int, seconds: float) -> None:
        """After a target pass: `asked` whether the drafter was asked, `seconds` drafting plus verifying."""
        if not asked:
            return
        self.steps_asked += 1
        self.recent_tokens = RECENT_DECAY * self.recent_tokens + new_tokens
        self.recent_seconds = RECENT_DECAY * self.recent_seconds + seconds
        plain = self.cost.seconds(1)
        if self.steps_asked < STEPS_BEFORE_PAUSE or plain is None:
            return
        if self.recent_tokens / self.recent_seconds < LOSS_MARGIN / plain:
            self.pauses += 1
            self.paused_for, self.next_pause = self.next_pause, min(2 * self.next_pause, MAX_PAUSE_STEPS)
            self.steps_asked, self.recent_tokens, self.recent_seconds = 0, 0.0, 0.0
            self.pending.clear()

    def _acceptance(self, length: int) -> list[float]:
        """P_i from the record, with one half-accepted draft as the prior; made non-increasing in i."""
        result, previous = [], 1.0
        for i in range(length):
            offered = self.offered[i] if i < len(self.offered) else 0.0
            held = self.held[i] if i < len(self.held) else 0.0
            previous = min(previous, (held + 0.5) / (offered + 1.0))
            result.append(previous)
        return result

    def _record(self, length: int, held: int) -> None:
        while len(self.offered) < length:
            self.offered.append(0.0)
            self.held.append(0.0)
        for i in range(length):
            self.offered[i] = RECORD_DECAY * self.offered[i] + 1.0
            self.held[i] = RECORD_DECAY * self.held[i] + (i < held)

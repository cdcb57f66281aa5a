"""The verifier on hand-made inputs: greedy acceptance, and speculative sampling's output distribution."""

import pytest
import torch

from mtp_mcp.engine.verify import verify_greedy, verify_sampling

V = 5


@pytest.mark.parametrize(
    ("draft", "target", "accepted", "next_token"),
    [
        ([], [3], 0, 3),  # no draft: one plain step
        ([1, 2, 3], [1, 2, 3, 4], 3, 4),  # all accepted, bonus token from the last row
        ([1, 2, 3], [1, 0, 3, 4], 1, 0),  # first mismatch at position 1: keep one, correct to the target's token
        ([1, 2, 3], [0, 2, 3, 4], 0, 0),  # rejected at once: the target's own token
    ],
)
def test_greedy_keeps_the_agreeing_prefix_plus_one_target_token(draft, target, accepted, next_token):
    verdict = verify_greedy(draft, target)
    assert (verdict.accepted, verdict.next_token) == (accepted, next_token)


# Chi-square critical value for 4 degrees of freedom at significance 0.001: a correct sampler fails this with
# probability 1/1000 per seed; the seeds are fixed, so the test is deterministic.
CHI2_CRITICAL_DF4 = 18.47
SAMPLES = 6000

P = torch.tensor([[0.40, 0.25, 0.20, 0.10, 0.05], [0.05, 0.05, 0.30, 0.30, 0.30], [0.2, 0.2, 0.2, 0.2, 0.2]])
Q = torch.tensor([[0.10, 0.10, 0.10, 0.35, 0.35], [0.60, 0.10, 0.10, 0.10, 0.10]])


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def first_token_counts(verify, draft_probs) -> torch.Tensor:
    """Draws drafts from q (or uses a fixed deterministic draft), verifies, and counts the first emitted token."""
    generator = torch.Generator().manual_seed(1234)
    counts = torch.zeros(V)
    for _ in range(SAMPLES):
        if draft_probs is None:
            draft = [3, 0]
        else:
            draft = [int(torch.multinomial(q, 1, generator=generator)) for q in draft_probs]
        verdict = verify(draft, draft_probs, P, generator)
        first = draft[0] if verdict.accepted > 0 else verdict.next_token
        counts[first] += 1
    return counts


@pytest.mark.parametrize("draft_probs", [Q, None], ids=["sampled-drafter", "deterministic-drafter"])
def test_speculative_sampling_output_follows_the_target_distribution(draft_probs):
    counts = first_token_counts(verify_sampling, draft_probs)
    assert chi_square(counts, P[0]) < CHI2_CRITICAL_DF4


def test_second_token_follows_the_target_distribution_when_the_first_is_accepted():
    generator = torch.Generator().manual_seed(99)
    counts = torch.zeros(V)
    while counts.sum() < 4000:
        draft = [int(torch.multinomial(q, 1, generator=generator)) for q in Q]
        verdict = verify_sampling(draft, Q, P, generator)
        if verdict.accepted >= 1:
            second = draft[1] if verdict.accepted == 2 else verdict.next_token
            counts[second] += 1
    assert chi_square(counts, P[1]) < CHI2_CRITICAL_DF4


def wrong_rule(draft_tokens, draft_probs, target_probs, generator):
    """A plausible but wrong rule: on rejection, resample from p instead of the residual max(0, p - q)."""
    from mtp_mcp.engine.verify import Verdict

    for i, token in enumerate(draft_tokens):
        p, q = target_probs[i], draft_probs[i]
        if float(torch.rand((), generator=generator)) < min(1.0, float(p[token] / q[token])):
            continue
        return Verdict(i, int(torch.multinomial(p, 1, generator=generator)))
    return Verdict(len(draft_tokens), int(torch.multinomial(target_probs[-1], 1, generator=generator)))


def test_the_statistical_check_catches_a_wrong_acceptance_rule():
    counts = first_token_counts(wrong_rule, Q)
    assert chi_square(counts, P[0]) > CHI2_CRITICAL_DF4


def test_sampling_always_returns_a_token_and_never_accepts_beyond_the_draft():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        verdict = verify_sampling([1, 2], Q, P, generator)
        assert 0 <= verdict.accepted <= 2 and 0 <= verdict.next_token < V

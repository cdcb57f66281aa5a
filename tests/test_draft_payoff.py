"""Speculate only when it pays (engine/draft_payoff.py): the cost line, the cut, learning from cut drafts, pauses;
and decoding with it stays lossless for every drafter, the paused ones included."""

from __future__ import annotations

import pytest
import torch
from mtp_checkpoints import build_gemma4, build_qwen3_5
from tiny_models import CONTEXT, VOCAB, tiny_gemma3, tiny_llama, train_tiny_tokenizer

from mtp_mcp.engine.decode import generate
from mtp_mcp.engine.draft_payoff import (
    PAUSE_STEPS,
    PRIOR_COST_SLOPE,
    STEPS_BEFORE_PAUSE,
    DraftPayoff,
    VerifyCostCurve,
    best_draft_length,
)
from mtp_mcp.engine.drafters import create_drafter
from mtp_mcp.engine.drafters.autoregressive import NoDrafter
from mtp_mcp.engine.drafters.draft_model import DraftModelDrafter
from mtp_mcp.engine.drafters.prompt_lookup import PromptLookupDrafter
from mtp_mcp.engine.drafters.suffix import SuffixDrafter
from mtp_mcp.engine.drafters.suffix_index import GlobalIndex
from mtp_mcp.engine.loading import load_model
from mtp_mcp.engine.request import GenerationRequest
from mtp_mcp.engine.target import TargetModel

TOKENIZER = train_tiny_tokenizer(VOCAB)
EOS = frozenset({TOKENIZER.eos_token_id})


def curve(points: dict[int, float]) -> VerifyCostCurve:
    cost = VerifyCostCurve()
    for positions, seconds in points.items():
        cost.record(positions, seconds)
    return cost


def test_the_cost_line_fits_what_was_measured_and_assumes_a_prior_slope_before():
    assert VerifyCostCurve().seconds(3) is None
    one = curve({1: 0.05})
    assert one.seconds(1) == pytest.approx(0.05)
    assert one.seconds(6) == pytest.approx(0.05 * (1 + 5 * PRIOR_COST_SLOPE))
    line = curve({1: 0.05, 2: 0.06, 3: 0.07, 5: 0.09})
    assert line.seconds(9) == pytest.approx(0.13)
    noisy = curve({1: 0.06, 2: 0.05})  # more positions never cost less
    assert noisy.seconds(4) == pytest.approx(noisy.seconds(1))


def test_measured_means_override_the_line_where_the_cost_jumps():
    # On CPU the greedy head screens at most 8 positions; beyond, a pass costs far more than the line says.
    cost = VerifyCostCurve()
    for _ in range(3):
        for positions, seconds in {1: 0.05, 9: 0.09, 17: 0.3}.items():
            cost.record(positions, seconds)
    assert cost.seconds(17) == pytest.approx(0.3) and cost.seconds(5) < cost.seconds(9)
    assert best_draft_length([1.0] * 16, cost) == 8


def test_the_cut_verifies_what_maximises_tokens_per_second_zero_included():
    flat = curve({1: 0.05, 9: 0.05})
    steep = curve({1: 0.05, 3: 0.15})  # each position costs as much as the first
    confident = [0.95, 0.9, 0.85, 0.8]
    hopeless = [0.1, 0.01, 0.001]
    assert best_draft_length(confident, flat) == 4
    assert best_draft_length(hopeless, flat) == 3  # free positions are always worth verifying
    assert best_draft_length(hopeless, steep) == 0
    # (1 + E(n)) / c(n + 1) for steep: n = 0 gives 20 tokens/s, n = 1 19.5, n = 4 18: nothing pays here.
    assert best_draft_length(confident, steep) == 0
    middling = curve({1: 0.05, 2: 0.06})  # +20% per position
    assert best_draft_length([0.9, 0.8, 0.2, 0.1], middling) == 2
    assert best_draft_length([0.5], VerifyCostCurve()) == 1  # nothing measured: verify it all


def test_cut_drafts_are_learned_from_the_tokens_committed_later():
    payoff = DraftPayoff(curve({1: 0.05, 2: 0.06}))
    before = payoff._acceptance(3)
    tokens = [1, 2, 3]
    for _ in range(10):
        payoff.cut([7, 8, 9], None, len(tokens))  # a draft that keeps being right
        tokens += [7, 8, 9]
        payoff.learn(tokens)
    assert not payoff.pending
    after = payoff._acceptance(3)
    assert all(a > b for a, b in zip(after, before)) and after[2] > 0.9
    for _ in range(10):
        payoff.cut([5, 5, 5], None, len(tokens))  # and then wrong at once
        tokens += [6]
        payoff.learn(tokens)
    assert payoff._acceptance(3)[0] < 0.4
    payoff.cut([4, 4], None, len(tokens))
    tokens += [4]
    payoff.learn(tokens)
    assert len(payoff.pending) == 1  # its second token is not known yet


def test_a_drafters_confidence_is_tempered_by_what_its_drafts_achieved():
    cost = fixed({1: 0.05, 2: 0.06})  # +20% per position
    payoff = DraftPayoff(cost)
    sure = [1.0] * 8
    assert payoff.cut([1] * 8, sure, 0) == 8  # the record's prior: half of the drafts held, still worth it all
    tokens = [0]
    for _ in range(10):  # sure, yet wrong every time
        payoff.cut([7, 8, 9], sure[:3], len(tokens))
        tokens.append(5)
        payoff.learn(tokens)
    assert payoff.cut([1] * 8, sure, len(tokens)) == 0


def test_a_drafter_that_keeps_losing_is_paused_for_longer_each_time():
    payoff = DraftPayoff(curve({1: 0.05}))
    for _ in range(STEPS_BEFORE_PAUSE):
        assert payoff.should_draft()
        payoff.step(True, 1, 0.08)  # one token per 80 ms, against 50 ms plain
    assert payoff.pauses == 1
    assert [payoff.should_draft() for _ in range(PAUSE_STEPS)] == [False] * PAUSE_STEPS
    assert payoff.should_draft()
    for _ in range(STEPS_BEFORE_PAUSE):
        payoff.step(True, 1, 0.08)
    assert payoff.pauses == 2 and payoff.paused_for == 2 * PAUSE_STEPS
    winner = DraftPayoff(curve({1: 0.05}))
    for _ in range(5 * STEPS_BEFORE_PAUSE):
        winner.step(True, 3, 0.07)
    assert winner.pauses == 0


class FixedCost(VerifyCostCurve):
    """A cost curve that does not learn from the test's own (tiny-model) timings."""

    def record(self, positions: int, seconds: float) -> None:
        pass


def fixed(points: dict[int, float]) -> FixedCost:
    cost = FixedCost()
    for positions, seconds in points.items():
        VerifyCostCurve.record(cost, positions, seconds)
    return cost


def run(model, drafter, prompt_ids, cost: VerifyCostCurve | None, max_new_tokens=40, **request_fields):
    request = GenerationRequest(prompt="unused: ids are given", max_new_tokens=max_new_tokens, **request_fields)
    return generate(TargetModel(model), drafter, TOKENIZER, request, prompt_ids, EOS, CONTEXT, verify_cost=cost)


def reference(model, prompt_ids, max_new_tokens):
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=TOKENIZER.eos_token_id, pad_token_id=TOKENIZER.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


DRAFTERS = {
    "ngram": lambda: PromptLookupDrafter(4),
    "suffix": lambda: SuffixDrafter(16, GlobalIndex(1000)),
    "draft-model-self": lambda: DraftModelDrafter(tiny_gemma3(seed=0), 4),
    "draft-model-other": lambda: DraftModelDrafter(tiny_llama(seed=7), 3),
}
PROMPT = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n"


@pytest.mark.parametrize("drafter_name", DRAFTERS)
@pytest.mark.parametrize("cost", ["measured", "steep", "flat"])
def test_greedy_output_stays_identical_whatever_the_cut(drafter_name, cost):
    model = tiny_gemma3(seed=0)
    ids = TOKENIZER(PROMPT)["input_ids"]
    curve_for = {"measured": VerifyCostCurve(), "steep": fixed({1: 1.0, 2: 2.0}), "flat": fixed({1: 1.0, 9: 1.0})}
    result = run(model, DRAFTERS[drafter_name](), ids, curve_for[cost])
    assert result.token_ids == reference(model, ids, 40)
    if cost == "steep":  # nothing is worth verifying, as the stats say
        assert result.stats.draft_tokens_proposed == 0
        assert result.stats.steps_without_draft == result.stats.target_passes
    if cost == "flat" and drafter_name == "draft-model-self":  # a perfect drafter on free positions: all verified
        assert result.stats.mean_tokens_per_pass > 3


@pytest.mark.parametrize("builder", [build_qwen3_5, build_gemma4])
def test_a_paused_drafter_that_reads_hidden_states_catches_up_losslessly(monkeypatch, tmp_path, builder):
    """Gaps in the asking: the drafter gets the target states of every step it missed (DraftContext.new_hidden)."""
    asked = iter([True, False, False, True, False, True, True, False] * 20)
    monkeypatch.setattr(DraftPayoff, "should_draft", lambda self: next(asked))
    target = load_model(str(builder(tmp_path / "model", oracle=0.15)), "cpu", "float32", progress=False)
    ids = TOKENIZER(PROMPT)["input_ids"]
    drafter = create_drafter("mtp", target, None, 4)
    result = run(target.model, drafter, ids, fixed({1: 1.0, 9: 1.0}))
    assert result.token_ids == reference(target.model, ids, 40)
    assert 0 < result.stats.steps_without_draft < result.stats.target_passes
    assert result.stats.mean_tokens_per_pass > 1.2


def test_the_none_drafter_is_never_cut_or_paused():
    model = tiny_gemma3(seed=0)
    ids = TOKENIZER(PROMPT)["input_ids"]
    result = run(model, NoDrafter(), ids, VerifyCostCurve())
    assert result.token_ids == reference(model, ids, 40)
    assert result.stats.drafter_pauses == 0

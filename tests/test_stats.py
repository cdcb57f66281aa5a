"""Per-request statistics: derived rates and adding several generations into one answer's statistics."""

from mtp_mcp.engine.stats import GenerationStats


def stats_of(steps: list[tuple[int, int]], new_tokens: int) -> GenerationStats:
    stats = GenerationStats(drafter="ngram", new_tokens=new_tokens, total_time_s=2.0)
    for proposed, accepted in steps:
        stats.record_step(proposed, accepted)
    return stats


def test_rates_follow_from_the_recorded_steps():
    stats = stats_of([(3, 3), (3, 1), (0, 0)], new_tokens=7)
    assert stats.target_passes == 3 and stats.mean_tokens_per_pass == 7 / 3
    assert stats.acceptance_rate == 4 / 6
    assert stats.acceptance_by_position == [1.0, 0.5, 0.5]
    assert stats.tokens_per_second == 3.5


def test_adding_generations_adds_counts_times_and_per_position_counts():
    first, second = stats_of([(2, 2)], new_tokens=3), stats_of([(4, 1), (1, 0)], new_tokens=3)
    first.time_to_first_token_s = 0.5
    first.add(second)
    assert (first.new_tokens, first.target_passes, first.total_time_s) == (6, 3, 4.0)
    assert first.proposed_at == [3, 2, 1, 1] and first.accepted_at == [2, 1, 0, 0]
    assert first.time_to_first_token_s == 0.5 and first.drafter == "ngram"

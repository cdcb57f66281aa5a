"""vLLM's speculative-decoding counters from its Prometheus `/metrics`, for the statistics of one request.

vLLM counts over all of its requests: a request's share is the difference between a reading before it and one
after it, exact only when nothing else ran on the upstream meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

DRAFTS = "vllm:spec_decode_num_drafts_total"
DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens_total"
ACCEPTED_TOKENS = "vllm:spec_decode_num_accepted_tokens_total"
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits_total"  # prompt tokens read from vLLM's prefix cache


@dataclass(frozen=True, slots=True)
class SpeculationCounters:
    drafts: int  # target passes that verified a draft
    draft_tokens: int
    accepted_tokens: int

    def since(self, earlier: SpeculationCounters) -> SpeculationCounters:
        return SpeculationCounters(self.drafts - earlier.drafts, self.draft_tokens - earlier.draft_tokens,
                                   self.accepted_tokens - earlier.accepted_tokens)


def parse_speculation_counters(metrics_text: str, model: str) -> SpeculationCounters | None:
    """The counters for `model` (summed over vLLM's engines), or None when the upstream does not export them: it is
    not vLLM, or it runs without speculative decoding."""
    totals = parse_counters(metrics_text, model, (DRAFTS, DRAFT_TOKENS, ACCEPTED_TOKENS))
    if totals is None:
        return None
    return SpeculationCounters(*(int(totals[name]) for name in (DRAFTS, DRAFT_TOKENS, ACCEPTED_TOKENS)))


def parse_counters(metrics_text: str, model: str, names: tuple[str, ...]) -> dict[str, float] | None:
    """Each named sample's value for `model`, summed over its other labels; None unless all of them are there."""
    totals = dict.fromkeys(names, 0.0)
    seen = set()
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in totals and sample.labels.get("model_name", model) == model:
                totals[sample.name] += sample.value
                seen.add(sample.name)
    return totals if seen == set(names) else None

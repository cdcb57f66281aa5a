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
    totals = {DRAFTS: 0.0, DRAFT_TOKENS: 0.0, ACCEPTED_TOKENS: 0.0}
    seen = set()
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in totals and sample.labels.get("model_name", model) == model:
                totals[sample.name] += sample.value
                seen.add(sample.name)
    if seen != set(totals):
        return None
    return SpeculationCounters(int(totals[DRAFTS]), int(totals[DRAFT_TOKENS]), int(totals[ACCEPTED_TOKENS]))

"""Runs every method on every prompt, interleaved, and aggregates the runs.

Order: for each repeat, for each prompt, every method once, starting at a different method each time
(rotation by repeat + prompt index), so machine drift (thermal, other processes) hits all methods alike.
Each method first runs once untimed on a short generation (allocator, thread pools, lazy initialisation).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass

from mtp_mcp.benchmarks.memory import PeakMemory
from mtp_mcp.benchmarks.methods import Method
from mtp_mcp.benchmarks.workloads import Prompt

log = logging.getLogger(__name__)

REFERENCE_METHOD = "transformers"
BASELINE_ENGINE_METHOD = "engine-none"
LLAMA_CPP_METHOD = "llama.cpp"
ALL_WORKLOADS = "all"
WARMUP_NEW_TOKENS = 8


@dataclass(frozen=True, slots=True)
class RunRecord:
    method: str
    workload: str
    prompt: str
    repeat: int
    new_tokens: int
    seconds: float
    target_passes: int
    peak_memory_mib: float
    token_ids: list[int]

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class MethodSummary:
    """One method on one workload (or on all of them together)."""

    method: str
    workload: str
    tokens_per_second: float  # median over repeats of (tokens of the workload's prompts / their total time)
    tokens_per_second_runs: list[float]  # the per-repeat values the median is taken over
    speedup_vs_transformers: float | None
    speedup_vs_engine_none: float | None
    speedup_vs_llama_cpp: float | None  # None when llama.cpp did not run
    tokens_per_pass: float  # new tokens per target forward pass
    equal_to_reference: int  # runs whose tokens equal the transformers plain greedy tokens for the same prompt
    runs: int
    peak_memory_mib: float

    def to_dict(self) -> dict:
        return asdict(self)


def run_interleaved(
    methods: list[Method], prompts: list[Prompt], repeats: int, max_new_tokens: int, memory: PeakMemory
) -> list[RunRecord]:
    for method in methods:
        log.info("warming up %s", method.name)
        method.run(prompts[0], min(WARMUP_NEW_TOKENS, max_new_tokens))
    records: list[RunRecord] = []
    total = repeats * len(prompts) * len(methods)
    for repeat in range(repeats):
        for prompt_index, prompt in enumerate(prompts):
            start = (repeat + prompt_index) % len(methods)
            for method in methods[start:] + methods[:start]:
                memory.reset()
                run = method.run(prompt, max_new_tokens)
                record = RunRecord(
                    method=method.name,
                    workload=prompt.workload,
                    prompt=prompt.name,
                    repeat=repeat,
                    new_tokens=len(run.token_ids),
                    seconds=run.seconds,
                    target_passes=run.target_passes,
                    # A method in a process of its own (llama.cpp) reports that process's peak.
                    peak_memory_mib=getattr(method, "peak_memory_mib", memory.peak_mib)(),
                    token_ids=run.token_ids,
                )
                records.append(record)
                log.info("[%d/%d] repeat %d, %s %s, %s: %d tokens in %.2f s (%.2f tok/s)", len(records), total,
                         repeat + 1, prompt.workload, prompt.name, method.name, record.new_tokens, record.seconds,
                         record.tokens_per_second)
    return records


def summarise_runs(records: list[RunRecord], method_names: list[str], workloads: list[str]) -> list[MethodSummary]:
    """Per method and workload, plus ALL_WORKLOADS (every prompt of the run together) when there are several."""
    reference = {
        (r.workload, r.prompt): r.token_ids for r in records if r.method == REFERENCE_METHOD and r.repeat == 0
    }
    groups = [*workloads, ALL_WORKLOADS] if len(workloads) > 1 else list(workloads)
    summaries: list[MethodSummary] = []
    for workload in groups:
        in_group = [r for r in records if workload in (ALL_WORKLOADS, r.workload)]
        median = {name: _median_rate([r for r in in_group if r.method == name]) for name in method_names}
        for name in method_names:
            runs = [r for r in in_group if r.method == name]
            if not runs:
                continue
            summaries.append(
                MethodSummary(
                    method=name,
                    workload=workload,
                    tokens_per_second=median[name][0],
                    tokens_per_second_runs=median[name][1],
                    speedup_vs_transformers=_ratio(median[name][0], median.get(REFERENCE_METHOD)),
                    speedup_vs_engine_none=_ratio(median[name][0], median.get(BASELINE_ENGINE_METHOD)),
                    speedup_vs_llama_cpp=_ratio(median[name][0], median.get(LLAMA_CPP_METHOD)),
                    tokens_per_pass=sum(r.new_tokens for r in runs) / max(1, sum(r.target_passes for r in runs)),
                    equal_to_reference=sum(r.token_ids == reference.get((r.workload, r.prompt)) for r in runs),
                    runs=len(runs),
                    peak_memory_mib=max(r.peak_memory_mib for r in runs),
                )
            )
    return summaries


def _median_rate(runs: list[RunRecord]) -> tuple[float, list[float]]:
    """Median over repeats of the repeat's tokens per second, each repeat's prompts pooled (tokens / seconds)."""
    per_repeat = []
    for repeat in sorted({r.repeat for r in runs}):
        in_repeat = [r for r in runs if r.repeat == repeat]
        seconds = sum(r.seconds for r in in_repeat)
        per_repeat.append(sum(r.new_tokens for r in in_repeat) / seconds if seconds > 0 else 0.0)
    return (statistics.median(per_repeat) if per_repeat else 0.0), per_repeat


def _ratio(value: float, baseline: tuple[float, list[float]] | None) -> float | None:
    if baseline is None or baseline[0] <= 0:
        return None
    return value / baseline[0]

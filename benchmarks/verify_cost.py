"""What verifying k drafts costs: one greedy verification step over n = k + 1 positions, against n = 1 (plain
decoding).

Speculation pays only while this ratio stays near 1 for small n (decoding is memory-bound: all weights are read
once whatever n is). Each step appends n tokens to a cache that already holds VERIFY_COST_CACHE_TOKENS tokens,
finds the target's greedy token at every position (`TargetModel.greedy_tokens`, as the engine's greedy loop does)
and is then rolled back. The full logits of the same n positions, which sampling needs instead, are timed beside it. Variants (stock
transformers modules vs the engine's CPU kernels) are interleaved in one run.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from mtp_mcp.benchmarks.methods import synchronize
from mtp_mcp.benchmarks.workloads import VERIFY_COST_CACHE_TOKENS, VERIFY_COST_POSITIONS
from mtp_mcp.engine.target import TargetModel

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class VerifyCost:
    variant: str
    positions: int
    forward_ms: float  # median time of one greedy verification step: decoder + greedy tokens, `positions` tokens
    ratio_to_one: float  # forward_ms / forward_ms at 1 position, same variant
    greedy_head_ms: float  # median time of the greedy tokens alone (the output layer's share of forward_ms)
    logits_ms: float  # median time of the full float32 logits of the same positions (what sampling needs)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def measure_verify_cost(
    targets: dict[str, TargetModel], token_ids: list[int], trials: int, positions: tuple[int, ...] = VERIFY_COST_POSITIONS
) -> list[VerifyCost]:
    """targets: variant name -> target model. token_ids: at least VERIFY_COST_CACHE_TOKENS + max(positions) real token ids."""
    needed = VERIFY_COST_CACHE_TOKENS + max(positions)
    if len(token_ids) < needed:
        raise ValueError(f"verify cost needs {needed} token ids, got {len(token_ids)}")
    context, fed = token_ids[:VERIFY_COST_CACHE_TOKENS], token_ids[VERIFY_COST_CACHE_TOKENS:]
    for target in targets.values():
        target.prefill(context)

    timings: dict[tuple[str, int], dict[str, list[float]]] = {}
    for trial in range(trials + 1):  # trial 0 warms every shape up and is not kept
        for n in positions[trial % len(positions) :] + positions[: trial % len(positions)]:
            for variant, target in targets.items():
                started = time.perf_counter()
                hidden = target.forward(fed[:n], logits_for_last=0).hidden
                target.greedy_tokens(hidden)
                synchronize(target.device)
                step_done = time.perf_counter()
                target.rollback(n)
                head_started = time.perf_counter()
                target.greedy_tokens(hidden)
                synchronize(target.device)
                head_done = time.perf_counter()
                target.logits(hidden)
                synchronize(target.device)
                logits_done = time.perf_counter()
                if trial:
                    times = timings.setdefault((variant, n), {"step": [], "head": [], "logits": []})
                    times["step"].append((step_done - started) * 1e3)
                    times["head"].append((head_done - head_started) * 1e3)
                    times["logits"].append((logits_done - head_done) * 1e3)
        if trial:
            log.info("verify cost: trial %d/%d done", trial, trials)
    for target in targets.values():
        target.release()

    results = []
    for variant in targets:
        one = statistics.median(timings[(variant, 1)]["step"])
        for n in positions:
            times = {name: statistics.median(values) for name, values in timings[(variant, n)].items()}
            results.append(VerifyCost(variant, n, times["step"], times["step"] / one, times["head"], times["logits"]))
    return results

"""What verifying k drafts costs: one target forward over n = k + 1 positions, against n = 1 (plain decoding).

Speculation pays only while this ratio stays near 1 for small n (decoding is memory-bound: all weights are read
once whatever n is). Each forward appends n tokens to a cache that already holds CACHE_TOKENS tokens and is then
rolled back, exactly as a verification step does; logits are computed for all n positions, as verify needs them.
Variants (e.g. stock transformers modules vs the engine's CPU kernels) are interleaved in one run.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from engine.target import TargetModel

log = logging.getLogger(__name__)

POSITIONS = (1, 2, 3, 4, 5, 8, 16)
CACHE_TOKENS = 200


@dataclass(frozen=True, slots=True)
class VerifyCost:
    variant: str
    positions: int
    forward_ms: float  # median time of one target forward (decoder + output layer) over `positions` tokens
    ratio_to_one: float  # forward_ms / forward_ms at 1 position, same variant
    output_layer_ms: float  # median time of the output layer alone on `positions` rows

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def measure_verify_cost(
    targets: dict[str, TargetModel], token_ids: list[int], trials: int, positions: tuple[int, ...] = POSITIONS
) -> list[VerifyCost]:
    """targets: variant name -> target model. token_ids: at least CACHE_TOKENS + max(positions) real token ids."""
    needed = CACHE_TOKENS + max(positions)
    if len(token_ids) < needed:
        raise ValueError(f"verify cost needs {needed} token ids, got {len(token_ids)}")
    context, fed = token_ids[:CACHE_TOKENS], token_ids[CACHE_TOKENS:]
    for target in targets.values():
        target.prefill(context)
    hidden_size = next(iter(targets.values())).model.config.get_text_config().hidden_size

    forward_ms: dict[tuple[str, int], list[float]] = {}
    head_ms: dict[tuple[str, int], list[float]] = {}
    for trial in range(trials + 1):  # trial 0 warms every shape up and is not kept
        for n in positions[trial % len(positions) :] + positions[: trial % len(positions)]:
            for variant, target in targets.items():
                started = time.perf_counter()
                target.forward(fed[:n])
                _synchronize(target.device)
                forward_done = time.perf_counter()
                target.rollback(n)
                hidden = torch.randn(n, hidden_size, dtype=target.model.dtype, device=target.device)
                head_started = time.perf_counter()
                target.logits(hidden)
                _synchronize(target.device)
                head_done = time.perf_counter()
                if trial:
                    forward_ms.setdefault((variant, n), []).append((forward_done - started) * 1e3)
                    head_ms.setdefault((variant, n), []).append((head_done - head_started) * 1e3)
        if trial:
            log.info("verify cost: trial %d/%d done", trial, trials)
    for target in targets.values():
        target.release()

    results = []
    for variant in targets:
        one = statistics.median(forward_ms[(variant, 1)])
        for n in positions:
            median = statistics.median(forward_ms[(variant, n)])
            results.append(VerifyCost(variant, n, median, median / one, statistics.median(head_ms[(variant, n)])))
    return results


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

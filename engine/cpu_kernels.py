"""A CPU kernel that keeps verification cheap: the output layer with its weight prepacked for oneDNN.

Why: verifying k drafts feeds k+1 rows through the model in one pass, and that only pays if it costs about as much
as one row (decoding is memory-bound: every weight is read once whatever the row count). On CPU the output layer
(Gemma 3 270M: 262144 x 640 floats, 671 MB, half or more of a one-token forward) breaks that: torch's default
`F.linear` leaves its fast path from 4 rows on and costs ~2x at 4-5 rows and ~3x at 8. The same product through
oneDNN with the weight reordered once at load ("prepacked") costs about the same for 1 to 8 rows. Measured by
`mtp-mcp bench --verify-cost --threads 1` (Xeon with AVX-512, torch 2.13; median ms of the output layer alone,
interleaved in one run; BENCHMARKS.md has the whole-model numbers):

    rows                     1     2     3     4     5     8    16
    F.linear (stock)        56    57    68   127   117   188   131
    oneDNN prepacked        57    64    69    66    67    72    94

The decoder layers' projections also grow from 4 rows on, but prepacking them too measured only 5-10% faster at
4-8 positions (within this machine's noise) for 400 MB more, so they stay as they are.

Invariant: one row goes through the stock `F.linear` on the original weight, so plain decoding computes bit for bit
what transformers computes; two or more rows go through oneDNN, which differs from it only in float rounding (~1e-5
relative on the logits). The benchmark checks that greedy outputs stay token-identical to transformers.
Cost: the prepacked copy doubles the output layer's memory (the original stays: it is also the input embedding).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Below this many rows the stock kernel is as fast and bit-identical to transformers' own decode step.
PACKED_MIN_ROWS = 2
# oneDNN picks the packed layout for a typical row count; 4 was the fastest hint for 1..16 rows (hints 1, 4, 16 and
# none measured).
_PACKING_ROWS_HINT = 4


class PrepackedLinear(torch.nn.Module):
    """A drop-in for an nn.Linear: the same weight (shared, not copied) plus a oneDNN-prepacked copy of it for
    multi-row inputs."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # A plain attribute, not a buffer: derived from the weight at load, not saved, and never converted by .to()
        # (a oneDNN tensor cannot be). Swap the layer after the model has its final device and dtype.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _PACKING_ROWS_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features]
        rows = x.numel() // self.in_features
        if rows < PACKED_MIN_ROWS:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"prepacked for >= {PACKED_MIN_ROWS} rows")


def use_cpu_kernels(model: torch.nn.Module) -> int:
    """Swaps the output layer of a float32 CPU model for a PrepackedLinear, in place. Returns how many modules were
    swapped (0 when the model is not float32 on CPU, torch lacks oneDNN, or the output layer is not a plain Linear)."""
    head = model.get_output_embeddings()
    parameter = next(model.parameters())
    usable = (
        parameter.device.type == "cpu"
        and parameter.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and type(head) is torch.nn.Linear
    )
    if not usable:
        log.debug("CPU kernels not used (device %s, dtype %s, output layer %s)", parameter.device, parameter.dtype,
                  type(head).__name__)
        return 0
    model.set_output_embeddings(PrepackedLinear(head))
    log.info("output layer prepacked for multi-position verification (+%.0f MB)", head.weight.nbytes / 2**20)
    return 1

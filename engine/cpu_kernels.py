"""CPU kernels that keep a decoding step cheap, for float32 models on CPU (what Engine.load runs). Quantized models
(engine/quantized.py) compute on the native kernels instead; for them this module only sets the kernels' threads
and, where the lean Gemma 3 pass does not apply, attention one row at a time (engine/row_attention.py).

Why: decoding is memory-bound (every weight is read once per step, whatever the number of rows), so verifying k
drafts in one pass of k+1 rows should cost about as much as one row, and a step should read as few bytes as it can.
Stock torch breaks the first on CPU: `F.linear` leaves its fast path from 4 rows on and costs ~2x at 4-5 rows and
~3x at 8. Three kernels, all measured with `mtp-mcp bench --verify-cost --threads 1` (Xeon with AVX-512, torch 2.13;
medians in ms, interleaved in one run; BENCHMARKS.md has the whole-step numbers):

1. The output layer prepacked for oneDNN (its weight reordered once at load): as cheap for 1-8 rows as for one.
   Used for the full logits that sampling needs (Gemma 3 270M: 262144 x 640 floats, 671 MB):

       rows                     1     2     3     4     5     8    16
       F.linear (stock)        56    57    68   127   117   188   131
       oneDNN prepacked        57    64    69    66    67    72    94

2. The decoder layers' projections prepacked the same way, from 4 rows on (at 2-3 rows the stock kernel is still
   on its fast path and faster). One greedy step of the whole model, 4-8 positions: 108-118 ms against 119-140 ms
   with stock projections (1-3 positions equal). Costs a second copy of the projection weights, so it is done only
   while the model with every copy takes at most half of the machine's memory.

3. QuantizedArgmaxScreen, for greedy decoding, which needs only the argmax of the output layer: it reads a Q8_0
   copy (34 bytes per 32 weights instead of 128) and leaves a handful of candidate rows to compute exactly. Exact,
   see the class.

Invariant: one row always goes through the stock `F.linear` on the original weights, the kernel transformers runs
for one position, and the screen's argmax is exactly that of the output layer's float32 logits. (A prompt fed in
chunks still rounds differently from transformers' one-piece prefill, by 2e-4..1e-3 in the hidden states: equality
with transformers is shown in tokens, on every prompt measured, not in floats.) From a layer's threshold on
(2 rows for the output layer, 4 for the projections) rows go through oneDNN, which differs from the stock kernel only
in float rounding (~1e-5 relative); the benchmark checks that greedy outputs stay token-identical to transformers.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from mtp_mcp.engine import native_ops
from mtp_mcp.engine.lean_gemma3 import lean_gemma3_supported
from mtp_mcp.engine.quantized import is_quantized, quantize_weight
from mtp_mcp.engine.row_attention import use_row_attention

log = logging.getLogger(__name__)

# Below this many rows the stock kernel is as fast, and it is the kernel transformers' own decode step runs.
HEAD_PACKED_MIN_ROWS = 2
# The decoder's smaller projections stay on the stock kernel's fast path up to 3 rows and are faster there.
DECODER_PACKED_MIN_ROWS = 4
# The decoder projections are prepacked only while the model with its extra copies fits in this share of the RAM.
_DECODER_PACKING_MEMORY_SHARE = 0.5
# oneDNN picks the packed layout for a typical row count; 4 was the fastest hint for 1..16 rows (hints 1, 4, 16 and
# none measured).
_PACKING_ROWS_HINT = 4


class PrepackedLinear(torch.nn.Module):
    """A drop-in for an nn.Linear: the same weight (shared, not copied) plus a oneDNN-prepacked copy of it for
    inputs of min_rows rows or more."""

    def __init__(self, linear: torch.nn.Linear, min_rows: int):
        super().__init__()
        self.min_rows = min_rows  # inputs with fewer rows take the stock kernel on the original weight
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # A plain attribute, not a buffer: derived from the weight at load, not saved, and never converted by .to()
        # (a oneDNN tensor cannot be). Swap the layer after the model has its final device and dtype.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _PACKING_ROWS_HINT)
        # For greedy decoding, which needs only the argmax of this layer's output (see TargetModel.greedy_tokens).
        self.argmax_screen: QuantizedArgmaxScreen | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features]
        rows = x.numel() // self.in_features
        if rows < self.min_rows:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"prepacked for >= {self.min_rows} rows")


# Unit roundoff of float32, and the dot-product error factor gamma_K = K u / (1 - K u): any float32 summation order
# (blocked, FMA, SIMD lanes) of a K-term dot product x . w lands within gamma_K * sum|x_i w_i| of the exact value.
_FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def dot_error_factor(terms: int) -> float:
    """gamma_K for K-term float32 dot products (Higham, Accuracy and Stability of Numerical Algorithms, 3.1)."""
    k_u = terms * _FLOAT32_UNIT_ROUNDOFF
    return k_u / (1.0 - k_u)


class QuantizedArgmaxScreen:
    """Narrows the argmax of `hidden @ W.T` over a large vocabulary to a few candidate rows, reading a Q8_0 copy of
    the float weight W (engine/native_ops.products) instead of W; the caller then computes those few logits
    exactly.

    Why: greedy decoding needs only the argmax, and the output layer is memory-bound (Gemma 3 270M: 671 MB of
    float32 per pass, half of a one-token forward on CPU). The screen is exact, not a heuristic: the kernels compute
    approx_v = h_hat . W_hat_v, where W_hat is W in Q8_0 blocks and h_hat is h as the kernels quantize it (int8 per
    group of 32 values: each value off by at most its group's max|h| / 254, plus rounding), to float rounding
    (at most (groups + 10) u |h_hat| |W_hat_v|, u the float32 unit roundoff: exact integer dots, one scale product
    and one accumulation per group). So, by Cauchy-Schwarz,
        |h . W_v - approx_v| <= |h| |W_v - W_hat_v| + |h - h_hat| |W_hat_v| + rounding,
    with the per-row norms computed once here; the bound also covers the float rounding of any kernel that
    computes h . W_v in float32 (gamma_K |h| |W_v|). Every row whose upper bound reaches the largest lower bound is
    kept, and the row holding the float32 argmax is always among them.
    """

    # The products' time grows with rows: at 8 hidden rows the screen is still cheaper than the prepacked logits.
    max_rows = 8

    def __init__(self, weight: torch.Tensor, chunk_rows: int = 16384):
        """weight: the float output layer [V, K], K a multiple of 32 (ValueError otherwise)."""
        weight = weight.detach()
        self.in_features = weight.shape[1]
        self._blocks = quantize_weight(weight, GGMLQuantizationType.Q8_0)
        gamma = dot_error_factor(self.in_features)
        weight_error, dequantized_norm = [], []
        for start in range(0, len(weight), chunk_rows):
            rows = weight[start : start + chunk_rows].float()
            dequantized = native_ops.dequantized_rows(self._blocks, torch.arange(start, start + len(rows)))
            # norms in float32 are off by a few u relative to the exact ones: 1e-5 covers it
            weight_error.append((rows - dequantized).norm(dim=1) * (1 + 1e-5) + (gamma + 1e-5) * rows.norm(dim=1))
            dequantized_norm.append(dequantized.norm(dim=1) * (1 + 1e-5))
        self._weight_error = torch.cat(weight_error)  # multiplies |h|
        self._dequantized_norm = torch.cat(dequantized_norm)  # |W_hat_v|, multiplies |h - h_hat|
        self._max_weight_error = float(self._weight_error.max())
        self._max_dequantized_norm = float(self._dequantized_norm.max())
        self._rounding = (self.in_features // 32 + 10) * _FLOAT32_UNIT_ROUNDOFF

    def candidates(self, hidden: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """hidden: [n, K] float32. Returns, per row, the ascending vocabulary ids that may hold the argmax of the
        float32 logits, and [n] ceilings: every id left out has a float32 logit below its row's ceiling. A row that
        is not finite gets no ids."""
        h = hidden.float().contiguous()
        approx = native_ops.products(h, [self._blocks])
        h_norm = h.norm(dim=1)
        # |h - h_hat|: at most max|h| / 254 per value of each group of 32 (with room for rounding), in float32.
        group_max = h.abs().view(len(h), -1, 32).amax(dim=2)
        rest_norm = (group_max.square().sum(dim=1) * 32).sqrt() * (1 / 254 + 1e-5) * (1 + 1e-5)
        constant = self._rounding * (h_norm + rest_norm) * self._max_dequantized_norm
        # bound_v = h_norm * weight_error_v + rest_norm * dequantized_norm_v + constant, never above widest.
        widest = h_norm * self._max_weight_error + rest_norm * self._max_dequantized_norm + constant
        # Two passes over the vocabulary, then exact bounds on the few rows within 2 * widest of the top: both the
        # row with the largest lower bound and every row whose upper bound reaches it lie there.
        near_top = approx >= (approx.amax(dim=1) - 2 * widest)[:, None]
        candidates, ceilings = [], []
        for row in range(h.shape[0]):
            ids = near_top[row].nonzero()[:, 0]
            if len(ids) == 0:  # NaN or inf in the hidden state: no bound holds, leave the row to the full logits
                candidates.append(ids)
                ceilings.append(torch.tensor(float("inf")))
                continue
            near = approx[row, ids]
            bound = h_norm[row] * self._weight_error[ids] + rest_norm[row] * self._dequantized_norm[ids] + constant[row]
            ceiling = (near - bound).max()
            candidates.append(ids[near + bound >= ceiling])
            ceilings.append(ceiling)
        return candidates, torch.stack(ceilings)


def use_cpu_kernels(model: torch.nn.Module) -> int:
    """Applies the kernels above to a float32 CPU model, in place: swaps the output layer (and, memory allowing,
    every projection of the decoder) for a PrepackedLinear and gives the output layer a QuantizedArgmaxScreen.
    Returns how many modules were swapped: 0 when the model is not float32 on CPU, torch lacks oneDNN, or the output
    layer is not a plain Linear. Call it after the model has its final device and dtype."""
    native_ops.set_threads(torch.get_num_threads())
    head = model.get_output_embeddings()
    if is_quantized(model):
        # The lean Gemma 3 pass computes each row alone by itself; transformers' modules (every other model, and
        # whatever runs them, as a draft model does) need their attention one row at a time for that: the kernels'
        # int8 activations turn a last-bit difference into another level.
        row_attention = use_row_attention(model)
        if lean_gemma3_supported(model):
            log.info("CPU kernels: quantized weights, the lean Gemma 3 pass")
        elif row_attention:
            log.info("CPU kernels: quantized weights, attention one row at a time")
        else:
            log.info("CPU kernels: quantized weights; this model's attention cannot run one row at a time, so a "
                     "verification pass may round differently from plain decoding")
        return 0
    # The screen bounds h . W_v; an output layer with a bias (Phi, GPT-J, CodeGen) adds b_v, which the bound does
    # not cover, so such a layer gets no screen and greedy tokens come from its full logits.
    screenable = getattr(head, "bias", None) is None
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
    packed_head = PrepackedLinear(head, HEAD_PACKED_MIN_ROWS)
    try:
        if screenable:
            packed_head.argmax_screen = QuantizedArgmaxScreen(head.weight)
    except (ValueError, NotImplementedError) as error:  # a width the blocks cannot hold (not a multiple of 32)
        log.info("greedy decoding reads the float32 output layer: %s", error)
    model.set_output_embeddings(packed_head)
    # Already added: the prepacked head (1x its float32 bytes) and the screen's Q8_0 copy (~1/4, ~180 MB for Gemma 3).
    swapped = 1 + _prepack_decoder_projections(model, extra_bytes=head.weight.nbytes * 5 // 4)
    log.info("CPU kernels: %d layers prepacked for multi-position verification%s", swapped,
             ", Q8_0 argmax screen for greedy decoding" if packed_head.argmax_screen is not None else "")
    return swapped


def cpu_kernels_in_use(model: torch.nn.Module) -> dict:
    """What use_cpu_kernels left on this model, for the engine's info: how many layers are prepacked, whether
    greedy tokens come from the Q8_0 argmax screen, and the native kernels' instruction set and threads."""
    head = model.get_output_embeddings()
    return {
        "prepacked_layers": sum(isinstance(module, PrepackedLinear) for module in model.modules()),
        "argmax_screen": getattr(head, "argmax_screen", None) is not None,
        "native_instruction_set": native_ops.instruction_set(),
        "native_threads": native_ops.threads(),
    }


def _prepack_decoder_projections(model: torch.nn.Module, extra_bytes: int) -> int:
    """Swaps every nn.Linear inside the decoder for a PrepackedLinear if the model, the copies already made
    (extra_bytes) and these copies fit in _DECODER_PACKING_MEMORY_SHARE of the RAM. Returns how many were swapped."""
    decoder = model.get_decoder()
    projections = [
        (parent, name, child)
        for parent in decoder.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear
    ]
    copies = sum(child.weight.nbytes for _, _, child in projections)
    model_bytes = sum(p.nbytes for p in model.parameters())
    ram = _physical_memory_bytes()
    if ram is None or model_bytes + extra_bytes + copies > _DECODER_PACKING_MEMORY_SHARE * ram:
        log.info("decoder projections not prepacked: +%.0f MB would not leave half of the RAM free", copies / 2**20)
        return 0
    for parent, name, child in projections:
        setattr(parent, name, PrepackedLinear(child, DECODER_PACKED_MIN_ROWS))
    return len(projections)


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None

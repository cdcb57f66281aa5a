"""CPU kernels that keep a decoding step cheap, for float32 models on CPU (what Engine.load runs).

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

3. Int8ArgmaxScreen, for greedy decoding, which needs only the argmax of the output layer: it reads an int8 copy
   (a quarter of the bytes) and leaves a handful of candidate rows to compute exactly. Greedy tokens at 1 / 5 / 8
   rows: 21 / 38 / 48 ms against 53 / 65 / 69 ms for the prepacked full logits. Exact, see the class.

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

from mtp_mcp.engine.int8_weights import Int8Linear, split_levels, split_residue, two_level_product
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
        self.argmax_screen: Int8ArgmaxScreen | None = None

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


class Int8ArgmaxScreen:
    """Narrows the argmax of `hidden @ W.T` over a large vocabulary to a few candidate rows, reading an int8 copy
    of W (a quarter of float32's bytes) instead of W; the caller then computes those few logits exactly.

    Why: greedy decoding needs only the argmax, and the output layer is memory-bound (Gemma 3 270M: 671 MB of
    float32 per pass, half of a one-token forward on CPU). The screen is exact, not a heuristic:
      W_v ~ s_v q_v with q_v int8 (per-row scale), and h ~ h_hat = a (z_1 + z_2 / 126) with z_1, z_2 integer vectors in
      [-63, 63] (engine/int8_weights.two_level_product: the rest r = h - h_hat is at most max|h|/15876). fbgemm
      computes z_l . q_v exactly in int32, so approx_v = sum_l a_l s_v (z_l . q_v) up to a few float roundings, and
        |h . W_v - approx_v| <= |h| |W_v - s_v q_v| + |r| |s_v q_v| + rounding       (Cauchy-Schwarz),
      where the per-row norms are computed once here. The bound also covers the float rounding of any kernel that
      computes h . W_v in float32 (gamma_K |h| |W_v|). So every row whose upper bound reaches the largest lower bound
      is kept, and the row holding the float32 argmax is always among them.
    For an int8 output layer (engine/int8_weights.Int8Linear) W is s q itself: the screen reads the layer's own
    int8 rows (no copy) and its weight error is rounding alone.
    Measured on Gemma 3 270M hidden states (1,874 positions of the benchmark texts): median 8 candidates, max 366;
    about 1% of positions then need their full row of logits (a near-tie within rounding, see TargetModel).
    The integer trick relies on fbgemm's choice of quantization parameters; the first Int8Linear of a process checks
    it on random inputs and raises RuntimeError if the products are not exact, so a changed torch falls back to
    float32.
    """

    # fbgemm's time grows with rows (two per hidden row): at 16 hidden rows the screen costs more than the prepacked
    # full logits (125 vs 91 ms on Gemma 3 270M), at 8 it is still cheaper (48 vs 69 ms).
    max_rows = 8

    def __init__(self, int8_rows: Int8Linear, weight_error: torch.Tensor | None = None):
        """int8_rows: s q. weight_error [V], which multiplies |h|: |W_v - s_v q_v| + (gamma_K + 1e-5) |W_v| for a
        float weight W screened through an int8 copy; None when W is s q itself (rounding alone)."""
        self.in_features = int8_rows.in_features
        self._int8_rows = int8_rows
        # |s_v q_v| (multiplies |r|); norms in float32 are off by a few u relative to the exact ones: 1e-5 covers it.
        self._dequantized_norm = torch.cat([
            int8_rows.dequantized_rows(torch.arange(start, min(start + 16384, int8_rows.out_features))).norm(dim=1)
            for start in range(0, int8_rows.out_features, 16384)]) * (1 + 1e-5)
        if weight_error is None:
            weight_error = (dot_error_factor(self.in_features) + 1e-5) * self._dequantized_norm
        self._weight_error = weight_error
        self._max_weight_error = float(self._weight_error.max())
        self._max_dequantized_norm = float(self._dequantized_norm.max())
        int8_rows.packed  # read at every greedy step: packed at load, not at the first request

    @classmethod
    def for_float_weight(cls, weight: torch.Tensor, chunk_rows: int = 16384) -> Int8ArgmaxScreen:
        """A screen over an int8 copy of a float32 weight [V, K]."""
        weight = weight.detach()
        int8_rows = Int8Linear.from_float(weight, chunk_rows=chunk_rows)
        gamma = dot_error_factor(weight.shape[1])
        weight_error = torch.cat([
            (rows.float() - int8_rows.dequantized_rows(torch.arange(start, start + len(rows)))).norm(dim=1)
            + (gamma + 1e-5) * rows.float().norm(dim=1)
            for start in range(0, len(weight), chunk_rows)
            for rows in [weight[start : start + chunk_rows]]])
        return cls(int8_rows, weight_error)

    def candidates(self, hidden: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """hidden: [n, K] float32. Returns, per row, the ascending vocabulary ids that may hold the argmax of the
        float32 logits, and [n] ceilings: every id left out has a float32 logit below its row's ceiling. A row that
        is not finite gets no ids."""
        h = hidden.float()
        levels = split_levels(h, self._int8_rows.pad)
        approx = two_level_product(levels, self._int8_rows.packed)
        rest = split_residue(h, levels)
        h_norm = h.norm(dim=1)
        # rest was computed in float32: add a few roundings of |h| to its norm. The constant term covers the float
        # roundings of approx itself (a handful of u relative to |h| |s_v q_v|), with a wide margin.
        rest_norm = rest.norm(dim=1) + 8 * _FLOAT32_UNIT_ROUNDOFF * h_norm
        constant = 64 * _FLOAT32_UNIT_ROUNDOFF * self._max_dequantized_norm * h_norm
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
    every projection of the decoder) for a PrepackedLinear and gives the output layer an Int8ArgmaxScreen.
    Returns how many modules were swapped: 0 when the model is not float32 on CPU, torch lacks oneDNN, or the output
    layer is not a plain Linear. Call it after the model has its final device and dtype."""
    head = model.get_output_embeddings()
    # The screen bounds h . W_v; an output layer with a bias (Phi, GPT-J, CodeGen) adds b_v, which the bound does
    # not cover, so such a layer gets no screen and greedy tokens come from its full logits.
    screenable = getattr(head, "bias", None) is None
    if isinstance(head, Int8Linear):  # int8 weights (engine/int8_weights.py): screen the layer's own rows
        head.argmax_screen = Int8ArgmaxScreen(head) if screenable else None
        # The int8 levels magnify the attention kernel's shape-dependent rounding into other tokens: one row at a
        # time keeps verification equal to plain decoding (the lean Gemma 3 pass does the same on its own).
        row_attention = use_row_attention(model)
        log.info("CPU kernels: int8 weights%s%s", ", int8 argmax screen for greedy decoding" if screenable else "",
                 "" if row_attention else "; this model's attention cannot run one row at a time, so a verification "
                 "pass may round differently from plain decoding")
        return 0
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
            packed_head.argmax_screen = Int8ArgmaxScreen.for_float_weight(head.weight)
    except (RuntimeError, NotImplementedError) as error:  # no fbgemm in this torch build, or not exact
        log.info("greedy decoding reads the float32 output layer: %s", error)
    model.set_output_embeddings(packed_head)
    # Already added: the prepacked head (1x its float32 bytes) and the screen's int8 copy (1/4, ~190 MB for Gemma 3).
    swapped = 1 + _prepack_decoder_projections(model, extra_bytes=head.weight.nbytes * 5 // 4)
    log.info("CPU kernels: %d layers prepacked for multi-position verification%s", swapped,
             ", int8 argmax screen for greedy decoding" if packed_head.argmax_screen is not None else "")
    return swapped


def cpu_kernels_in_use(model: torch.nn.Module) -> dict:
    """What use_cpu_kernels left on this model, for the engine's info: how many layers are prepacked and whether
    greedy tokens come from the int8 argmax screen."""
    head = model.get_output_embeddings()
    return {
        "prepacked_layers": sum(isinstance(module, PrepackedLinear) for module in model.modules()),
        "int8_argmax_screen": getattr(head, "argmax_screen", None) is not None,
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

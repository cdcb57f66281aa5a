"""Int8 weights for CPU: linear layers and embeddings that keep one int8 byte per weight instead of four.

Why: a decoding step is memory-bound, and on CPU it reads every weight of the model once. Measured on an AVX2 EPYC
(torch 2.13, 1 thread, medians, 18 different copies of each shape so that caches do not help; ms):

    layer (in -> out), rows       fp32 F.linear          fbgemm int8 (this module)
    640 -> 2048, 1 / 5 / 11        0.70 / 1.33 / 1.58     0.23 / 0.21 / 0.28
    2048 -> 640, 1 / 5 / 11        0.52 / 1.33 / 1.43     0.17 / 0.26 / 0.23

so fbgemm's int8 product is ~3x faster at one row and flat in the row count, which is what verifying drafts needs.
torch's weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) are no alternative on AVX2:
in the same run they took 1.4 and 2.9 ms for 640 -> 2048 at one row, 10-20x slower than float32.

The weights: W_v ~ s_v q_v, one float32 scale per output row and int8 q in [-127, 127]. A GGUF's blocks (Q4_K, Q5_0,
Q6_K, Q8_0: a scale per 16 or 32 weights) are dequantized once at load and quantized per row; fbgemm has no
kernel for per-block scales, so the values are not carried over exactly (see BENCHMARKS.md for how close the int8
model stays to the dequantized one).

The activations: fbgemm quantizes its input to 7-bit integers with one scale for all rows, which would make a row's
result depend on the rows beside it (a verification pass of 5 positions would then not compute what 5 one-position
passes compute). So each row is split here into two exact integer levels, h ~ a (z_1 + z_2 / 126) with z_l integer
vectors in [-63, 63] and a = max|h| / 63 per row, plus a pad row that pins fbgemm's quantization to scale 1, zero
point 63; fbgemm then multiplies integers exactly, and

    y_v = a (s_v (z_1 . q_v) + s_v (z_2 . q_v) / 126) + b_v

is a function of the row alone, the same whichever rows are fed with it. It differs from h . (s_v q_v) by the
residue r = h - a (z_1 + z_2 / 126) (at most max|h| / 15876 per value) and float rounding: this *is* the int8 model's
layer, in plain decoding and in verification alike.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable

import torch

# The two activation levels are integers in [-63, 63]; with one extra row holding -63 and 64, fbgemm's dynamic
# quantization (7-bit range 0..127 with reduce_range) picks scale 1 and zero point 63, so it quantizes them exactly.
LEVEL_MAX = 63
_PAD_VALUES = (-63.0, 64.0)
_INT8_MAX = 127


def quantize_rows(chunks: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of a weight given as chunks of rows (float, [rows_i, K] each), so that
    a large matrix is never whole in float32. Returns (q int8 [N, K], scale float32 [N])."""
    quantized, scales = [], []
    for rows in chunks:
        rows = rows.float()
        scale = (rows.abs().amax(1) / _INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        quantized.append(torch.round(rows / scale[:, None]).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8))
        scales.append(scale)
    return torch.cat(quantized), torch.cat(scales)


def prepack(quantized: torch.Tensor, scale: torch.Tensor):
    """fbgemm's packed form of s q (per-channel int8), for torch.ops.quantized.linear_dynamic."""
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch's Python API, fbgemm is not
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            quantized, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


def pad_row(in_features: int) -> torch.Tensor:
    pad = torch.zeros(1, in_features)
    pad[0, :2] = torch.tensor(_PAD_VALUES)
    return pad


# The second level resolves what the first leaves (|t - z_1| <= 1/2) in steps of 1/_SECOND_LEVEL_STEPS, so that
# z_2 = round((t - z_1) * _SECOND_LEVEL_STEPS) lies in [-63, 63] too; together they carry ~14 bits of each value.
_SECOND_LEVEL_STEPS = 2 * LEVEL_MAX


def split_levels(hidden: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [n, K] float32 -> (cat(z_1, z_2, pad) [2n+1, K], a [n, 1]) with hidden ~ a (z_1 + z_2 / 126)."""
    # abs().amax(): the infinity norm's value, 1.2-10x faster than linalg.vector_norm here (torch 2.13, AVX2).
    scale = hidden.abs().amax(dim=1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny).mul_(1 / LEVEL_MAX)
    scaled = hidden / scale
    first = torch.round(scaled)
    second = scaled.sub_(first).mul_(_SECOND_LEVEL_STEPS).round_()
    return torch.cat([first, second, pad]), scale


def two_level_product(levels: tuple[torch.Tensor, torch.Tensor], packed) -> torch.Tensor:
    """split_levels' output -> [n, N] = a (s_v (z_1 . q_v) + s_v (z_2 . q_v) / 126), the integer products exact.
    Each row's result depends on that row alone."""
    stacked, scale = levels
    rows = scale.shape[0]
    products = torch.ops.quantized.linear_dynamic(stacked, packed, True)
    return torch.add(products[:rows], products[rows : 2 * rows], alpha=1 / _SECOND_LEVEL_STEPS).mul_(scale)


def split_residue(hidden: torch.Tensor, levels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """hidden - a (z_1 + z_2 / 126): what the two levels leave out (at most max|h| / 15876 per value)."""
    stacked, scale = levels
    rows = scale.shape[0]
    return hidden - scale * (stacked[:rows] + stacked[rows : 2 * rows] / _SECOND_LEVEL_STEPS)


@functools.cache
def _check_fbgemm_once() -> None:
    """The row independence above is a property of this torch build's fbgemm (how it quantizes its input), not of
    any weight: checked once per process, on a random layer, before the first int8 layer is made.
    Raises RuntimeError unless fbgemm returns s_v (z . q_v) for integer rows z, to float rounding."""
    generator = torch.Generator().manual_seed(0)
    quantized = torch.randint(-_INT8_MAX, _INT8_MAX + 1, (512, 96), generator=generator, dtype=torch.int8)
    scale = torch.rand(512, generator=generator) + 0.01
    z = torch.randint(-LEVEL_MAX, LEVEL_MAX + 1, (3, 96), generator=generator).float()
    got = torch.ops.quantized.linear_dynamic(torch.cat([z, pad_row(96)]), prepack(quantized, scale), True)[:3]
    exact = (z.double() @ quantized.double().T) * scale.double()
    norms = z.double().norm(dim=1, keepdim=True) * (quantized.double().norm(dim=1) * scale.double())
    if not bool(((got.double() - exact).abs() <= 8 * 2.0**-24 * norms).all()):
        raise RuntimeError("fbgemm's int8 linear does not compute integer inputs exactly in this torch build")


class Int8Linear(torch.nn.Module):
    """A drop-in for an nn.Linear on CPU whose weight is int8 per output row (see the module docstring)."""

    def __init__(self, quantized: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        _check_fbgemm_once()
        self.out_features, self.in_features = quantized.shape
        # Buffers, not parameters: nothing here is trained, and .to() must not turn int8 into float.
        self.register_buffer("quantized", quantized)
        self.register_buffer("scale", scale.float())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)
        self.pad = pad_row(self.in_features)
        self._packed = None
        # For greedy decoding, which needs only the argmax of this layer's output (engine/cpu_kernels.py).
        self.argmax_screen = None

    @property
    def packed(self):
        """fbgemm's packed copy of the weight (CPU only, never saved or moved), made at first use: a layer that is
        only read through a fused copy (engine/lean_gemma3.py) never pays for one."""
        if self._packed is None:
            self._packed = prepack(self.quantized, self.scale)
        return self._packed

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, chunk_rows: int = 16384) -> Int8Linear:
        quantized, scale = quantize_rows(weight[start : start + chunk_rows].detach()
                                         for start in range(0, len(weight), chunk_rows))
        return cls(quantized, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features], float32 inside whatever x's dtype is.
        rows = x.reshape(-1, self.in_features).float()
        y = two_level_product(split_levels(rows, self.pad), self.packed)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The exact float32 rows s_v q_v of the weight for the given output ids: [len(ids), in_features]."""
        return self.quantized[ids].float() * self.scale[ids, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per row (fbgemm)"


class Int8Embedding(torch.nn.Module):
    """A drop-in for an nn.Embedding (or a scaled one, as Gemma's) over int8 rows, sharing them with a tied output
    layer: a lookup dequantizes only the rows it returns."""

    def __init__(self, weights: Int8Linear, embed_scale: torch.Tensor | None = None):
        super().__init__()
        self.weights = weights  # the (possibly tied) output layer that owns the int8 rows
        self.num_embeddings, self.embedding_dim = weights.out_features, weights.in_features
        # Gemma multiplies embeddings by sqrt(hidden_size) (Gemma3TextScaledWordEmbedding.embed_scale).
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        embedded = self.weights.dequantized_rows(flat).reshape(*input_ids.shape, self.embedding_dim)
        return embedded if self.embed_scale is None else embedded * self.embed_scale.float()


def quantize_to_int8(model: torch.nn.Module) -> int:
    """Swaps, in place, every nn.Linear of the decoder, the output layer and the input embedding of a float CPU
    model for int8 ones (a tied embedding shares the output layer's int8 rows). Returns how many were swapped."""
    decoder = model.get_decoder()
    swapped = 0
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, Int8Linear.from_float(child.weight, child.bias))
                swapped += 1
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    if head is not None:
        int8_head = Int8Linear.from_float(head.weight, head.bias)
        model.set_output_embeddings(int8_head)
        swapped += 1
    int8_rows = int8_head if tied else Int8Linear.from_float(embedding.weight)
    model.set_input_embeddings(Int8Embedding(int8_rows, getattr(embedding, "embed_scale", None)))
    return swapped + 1

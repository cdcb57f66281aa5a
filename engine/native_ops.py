"""The native CPU kernels (engine/native/, built into mtp_mcp.engine._native) on torch tensors.

Why native code: on CPU a decoding step reads every weight once, so it runs at memory speed only if the matrix
products read the weights as the GGUF stores them (4-8 bits each) and nothing else costs much. torch has no such
kernels for AVX2 CPUs: measured on an AVX2 EPYC (torch 2.13, one row, 640 -> 2048), `_weight_int4pack_mm_for_cpu`
took 2.9 ms and `_weight_int8pack_mm` 1.4 ms against 0.13 ms for float32, torchao's wheel has no CPU kernels, and
fbgemm's int8 product takes only one scale per row, not the GGUF's per-block scales. The kernels here compute
GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) times activations quantized to int8 per group of 32
values, as llama.cpp does, plus attention and the small operations of a step; BENCHMARKS.md has the timings.

What they guarantee (engine/native/native.h): each output element is a function of its own inputs alone,
computed by one fixed sequence of float operations for any number of rows, any thread count and any instruction
set. So speculative decoding (k + 1 rows per pass) computes what plain decoding (one row) computes, bit for bit.

Each function checks what it is given (dtype, device, layout, shapes) and raises ValueError, since the native
side trusts the addresses it gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mtp_mcp.engine import _native

# GGML type ids (gguf.GGMLQuantizationType) that the products compute, and the values per block of each.
NATIVE_TYPES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


@dataclass(frozen=True, eq=False)
class BlockWeight:
    """A weight matrix [rows, columns] of a GGUF block format, in the kernels' row blocks (engine/native/blocks.h):
    the file's values and scales exactly, 8 rows interleaved so that one instruction meets 8 rows. Made from GGUF
    rows by from_gguf_rows."""

    blocks: torch.Tensor  # uint8 [repacked bytes], contiguous
    type: int
    rows: int
    columns: int

    def __post_init__(self):
        expected = _native.repacked_bytes(self.type, self.rows, self.columns)
        if (self.blocks.dtype != torch.uint8 or self.blocks.device.type != "cpu" or self.blocks.dim() != 1
                or len(self.blocks) != expected or not self.blocks.is_contiguous()):
            raise ValueError(f"blocks must be {expected} contiguous uint8 on CPU (from_gguf_rows makes them)")

    @classmethod
    def from_gguf_rows(cls, rows: np.ndarray, kind: int, columns: int) -> BlockWeight:
        """rows: uint8 [n, bytes per row], each row `columns` values in GGUF block format `kind` (as a GGUF file
        stores a matrix: a memory-mapped view is read once, not kept)."""
        if kind not in NATIVE_TYPES:
            raise ValueError(f"type {kind} is not one of the block formats computed here")
        row_bytes = _native.row_bytes(kind, columns)
        if row_bytes == 0:
            raise ValueError(f"rows of {columns} values do not fill whole {NATIVE_TYPES[kind]} blocks")
        if rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != row_bytes:
            raise ValueError(f"GGUF rows must be uint8 [n, {row_bytes}], not {rows.dtype} {rows.shape}")
        rows = np.ascontiguousarray(rows)
        blocks = torch.empty(_native.repacked_bytes(kind, len(rows), columns), dtype=torch.uint8)
        _native.repack(kind, rows.ctypes.data, len(rows), columns, blocks.data_ptr())
        return cls(blocks, kind, len(rows), columns)

    @property
    def type_name(self) -> str:
        return NATIVE_TYPES[self.type]

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes


def instruction_sets() -> tuple[str, ...]:
    """What this CPU can run: 'scalar', then 'avx2', then 'avx512vnni' where available."""
    return _native.instruction_sets()


def instruction_set() -> str:
    return _native.instruction_set()


def use_instruction_set(name: str) -> None:
    """Makes the kernels use `name` (one of instruction_sets()); every one computes the same floats."""
    _native.use_instruction_set(name)


def set_threads(threads: int) -> None:
    _native.set_threads(threads)


def threads() -> int:
    return _native.threads()


def _check_rows(x: torch.Tensor, name: str, columns: int | None = None) -> None:
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name} must be a float32 CPU matrix with contiguous rows, not {x.dtype} "
                         f"{tuple(x.shape)} (strides {x.stride()}) on {x.device}")
    if columns is not None and x.shape[1] != columns:
        raise ValueError(f"{name} has {x.shape[1]} columns where {columns} are needed")


class Products:
    """x times a fixed list of weights (one native call; the activations quantized once for all of them), with
    what each call passes computed once: a layer holds one of these per product it makes at every step."""

    def __init__(self, weights: Sequence[BlockWeight]):
        if not weights:
            raise ValueError("products need at least one weight")
        self.columns = weights[0].columns
        if any(weight.columns != self.columns for weight in weights):
            raise ValueError("the weights of one products call must all take the same number of columns")
        self.rows = sum(weight.rows for weight in weights)
        self.weights = list(weights)  # kept alive: the parts below hold their addresses
        self._parts, offset = [], 0
        for weight in weights:
            self._parts.append((weight.blocks.data_ptr(), weight.type, weight.rows, 4 * offset))
            offset += weight.rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, columns] -> [n, sum of the weights' rows], the weights' outputs side by side."""
        if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] != self.columns or x.is_cuda:
            _check_rows(x, "x", self.columns)
        out = torch.empty(x.shape[0], self.rows)
        base, rows = out.data_ptr(), self.rows
        specs = tuple((address, kind, weight_rows, base + offset, rows)
                      for address, kind, weight_rows, offset in self._parts)
        _native.products(x.data_ptr(), x.shape[0], self.columns, x.stride(0), specs)
        return out


def products(x: torch.Tensor, weights: Sequence[BlockWeight]) -> torch.Tensor:
    """x [n, K] float32 times each weight [rows_i, K]: returns [n, sum of rows_i], the weights' outputs side by side.
    The activations are quantized once for all the weights."""
    return Products(weights)(x)


def argmax_rows(x: torch.Tensor) -> list[int]:
    """The index of each row's largest value, as torch.argmax gives it (the first of equal maxima; the first NaN
    where there is one), without torch's threads (engine/engine.py says why they stay off)."""
    _check_rows(x, "x")
    return _native.argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0))


def dequantized_rows(weight: BlockWeight, ids: torch.Tensor) -> torch.Tensor:
    """The rows `ids` of the weight as float32 [len(ids), columns] (an embedding lookup, a few output rows)."""
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= weight.rows):
        raise ValueError(f"row ids must lie in [0, {weight.rows}) for this weight")
    out = torch.empty(len(ids), weight.columns)
    _native.dequantize_rows(weight.type, weight.blocks.data_ptr(), weight.columns, ids.data_ptr(), len(ids),
                            out.data_ptr())
    return out


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, window: int,
              scale: float) -> torch.Tensor:
    """q [n, heads, dim] (rows may lie apart: a view of a wider matrix) for positions start..start+n-1; keys,
    values [kv_heads, capacity, dim] holding every position up to start+n-1. Row i attends to the keys at positions
    max(0, p - window + 1)..p, p = start + i (window 0: all from 0). Returns [n, heads * dim]."""
    n, heads, dim = q.shape
    kv_heads, capacity, key_dim = keys.shape
    if q.dtype != torch.float32 or q.device.type != "cpu" or q.stride(2) != 1 or q.stride(1) != dim:
        raise ValueError("q must be float32 on CPU with each row's heads contiguous")
    for name, tensor in (("keys", keys), ("values", values)):
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 CPU tensor")
    if values.shape != keys.shape or key_dim != dim or heads % kv_heads or start < 0 or start + n > capacity:
        raise ValueError(f"attention shapes do not fit: q {tuple(q.shape)}, keys {tuple(keys.shape)}, start {start}")
    out = torch.empty(n, heads * dim)
    _native.attention(q.data_ptr(), q.stride(0), keys.data_ptr(), values.data_ptr(), out.data_ptr(), n, start, heads,
                      kv_heads, dim, capacity, window, scale)
    return out


def store_keys_values(qkv: torch.Tensor, keys_column: int, values_column: int, keys: torch.Tensor,
                      values: torch.Tensor, start: int) -> None:
    """Rows of a fused q/k/v product (qkv [n, ...], the keys from column keys_column, the values from values_column,
    kv_heads * dim each) into the cache keys, values [kv_heads, capacity, dim] at positions start .. start + n - 1."""
    _check_rows(qkv, "qkv")
    kv_heads, capacity, dim = keys.shape
    for name, tensor in (("keys", keys), ("values", values)):
        if tensor.dtype != torch.float32 or not tensor.is_contiguous() or tensor.shape != keys.shape:
            raise ValueError(f"{name} must be a contiguous float32 cache [kv_heads, capacity, dim]")
    if max(keys_column, values_column) + kv_heads * dim > qkv.shape[1] or min(keys_column, values_column) < 0:
        raise ValueError("the key and value columns must lie within qkv's rows")
    _native.store_keys_values(qkv.data_ptr(), qkv.stride(0), keys_column, values_column, keys.data_ptr(),
                              values.data_ptr(), kv_heads, capacity, dim, start, qkv.shape[0])


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x [n, d] -> x / sqrt(mean(x^2) + eps) * scale, per row."""
    _check_rows(x, "x")
    _check_scale(scale, x.shape[1])
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _native.rms_norm(x.data_ptr(), x.stride(0), scale.data_ptr(), eps, out.data_ptr(), out.stride(0), x.shape[0],
                     x.shape[1])
    return out


def add_rms_norm_(residual: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += rms_norm(x, scale, eps), in place; returns residual."""
    _check_rows(x, "x")
    _check_rows(residual, "residual", x.shape[1])
    _check_scale(scale, x.shape[1])
    if residual.shape[0] != x.shape[0]:
        raise ValueError("residual and x must have the same rows")
    _native.add_rms_norm(x.data_ptr(), x.stride(0), scale.data_ptr(), eps, residual.data_ptr(), residual.stride(0),
                         x.shape[0], x.shape[1])
    return residual


def head_norm_rotary_(x: torch.Tensor, scales: torch.Tensor, eps: float, cos: torch.Tensor,
                      sin: torch.Tensor) -> torch.Tensor:
    """In place on x [n, heads, dim] (rows may lie apart: a view of a wider matrix): each head RMS-normed with its
    scale row (scales [heads, dim]), then rotated by cos, sin [n, dim] as transformers' rotate_half rotary
    embedding. Returns x."""
    n, heads, dim = x.shape
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(2) != 1 or x.stride(1) != dim:
        raise ValueError("x must be float32 on CPU with each row's heads contiguous")
    for name, tensor, shape in (("scales", scales, (heads, dim)), ("cos", cos, (n, dim)), ("sin", sin, (n, dim))):
        if tensor.dtype != torch.float32 or tuple(tensor.shape) != shape or not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous float32 {shape}, not {tensor.dtype} {tuple(tensor.shape)}")
    _native.head_norm_rotary(x.data_ptr(), x.stride(0), n, heads, dim, scales.data_ptr(), eps, cos.data_ptr(),
                             sin.data_ptr())
    return x


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [n, 2 * d] (gate, then up) -> gelu_tanh(gate) * up [n, d]."""
    _check_rows(gate_up, "gate_up")
    width = gate_up.shape[1] // 2
    out = torch.empty(gate_up.shape[0], width)
    _native.gelu_tanh_mul(gate_up.data_ptr(), gate_up.data_ptr() + 4 * width, gate_up.stride(0), out.data_ptr(),
                          out.stride(0), gate_up.shape[0], width)
    return out


def _check_scale(scale: torch.Tensor, dim: int) -> None:
    if scale.dtype != torch.float32 or tuple(scale.shape) != (dim,) or not scale.is_contiguous():
        raise ValueError(f"scale must be contiguous float32 [{dim}], not {scale.dtype} {tuple(scale.shape)}")

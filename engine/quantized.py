"""Quantized weights for CPU: linear layers and embeddings over GGUF blocks, computed by the native kernels.

A GGUF's quantized tensors *are* the model llama.cpp runs: a Q4_K block is 256 weights with 6-bit scales and
minimums per 32, a Q8_0 block 32 int8 with one scale. They are kept exactly as stored (a view of the memory-mapped
file, nothing converted) and multiplied as stored, by engine/native_ops.products. Activations are quantized to int8
per group of 32 values for the product, as llama.cpp does: this quantized model is the target that speculative
decoding is lossless against (each row computed alone, engine/native_ops), and BENCHMARKS.md measures how close it
stays to the float model dequantized from the same file.

Float checkpoints are quantized on request (`--quantize int8` -> Q8_0, `int4` -> Q4_1: per group of 32 a scale and
a minimum, the groupwise int4 scale/zero layout), by gguf-py's reference quantizers; so are the few tensors of a GGUF
stored in a format the kernels do not compute (they are dequantized first, and the load logs which).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quantize

from mtp_mcp.engine.native_ops import BlockWeight, Products, dequantized_rows

log = logging.getLogger(__name__)

# --quantize names -> the block format a float weight is quantized to.
QUANTIZE_FORMATS = {"int8": GGMLQuantizationType.Q8_0, "int4": GGMLQuantizationType.Q4_1}
# Every block format holds rows of whole groups of this many values.
GROUP_VALUES = 32
# Rows of a float weight quantized at a time, so that a large embedding is never copied whole.
_CHUNK_ROWS = 16384


def quantize_chunks(chunks: Iterable[np.ndarray], kind: GGMLQuantizationType) -> BlockWeight:
    """A float weight given as chunks of rows ([rows_i, columns] each, so that a large matrix is never whole in
    float32) in block format `kind`: Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1, by gguf-py's quantizers."""
    quantized = [quantize(np.ascontiguousarray(chunk, dtype=np.float32), kind) for chunk in chunks]
    rows = np.concatenate(quantized) if len(quantized) > 1 else quantized[0]
    values_per_block, bytes_per_block = GGML_QUANT_SIZES[kind]
    return BlockWeight.from_gguf_rows(rows, int(kind), rows.shape[1] // bytes_per_block * values_per_block)


def quantize_weight(weight: torch.Tensor, kind: GGMLQuantizationType) -> BlockWeight:
    """A float weight [rows, columns] in block format `kind` (see quantize_chunks)."""
    weight = weight.detach()
    return quantize_chunks((weight[start : start + _CHUNK_ROWS].float().numpy()
                            for start in range(0, len(weight), _CHUNK_ROWS)), kind)


class QuantizedLinear(torch.nn.Module):
    """A drop-in for an nn.Linear on CPU whose weight is a BlockWeight. Each output row is computed from its own
    input row alone (engine/native_ops), so a row gives the same result whatever rows are fed with it."""

    def __init__(self, weight: BlockWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight_blocks = weight
        self.out_features, self.in_features = weight.rows, weight.columns
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)
        self._products = Products([weight])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features], float32 inside whatever x's dtype is.
        rows = x.reshape(-1, self.in_features).float().contiguous()
        y = self._products(rows)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight as float32 [len(ids), in_features]."""
        return dequantized_rows(self.weight_blocks, ids)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.weight_blocks.type_name} blocks")


class QuantizedEmbedding(torch.nn.Module):
    """A drop-in for an nn.Embedding (or a scaled one, as Gemma's) over a BlockWeight, which a tied output layer
    shares: a lookup dequantizes only the rows it returns."""

    def __init__(self, weight: BlockWeight, embed_scale: torch.Tensor | None = None):
        super().__init__()
        self.weight_blocks = weight
        self.num_embeddings, self.embedding_dim = weight.rows, weight.columns
        # Gemma multiplies embeddings by sqrt(hidden_size) (Gemma3TextScaledWordEmbedding.embed_scale).
        self.embed_scale = None if embed_scale is None else embed_scale.float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded = dequantized_rows(self.weight_blocks, input_ids).reshape(*input_ids.shape, self.embedding_dim)
        return embedded if self.embed_scale is None else embedded * self.embed_scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.weight_blocks.type_name} blocks"


class RowByRowLinear(torch.nn.Module):
    """A float nn.Linear computed one input row at a time: for the rare layer whose input width is not a multiple
    of 32 values (no block format holds it) in an otherwise quantized model, whose rows must each come out the same
    whatever rows are fed with them (a float product of several rows may round each row differently)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = torch.cat([torch.nn.functional.linear(row[None], self.weight, self.bias) for row in rows])
        return y.reshape(*x.shape[:-1], self.out_features)


def is_quantized(model: torch.nn.Module) -> bool:
    return isinstance(model.get_output_embeddings(), QuantizedLinear) or any(
        isinstance(module, QuantizedLinear) for module in model.get_decoder().modules())


def quantize_model(model: torch.nn.Module, kind: GGMLQuantizationType) -> int:
    """Swaps, in place, every nn.Linear of the decoder, the output layer and the input embedding of a float CPU
    model for quantized ones in block format `kind` (a tied embedding shares the output layer's blocks). Returns
    how many modules were swapped."""
    width = model.get_input_embeddings().embedding_dim
    if width % GROUP_VALUES:
        raise ValueError(f"quantized weights need a hidden size that is a multiple of {GROUP_VALUES}, and this model's "
                         f"is {width}; load it with --quantize none")
    decoder = model.get_decoder()
    swapped, kept_float = 0, 0
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                if child.in_features % GROUP_VALUES:
                    setattr(parent, name, RowByRowLinear(child))
                    kept_float += 1
                else:
                    setattr(parent, name, QuantizedLinear(quantize_weight(child.weight, kind), child.bias))
                swapped += 1
    if kept_float:
        log.info("%d linear layers take inputs whose width is not a multiple of %d values; they stay float, computed "
                 "one row at a time", kept_float, GROUP_VALUES)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    head_blocks = None
    if head is not None:
        head_blocks = quantize_weight(head.weight, kind)
        model.set_output_embeddings(QuantizedLinear(head_blocks, head.bias))
        swapped += 1
    embedding_blocks = head_blocks if tied else quantize_weight(embedding.weight, kind)
    model.set_input_embeddings(QuantizedEmbedding(embedding_blocks, getattr(embedding, "embed_scale", None)))
    return swapped + 1

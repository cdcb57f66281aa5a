"""A lean forward pass for Gemma 3 text models with int8 weights: the layers of transformers' Gemma3TextModel, in
fewer operations, over a KV cache of preallocated tensors.

Why: with int8 weights (engine/int8_weights.py) a decoding step of Gemma 3 270M on CPU spends more time around the
matrix products than in them: transformers' modules cost ~27 ms of a ~65 ms one-token step (1 thread; profiled with
forward hooks: Int8Linear 33 ms, attention and MLP modules ~45 ms, the whole decoder ~51 ms). Here one step is a
flat loop: q, k and v read through one int8 product (and gate and up through another), masks are built once per
step instead of per layer, and keys and values are written into tensors that grow by doubling, so cutting a
rejected draft is a change of length, not a copy. The same shape of step (static cache, a few fixed input sizes)
is what CUDA graphs would capture.

It computes what transformers' Gemma 3 computes, to float rounding (the tests compare the hidden states with
transformers' on the same int8 model); the int8 model's greedy tokens are defined by this pass, and verification
uses the same pass with attention in aligned blocks of fixed shapes (_attend_in_blocks), so each row comes out bit
for bit as in plain decoding: speculative decoding stays token-identical to the engine's own plain decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.gemma3.modeling_gemma3 import rotate_half

from mtp_mcp.engine.int8_weights import Int8Linear

# Attention is computed for aligned blocks of this many positions, always with the same shapes (see _attend_in_blocks).
# Gemma 3 270M, 2 AVX2 cores, 1,500 cached tokens (two interleaved runs, ms): a pass over 1 / 5 / 9 / 17 positions
# costs 40-45 / 79-86 / 86-126 / 142-173 with blocks of 1 (one call per row), 48-50 / 63-65 / 71-90 / 118-137 with 4,
# 58-62 / 71-77 / 77-109 / 120-126 with 8; a prefill of 1,500 tokens 9.8-10.4 s, 6.4-7.5 s and 5.7-6.1 s, each block
# then a call of its own. Since blocks of the same span length share one call (interleaved, same machine, later and
# busier: 1 / 5 / 9 positions 63-69 / 91-94 / 132-136 ms with 1 and 4; prefill 6.2 s with 1, 5.8 s with 2, 5.1 s
# with 4, 5.2 s with 8), 4 gives the fastest prefill at about the cost per step of 1.
ATTENTION_BLOCK = 4
KEY_SPAN_STEP = 64  # global layers' spans end on a multiple of this (see _key_span)
_INITIAL_CAPACITY = 1024  # tokens of cache allocated at first; doubled whenever a feed would overflow it


def lean_gemma3_supported(model: torch.nn.Module) -> bool:
    """True for a Gemma 3 text model (Gemma3ForCausalLM) whose decoder projections are all int8 and whose
    attention has nothing this pass leaves out (logit softcapping, bidirectional attention)."""
    config = model.config
    if getattr(config, "model_type", None) != "gemma3_text":
        return False
    layers = model.get_decoder().layers
    projections = [getattr(layer.self_attn, name) for layer in layers for name in ("q_proj", "k_proj", "v_proj",
                                                                                     "o_proj")]
    projections += [getattr(layer.mlp, name) for layer in layers for name in ("gate_proj", "up_proj", "down_proj")]
    return (
        all(isinstance(p, Int8Linear) for p in projections)
        and getattr(config, "attn_logit_softcapping", None) is None
        and not getattr(config, "use_bidirectional_attention", False)
    )


def _fuse(*layers: Int8Linear) -> Int8Linear:
    """One int8 layer whose outputs are the given layers' outputs side by side: the same int8 rows and scales, so
    each output equals the separate layer's bit for bit (fbgemm computes every output column on its own). The
    given layers keep working, their rows now views of the fused layer's (one copy in memory, and fbgemm's packed
    copy only of the fused layer unless transformers' modules run too)."""
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat([layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
                          for layer in layers])
    fused = Int8Linear(torch.cat([layer.quantized for layer in layers]), torch.cat([layer.scale for layer in layers]),
                       bias)
    start = 0
    for layer in layers:
        rows = slice(start, start + layer.out_features)
        layer.quantized, layer.scale = fused.quantized[rows], fused.scale[rows]
        start += layer.out_features
    return fused


class _Layer:
    def __init__(self, layer: torch.nn.Module, layer_type: str):
        attention, mlp = layer.self_attn, layer.mlp
        self.sliding = layer_type == "sliding_attention"
        self.layer_type = layer_type
        self.qkv = _fuse(attention.q_proj, attention.k_proj, attention.v_proj)
        # The fused output's columns: queries and keys (normed and rotated together), then values.
        self.split = (attention.q_proj.out_features + attention.k_proj.out_features, attention.v_proj.out_features)
        self.o_proj = attention.o_proj
        self.gate_up = _fuse(mlp.gate_proj, mlp.up_proj)
        self.down = mlp.down_proj
        self.act = mlp.act_fn
        # Gemma's norms scale by (1 + weight).
        self.norms = [1.0 + module.weight.float() for module in (
            layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
            layer.post_feedforward_layernorm)]
        self.eps = layer.input_layernorm.eps
        # Queries and keys are normed per head and rotated as one tensor of heads + kv_heads heads (half the
        # operations of two): the q_norm scale for the query heads, k_norm's for the key heads.
        heads, kv_heads = attention.config.num_attention_heads, attention.config.num_key_value_heads
        self.head_norm = torch.stack([1.0 + attention.q_norm.weight.float()] * heads
                                     + [1.0 + attention.k_norm.weight.float()] * kv_heads)
        self.head_eps = attention.q_norm.eps
        self.scaling = attention.scaling


class LeanGemma3:
    """The decoder of a Gemma 3 model with int8 weights, and its cache: feed tokens, crop the last ones."""

    def __init__(self, model: torch.nn.Module):
        decoder = model.get_decoder()
        config = model.config
        self._embed = decoder.embed_tokens
        self._rotary = decoder.rotary_emb
        self._final_norm = 1.0 + decoder.norm.weight.float()
        self._final_eps = decoder.norm.eps
        self._layers = [_Layer(layer, layer_type) for layer, layer_type in zip(decoder.layers, config.layer_types)]
        # Packed now, not at the first request: every layer here is read at every step.
        for layer in self._layers:
            for linear in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
                linear.packed
        self._layer_types = {layer.layer_type for layer in self._layers}
        self._window = config.sliding_window
        self._heads = config.num_attention_heads
        self._kv_heads = config.num_key_value_heads
        self._head_dim = config.head_dim
        self.length = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    def reset(self) -> None:
        """Drops the cache (its memory is freed)."""
        self.length = 0
        self._keys, self._values = [], []

    def state(self) -> tuple:
        """What the cache holds, to be put back by `restore` (a parked prefix-cache sequence)."""
        return self._keys, self._values, self.length

    def copied_state(self) -> tuple:
        """A copy of what the cache holds (its first `length` positions, in tensors of their own)."""
        keys = [tensor[:, : self.length].clone() for tensor in self._keys]
        values = [tensor[:, : self.length].clone() for tensor in self._values]
        return keys, values, self.length

    def restore(self, state: tuple) -> None:
        self._keys, self._values, self.length = state

    def crop(self, n_tokens: int) -> None:
        """Forgets the last n_tokens fed."""
        self.length -= n_tokens

    def reserved_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in (*self._keys, *self._values))

    def key_value_states(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's cached keys and values, [1, kv_heads, length, head_dim] each."""
        return (self._keys[layer_index][:, : self.length].unsqueeze(0),
                self._values[layer_index][:, : self.length].unsqueeze(0))

    def feed(self, token_ids: list[int]) -> torch.Tensor:
        """Runs the decoder over token_ids after the cached ones; returns the final hidden states [n, H]."""
        n, start = len(token_ids), self.length
        end = start + n
        self._reserve(self._key_span(end - 1 - (end - 1) % ATTENTION_BLOCK, False)[1])  # every key a block reads
        ids = torch.tensor(token_ids, dtype=torch.long)
        hidden = self._embed(ids)  # [n, H], Gemma's sqrt(H) scale included
        positions = torch.arange(start, end)[None]
        rotary = {layer_type: self._rotary(hidden, positions, layer_type) for layer_type in self._layer_types}
        masks: dict[tuple[int, int, bool], torch.Tensor] = {}  # (block start, blocks, sliding) -> mask, once per feed
        for index, layer in enumerate(self._layers):
            hidden = self._layer(index, layer, hidden, rotary[layer.layer_type], masks, start, end)
        self.length = end
        return _rms_norm(hidden, self._final_norm, self._final_eps)

    def _layer(self, index, layer, hidden, rotary, masks, start, end):
        n = hidden.shape[0]
        x = _rms_norm(hidden, layer.norms[0], layer.eps)
        qk, v = layer.qkv(x).split(layer.split, dim=-1)
        qk = _rms_norm(qk.view(n, self._heads + self._kv_heads, self._head_dim), layer.head_norm, layer.head_eps)
        cos, sin = rotary  # [1, n, head_dim]
        qk = qk * cos[0, :, None] + rotate_half(qk) * sin[0, :, None]  # as transformers' apply_rotary_pos_emb
        q, k = qk[:, : self._heads], qk[:, self._heads :]  # [n, heads or kv_heads, head_dim]
        keys, values = self._keys[index], self._values[index]  # [kv_heads, capacity, head_dim]
        keys[:, start:end] = k.transpose(0, 1)
        values[:, start:end] = v.view(n, self._kv_heads, self._head_dim).transpose(0, 1)
        attention = layer.o_proj(self._attend_in_blocks(q, keys, values, masks, start, end, layer))
        hidden = hidden + _rms_norm(attention, layer.norms[1], layer.eps)
        x = _rms_norm(hidden, layer.norms[2], layer.eps)
        gate, up = layer.gate_up(x).chunk(2, dim=-1)
        return hidden + _rms_norm(layer.down(layer.act(gate) * up), layer.norms[3], layer.eps)

    def _attend_in_blocks(self, q, keys, values, masks, start, end, layer) -> torch.Tensor:
        """q [n, heads, d] for positions start..end-1 -> [n, heads * d].

        A row's result must not depend on the rows fed with it (engine/row_attention.py says why: int8 levels turn
        the kernel's shape-dependent rounding into other tokens). So positions are grouped in aligned blocks of
        ATTENTION_BLOCK, and block b is always computed with the same shapes whatever is fed: its query rows (zero
        for positions not fed now), the query heads of a kv head stacked as rows of one, and the keys of
        _key_span(b) under the same mask. Keys beyond what a row may read are masked out and finite (the cache is
        zeroed when allocated), so they contribute exact zeros. Blocks whose spans have the same length go to the
        attention kernel together, as a batch: the kernel computes each batch entry, head and query block as a
        unit of its own with the same code, so a block comes out bit for bit as when it is alone. One-token steps,
        verification passes and prefill chunks thus compute each position alike, at a few calls per pass."""
        block, group = ATTENTION_BLOCK, self._heads // self._kv_heads
        first_block = start - start % block
        n_blocks = -(-(end - first_block) // block)
        rows = q.new_zeros(n_blocks * block, self._heads, self._head_dim)
        rows[start - first_block : end - first_block] = q
        # [blocks, kv_heads, group * block, d]: row g * block + i is query head (kv * group + g) at position i.
        rows = rows.view(n_blocks, block, self._kv_heads, group, self._head_dim).permute(0, 2, 3, 1, 4)
        rows = rows.reshape(n_blocks, self._kv_heads, group * block, self._head_dim)
        out = torch.empty_like(rows)
        for lo, hi in self._batches(first_block, n_blocks, layer.sliding):
            block_start = first_block + lo * block
            first, length = self._key_span(block_start, layer.sliding)
            mask = masks.get((block_start, hi - lo, layer.sliding))
            if mask is None:
                mask = masks[block_start, hi - lo, layer.sliding] = self._batch_mask(block_start, hi - lo,
                                                                                      layer.sliding)
            # Block j of the batch reads keys first + j * step ... (+ length): a strided view, no copy.
            step = block if first else 0
            span = (hi - lo, self._kv_heads, length, self._head_dim)
            strides = (step * self._head_dim, keys.stride(0), keys.stride(1), 1)
            offset = keys.storage_offset() + first * self._head_dim
            out[lo:hi] = F.scaled_dot_product_attention(
                rows[lo:hi], keys.as_strided(span, strides, offset), values.as_strided(span, strides, offset),
                attn_mask=mask, scale=layer.scaling)
        out = out.view(n_blocks, self._kv_heads, group, block, self._head_dim).permute(0, 3, 1, 2, 4)
        out = out.reshape(n_blocks * block, self._heads * self._head_dim)
        return out[start - first_block : end - first_block]

    def _key_span(self, block_start: int, sliding: bool) -> tuple[int, int]:
        """(first key, number of keys) that the block at block_start reads, a function of the block alone. A
        sliding-window layer's block, once past the first window, reads its window and its own positions; any other
        block reads from the first position to its end rounded up to KEY_SPAN_STEP, so that neighbouring blocks
        share a length (and a batch) at the price of a few masked keys."""
        block_end = block_start + ATTENTION_BLOCK
        if sliding and block_start >= self._window:
            return block_start - self._window + 1, self._window - 1 + ATTENTION_BLOCK
        return 0, -(-block_end // KEY_SPAN_STEP) * KEY_SPAN_STEP

    def _batches(self, first_block: int, n_blocks: int, sliding: bool):
        """Runs (lo, hi) of consecutive block indices whose key spans have the same length."""
        lo = 0
        while lo < n_blocks:
            key = self._key_span(first_block + lo * ATTENTION_BLOCK, sliding)
            hi = lo + 1
            while hi < n_blocks and self._same_batch(key, self._key_span(first_block + hi * ATTENTION_BLOCK,
                                                                          sliding)):
                hi += 1
            yield lo, hi
            lo = hi

    @staticmethod
    def _same_batch(span: tuple[int, int], other: tuple[int, int]) -> bool:
        # Windows (first > 0) advance by a block from one block to the next; spans from 0 must be equal.
        return span[1] == other[1] and (span[0] > 0) == (other[0] > 0)

    def _batch_mask(self, block_start: int, n_blocks: int, sliding: bool) -> torch.Tensor:
        """[n_blocks, 1, group * ATTENTION_BLOCK, keys] additive mask (0 or -inf) for the blocks from block_start:
        row g * ATTENTION_BLOCK + i is position (block start + i) and may read the keys at or before it (and, in a
        sliding-window layer, within the window)."""
        starts = block_start + ATTENTION_BLOCK * torch.arange(n_blocks)
        first, length = self._key_span(block_start, sliding)
        firsts = starts - block_start + first if first else torch.zeros(n_blocks, dtype=torch.long)
        query = (starts[:, None] + torch.arange(ATTENTION_BLOCK))[:, :, None]  # [blocks, block, 1]
        key = (firsts[:, None] + torch.arange(length))[:, None, :]  # [blocks, 1, length]
        allowed = key <= query
        if sliding:
            allowed &= key > query - self._window
        mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
        return mask.repeat(1, self._heads // self._kv_heads, 1)[:, None]

    def _reserve(self, end: int) -> None:
        capacity = self._keys[0].shape[1] if self._keys else 0
        if end <= capacity:
            return
        new_capacity = max(_INITIAL_CAPACITY, capacity)
        while new_capacity < end:
            new_capacity *= 2
        shape = (self._kv_heads, new_capacity, self._head_dim)
        grown_keys, grown_values = [], []
        for index in range(len(self._layers)):
            keys, values = torch.zeros(shape), torch.zeros(shape)
            if capacity:
                keys[:, : self.length] = self._keys[index][:, : self.length]
                values[:, : self.length] = self._values[index][:, : self.length]
            grown_keys.append(keys)
            grown_values.append(values)
        self._keys, self._values = grown_keys, grown_values


def _rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    # As Gemma3RMSNorm in float32: x * rsqrt(mean(x^2) + eps) * (1 + weight).
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


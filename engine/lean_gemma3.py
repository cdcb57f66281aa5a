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
from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

from mtp_mcp.engine.int8_weights import Int8Linear

# Attention is computed for aligned blocks of this many positions, always with the same shapes (see _attend_in_blocks).
# Gemma 3 270M, 2 AVX2 cores, 1,500 cached tokens (two interleaved runs, ms): a pass over 1 / 5 / 9 / 17 positions
# costs 40-45 / 79-86 / 86-126 / 142-173 with blocks of 1 (one call per row), 48-50 / 63-65 / 71-90 / 118-137 with 4,
# 58-62 / 71-77 / 77-109 / 120-126 with 8; a prefill of 1,500 tokens 9.8-10.4 s, 6.4-7.5 s and 5.7-6.1 s.
ATTENTION_BLOCK = 4
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
        self.split = (attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features)
        self.o_proj = attention.o_proj
        self.gate_up = _fuse(mlp.gate_proj, mlp.up_proj)
        self.down = mlp.down_proj
        self.act = mlp.act_fn
        # Gemma's norms scale by (1 + weight).
        self.norms = [1.0 + module.weight.float() for module in (
            layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
            layer.post_feedforward_layernorm, attention.q_norm, attention.k_norm)]
        self.eps = layer.input_layernorm.eps
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
        self._reserve(end + ATTENTION_BLOCK)  # the last block's keys, fed or not
        ids = torch.tensor(token_ids, dtype=torch.long)
        hidden = self._embed(ids)  # [n, H], Gemma's sqrt(H) scale included
        positions = torch.arange(start, end)[None]
        rotary = {layer_type: self._rotary(hidden, positions, layer_type) for layer_type in self._layer_types}
        masks: dict[tuple[int, bool], torch.Tensor] = {}  # (block start, sliding) -> mask, built once per feed
        for index, layer in enumerate(self._layers):
            hidden = self._layer(index, layer, hidden, rotary[layer.layer_type], masks, start, end)
        self.length = end
        return _rms_norm(hidden, self._final_norm, self._final_eps)

    def _layer(self, index, layer, hidden, rotary, masks, start, end):
        n = hidden.shape[0]
        x = _rms_norm(hidden, layer.norms[0], layer.eps)
        q, k, v = layer.qkv(x).split(layer.split, dim=-1)
        q = _rms_norm(q.view(n, self._heads, self._head_dim), layer.norms[4], layer.head_eps)
        k = _rms_norm(k.view(n, self._kv_heads, self._head_dim), layer.norms[5], layer.head_eps)
        cos, sin = rotary  # [1, n, head_dim]; q, k: [n, heads, head_dim]
        q, k = apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)
        keys, values = self._keys[index], self._values[index]  # [kv_heads, capacity, head_dim]
        keys[:, start:end] = k.transpose(0, 1)
        values[:, start:end] = v.view(n, self._kv_heads, self._head_dim).transpose(0, 1)
        attended = self._attend_in_blocks(q.transpose(0, 1), keys, values, masks, start, end, layer)
        attention = layer.o_proj(attended[0].transpose(0, 1).reshape(n, -1))
        hidden = hidden + _rms_norm(attention, layer.norms[1], layer.eps)
        x = _rms_norm(hidden, layer.norms[2], layer.eps)
        gate, up = layer.gate_up(x).chunk(2, dim=-1)
        return hidden + _rms_norm(layer.down(layer.act(gate) * up), layer.norms[3], layer.eps)

    def _attend_in_blocks(self, q, keys, values, masks, start, end, layer) -> torch.Tensor:
        """q [heads, n, d] for positions start..end-1 -> [1, heads, n, d].

        A row's result must not depend on the rows fed with it (engine/row_attention.py says why: int8 levels turn
        the kernel's shape-dependent rounding into other tokens). So positions are grouped in aligned blocks of
        ATTENTION_BLOCK, and every call for block b has the same shapes whatever is fed: the block's query rows (zero
        for positions not fed now), the keys from the window start of its first position to its last position, and
        the same mask. Keys beyond what is fed are masked out for every fed row and finite (the cache is zeroed when
        allocated), so they contribute exact zeros; rows do not interact. One-token steps, verification passes and
        prefill chunks thus compute each position bit for bit alike, at one call per block instead of per row."""
        out = []
        for block_start in range(start - start % ATTENTION_BLOCK, end, ATTENTION_BLOCK):
            block_end = block_start + ATTENTION_BLOCK
            first = max(0, block_start - self._window + 1) if layer.sliding else 0
            rows = torch.zeros(q.shape[0], ATTENTION_BLOCK, q.shape[2])
            lo, hi = max(start, block_start), min(end, block_end)
            rows[:, lo - block_start : hi - block_start] = q[:, lo - start : hi - start]
            mask = masks.get((block_start, layer.sliding))
            if mask is None:
                mask = masks[block_start, layer.sliding] = self._block_mask(block_start, first, layer.sliding)
            attended = F.scaled_dot_product_attention(
                rows[None], keys[None, :, first:block_end], values[None, :, first:block_end], attn_mask=mask,
                scale=layer.scaling, enable_gqa=True)
            out.append(attended[:, :, lo - block_start : hi - block_start])
        return torch.cat(out, dim=2)

    def _block_mask(self, block_start: int, first: int, sliding: bool) -> torch.Tensor:
        """[ATTENTION_BLOCK, keys]: True where the block's query may attend to key `first + j`."""
        query = torch.arange(block_start, block_start + ATTENTION_BLOCK)[:, None]
        key = torch.arange(first, block_start + ATTENTION_BLOCK)[None]
        allowed = key <= query
        if sliding:
            allowed &= key > query - self._window
        return allowed

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


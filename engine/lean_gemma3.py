"""A lean forward pass for Gemma 3 text models with quantized weights: the layers of transformers' Gemma3TextModel
as a dozen native operations each (engine/native_ops.py), over a KV cache of preallocated tensors.

Why: on CPU a step of Gemma 3 270M reads ~250 MB of weights, ~8 ms at this class of machine's memory bandwidth,
and transformers' modules around the products cost more than that (norms, rotary embedding, masks, attention
dispatch: ~25 ms of small operations per step when they ran as torch operations). Here a layer is: norm, one
product for q, k and v, head norms with the rotary embedding, attention, the output product, norm and add, norm,
one product for gate and up, GELU times up, the down product, norm and add; and keys and values go into tensors
that grow by doubling, so cutting a rejected draft is a change of length, not a copy.

It computes what transformers' Gemma 3 computes over the same quantized layers (the tests compare them), and
every operation computes each row from that row alone, by the same floats however many rows a pass feeds
(engine/native/native.h): plain decoding, a verification pass and a prefill chunk give each position the same
hidden state bit for bit, so speculative decoding is token-identical to the engine's plain decoding.
"""

from __future__ import annotations

import torch

from mtp_mcp.engine.native_ops import (
    Products,
    add_rms_norm_,
    attention,
    gelu_tanh_mul,
    head_norm_rotary_,
    rms_norm,
    store_keys_values,
)
from mtp_mcp.engine.quantized import QuantizedLinear

_INITIAL_CAPACITY = 1024  # tokens of cache allocated at first; doubled whenever a feed would overflow it
_MAX_HEAD_DIM = 1024  # what the native head norm holds per head


def lean_gemma3_supported(model: torch.nn.Module) -> bool:
    """True for a Gemma 3 text model (Gemma3ForCausalLM) whose decoder projections are all quantized and unbiased
    and whose attention and MLP have nothing this pass leaves out (logit softcapping, bidirectional attention,
    another activation)."""
    config = model.config
    if getattr(config, "model_type", None) != "gemma3_text":
        return False
    layers = model.get_decoder().layers
    projections = [getattr(layer.self_attn, name) for layer in layers for name in ("q_proj", "k_proj", "v_proj",
                                                                                     "o_proj")]
    projections += [getattr(layer.mlp, name) for layer in layers for name in ("gate_proj", "up_proj", "down_proj")]
    return (
        all(isinstance(p, QuantizedLinear) and p.bias is None for p in projections)
        and isinstance(model.get_output_embeddings(), QuantizedLinear)
        and getattr(config, "attn_logit_softcapping", None) is None
        and not getattr(config, "use_bidirectional_attention", False)
        and getattr(config, "hidden_activation", None) == "gelu_pytorch_tanh"
        and config.head_dim <= _MAX_HEAD_DIM and config.head_dim % 2 == 0
    )


class _Layer:
    def __init__(self, layer: torch.nn.Module, layer_type: str, sliding_window: int):
        attention_module, mlp = layer.self_attn, layer.mlp
        self.layer_type = layer_type
        self.window = sliding_window if layer_type == "sliding_attention" else 0  # 0: every earlier position
        self.qkv = Products([attention_module.q_proj.weight_blocks, attention_module.k_proj.weight_blocks,
                             attention_module.v_proj.weight_blocks])
        self.o_proj = Products([attention_module.o_proj.weight_blocks])
        self.gate_up = Products([mlp.gate_proj.weight_blocks, mlp.up_proj.weight_blocks])
        self.down = Products([mlp.down_proj.weight_blocks])
        # Gemma's norms scale by (1 + weight).
        self.norms = [(1.0 + module.weight.float()).contiguous() for module in (
            layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
            layer.post_feedforward_layernorm)]
        self.eps = layer.input_layernorm.eps
        # Queries and keys are normed per head and rotated as one matrix of heads + kv_heads rows: q_norm's scale for
        # the query heads, k_norm's for the key heads.
        config = attention_module.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_norm = torch.stack([1.0 + attention_module.q_norm.weight.float()] * heads
                                     + [1.0 + attention_module.k_norm.weight.float()] * kv_heads).contiguous()
        self.head_eps = attention_module.q_norm.eps
        self.scaling = attention_module.scaling


class LeanGemma3:
    """The decoder of a Gemma 3 model with quantized weights, and its cache: feed tokens, crop the last ones."""

    def __init__(self, model: torch.nn.Module):
        decoder = model.get_decoder()
        config = model.config
        self._embed = decoder.embed_tokens
        self._rotary = decoder.rotary_emb
        self._final_norm = (1.0 + decoder.norm.weight.float()).contiguous()
        self._final_eps = decoder.norm.eps
        self._layers = [_Layer(layer, layer_type, config.sliding_window)
                        for layer, layer_type in zip(decoder.layers, config.layer_types)]
        self._layer_types = {layer.layer_type for layer in self._layers}
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
        self._reserve(start + n)
        hidden = self._embed(torch.tensor(token_ids, dtype=torch.long)).contiguous()  # [n, H], Gemma's scale in
        positions = torch.arange(start, start + n)[None]
        rotary = {}
        for layer_type in self._layer_types:
            cos, sin = self._rotary(hidden, positions, layer_type)  # [1, n, head_dim] each
            rotary[layer_type] = (cos[0].contiguous(), sin[0].contiguous())
        for index, layer in enumerate(self._layers):
            self._layer(index, layer, hidden, rotary[layer.layer_type], start)
        self.length = start + n
        return rms_norm(hidden, self._final_norm, self._final_eps)

    def _layer(self, index: int, layer: _Layer, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
               start: int) -> None:
        """One decoder layer over hidden [n, H], in place."""
        n, d, heads, kv_heads = hidden.shape[0], self._head_dim, self._heads, self._kv_heads
        qkv = layer.qkv(rms_norm(hidden, layer.norms[0], layer.eps))  # [n, (heads + 2 kv_heads) d]
        head_norm_rotary_(qkv[:, : (heads + kv_heads) * d].view(n, heads + kv_heads, d), layer.head_norm,
                          layer.head_eps, *rotary)
        keys, values = self._keys[index], self._values[index]  # [kv_heads, capacity, d]
        store_keys_values(qkv, heads * d, (heads + kv_heads) * d, keys, values, start)
        attended = attention(qkv[:, : heads * d].view(n, heads, d), keys, values, start, layer.window, layer.scaling)
        add_rms_norm_(hidden, layer.o_proj(attended), layer.norms[1], layer.eps)
        gate_up = layer.gate_up(rms_norm(hidden, layer.norms[2], layer.eps))
        add_rms_norm_(hidden, layer.down(gelu_tanh_mul(gate_up)), layer.norms[3], layer.eps)

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
            # Never read past what was written: attention reads each row's positions up to itself.
            keys, values = torch.empty(shape), torch.empty(shape)
            if capacity:
                keys[:, : self.length] = self._keys[index][:, : self.length]
                values[:, : self.length] = self._values[index][:, : self.length]
            grown_keys.append(keys)
            grown_values.append(values)
        self._keys, self._values = grown_keys, grown_values

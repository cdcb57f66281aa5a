"""Attention one query row at a time, so that a row's result never depends on the rows fed with it.

Why: the attention kernel picks its blocking (and so the order of its float sums) by the shapes it is given. A
verification pass over k + 1 positions then rounds each row a little differently from k + 1 one-token passes, and
so does a prompt whose start came from the prefix cache from a cold prefill. With float weights that is a last-bit
difference; with quantized weights (engine/quantized.py) each layer rounds its input to int8 levels, which turns a
last-bit difference into up to one level, and greedy decoding then can and does pick another token at near-ties
(measured on the embedded Gemma 3: hidden states 0.07-0.12 apart after 2-17 rows per pass). Here every row attends
alone to exactly the keys a one-token pass at its position reads, with the same call, so each row is computed the same
way whatever came with it: speculative decoding is token-identical to plain decoding, bit for bit.

The price is one attention call per row: nothing at one position, about +20% for a pass over 17 positions and
+35-80% for a long prefill on 2 CPU cores (Gemma 3 270M, measured before its lean pass moved to aligned blocks of
fixed shapes, which give the same guarantee at less cost: engine/lean_gemma3.py). Used, through transformers'
attention interface, by every model with quantized weights that runs transformers' modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ROW_ATTENTION = "mtp_mcp_row_by_row"


def attend_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: list[tuple[int, int]],
                scaling: float) -> torch.Tensor:
    """query [b, heads, n, d], key and value [b, kv_heads, T, d]; row i attends to keys spans[i] = (first, end).
    Returns [b, heads, n, d]."""
    return torch.cat([
        F.scaled_dot_product_attention(query[:, :, i : i + 1], key[:, :, first:end], value[:, :, first:end],
                                       scale=scaling, enable_gqa=True)
        for i, (first, end) in enumerate(spans)
    ], dim=2)


def _row_by_row_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (see transformers.integrations.sdpa_attention); returns
    ([b, n, heads, d], None). The engine feeds one sequence (batch 1) with causal or sliding-window masks, where each
    row's allowed keys are one contiguous span; a row whose mask is not (never seen) falls back to its own mask."""
    n, total = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if attention_mask is None:  # causal over everything: row i (position total - n + i) reads keys up to itself
        spans = [(0, total - n + i + 1) for i in range(n)]
        return attend_rows(query, key, value, spans, scale).transpose(1, 2).contiguous(), None
    allowed = attention_mask[0, 0] if attention_mask.dtype == torch.bool else attention_mask[0, 0] > float("-inf")
    rows = []
    for i in range(n):
        keys = allowed[i].nonzero().flatten()
        first, end = int(keys[0]), int(keys[-1]) + 1
        if end - first == len(keys):
            rows.append(attend_rows(query[:, :, i : i + 1], key, value, [(first, end)], scale))
        else:
            rows.append(F.scaled_dot_product_attention(query[:, :, i : i + 1], key, value,
                                                       attn_mask=allowed[i][None, None, None], scale=scale,
                                                       enable_gqa=True))
    return torch.cat(rows, dim=2).transpose(1, 2).contiguous(), None


def _always_a_mask(*args, **kwargs) -> torch.Tensor | None:
    return sdpa_mask(*args, **(kwargs | {"allow_is_causal_skip": False}))


def use_row_attention(model: torch.nn.Module) -> bool:
    """Switches a transformers model's attention to one row at a time; False (and nothing changed) for models whose
    attention needs more than a mask (soft-capping, sinks, relative position biases)."""
    config = model.config.get_text_config()
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return False
    if any(name.endswith(".sinks") for name, _ in model.named_parameters()):
        return False
    AttentionInterface.register(ROW_ATTENTION, _row_by_row_attention)
    # Masks as for sdpa (causal, sliding windows), always built: a custom attention without a mask function of its
    # own would get none, and sliding-window layers would read too far back.
    AttentionMaskInterface.register(ROW_ATTENTION, _always_a_mask)
    try:
        model.set_attn_implementation(ROW_ATTENTION)
    except (ValueError, NotImplementedError):  # a model class that does not take custom attention functions
        return False
    return True

"""DeepSeek-V3-style MTP (DeepSeek-V3/R1, GLM-4.5/4.6, and the other configs transformers reads `num_mtp_layers` /
`num_nextn_predict_layers` for).

Checkpoint layout: MTP depth d is stored as decoder layer `model.layers.{num_hidden_layers + d}` with extra tensors
`enorm`, `hnorm`, `eh_proj`, `shared_head.norm` (and copies of the embedding / head, which are the target's anyway);
DeepSeek-V3 keeps it at layer 61, GLM-4.5 at 92 (4.5-Air: 46). transformers' MTP weight renaming maps it onto its
generic MtpModel, which engine.drafters.mtp_heads loads and runs. The hidden state fed in is the target's final
normalised one, as in transformers' MTPCandidateGenerator and vLLM's deepseek_mtp (the model's returned hidden states).
"""

from __future__ import annotations

import re

from transformers import PreTrainedConfig
from transformers.modeling_layers import MtpModel

from mtp_mcp.engine.drafters.mtp_heads import MtpHeadDrafter, load_mtp_heads
from mtp_mcp.engine.loading import LoadedModel


def declared_mtp_layers(text_config: PreTrainedConfig) -> int:
    """MTP layers of a config transformers knows MTP for (`num_mtp_layers`, alias `num_nextn_predict_layers`).
    Some configs default it to 1 when config.json is silent, so only the checkpoint's tensors prove it."""
    return int(getattr(text_config, "num_mtp_layers", 0) or 0)


def mtp_tensor_names(target: LoadedModel) -> re.Pattern:
    """The decoder layers right after the last one (any model size), plus whatever transformers itself would load as
    MTP weights for this architecture (its `_keys_to_ignore_on_load_unexpected`, e.g. `model.layers.61` for V3)."""
    text_config = target.model.config.get_text_config()
    first = text_config.num_hidden_layers
    indices = "|".join(str(i) for i in range(first, first + declared_mtp_layers(text_config)))
    patterns = [rf"^model\.layers\.({indices})\."]
    try:
        patterns.append(MtpModel.get_mtp_weights_regex(target.model).pattern)
    except ValueError:  # the architecture registers no MTP pattern of its own
        pass
    return re.compile("|".join(f"(?:{pattern})" for pattern in patterns))


def load_deepseek_mtp_drafter(target: LoadedModel, num_draft_tokens: int) -> MtpHeadDrafter:
    text_config = target.model.config.get_text_config()
    num_layers = declared_mtp_layers(text_config)
    first = text_config.num_hidden_layers
    heads = load_mtp_heads(target, num_layers, mtp_tensor_names(target), f"'model.layers.{first}.*'")
    return MtpHeadDrafter(f"mtp:{text_config.model_type.removesuffix('_text')}", heads, num_draft_tokens)

"""Qwen3.5 / Qwen3.6 / Qwen3-Next built-in MTP: the `mtp.*` tensors transformers drops when it loads the model.

Checkpoint layout (the names vLLM's qwen3_5_mtp.py / qwen3_next_mtp.py load): `mtp.pre_fc_norm_embedding`,
`mtp.pre_fc_norm_hidden`, `mtp.fc` ([H, 2H], over cat(normed embedding, normed hidden)), `mtp.layers.{i}.*` (a
full-attention decoder layer of the model's own class, MoE for the MoE models), `mtp.norm`; embedding and lm_head
are the target's. That is transformers' generic MtpLayer under other names (enorm, hnorm, eh_proj, mtp_block,
post_norm), and transformers' MTP weight renaming already maps this layout, so engine.drafters.mtp_heads loads and
runs it. The hidden state fed in is the target's final normalised one, as in vLLM (the model's returned hidden
states) and transformers' MTPCandidateGenerator (`hidden_states[-1]`, tied to `last_hidden_state`).

These targets are hybrid (Gated DeltaNet linear attention): rolling back their recurrent state is engine.target's job.
"""

from __future__ import annotations

import re

from transformers import PreTrainedConfig

from mtp_mcp.engine.drafters.mtp_heads import MtpHeadDrafter, load_mtp_heads
from mtp_mcp.engine.errors import ModelLoadError
from mtp_mcp.engine.loading import LoadedModel

QWEN_MTP_TENSORS = re.compile(r"^mtp\.")


def declared_mtp_layers(text_config: PreTrainedConfig) -> int:
    """MTP layers a Qwen3.x config declares: `mtp_num_hidden_layers` (Qwen3.5 / 3.6) or `num_nextn_predict_layers`
    (Qwen3-Next); 0 for any other model."""
    if not text_config.model_type.startswith("qwen3"):
        return 0
    qwen3_5_name = getattr(text_config, "mtp_num_hidden_layers", None)
    return int(qwen3_5_name or getattr(text_config, "num_nextn_predict_layers", None) or 0)


def mtp_tensor_names(target: LoadedModel) -> re.Pattern:
    return QWEN_MTP_TENSORS


def load_qwen_mtp_drafter(target: LoadedModel, num_draft_tokens: int) -> MtpHeadDrafter:
    text_config = target.model.config.get_text_config()
    num_layers = declared_mtp_layers(text_config)
    if getattr(text_config, "mtp_use_dedicated_embeddings", False):
        raise ModelLoadError(
            f"model '{target.name}' gives its MTP layers their own embedding (mtp_use_dedicated_embeddings), which "
            "this engine does not load yet; use --drafter ngram"
        )
    # transformers' MtpModel reads the generic names; Qwen's config spells them its own way. Every Qwen MTP layer is
    # a full-attention layer (vLLM builds them with layer_type="full_attention").
    text_config.num_mtp_layers = num_layers
    text_config.mtp_layer_types = ["full_attention"] * num_layers
    heads = load_mtp_heads(target, num_layers, QWEN_MTP_TENSORS, "'mtp.*'")
    return MtpHeadDrafter(f"mtp:{text_config.model_type.removesuffix('_text')}", heads, num_draft_tokens)

"""Tiny random checkpoints with native multi-token prediction, saved like the real ones (offline, ~100 KB each).

- Gemma 4: a Gemma4ForConditionalGeneration (text only) and, beside it as `<dir>-assistant`, a
  Gemma4AssistantForCausalLM configured for it.
- Qwen3.5: a hybrid model (3 Gated DeltaNet layers + 1 full attention, with a vision tower and the
  `model.language_model.*` names of the published checkpoints) whose safetensors also hold `mtp.*` tensors
  with the real names and shapes (`mtp.fc` [H, 2H], `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`,
  `mtp.layers.0.*` = a full-attention decoder layer, `mtp.norm`) and config `mtp_num_hidden_layers`.
- DeepSeek-V3: MoE with MLA, MTP depth d stored as `model.layers.{num_hidden_layers + d}` (+ enorm, hnorm, eh_proj,
  shared_head.norm, and the embedding/head copies real checkpoints carry), config `num_nextn_predict_layers`.

The MTP decoder layers are saved through save_pretrained of a model with the extra layers, then renamed, so their
tensors are in exactly the on-disk format the model class writes (fused experts ...).

oracle=d (0 < d < 1) makes the MTP module agree with the target by construction: the target's layers are damped to a
share d of their weight in the residual stream, so its next token is mostly a function of the current token (a
"bigram"), and the MTP module computes exactly that function: its input projection keeps only the (normalised) token
embedding, its decoder layer adds nothing, and its final norm is the target's. Most drafts are accepted, some are not
(the damped layers still move the target now and then), so both paths run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tiny_models import CONTEXT, VOCAB, train_tiny_tokenizer
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    PreTrainedModel,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
)
from transformers.cache_utils import LinearAttentionCacheLayerMixin

HIDDEN = 32
SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


def build_gemma4(path: str | Path, *, seed: int = 0, oracle: float = 0.0, assistant_hidden_size: int = HIDDEN,
                 assistant_vocab: int = VOCAB) -> Path:
    """A Gemma 4 model at `path` and its assistant at `<path>-assistant`; returns the target's path. The target is a
    Gemma4ForConditionalGeneration like the published ones (here without vision and audio towers).
    assistant_hidden_size / assistant_vocab other than the defaults make an assistant for a different target."""
    path = Path(path)
    # sliding_window 8 is shorter than the test sequences, so the assistant reads a window that has moved on.
    text_config = Gemma4TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, final_logit_softcapping=30.0,
        max_position_embeddings=CONTEXT, **SPECIAL_IDS,
    )
    torch.manual_seed(seed)
    target = Gemma4ForConditionalGeneration(
        Gemma4Config(text_config=text_config, vision_config=None, audio_config=None)
    ).eval()
    language_model = target.model.language_model
    assistant_text = Gemma4TextConfig(
        vocab_size=assistant_vocab, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0, max_position_embeddings=CONTEXT, **SPECIAL_IDS,
    )
    assistant = Gemma4AssistantForCausalLM(
        Gemma4AssistantConfig(text_config=assistant_text, backbone_hidden_size=assistant_hidden_size)
    ).eval()
    if oracle:
        with torch.no_grad():
            # Gemma normalises each layer's output before adding it: damp those norms, not the projections.
            _scale(target, ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"), oracle)
            _scale(assistant, ("o_proj.weight", "down_proj.weight"), 0.0)
            assistant.pre_projection.weight.copy_(_keep_first_half(HIDDEN))
            assistant.model.norm.weight.copy_(language_model.norm.weight)
            assistant.model.embed_tokens.weight.copy_(language_model.embed_tokens.weight)  # the tied lm_head
    _save(target, path)
    assistant.generation_config.num_assistant_tokens = 4  # what transformers' own assisted generation reads
    assistant.save_pretrained(path.with_name(f"{path.name}-assistant"))
    return path


def build_qwen3_5(path: str | Path, *, seed: int = 0, oracle: float = 0.0, mtp_tensors: bool = True) -> Path:
    """A hybrid Qwen3.5 with one MTP layer, laid out like the published checkpoints (Qwen3_5ForConditionalGeneration:
    `model.language_model.*`, a vision tower, `mtp.*` at the top); mtp_tensors=False keeps the config's claim but
    drops the tensors."""
    path = Path(path)
    text_config = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        max_position_embeddings=CONTEXT, **SPECIAL_IDS,
    )
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=HIDDEN,
                         patch_size=4, spatial_merge_size=1, temporal_patch_size=1)
    layer_types = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
    torch.manual_seed(seed)
    # One layer more than the target: it becomes mtp.layers.0 (a full-attention layer of the model's own class).
    config = Qwen3_5Config(
        text_config=text_config | {"num_hidden_layers": 5, "layer_types": [*layer_types, "full_attention"]},
        vision_config=vision_config,
    )
    model = Qwen3_5ForConditionalGeneration(config).eval()
    language_model = model.model.language_model
    mtp_layer = language_model.layers[4]
    extra = {
        "mtp.fc.weight": torch.randn(HIDDEN, 2 * HIDDEN) * 0.02,
        # Qwen3.5 norms scale by (1 + weight).
        "mtp.pre_fc_norm_embedding.weight": torch.randn(HIDDEN) * 0.1,
        "mtp.pre_fc_norm_hidden.weight": torch.randn(HIDDEN) * 0.1,
        "mtp.norm.weight": torch.randn(HIDDEN) * 0.1,
    }
    if oracle:
        with torch.no_grad():
            for layer in language_model.layers[:4]:
                _scale(layer, ("out_proj.weight", "o_proj.weight", "down_proj.weight"), oracle)
            _scale(mtp_layer, ("o_proj.weight", "down_proj.weight"), 0.0)
        extra = {
            "mtp.fc.weight": _keep_first_half(HIDDEN),
            "mtp.pre_fc_norm_embedding.weight": torch.zeros(HIDDEN),
            "mtp.pre_fc_norm_hidden.weight": torch.zeros(HIDDEN),
            "mtp.norm.weight": language_model.norm.weight.detach().clone(),
        }
    _save(model, path)
    _move_layers_to_mtp(path, {"model.language_model.layers.4.": "mtp.layers.0."}, extra if mtp_tensors else {},
                        drop=not mtp_tensors)
    _edit_config(path, section="text_config", num_hidden_layers=4, layer_types=layer_types, mtp_num_hidden_layers=1)
    return path


def build_deepseek_v3(path: str | Path, *, seed: int = 0, oracle: float = 0.0, mtp_layers: int = 1) -> Path:
    """A tiny DeepSeek-V3 (MLA attention, one dense layer then MoE) with `mtp_layers` MTP depths."""
    path = Path(path)
    layers = 2
    config = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=layers + mtp_layers, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=CONTEXT,
        **SPECIAL_IDS,
    )
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    extra = {}
    for depth in range(mtp_layers):
        prefix = f"model.layers.{layers + depth}."
        extra |= {
            prefix + "enorm.weight": 1 + torch.randn(HIDDEN) * 0.1,
            prefix + "hnorm.weight": 1 + torch.randn(HIDDEN) * 0.1,
            prefix + "eh_proj.weight": torch.randn(HIDDEN, 2 * HIDDEN) * 0.02,
            prefix + "shared_head.norm.weight": 1 + torch.randn(HIDDEN) * 0.1,
            # Real checkpoints carry copies of the shared embedding and head in every MTP layer.
            prefix + "embed_tokens.weight": model.model.embed_tokens.weight.detach().clone(),
            prefix + "shared_head.head.weight": model.lm_head.weight.detach().clone(),
        }
    if oracle:
        down_projections = ("o_proj.weight", "down_proj.weight", "experts.down_proj")
        with torch.no_grad():
            for layer in model.model.layers[:layers]:
                _scale(layer, down_projections, oracle)
            for depth in range(mtp_layers):
                prefix = f"model.layers.{layers + depth}."
                _scale(model.model.layers[layers + depth], down_projections, 0.0)
                extra |= {
                    prefix + "enorm.weight": torch.ones(HIDDEN),
                    prefix + "eh_proj.weight": _keep_first_half(HIDDEN),
                    prefix + "shared_head.norm.weight": model.model.norm.weight.detach().clone(),
                }
    _save(model, path)
    _move_layers_to_mtp(path, {}, extra)
    _edit_config(path, num_hidden_layers=layers, num_nextn_predict_layers=mtp_layers, drop=("num_mtp_layers",))
    return path


def _keep_first_half(size: int) -> torch.Tensor:
    """[size, 2 * size]: a projection of cat(a, b) that returns a."""
    return torch.cat([torch.eye(size), torch.zeros(size, size)], dim=1)


def _scale(module: torch.nn.Module, name_suffixes: tuple[str, ...], factor: float) -> None:
    for name, parameter in module.named_parameters():
        if name.endswith(name_suffixes):
            parameter.mul_(factor)


def _save(model: PreTrainedModel, path: Path) -> None:
    model.generation_config.eos_token_id = SPECIAL_IDS["eos_token_id"]
    model.generation_config.pad_token_id = SPECIAL_IDS["pad_token_id"]
    model.save_pretrained(path)
    train_tiny_tokenizer(VOCAB).save_pretrained(path)


def _move_layers_to_mtp(path: Path, renames: dict[str, str], extra: dict[str, torch.Tensor],
                        drop: bool = False) -> None:
    """Rewrites model.safetensors: tensors under each old prefix move to the new one (or are dropped), extra added."""
    weights_file = path / "model.safetensors"
    tensors = {}
    for name, tensor in load_file(weights_file).items():
        prefix = next((old for old in renames if name.startswith(old)), None)
        if prefix is None:
            tensors[name] = tensor
        elif not drop:
            tensors[renames[prefix] + name[len(prefix):]] = tensor
    tensors |= {name: tensor.contiguous() for name, tensor in extra.items()}
    save_file(tensors, weights_file, metadata={"format": "pt"})


def _edit_config(path: Path, section: str | None = None, drop: tuple[str, ...] = (), **values: object) -> None:
    """Sets `values` in config.json (in its `section`, e.g. text_config, when given) and removes the `drop` keys."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    edited = config[section] if section else config
    for key in drop:
        edited.pop(key, None)
    edited.update(values)
    config_file.write_text(json.dumps(config, indent=2))


def cache_states(cache) -> list[torch.Tensor]:
    """Every state of a cache that the next forward reads: the convolution window and recurrent state of linear
    layers (a convolution state may hold more inputs than its window until the next forward trims it), keys/values
    of the attention layers. Two caches that hold the same tokens exactly have the same states."""
    states = []
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            states += [layer.conv_states[0][..., -layer.conv_kernel_size[0] :], layer.recurrent_states[0]]
        else:
            states += [layer.keys, layer.values]
    return states

"""Drafters: cheap proposers of next tokens. `create_drafter` turns a --drafter name into one.

`mtp` is the model's own multi-token prediction: a Gemma 4 assistant (given with --draft-model, or found beside the
target as `<target>-assistant`), or MTP layers inside the checkpoint (Qwen3.5 / 3.6 / Next, DeepSeek-V3, GLM-4.5).
`suffix` drafts from earlier requests' prompts and outputs as well as the current one, remembered across restarts.
`auto` takes native MTP when the model has it (a checkpoint that only declares MTP layers, without their tensors,
does not count), together with `suffix` (the longer confident draft is verified: drafters/combined.py), else a draft
model when --draft-model is given, else `suffix` alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from re import Pattern

from mtp_mcp.engine.drafters import deepseek_mtp, qwen_mtp
from mtp_mcp.engine.drafters.autoregressive import NoDrafter
from mtp_mcp.engine.drafters.base import Draft, DraftContext, Drafter
from mtp_mcp.engine.drafters.combined import MtpWithSuffixDrafter
from mtp_mcp.engine.drafters.draft_model import DraftModelDrafter, check_same_vocabulary
from mtp_mcp.engine.drafters.gemma4_assistant import (
    is_gemma4_assistant,
    load_gemma4_assistant_drafter,
    sibling_assistant,
)
from mtp_mcp.engine.drafters.mtp_heads import checkpoint_tensor_files
from mtp_mcp.engine.drafters.prompt_lookup import PromptLookupDrafter
from mtp_mcp.engine.drafters.suffix import SuffixDrafter, load_suffix_drafter
from mtp_mcp.engine.errors import InvalidRequestError, ModelLoadError
from mtp_mcp.engine.loading import LoadedModel, load_model
from mtp_mcp.engine.options import DEFAULT_NUM_DRAFT_TOKENS, DEFAULT_SUFFIX_DRAFT_TOKENS, check_drafter_choice

log = logging.getLogger(__name__)

__all__ = ["Draft", "DraftContext", "Drafter", "create_drafter"]

# Per family of in-checkpoint MTP: (MTP layers the config declares, names of their tensors, loader).
_MTP_FAMILIES: tuple[tuple[Callable, Callable[[LoadedModel], Pattern], Callable[[LoadedModel, int], Drafter]], ...] = (
    (qwen_mtp.declared_mtp_layers, qwen_mtp.mtp_tensor_names, qwen_mtp.load_qwen_mtp_drafter),
    (deepseek_mtp.declared_mtp_layers, deepseek_mtp.mtp_tensor_names, deepseek_mtp.load_deepseek_mtp_drafter),
)


def create_drafter(name: str, target: LoadedModel, draft_model: str | None, num_draft_tokens: int | None,
                   memory_dir: Path | None = None) -> Drafter:
    """num_draft_tokens None: the drafter's default. memory_dir: where the suffix drafter keeps its memory across
    restarts (None: it keeps none)."""
    check_drafter_choice(name, draft_model, num_draft_tokens)
    if name == "none":
        return NoDrafter()
    if name in ("mtp", "auto"):
        native = _native_mtp_drafter(target, draft_model, num_draft_tokens or DEFAULT_NUM_DRAFT_TOKENS,
                                     required=name == "mtp")
        if native is not None and name == "auto":
            return MtpWithSuffixDrafter(native, _suffix(target, num_draft_tokens, memory_dir))
        if native is not None:
            return native
    if name == "draft-model" or draft_model is not None:
        if draft_model is None:
            raise InvalidRequestError(
                "--drafter draft-model needs --draft-model PATH (a small model with the same tokenizer)"
            )
        if is_gemma4_assistant(draft_model):
            raise InvalidRequestError(
                f"'{draft_model}' is a Gemma 4 assistant, which reads the target's hidden states and cache; "
                "use it with --drafter mtp (or auto), not draft-model"
            )
        draft = load_model(draft_model, device=str(target.device), dtype=str(target.dtype).removeprefix("torch."),
                           quantize=target.quantization if target.quantization in ("int8", "int4") else "auto")
        check_same_vocabulary(target.tokenizer, draft.tokenizer, draft.name)
        return DraftModelDrafter(draft.model, num_draft_tokens or DEFAULT_NUM_DRAFT_TOKENS)
    if name == "ngram":
        return PromptLookupDrafter(num_draft_tokens or DEFAULT_NUM_DRAFT_TOKENS)
    return _suffix(target, num_draft_tokens, memory_dir)


def _suffix(target: LoadedModel, num_draft_tokens: int | None, memory_dir: Path | None) -> SuffixDrafter:
    return load_suffix_drafter(num_draft_tokens or DEFAULT_SUFFIX_DRAFT_TOKENS, target.tokenizer,
                               f"{target.name}\n{target.path}", memory_dir)


def _native_mtp_drafter(target: LoadedModel, draft_model: str | None, num_draft_tokens: int, *,
                        required: bool) -> Drafter | None:
    """The model's own MTP drafter; None (auto) or InvalidRequestError (mtp) when it has none. Under auto, MTP
    layers that cannot be used (tensors partly missing, an unsupported variant) log a warning and give None, so the
    caller falls back to the draft model or suffix instead of failing the whole load."""
    if draft_model is not None and (required or is_gemma4_assistant(draft_model)):
        return load_gemma4_assistant_drafter(draft_model, target, num_draft_tokens)
    # auto with an ordinary draft model still prefers the model's own MTP (the module docstring's order).
    assistant = sibling_assistant(target.path)
    if assistant is not None:
        log.info("using the Gemma 4 assistant found beside the model: %s", assistant)
        return load_gemma4_assistant_drafter(assistant, target, num_draft_tokens)
    text_config = target.model.config.get_text_config()
    for declared_layers, tensor_names, load in _MTP_FAMILIES:
        if not declared_layers(text_config):
            continue
        if not required:
            pattern = tensor_names(target)
            if not any(pattern.search(tensor) for tensor in checkpoint_tensor_files(target.path)):
                log.warning("model %s declares MTP layers but its checkpoint holds none of their tensors; "
                            "drafting with %s instead", target.name, "the draft model" if draft_model else "suffix")
                return None
        try:
            return load(target, num_draft_tokens)
        except (ModelLoadError, InvalidRequestError) as error:
            if required:
                raise
            log.warning("model %s's MTP layers cannot be used (%s); drafting with %s instead", target.name, error,
                        "the draft model" if draft_model else "suffix")
            return None
    if required:
        raise InvalidRequestError(
            f"model '{target.name}' has no multi-token prediction of its own: its config declares no MTP layers "
            "(mtp_num_hidden_layers / num_nextn_predict_layers) and no Gemma 4 assistant was given or found beside "
            "it as '<model>-assistant'; use --drafter suffix, or --drafter mtp --draft-model ASSISTANT_DIR"
        )
    return None

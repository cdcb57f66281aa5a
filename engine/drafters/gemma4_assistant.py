"""Gemma 4 assistant drafters (`google/gemma-4-*-it-assistant`; transformers Gemma4AssistantForCausalLM, model_type
`gemma4_assistant`, and the same for `gemma4_unified_assistant`).

An assistant is a few decoder layers with no keys/values of their own: every layer attends to the TARGET's cache, to
the keys/values of the target's last non-shared layer of the same type (sliding or full attention). Each step it
reads `pre_projection(cat(target_embedding(token), hidden))` at the position of the last committed token, where
hidden is the target's final normalised hidden state before that token for the first draft, and then the assistant's
own projected output; the position stays put while it drafts (transformers' SinglePositionMultiTokenCandidateGenerator
works the same way, and also feeds the final normalised state: `hidden_states[-1]`, tied to `last_hidden_state`). So
it needs no prefill and no rollback: the target's cache invariant (every committed token but the last) is exactly the
context it must see. One difference from transformers: here the sliding layers see the keys the target's own window
would (the last window - 1), where transformers passes the keys/values of the target's last forward (one rejected
draft included, when there was one) and its mask keeps the last window + 1.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from mtp_mcp.engine.drafters.base import NO_DRAFT, AdaptiveDraftLength, Draft, DraftContext
from mtp_mcp.engine.errors import InvalidRequestError, ModelLoadError
from mtp_mcp.engine.loading import LoadedModel
from mtp_mcp.engine.request import SamplingParams
from mtp_mcp.engine.sampling import probabilities, sample

ASSISTANT_MODEL_TYPES = {"gemma4_assistant": "gemma4", "gemma4_unified_assistant": "gemma4_unified"}


class Gemma4AssistantDrafter:
    reads_prompt_hidden_states = True

    def __init__(self, assistant: PreTrainedModel, target: PreTrainedModel, num_draft_tokens: int):
        self.name = f"mtp:{assistant.config.model_type}"
        self.assistant = assistant
        self.length = AdaptiveDraftLength(num_draft_tokens)
        self._target_embedding = target.get_input_embeddings()
        self._producer_layers = _producer_layers(target.config.get_text_config())
        self._sampling = SamplingParams()
        self._generator: torch.Generator | None = None
        self._hidden: torch.Tensor | None = None  # [H]: the target's state before the last committed token

    def begin(self, prompt_ids: list[int], sampling: SamplingParams, generator: torch.Generator) -> None:
        self.length.current = self.length.maximum
        self._sampling = sampling
        self._generator = generator
        self._hidden = None

    @torch.inference_mode()
    def propose(self, context: DraftContext) -> Draft:
        if len(context.new_hidden):
            self._hidden = context.new_hidden[-1]
        limit = min(self.length.current, context.max_tokens)
        if limit <= 0 or self._hidden is None:  # a one-token prompt: no target state to start from yet
            return NO_DRAFT
        target = context.target
        shared_kv_states = {kind: target.key_value_states(index) for kind, index in self._producer_layers.items()}
        device = target.device
        position_ids = torch.tensor([[len(context.token_ids) - 1]], device=device)
        token = context.token_ids[-1]
        hidden = self._hidden[None, None]  # [1, 1, H]
        drafted: list[int] = []
        draft_probs: list[torch.Tensor] = []
        for _ in range(limit):
            embedding = self._target_embedding(torch.tensor([[token]], device=device))
            out = self.assistant(
                inputs_embeds=torch.cat([embedding, hidden], dim=-1),
                position_ids=position_ids,
                shared_kv_states=shared_kv_states,
                use_cache=False,
            )
            logits = out.logits[0, -1:].float()
            if self._sampling.greedy:
                token = int(logits[0].argmax())
            else:
                q = probabilities(logits, self._sampling)[0]
                token = sample(q, self._generator)
                draft_probs.append(q)
            drafted.append(token)
            hidden = out.last_hidden_state
        if not draft_probs:
            return Draft(tokens=drafted)
        return Draft(tokens=drafted, probs=torch.stack(draft_probs))

    def observe(self, proposed: int, accepted: int) -> None:
        self.length.update(proposed, accepted)

    def release(self) -> None:
        self._hidden = None

    def remember(self, token_ids: list[int]) -> None:
        pass


def is_gemma4_assistant(path: str | Path) -> bool:
    """Whether the directory holds a Gemma 4 assistant (by its config.json)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False
    return AutoConfig.from_pretrained(path, local_files_only=True).model_type in ASSISTANT_MODEL_TYPES


def sibling_assistant(target_path: str) -> Path | None:
    """`<target>-assistant` beside the target's directory, when it holds a Gemma 4 assistant (the layout of
    `huggingface-cli download google/gemma-4-E4B-it --local-dir gemma-4-E4B-it` plus the same for its assistant)."""
    target_dir = Path(target_path)
    candidate = target_dir.with_name(f"{target_dir.name}-assistant")
    return candidate if is_gemma4_assistant(candidate) else None


def load_gemma4_assistant_drafter(
    path: str | Path, target: LoadedModel, num_draft_tokens: int
) -> Gemma4AssistantDrafter:
    """Loads the assistant at `path` for `target`; raises InvalidRequestError when it was made for another model."""
    path = Path(path)
    if not is_gemma4_assistant(path):
        raise InvalidRequestError(
            f"'{path}' is not a Gemma 4 assistant directory (its config.json must say model_type "
            f"{' or '.join(ASSISTANT_MODEL_TYPES)}); --drafter mtp takes --draft-model only for those"
        )
    assistant_config = AutoConfig.from_pretrained(path, local_files_only=True)
    _check_made_for(assistant_config, target, path.name)
    try:
        assistant = AutoModelForCausalLM.from_pretrained(path, dtype=target.dtype, local_files_only=True,
                                                         use_kernels=False)  # as engine.loading does
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"could not load the Gemma 4 assistant '{path.name}': {reason}") from error
    assistant.to(target.device).eval().requires_grad_(False)
    return Gemma4AssistantDrafter(assistant, target.model, num_draft_tokens)


def _producer_layers(text_config) -> dict[str, int]:
    """Per attention type, the index of the target layer whose keys/values the assistant reads: the last layer of
    that type that computes its own (transformers marks it "store" in kv_sharing_modes)."""
    return {
        text_config.layer_types[index]: index
        for index, mode in enumerate(text_config.kv_sharing_modes)
        if mode == "store"
    }


def _check_made_for(assistant_config, target: LoadedModel, assistant_name: str) -> None:
    """An assistant reads the target's hidden states and keys/values, so their sizes must be the ones it was
    trained with; a mismatch would otherwise surface as a shape error deep inside attention."""
    target_config = target.model.config.get_text_config()
    family = ASSISTANT_MODEL_TYPES[assistant_config.model_type]
    target_type = target.model.config.model_type.removesuffix("_text")
    mismatch = None
    if target_type != family:
        mismatch = f"it drafts for {family} models, and '{target.name}' is {target_type}"
    elif assistant_config.backbone_hidden_size != target_config.hidden_size:
        mismatch = (f"it was made for hidden size {assistant_config.backbone_hidden_size} and '{target.name}' has "
                    f"{target_config.hidden_size}")
    elif assistant_config.text_config.vocab_size != target_config.vocab_size:
        mismatch = (f"its vocabulary has {assistant_config.text_config.vocab_size} tokens and '{target.name}' has "
                    f"{target_config.vocab_size}")
    else:
        producers = _producer_layers(target_config)
        assistant_text = assistant_config.text_config
        for index, kind in enumerate(assistant_text.layer_types):
            if kind not in producers:
                mismatch = f"it attends to {kind} layers and '{target.name}' has none"
                break
            mine, theirs = assistant_text.per_layer_config[index], target_config.per_layer_config[producers[kind]]
            if (mine.num_key_value_heads, mine.head_dim) != (theirs.num_key_value_heads, theirs.head_dim):
                mismatch = (f"its {kind} layers expect {mine.num_key_value_heads} key/value heads of size "
                            f"{mine.head_dim} and '{target.name}' has {theirs.num_key_value_heads} of size "
                            f"{theirs.head_dim}")
                break
    if mismatch:
        raise InvalidRequestError(
            f"the Gemma 4 assistant '{assistant_name}' does not fit the target: {mismatch}; use the assistant "
            "published for this exact model"
        )

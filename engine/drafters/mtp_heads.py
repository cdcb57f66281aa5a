"""MTP heads that ship inside the target's checkpoint (Qwen3.5 / Qwen3.6 / Qwen3-Next, DeepSeek-V3, GLM-4.5 ...).

transformers builds such heads as `MtpModel` (transformers/modeling_layers.py): per depth d one `MtpLayer` =
`eh_proj(cat(enorm(embed(token)), hnorm(hidden)))` -> one decoder layer of the model's own class -> `post_norm`,
with the target's embedding and output layer shared. It only loads them inside `generate(use_mtp=True)`, for configs
that name `num_mtp_layers`, and never for Qwen's `mtp.*` layout. Here we build the same module, load its tensors from
the checkpoint ourselves, and drive it inside the engine's loop.

Drafting (depth d reads pairs (h_t, x_{t+d+1}); h is the target's final, normalised hidden state for d = 0 and depth
d-1's output otherwise; pair t sits at position t in depth d's own KV cache). With N the index of the last committed
token, draft i (1-based) comes from depth i-1 at pair t = N-1; beyond the last depth, the last layer chains on its own
output one position further (how vLLM and llama.cpp run Qwen's single MTP layer for k > 1).

Invariant between proposals: depth d's cache holds exactly its committed pairs t < c_d = max(0, N-d) (both h and the
token come from committed tokens); every speculative entry written while drafting is cropped before `propose` returns,
so a rejected draft never needs the MTP cache rolled back.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import ExitStack
from itertools import chain
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import DynamicCache
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_layers import MtpModel
from transformers.modeling_utils import LoadStateDictConfig
from transformers.utils import ContextManagers

from mtp_mcp.engine.drafters.base import NO_DRAFT, AdaptiveDraftLength, Draft, DraftContext
from mtp_mcp.engine.errors import ModelLoadError
from mtp_mcp.engine.loading import LoadedModel
from mtp_mcp.engine.request import SamplingParams
from mtp_mcp.engine.sampling import probabilities, sample
from mtp_mcp.engine.target import TargetModel

log = logging.getLogger(__name__)


class MtpHeadDrafter:
    """Drafts with the target's own MTP layers (a transformers MtpModel sharing the target's embedding and head)."""

    reads_prompt_hidden_states = True

    def __init__(self, name: str, heads: MtpModel, num_draft_tokens: int):
        self.name = name
        self.heads = heads
        self.depths = len(heads.layers)
        self.length = AdaptiveDraftLength(num_draft_tokens)
        self._sampling = SamplingParams()
        self._generator: torch.Generator | None = None
        self._cache: DynamicCache | None = None
        self._committed_pairs: list[int] = []  # c_d: committed pairs in depth d's cache
        self._pending_hidden: torch.Tensor | None = None  # target states of pairs t in [c_0, N-1], not yet fed
        # carry[d]: depth d's outputs at its committed pairs t in [c_{d+1}, c_d), which depth d+1 has yet to read
        self._carry: list[torch.Tensor | None] = []
        # Greedy drafts can take the target's greedy tokens (its exact argmax screen on CPU, see
        # TargetModel.greedy_tokens) when the heads project exactly as the target's output layer: shared_head is
        # that layer (load_mtp_heads ties it), so it suffices that there is no muP scaling and no vocabulary cut.
        config = heads.config
        unpadded = getattr(config, "unpadded_vocab_size", None)
        self._projects_like_target = (
            getattr(config, "logits_mup_width_multiplier", None) is None
            and (unpadded is None or unpadded >= heads.shared_head.out_features)
        )

    def begin(self, prompt_ids: list[int], sampling: SamplingParams, generator: torch.Generator) -> None:
        self.length.current = self.length.maximum
        self._sampling = sampling
        self._generator = generator
        self._cache = DynamicCache(config=self.heads.config)
        self._committed_pairs = [0] * self.depths
        self._pending_hidden = None
        self._carry = [None] * (self.depths - 1)

    @torch.inference_mode()
    def propose(self, context: DraftContext) -> Draft:
        self._pending_hidden = _concat(self._pending_hidden, context.new_hidden)
        tokens = context.token_ids
        last = len(tokens) - 1  # N
        limit = min(self.length.current, context.max_tokens)
        if limit <= 0 or last == 0:  # nothing asked for, or no (hidden, token) pair yet: feed them next time
            return NO_DRAFT

        drafted: list[int] = []
        draft_probs: list[torch.Tensor] = []
        hidden = self._pending_hidden  # depth 0 reads the target's states for pairs [c_0, N-1]
        for depth in range(self.depths):
            start = self._committed_pairs[depth]
            # Pair t reads token x_{t+d+1}; beyond N those are this proposal's own drafts.
            pair_tokens = [
                tokens[i] if i <= last else drafted[i - last - 1] for i in range(start + depth + 1, last + depth + 1)
            ]
            output = self._run(depth, hidden, pair_tokens, start)
            self._draft(output[-1:], drafted, draft_probs, context.target)
            self._committed_pairs[depth] = max(0, last - depth)
            if depth + 1 < self.depths:
                # Depth d+1 reads depth d's outputs for pairs [c_{d+1}, N-1]: the carried committed ones, then these;
                # it will have committed pairs up to N-d-2, so what it still needs to read later starts there.
                next_start, next_committed = self._committed_pairs[depth + 1], max(0, last - depth - 1)
                hidden = _concat(self._carry[depth], output)
                self._carry[depth] = hidden[next_committed - next_start : self._committed_pairs[depth] - next_start]
        self._pending_hidden = None
        # Beyond the last depth, its layer chains on its own output, one position further each time.
        position = last
        while len(drafted) < limit:
            output = self._run(self.depths - 1, output[-1:], drafted[-1:], position)
            self._draft(output, drafted, draft_probs, context.target)
            position += 1
        for depth, committed in enumerate(self._committed_pairs):
            self._cache.layers[depth].crop(committed - self._cache.get_seq_length(depth))

        drafted = drafted[:limit]
        if self._sampling.greedy:
            return Draft(tokens=drafted)
        probs = torch.stack(draft_probs[:limit])
        # p spans the target's whole output layer; heads cut to an unpadded vocabulary give q no mass beyond it.
        width = context.target.vocab_size
        return Draft(tokens=drafted, probs=torch.nn.functional.pad(probs, (0, width - probs.shape[-1])))

    def observe(self, proposed: int, accepted: int) -> None:
        self.length.update(proposed, accepted)

    def release(self) -> None:
        self._cache = None
        self._pending_hidden = None

    def remember(self, token_ids: list[int]) -> None:
        pass

    def _run(self, depth: int, hidden: torch.Tensor, token_ids: list[int], first_position: int) -> torch.Tensor:
        """Feeds pairs (hidden[i], token_ids[i]) at positions first_position + i to depth `depth`: [n, H] -> [n, H]."""
        device = hidden.device
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=device)
        positions = torch.arange(first_position, first_position + len(token_ids), device=device)[None]
        return self.heads.forward_layer(depth, hidden[None], positions, self._cache, input_ids=input_ids)[0]

    def _draft(self, hidden: torch.Tensor, drafted: list[int], draft_probs: list[torch.Tensor],
               target: TargetModel) -> None:
        """hidden: [1, H], the output at the pair that predicts the next draft; appends the drafted token (and q)."""
        greedy = self._sampling.greedy
        if greedy and self._projects_like_target:
            drafted.append(target.greedy_tokens(hidden)[0])
            return
        # The shared head applied the way MtpModel itself does (muP scaling, unpadded vocabulary).
        logits = self.heads._project_to_logits(hidden).float()
        if greedy:
            drafted.append(int(logits[0].argmax()))
            return
        q = probabilities(logits, self._sampling)[0]
        drafted.append(sample(q, self._generator))
        draft_probs.append(q)


def _concat(first: torch.Tensor | None, second: torch.Tensor) -> torch.Tensor:
    return second if first is None else torch.cat([first, second])


def checkpoint_tensor_files(directory: str) -> dict[str, Path]:
    """Every tensor name in a model directory's safetensors, mapped to the file that holds it: the shard index, plus
    the headers of *.safetensors files it does not list (MTP heads are sometimes added later as a separate
    `mtp.safetensors`). Empty for checkpoints without safetensors."""
    root = Path(directory)
    index = root / "model.safetensors.index.json"
    names: dict[str, Path] = {}
    if index.is_file():
        names = {name: root / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    indexed = set(names.values())
    for file in sorted(set(root.glob("*.safetensors")) - indexed):
        with safe_open(file, framework="pt") as handle:
            names.update(dict.fromkeys(handle.keys(), file))
    return names


def load_mtp_heads(target: LoadedModel, num_layers: int, tensor_names: re.Pattern, described: str) -> MtpModel:
    """Builds the target's MTP module (transformers MtpModel, `num_layers` depths) and loads its weights: the tensors
    of the target's checkpoint whose names match `tensor_names`, renamed and converted (fused experts ...) the way
    transformers maps MTP checkpoints. Raises ModelLoadError naming what is missing."""
    model = target.model
    files = {name: file for name, file in checkpoint_tensor_files(target.path).items() if tensor_names.search(name)}
    if not files:
        raise ModelLoadError(
            f"model '{target.name}' declares {num_layers} MTP layer(s) but its checkpoint holds no {described} "
            "tensors (saved without them, or converted from GGUF); use --drafter ngram, or the original checkpoint"
        )
    # Built on the meta device like from_pretrained does: every weight comes from the checkpoint below.
    with ContextManagers(MtpModel.get_init_context(target.dtype, False, False, None)):
        heads = MtpModel(model, num_layers)
    with ExitStack() as open_files:
        handles = {file: open_files.enter_context(safe_open(file, framework="pt")) for file in set(files.values())}
        state = {name: handles[file].get_slice(name) for name, file in files.items()}
        config = LoadStateDictConfig(
            weight_mapping=heads.get_weight_conversions(model), device_map={"": target.device}, dtype=target.dtype
        )
        loading, _ = convert_and_load_state_dict_in_model(model=heads, state_dict=state, load_config=config)
    heads._adjust_missing_and_unexpected_keys(loading)
    heads.tie_with_main_model(model)
    # Anything still on the meta device (a weight or buffer the checkpoint did not provide) would fail at first use.
    on_meta = {name for name, tensor in chain(heads.named_parameters(), heads.named_buffers()) if tensor.is_meta}
    # The embedding and head now are the target's own modules: nothing of theirs comes from the MTP tensors (a
    # quantized head holds its blocks outside the parameters transformers knows to tie).
    targets_own = {id(module) for module in model.modules()}
    missing = sorted(name for name in loading.missing_keys | on_meta | {name for name, *_ in loading.mismatched_keys}
                     if id(heads.get_submodule(name.rpartition(".")[0])) not in targets_own)
    if missing:
        raise ModelLoadError(
            f"model '{target.name}' has incomplete MTP weights: {len(missing)} tensor(s) missing or of the wrong "
            f"shape for its {num_layers} MTP layer(s) (e.g. {', '.join(missing[:3])}); use --drafter ngram, or the "
            "original checkpoint"
        )
    log.info("loaded %d MTP layer(s) of %s (%d tensors)", num_layers, target.name, len(files))
    return heads.eval().requires_grad_(False)

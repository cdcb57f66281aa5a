"""The target model and its cache: the single owner of what the target has seen.

Invariant between steps: the cache holds the states of every committed token except the last one, which is the
first input of the next forward pass. Rolling back a rejected draft therefore means dropping exactly the drafts
that were not accepted, never anything committed.

Hybrid models (Qwen3.5 / Qwen3.6 / Qwen3-Next: Gated DeltaNet linear attention beside full attention) keep, per
linear layer, a convolution state (the last few inputs) and a recurrent state (a matrix folded over every token seen).
Attention keys/values and the convolution state can be cut back token by token (`crop`, with past recording on); the
recurrent state only to a position whose state the cache recorded. So before a forward of n > 1 tokens (a
verification) the cache is asked to record the state after each of them (`recurrent_states_to_keep=n`, transformers
>= 5.25: those positions go through the one-token kernel instead of the chunked one), and `rollback` of a rejection
is one `crop` that takes the state back; prefill chunks record none, as they are never rolled back.

Why per-position states (benchmarks/hybrid_rollback_cost.py, BENCHMARKS.md; CPU, 1 thread, 4 drafts): with
Qwen3.5-0.8B's layer shapes a step costs 520-545 ms whatever was rejected, where snapshot + restore + re-run of the
accepted tokens (what the engine did before transformers 5.25) cost 548 ms with every draft kept and 794-1,047 ms
with a rejection.

Prefix cache across requests: the caches of recent requests are kept (the live one, whose tokens `ids` lists, and
up to MAX_KEPT_SEQUENCES parked ones, each with its own ids), and a prefill with `reuse` continues whichever shares
the longest exactly reusable prefix with the new prompt, feeding only what follows it; the live cache is parked
when another one is taken, so an agent that works on two files in turn keeps both. Only what is exact is reused:
any prefix in the lean Gemma 3 cache and in attention-only caches (cropping keys/values is exact); in caches with
sliding-window layers (which no longer hold what fell out of the window) or recurrent states (which hold only the
state after the last token), only the whole kept sequence, when the new prompt extends it. The owner (the engine)
bounds their memory with `trim_kept`.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from mtp_mcp.engine.cpu_kernels import dot_error_factor
from mtp_mcp.engine.errors import ModelLoadError
from mtp_mcp.engine.lean_gemma3 import LeanGemma3, lean_gemma3_supported
from mtp_mcp.engine.native_ops import argmax_rows

# A row with more candidates than this is computed in full (rare: the bound is loose only for flat distributions).
_MAX_RESCORED_CANDIDATES = 2048
# Prompts are fed in chunks of this many tokens. Attention over the whole prompt at once costs prompt_length^2 per
# layer even where a sliding window or the causal mask hides most of it; in chunks a sliding-window layer attends to
# at most window + chunk keys and a full layer to the keys up to its chunk. Gemma 3 270M, CPU, 1 thread, ranges of
# three runs of python -m mtp_mcp.benchmarks.prefill_cost (BENCHMARKS.md): 4,000 tokens take 17.65-18.70 s in one piece,
# 10.48-11.05 s in chunks of 256 (512: 11.25-11.43, 1,024 and 128: over 11.5); 1,357 tokens ~8% less in chunks,
# within noise; 500 tokens the same. Chunk sizes of 256 and 512 are about even below 1,500 tokens.
PREFILL_CHUNK_TOKENS = 256
# Parked caches besides the live one (within the owner's memory budget, see trim_kept).
MAX_KEPT_SEQUENCES = 4
# A reused prefix that would cut this many tokens or more off a kept sequence is taken from a copy instead.
FORK_MIN_TOKENS = 16


@dataclass(slots=True)
class _ParkedSequence:
    """A cache put aside whole: its tokens and whatever holds their states (the lean cache's tensors and length,
    or a DynamicCache and its linear-attention layers)."""

    ids: list[int]
    state: tuple
    nbytes: int


@dataclass(frozen=True, slots=True)
class TargetOutput:
    logits: torch.Tensor | None  # [n, V] for the last n fed positions that asked for logits, float32
    hidden: torch.Tensor  # [n_fed, H] final (normalised) hidden states; row i predicts the token after input i


class TargetModel:
    def __init__(self, model: PreTrainedModel, prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS):
        self.model = model
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.device = model.device
        self._decoder = model.get_decoder()
        self._lm_head = model.get_output_embeddings()
        text_config = model.config.get_text_config()
        self._softcap = getattr(text_config, "final_logit_softcapping", None)
        # What some families do to the output layer's result, as their *ForCausalLM.forward does it (same operation,
        # so the same rounding): Granite divides by logits_scaling, Cohere multiplies by logit_scale.
        self._logits_divisor = getattr(text_config, "logits_scaling", None)
        self._logits_multiplier = getattr(model, "logit_scale", None)
        self.vocab_size = self._lm_head.out_features
        # The exact float rows of the output layer for a few ids: a quantized layer dequantizes just those.
        self._head_rows = getattr(self._lm_head, "dequantized_rows", None) or (lambda ids: self._lm_head.weight[ids])
        # Set on float32 CPU models by engine.cpu_kernels.use_cpu_kernels, which runs before the target is built. It
        # finds the output layer's argmax, the model's only while the scaling after the layer keeps the order.
        order_kept = all(scale is None or scale > 0 for scale in (self._logits_divisor, self._logits_multiplier))
        self._argmax_screen = getattr(self._lm_head, "argmax_screen", None) if order_kept else None
        self._dot_error_factor = dot_error_factor(self._lm_head.in_features)
        self.cache: DynamicCache | None = None
        # The tokens whose states the cache holds, in order (the lean cache's too): what a later prefill can reuse.
        self.ids: list[int] = []
        # Gemma 3 with quantized weights runs its own lean pass and cache (engine/lean_gemma3.py) instead of
        # transformers' modules and DynamicCache; `cache` then stays None.
        self._lean = LeanGemma3(model) if lean_gemma3_supported(model) else None
        # The linear-attention layers of `cache` (none for other models), listed once per cache.
        self._recurrent_layers: list[LinearAttentionCacheLayerMixin] = []
        self._parked: list[_ParkedSequence] = []  # least recently used first

    @property
    def cache_length(self) -> int:
        if self._lean is not None:
            return self._lean.length
        return self.cache.get_seq_length() if self.cache is not None else 0

    @torch.inference_mode()
    def prefill(self, token_ids: list[int], cancel: threading.Event | None = None, reuse: bool = False
                ) -> torch.Tensor | None:
        """Puts token_ids (possibly none) in the cache, fed in chunks of prefill_chunk_tokens, as the start of a new
        sequence. With `reuse`, the longest prefix the cache already holds exactly (see the module doc) is kept and
        only the rest is fed; otherwise the previous cache is dropped first, so its memory is freed.

        Returns the final hidden states of the tokens fed, [n, H]: the last n of token_ids, the others were reused.
        None when `cancel` was set between two chunks (a long prompt takes minutes on CPU)."""
        reused = self._take_longest_prefix(token_ids) if reuse else 0
        if reused:
            self._crop_to(reused)
        else:
            if reuse:
                self._park()
            self._start_sequence()
        fed = []
        self._record_recurrent_states(0)  # a prefill is never rolled back
        for start in range(reused, len(token_ids), self.prefill_chunk_tokens):
            if cancel is not None and cancel.is_set():
                return None
            fed.append(self._feed(token_ids[start : start + self.prefill_chunk_tokens]))
            if self.cache is not None:
                # A prefill is never rolled back: drop at once what sliding-window layers hold back for a rollback,
                # so that they keep one window, not the whole prompt.
                self.cache.crop(0)
        if not fed:  # nothing new: its last token (not in the cache) is the first input of the first step
            hidden_size = self.model.config.get_text_config().hidden_size
            return torch.empty(0, hidden_size, dtype=self.model.dtype, device=self.device)
        return torch.cat(fed)

    def _reusable_prefix(self, token_ids: list[int], ids: list[int], state: tuple) -> int:
        """How many leading tokens of token_ids a cache (its ids and state, as _park_state gives them) keeps exactly."""
        common = 0
        for held, wanted in zip(ids, token_ids):
            if held != wanted:
                break
            common += 1
        if self._lean is not None:
            return common
        cache, recurrent_layers = state
        if cache is None:
            return 0
        only_whole = recurrent_layers or any(getattr(layer, "is_sliding", False) for layer in cache.layers)
        return common if common == len(ids) or not only_whole else 0

    def _take_longest_prefix(self, token_ids: list[int]) -> int:
        """Makes live the cache (live or parked) that keeps the most of token_ids, parking the live one if another
        wins; returns how many tokens it keeps. When that would cut off FORK_MIN_TOKENS or more of it (another
        edit of the same file, a retry whose output a grown prompt may want later), the whole sequence is parked
        and a copy of the kept prefix goes live instead."""
        candidates = [self._park_state(), *((parked.ids, parked.state) for parked in self._parked)]
        reusable = [self._reusable_prefix(token_ids, ids, state) for ids, state in candidates]
        best = max(reusable)
        if best == 0:
            return 0
        if (index := reusable.index(best)) > 0:  # ties go to the live cache
            chosen = self._parked.pop(index - 1)
            self._park()
            self._restore(chosen.ids, chosen.state)
        if len(self.ids) - best >= FORK_MIN_TOKENS:
            ids, copied = list(self.ids), self._copied_state()
            self._park()
            self._restore(ids, copied)
        return best

    def _copied_state(self) -> tuple:
        if self._lean is not None:
            return (self._lean.copied_state(),)
        copied = copy.deepcopy(self.cache)
        return copied, [layer for layer in copied.layers if isinstance(layer, LinearAttentionCacheLayerMixin)]

    def _park_state(self) -> tuple[list[int], tuple]:
        state = ((self._lean.state(),) if self._lean is not None else (self.cache, self._recurrent_layers))
        return self.ids, state

    def _restore(self, ids: list[int], state: tuple) -> None:
        self.ids = ids
        if self._lean is not None:
            self._lean.restore(state[0])
        else:
            self.cache, self._recurrent_layers = state

    def _park(self) -> None:
        """Puts the live cache aside (most recently used) and leaves none live."""
        if self.ids:
            self._parked.append(_ParkedSequence(*self._park_state(), self.cache_bytes()))
            del self._parked[:-MAX_KEPT_SEQUENCES]
        self.release_live()

    def trim_kept(self, max_bytes: int) -> None:
        """Drops parked caches, least recently used first, until the live one and the parked ones together hold at
        most max_bytes; the live one too if it alone is larger."""
        while self._parked and self.cache_bytes() + sum(p.nbytes for p in self._parked) > max_bytes:
            self._parked.pop(0)
        if self.cache_bytes() > max_bytes:
            self.release_live()

    def _start_sequence(self) -> None:
        self.release_live()
        if self._lean is None:
            self.cache = DynamicCache(config=self.model.config)
            # Sliding-window layers and convolution states must keep what they would evict until we know the drafts
            # were accepted; recurrent states are recorded per forward (_record_recurrent_states).
            self.cache.activate_past_recording(recurrent_states_to_keep=0)
            self._recurrent_layers = [layer for layer in self.cache.layers
                                      if isinstance(layer, LinearAttentionCacheLayerMixin)]

    def _crop_to(self, length: int) -> None:
        """Keeps the states of the first `length` tokens (exact for what _reusable_prefix allows)."""
        if self._lean is not None:
            self._lean.crop(self._lean.length - length)
        elif length < len(self.ids):
            self.cache.crop(length - len(self.ids))  # negative: that many tokens removed
        del self.ids[length:]

    def release(self) -> None:
        """Drops every cache, live and parked, so their memory does not outlive the request (or the budget)."""
        self._parked = []
        self.release_live()

    def release_live(self) -> None:
        """Drops the live cache (its memory is freed unless a parked sequence holds it)."""
        self.cache = None
        self.ids = []
        if self._lean is not None:
            self._lean.reset()
        self._recurrent_layers = []

    def cache_bytes(self) -> int:
        """Memory the cache holds now (for the lean cache: what it has reserved)."""
        if self._lean is not None:
            return self._lean.reserved_bytes()
        if self.cache is None:
            return 0
        return sum(_tensor_bytes(value) for layer in self.cache.layers for value in vars(layer).values())

    @torch.inference_mode()
    def forward(self, token_ids: list[int], logits_for_last: int | None = None) -> TargetOutput:
        """Appends token_ids to the cache; returns hidden states for all of them and logits for the last
        `logits_for_last` (all when None, none when 0)."""
        if len(token_ids) > 1:  # a verification, of which the drafts may be rolled back (one token never is)
            self._record_recurrent_states(len(token_ids))
        hidden = self._feed(token_ids)
        n_logits = len(token_ids) if logits_for_last is None else logits_for_last
        logits = self.logits(hidden[len(token_ids) - n_logits :]) if n_logits else None
        return TargetOutput(logits=logits, hidden=hidden)

    @torch.inference_mode()
    def greedy_tokens(self, hidden: torch.Tensor) -> list[int]:
        """hidden: [n, H] -> the argmax token of each row's logits: exactly `self.logits(hidden).argmax(-1)`.

        With a Q8_0 argmax screen on a float output layer (engine/cpu_kernels.py, float32 CPU; up to its max_rows
        positions at once), only the few rows of the output layer that can hold the argmax are computed in float32.
        The answer is still exact. A row's token is taken from its candidates only when it beats every other
        candidate, and the ceiling of the ids left out, by more than float32 rounding can move any of them
        (gamma_K sum|h_i w_i| for each kernel: the one here and whichever computes the full logits). Otherwise, and
        for rows with too many candidates, the whole row of logits is computed as `logits` does, so near-ties are
        broken exactly as the model's own head breaks them.
        """
        if self._argmax_screen is None or len(hidden) > self._argmax_screen.max_rows:
            logits = self.logits(hidden)
            return argmax_rows(logits) if logits.device.type == "cpu" else logits.argmax(dim=-1).tolist()
        candidates, ceilings = self._argmax_screen.candidates(hidden)
        tokens = []
        for row, ids, ceiling in zip(hidden, candidates, ceilings.tolist()):
            token = self._certain_argmax(row, ids, ceiling)
            tokens.append(token if token is not None else int(self.logits(row[None]).argmax()))
        return tokens

    def _certain_argmax(self, row: torch.Tensor, ids: torch.Tensor, ceiling: float) -> int | None:
        """The argmax of row's logits if it is certain among the candidate ids (every other id's logit is below
        ceiling), else None."""
        if not 0 < len(ids) <= _MAX_RESCORED_CANDIDATES:
            return None
        weight = self._head_rows(ids)
        raw = F.linear(row, weight).float()
        # Rounding of this kernel plus that of any other (2 gamma_K sum|h_i w_i|), with room for rounding in the sum.
        slack = 2.5 * self._dot_error_factor * F.linear(row.abs(), weight.abs()).float()
        best = int(raw.argmax())
        low = raw[best] - slack[best]
        high = raw + slack
        high[best] = ceiling  # the best candidate's rivals: the other candidates and every id left out
        rival = high.max()
        capped_low, capped_rival = self._finish(torch.stack([low, rival])).tolist()
        # The scaling and the cap (tanh) can merge distinct logits into one float; demand a clear gap after them, too.
        if capped_low - capped_rival <= 4 * torch.finfo(torch.float32).eps * abs(capped_low):
            return None
        return int(ids[best])

    def _finish(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model does after its output layer: the family's scaling, then Gemma's soft cap. Both keep the
        order of the logits (positive scales, tanh), so the argmax of the output layer is the model's argmax."""
        if self._logits_divisor is not None:
            logits = logits / self._logits_divisor
        if self._logits_multiplier is not None:
            logits = logits * self._logits_multiplier
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, H] -> logits [n, V] in float32, as the model's own head computes them (checked at load by
        check_output_path)."""
        return self._finish(self._lm_head(hidden).float())

    @torch.inference_mode()
    def check_output_path(self) -> None:
        """Raises ModelLoadError if `logits` does not reproduce the model's own forward on a probe: a family whose
        head does more than the steps of `_finish` (a hidden-state scale, an extra layer) would be sampled from a
        different distribution without any error."""
        if self._lean is not None:
            return  # Gemma 3's head is the output layer and its soft cap, which `_finish` does (tests compare them)
        vocab = self.vocab_size
        probe = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab, 4 % vocab]], device=self.device)
        expected = self.model(input_ids=probe, use_cache=False).logits[0, -1].float()
        hidden = self._decoder(input_ids=probe, use_cache=False).last_hidden_state[0, -1:]
        got = self.logits(hidden)[0]
        scale = float(expected.abs().max()) or 1.0
        tolerance = (1e-4 if expected.dtype == torch.float32 and self.model.dtype == torch.float32 else 2e-2) * scale
        if not bool(((got - expected).abs() <= tolerance).all()):
            raise ModelLoadError(
                f"{type(self.model).__name__} computes its logits in a way this engine does not reproduce (its "
                "output differs from the engine's output layer on a probe), so sampling would not follow the "
                "model; this architecture is not supported")

    @torch.inference_mode()
    def rollback(self, n_tokens: int) -> None:
        """Forgets the last n_tokens fed by the last forward (rejected drafts). Called after every verification,
        with 0 when all drafts were kept: that also trims the states that sliding-window layers and convolution
        states held back for a possible rollback."""
        del self.ids[len(self.ids) - n_tokens :]
        if self._lean is not None:
            self._lean.crop(n_tokens)
            return
        # Exact for every layer kind: a hybrid cache recorded the recurrent state after each token of the forward.
        self.cache.crop(-n_tokens)

    def key_value_states(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Read-only view of one attention layer's cached keys and values ([1, kv_heads, n, head_dim] each), for
        drafters that attend to the target's cache. Between steps they cover every committed token but the last
        (a sliding-window layer: only the last window - 1 of them)."""
        if self._lean is not None:
            return self._lean.key_value_states(layer_index)
        layer = self.cache.layers[layer_index]
        return layer.keys, layer.values

    def _feed(self, token_ids: list[int]) -> torch.Tensor:
        """Runs the decoder over token_ids on top of the cache; returns the final hidden states [n, H]."""
        self.ids += token_ids
        if self._lean is not None:
            return self._lean.feed(token_ids)
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        return self._decoder(input_ids=input_ids, cache=self.cache, use_cache=True).last_hidden_state[0]

    def _record_recurrent_states(self, n_positions: int) -> None:
        """Has a hybrid cache record, in the next forwards (until a rollback), the recurrent state after each of
        their last n_positions tokens: what a rollback of any of them takes back. Each recorded
        position runs through the one-token kernel instead of the chunked one."""
        if self._recurrent_layers:
            self.cache.activate_past_recording(recurrent_states_to_keep=n_positions)


def _tensor_bytes(value: object) -> int:
    """Bytes of the tensors in a cache layer's attribute: a tensor, or a dict or list of them (recurrent states)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(item) for item in value)
    return 0

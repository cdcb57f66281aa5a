"""One request, start to finish: prefill, then propose -> cut -> verify -> accept -> roll back, until a stop.

    tokens:  [ prompt ............ | generated ....... x ]   x = last committed token, not in the cache yet
    step:    feed [x, d_1 .. d_k] to the target (one pass), verify, keep d_1 .. d_n and the target's own token,
             drop the k - n rejected states from the cache.

With a VerifyCostCurve, engine.draft_payoff cuts each draft to what is expected to pay (possibly nothing) and
pauses a drafter that keeps losing; the drafter then gets the target states of the skipped steps at its next
proposal.
"""

from __future__ import annotations

import threading
import time

import torch
from transformers import PreTrainedTokenizerBase

from mtp_mcp.engine.draft_payoff import DraftPayoff, VerifyCostCurve
from mtp_mcp.engine.drafters.base import NO_DRAFT, DraftContext, Drafter
from mtp_mcp.engine.request import FinishReason, GenerationRequest, GenerationResult, TextCallback
from mtp_mcp.engine.sampling import probabilities
from mtp_mcp.engine.stats import GenerationStats
from mtp_mcp.engine.target import TargetModel
from mtp_mcp.engine.text import IncrementalDetokenizer, StopStringMatcher
from mtp_mcp.engine.verify import verify_greedy, verify_sampling


def generate(
    target: TargetModel,
    drafter: Drafter,
    tokenizer: PreTrainedTokenizerBase,
    request: GenerationRequest,
    prompt_ids: list[int],
    eos_ids: frozenset[int],
    context_length: int,
    cancel: threading.Event | None = None,
    on_text: TextCallback | None = None,
    reuse_prefix: bool = False,
    verify_cost: VerifyCostCurve | None = None,
) -> GenerationResult:
    """Runs the speculative decode loop. The prompt must already fit: len(prompt_ids) + max_new_tokens <= context.
    reuse_prefix: keep what the target's cache already holds of the prompt (TargetModel.prefill); never for drafters
    that read the hidden states of every prompt position.
    verify_cost: the engine's measured cost of a pass (updated here); given, drafts are cut to what pays, else every
    drafted token is verified."""
    started = time.perf_counter()
    stats = GenerationStats(drafter=drafter.name, prompt_tokens=len(prompt_ids))
    sampling = request.sampling
    generator = torch.Generator(device=target.device)
    if request.seed is None:
        generator.seed()
    else:
        generator.manual_seed(request.seed)

    reuse_prefix = reuse_prefix and not drafter.reads_prompt_hidden_states
    new_hidden = target.prefill(prompt_ids[:-1], cancel, reuse=reuse_prefix)
    stats.prefill_time_s = time.perf_counter() - started
    if new_hidden is None:  # cancelled between two chunks of the prompt
        stats.total_time_s = time.perf_counter() - started
        return GenerationResult(text="", token_ids=[], finish_reason="cancelled", stats=stats)
    stats.prompt_tokens_reused = len(prompt_ids) - 1 - len(new_hidden)
    drafter.begin(prompt_ids, sampling, generator)
    # Sampling with a seed must give the same text every time, and the random numbers it uses depend on the drafts:
    # so its drafts may depend on this request alone, not on timings (the payoff's cut) or on earlier requests.
    reproducible = not sampling.greedy and request.seed is not None
    payoff = DraftPayoff(verify_cost) if verify_cost is not None and not reproducible else None

    tokens = list(prompt_ids)
    generated: list[int] = []
    text_parts: list[str] = []
    detokenizer = IncrementalDetokenizer(tokenizer)
    stop_matcher = StopStringMatcher(request.stop)
    finish: FinishReason | None = None

    def emit(text: str) -> None:
        if text:
            text_parts.append(text)
            if on_text is not None:
                on_text(text, len(generated))

    while finish is None:
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
            break
        step_started = time.perf_counter()
        # Each pass yields accepted + 1 tokens: draft at most one fewer than the request still allows.
        draft_budget = min(request.max_new_tokens - len(generated), context_length - len(tokens)) - 1
        asked = payoff is None or payoff.should_draft()
        if asked:
            draft = drafter.propose(DraftContext(tokens, draft_budget, new_hidden, target, cancel,
                                                 use_memory=not reproducible))
            if payoff is not None:
                draft = draft.first(payoff.cut(draft.tokens, draft.confidence, len(tokens)))
        else:
            draft = NO_DRAFT
        drafted = time.perf_counter()

        # Greedy needs only each position's argmax, which the target finds without the full logits.
        scored = target.forward([tokens[-1], *draft.tokens], logits_for_last=0 if sampling.greedy else None)
        if sampling.greedy:
            verdict = verify_greedy(draft.tokens, target.greedy_tokens(scored.hidden))
        else:
            verdict = verify_sampling(draft.tokens, draft.probs, probabilities(scored.logits, sampling), generator)
        target.rollback(len(draft.tokens) - verdict.accepted)
        verified = time.perf_counter()
        if asked:
            drafter.observe(len(draft.tokens), verdict.accepted)
            new_hidden = scored.hidden[: verdict.accepted + 1]
        else:  # the drafter has yet to see the states of the steps it was not asked in
            new_hidden = torch.cat([new_hidden, scored.hidden[: verdict.accepted + 1]])
        stats.record_step(len(draft.tokens), verdict.accepted)
        stats.drafting_time_s += drafted - step_started
        stats.verifying_time_s += verified - drafted
        if verify_cost is not None:
            verify_cost.record(len(draft.tokens) + 1, verified - drafted)

        for token in [*draft.tokens[: verdict.accepted], verdict.next_token]:
            tokens.append(token)
            generated.append(token)
            if token in eos_ids:
                finish = "eos"
                break
            text, stopped = stop_matcher.push(detokenizer.push(token))
            emit(text)
            if stopped:
                finish = "stop_string"
                break
            if len(generated) >= request.max_new_tokens:
                finish = "length"
                break
        if stats.time_to_first_token_s == 0.0:
            stats.time_to_first_token_s = time.perf_counter() - started
        if payoff is not None:
            payoff.learn(tokens)
            payoff.step(asked, verdict.accepted + 1, verified - step_started)

    if payoff is not None:
        stats.drafter_pauses = payoff.pauses
    emit(stop_matcher.flush())
    stats.new_tokens = len(generated)
    stats.total_time_s = time.perf_counter() - started
    return GenerationResult(text="".join(text_parts), token_ids=generated, finish_reason=finish, stats=stats)

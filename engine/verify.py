"""The verifier: decides which drafted tokens the target keeps. Pure functions, no model, no state.

Inputs are the k drafted tokens and the target's verdicts at the k+1 positions it was fed
([last committed token, draft_1, ..., draft_k]): its argmax tokens (greedy) or probabilities (sampling). Row i is
about the token that follows position i, so row i judges draft_{i+1} and row k gives the bonus token when every
draft is accepted.
Every call returns at least one token, so each target pass makes progress.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp_mcp.engine.sampling import sample


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: int  # how many drafts are kept (a prefix of the draft)
    next_token: int  # the target's own token after them: the correction, or the bonus when all were kept


def verify_greedy(draft_tokens: list[int], target_tokens: list[int]) -> Verdict:
    """draft_tokens: k ids; target_tokens: the target's k+1 argmax tokens. Keep drafts while they equal them."""
    accepted = 0
    for draft, target in zip(draft_tokens, target_tokens):
        if draft != target:
            break
        accepted += 1
    return Verdict(accepted, target_tokens[accepted])


def verify_sampling(
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator,
) -> Verdict:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): the kept tokens are distributed exactly as p.

    draft_tokens: k ids, each sampled from q_i = draft_probs[i] ([k, V]); draft_probs None means a deterministic
    drafter, i.e. q_i is one-hot on draft_i. target_probs: [k+1, V] = p_i.
    For each i: accept draft x with probability min(1, p_i(x) / q_i(x)); at the first rejection sample the
    correction from normalize(max(0, p_i - q_i)); if all k are accepted, sample the bonus from p_k.
    """
    for i, token in enumerate(draft_tokens):
        p = target_probs[i]
        if draft_probs is None:
            q = torch.zeros_like(p)
            q[token] = 1.0
        else:
            q = draft_probs[i]
        p_x, q_x = float(p[token]), float(q[token])
        uniform = float(torch.rand((), generator=generator, device=generator.device))
        if q_x > 0.0 and uniform < min(1.0, p_x / q_x):
            continue
        residual = torch.clamp(p - q, min=0.0)
        total = float(residual.sum())
        # residual is all zero only when p == q (then acceptance was certain unless q_x == 0); fall back to p.
        next_token = sample(residual / total if total > 0.0 else p, generator)
        return Verdict(i, next_token)
    return Verdict(len(draft_tokens), sample(target_probs[len(draft_tokens)], generator))

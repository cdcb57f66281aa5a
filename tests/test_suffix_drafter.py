"""The suffix drafter: its indexes, its memory across restarts, and decoding with it (lossless, greedy and sampling)."""

from __future__ import annotations

import logging
import os
import stat

import numpy as np
import pytest
import torch
from tiny_checkpoints import build_tiny_checkpoint
from tiny_models import CONTEXT, VOCAB, tiny_gemma3, train_tiny_tokenizer

from mtp_mcp.engine.decode import generate
from mtp_mcp.engine.drafters.base import DraftContext
from mtp_mcp.engine.drafters.suffix import MEMORY_DIR, SuffixDrafter
from mtp_mcp.engine.drafters.suffix_index import (
    MAX_OCCURRENCES,
    GlobalIndex,
    RequestIndex,
    best_continuation,
)
from mtp_mcp.engine.engine import Engine, EngineOptions
from mtp_mcp.engine.loading import CACHE_DIR_ENV, LoadedModel
from mtp_mcp.engine.request import GenerationRequest, SamplingParams
from mtp_mcp.engine.sampling import probabilities
from mtp_mcp.engine.target import TargetModel

TOKENIZER = train_tiny_tokenizer(VOCAB)
EOS = frozenset({TOKENIZER.eos_token_id})


def corpus(*documents: list[int]) -> np.ndarray:
    flat = [-1]
    for document in documents:
        flat += [*document, -1]
    return np.array(flat, dtype=np.int32)


# -- the indexes ------------------------------------------------------------------------------------------------


def test_the_longest_match_decides_and_its_most_frequent_continuation_is_drafted():
    # [3, 4] occurs three times; after [2, 3, 4] only twice, continuing with 7 then 8 (once 9).
    found = best_continuation(corpus([1, 3, 4, 5, 6], [2, 3, 4, 7, 8], [2, 3, 4, 7, 9]), [0, 2, 3, 4], 8)
    assert found.match_length == 3
    assert found.tokens == [7, 9]  # the 8/9 tie goes to the most recent occurrence
    assert found.confidence == [1.0, 0.5]


def test_ties_go_to_the_most_recent_occurrence_and_rare_tokens_stop_the_draft():
    found = best_continuation(corpus([3, 4, 5], [3, 4, 6]), [3, 4], 8)
    assert found.tokens == [6] and found.confidence == [0.5]
    # 12 occurrences, each continuing differently at the second token: 1/12 is below the 0.1 floor.
    documents = [[1, 2, 3, 10 + i] for i in range(12)]
    found = best_continuation(corpus(*documents), [1, 2], 8)
    assert found.tokens == [3] and found.match_length == 2
    assert best_continuation(corpus(*documents), [1, 2, 3], 8).tokens == []


def test_a_short_match_earns_a_short_draft_and_documents_are_not_crossed():
    found = best_continuation(corpus([5, 6, 7, 8, 9, 10]), [1, 5], 8)
    assert found.match_length == 1 and found.tokens == [6]
    found = best_continuation(corpus([1, 2], [3, 4]), [1], 8)  # 2 ends its document: nothing follows in [3, 4]
    assert found.tokens == [2]
    assert best_continuation(corpus([1, 2]), [2], 8).tokens == []


def test_only_the_most_recent_occurrences_are_counted():
    old = [[7, 8, 1]] * (MAX_OCCURRENCES + 10)
    new = [[7, 8, 2]] * 5
    assert best_continuation(corpus(*new, *old), [7, 8], 4).tokens == [1]
    assert best_continuation(corpus(*old, *new), [7, 8], 4).tokens == [1]  # 59 of the last 64 still say 1
    assert best_continuation(corpus(*old[:10], *new * 20), [7, 8], 4).tokens == [2]


def test_the_request_index_never_matches_the_tail_with_itself():
    index = RequestIndex()
    index.extend_to([5, 6, 7])
    assert index.continuation([5, 6, 7], 4).tokens == []
    index.extend_to([5, 6, 7, 1, 5, 6, 7])
    assert index.continuation([5, 6, 7], 4).tokens == [1, 5, 6]
    longer = RequestIndex()
    longer.extend_to([*range(3000), 10, 11])  # grows past its first buffer
    assert longer.continuation([10, 11], 8).tokens == [12, 13]


def test_the_global_index_keeps_distinct_text_within_its_budget_least_recently_used_first():
    index = GlobalIndex(token_budget=20)
    index.add([1, 2, 3, 4])
    index.add([1, 2, 3, 4, 5, 6])  # a growing file replaces its shorter self
    assert (index.documents, index.tokens) == (1, 6)
    index.add([1, 2, 3])  # already held whole
    assert (index.documents, index.tokens) == (1, 6)
    index.add([20, 21, 22, 23, 24, 25, 26])
    index.add([30, 31, 32, 33, 34, 35, 36])
    assert index.tokens == 20
    assert index.continuation([4, 5], 4).tokens == [6]  # drafting from the oldest makes it the most recent
    index.add([40, 41, 42])
    assert index.continuation([21, 22], 4).tokens == []  # so the second document went instead
    assert index.continuation([4, 5], 4).tokens == [6]
    assert index.tokens <= 20


# -- memory across restarts ---------------------------------------------------------------------------------------


def test_the_memory_file_round_trips_and_is_the_users_alone(tmp_path):
    index = GlobalIndex(1000)
    index.add([1, 2, 3, 4, 5])
    index.add([9, 8, 7])
    path = tmp_path / "memory" / "m.safetensors"
    index.save(path, "key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    again = GlobalIndex(1000)
    assert again.load(path, "key")
    assert (again.documents, again.tokens) == (2, 8)
    assert again.continuation([2, 3], 4).tokens == [4, 5]
    small = GlobalIndex(3)  # a smaller budget keeps the most recently used
    assert small.load(path, "key") and small.tokens == 3
    assert small.continuation([9, 8], 4).tokens == [7]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign", "negative tokens"])
def test_a_damaged_or_foreign_memory_file_is_ignored_with_a_warning(tmp_path, caplog, damage):
    path = tmp_path / "m.safetensors"
    index = GlobalIndex(1000)
    index.add([1, 2, 3, 4])
    index.save(path, "key")
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "negative tokens":
        from safetensors.numpy import save_file

        save_file({"tokens": np.array([1, -5], dtype=np.int32), "lengths": np.array([2], dtype=np.int64)},
                  str(path), metadata={"format": "mtp-mcp-suffix-memory-v1", "key": "key"})
    with caplog.at_level(logging.WARNING):
        fresh = GlobalIndex(1000)
        assert not fresh.load(path, "other key" if damage == "foreign" else "key")
    assert fresh.tokens == 0
    assert "drafter memory" in caplog.text and "replaced" in caplog.text


def tiny_options(path, **fields) -> EngineOptions:
    # Every drafted token verified, so that tokens per pass depend on the drafts alone, not on measured timings.
    return EngineOptions(model=str(path), drafter="suffix", device="cpu", dtype="float32", draft_when_it_pays=False,
                         **fields)


def test_an_engine_remembers_earlier_requests_across_a_restart(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    checkpoint = build_tiny_checkpoint(tmp_path / "model", eos="not_by_greedy")
    request = GenerationRequest("Ünïcödé ü ö ä ß 日本語", max_new_tokens=40)
    first = Engine.load(tiny_options(checkpoint))
    try:
        cold = first.generate(request)
    finally:
        first.close()
    files = list((tmp_path / "cache" / MEMORY_DIR).iterdir())
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    # A restart: a new engine, the same request (a retry) is drafted from the memory, many tokens per pass.
    second = Engine.load(tiny_options(checkpoint))
    try:
        warm = second.generate(request)
    finally:
        second.close()
    assert warm.token_ids == cold.token_ids
    assert warm.stats.mean_tokens_per_pass > 4 * cold.stats.mean_tokens_per_pass
    # Without the memory, the restarted engine knows nothing of the first one.
    forgetful = Engine.load(tiny_options(checkpoint, drafter_memory=False))
    try:
        again = forgetful.generate(request)
    finally:
        forgetful.close()
    assert again.token_ids == cold.token_ids
    assert again.stats.mean_tokens_per_pass == cold.stats.mean_tokens_per_pass


def test_a_memory_that_cannot_be_saved_costs_one_warning_not_the_request(tmp_path, caplog):
    blocker = tmp_path / "not a directory"
    blocker.write_text("")
    drafter = SuffixDrafter(8, GlobalIndex(1000), blocker / "m.safetensors", "key")
    with caplog.at_level(logging.WARNING):
        drafter.remember([1, 2, 3])
        drafter.remember([4, 5, 6])
    assert caplog.text.count("cannot save the drafter memory") == 1
    assert drafter.memory.tokens == 6


# -- decoding -------------------------------------------------------------------------------------------------------


def run(model, drafter, prompt_ids, max_new_tokens=40, **request_fields):
    request = GenerationRequest(prompt="unused: ids are given", max_new_tokens=max_new_tokens, **request_fields)
    return generate(TargetModel(model), drafter, TOKENIZER, request, prompt_ids, EOS, CONTEXT)


def reference(model, prompt_ids, max_new_tokens):
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=TOKENIZER.eos_token_id, pad_token_id=TOKENIZER.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "🙂🚀 日本語 テキスト",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_is_identical_to_transformers_generate_with_and_without_memory(prompt):
    model = tiny_gemma3(seed=0)
    ids = TOKENIZER(prompt)["input_ids"]
    expected = reference(model, ids, 40)
    drafter = SuffixDrafter(16, GlobalIndex(10_000))
    first = run(model, drafter, ids)
    drafter.remember([*ids, *first.token_ids])
    retry = run(model, drafter, ids)
    # A near-duplicate prompt: the memory holds most of what follows.
    near = run(model, drafter, ids[:-1])
    assert first.token_ids == retry.token_ids == expected
    assert near.token_ids == reference(model, ids[:-1], 40)
    assert retry.stats.mean_tokens_per_pass > 8  # the whole answer comes from the memory, 16 drafts per pass


def test_proposals_never_exceed_what_the_request_allows():
    drafter = SuffixDrafter(16, GlobalIndex(1000))
    drafter.remember(list(range(50)))
    drafter.begin([], SamplingParams(), torch.Generator())
    context = DraftContext(token_ids=list(range(20)), max_tokens=3, new_hidden=torch.empty(0), target=None)
    assert drafter.propose(context).tokens == [20, 21, 22]
    assert drafter.propose(DraftContext(list(range(20)), 0, torch.empty(0), None)).tokens == []


def test_speculative_sampling_with_the_suffix_drafter_matches_the_target_distribution():
    """First generated token over many seeded runs while the memory always drafts one fixed continuation: a
    deterministic drafter is a one-hot q, and the kept token must still follow the target's distribution."""
    model = tiny_gemma3(seed=0)
    ids = TOKENIZER(PROMPTS[0])["input_ids"]
    params = SamplingParams(temperature=1.5, top_k=3)
    with torch.inference_mode():
        p = probabilities(model(torch.tensor([ids])).logits[0, -1:], params)[0]
    support = p.nonzero().flatten().tolist()
    drafter = SuffixDrafter(4, GlobalIndex(1000))
    drafter.remember([*ids, support[0], support[1], support[2]])
    counts = dict.fromkeys(support, 0)
    runs = 400
    for seed in range(runs):
        result = run(model, drafter, ids, max_new_tokens=3, temperature=1.5, top_k=3, seed=seed)
        assert result.stats.draft_tokens_proposed > 0
        counts[result.token_ids[0]] += 1
    chi2 = sum((counts[t] - runs * float(p[t])) ** 2 / (runs * float(p[t])) for t in support)
    assert chi2 < 13.82  # chi-square, 2 degrees of freedom, significance 0.001


def test_sampling_with_a_seed_repeats_although_the_memory_and_the_cut_change_between_calls():
    # The second call would draft the first call's output from memory and cut drafts by measured timings; a seeded
    # sampling request drafts from itself alone and verifies every draft, so the random numbers are used alike.
    loaded = LoadedModel(tiny_gemma3(seed=0), TOKENIZER, "tiny", "memory", torch.device("cpu"), torch.float32, CONTEXT)
    engine = Engine(loaded, SuffixDrafter(16, GlobalIndex(10_000)))
    try:
        request = GenerationRequest(PROMPTS[0], max_new_tokens=40, temperature=1.0, top_k=50, seed=7)
        first, second = engine.generate(request), engine.generate(request)
        assert engine.drafter.memory.tokens > 0
        assert first.token_ids == second.token_ids
        greedy = GenerationRequest(PROMPTS[0], max_new_tokens=40)
        engine.generate(greedy)
        assert engine.generate(greedy).stats.mean_tokens_per_pass > 4  # greedy calls still draft from memory
    finally:
        engine.close()

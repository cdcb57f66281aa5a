"""The prefix cache: a request whose prompt starts like what the target's cache holds from the request before prefills
only the rest, and its output is token for token what a cold run gives, for every kind of cache the engine has."""

import pytest
import torch
from mtp_checkpoints import build_qwen3_5
from test_loading import write_tiny_gguf
from test_quantized_weights import BLOCKS
from tiny_models import tiny_gemma3, tiny_llama, train_tiny_tokenizer

from mtp_mcp.engine.drafters import create_drafter
from mtp_mcp.engine.drafters.autoregressive import NoDrafter
from mtp_mcp.engine.drafters.prompt_lookup import PromptLookupDrafter
from mtp_mcp.engine.engine import Engine
from mtp_mcp.engine.loading import LoadedModel, load_model
from mtp_mcp.engine.request import GenerationRequest

TOKENIZER = train_tiny_tokenizer()
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"


def in_memory(model) -> LoadedModel:
    return LoadedModel(model, TOKENIZER, "tiny", "memory", torch.device("cpu"), torch.float32, 512)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (loaded model, whether any shared prefix is reusable, or only the whole kept sequence)."""
    gguf = tmp_path_factory.mktemp("gguf") / "tiny-q.gguf"
    write_tiny_gguf(gguf, BLOCKS)
    qwen = build_qwen3_5(tmp_path_factory.mktemp("qwen") / "qwen3_5")
    return {
        "llama (attention only)": (in_memory(tiny_llama(seed=0)), True),
        "gemma3 (sliding windows)": (in_memory(tiny_gemma3(seed=0)), False),
        "gemma3 quantized (lean cache)": (load_model(str(gguf), device="cpu", progress=False), True),
        "qwen3.5 (recurrent states)": (load_model(str(qwen), "cpu", "float32", progress=False), False),
    }


# What agents send, in this order: a prompt; the same prompt grown (the cache holds exactly the first prompt, since one
# token was generated); the same prompt again; a prompt that shares only a beginning; an unrelated one.
PROMPTS = [(PROMPT, 1), (PROMPT + " jumps over the lazy dog.", 12), (PROMPT, 12), (PROMPT[:25] + " sat down.", 12),
           ("A different start", 12)]


@pytest.mark.parametrize("name", ["llama (attention only)", "gemma3 (sliding windows)", "gemma3 quantized (lean cache)",
                                  "qwen3.5 (recurrent states)"])
@pytest.mark.parametrize("drafter", ["none", "ngram"])
def test_reused_prefixes_give_the_tokens_of_a_cold_run(models, name, drafter):
    loaded, any_prefix = models[name]
    make = (lambda: NoDrafter()) if drafter == "none" else (lambda: PromptLookupDrafter(4))
    warm, cold = Engine(loaded, make()), Engine(loaded, make(), prefix_cache=False)
    try:
        reused_any = False
        for prompt, max_new_tokens in PROMPTS:
            request = GenerationRequest(prompt, max_new_tokens=max_new_tokens)
            held = [list(warm._target.ids)] + [list(parked.ids) for parked in warm._target._parked]
            got, expected = warm.generate(request), cold.generate(request)
            assert got.token_ids == expected.token_ids, prompt
            assert expected.stats.prompt_tokens_reused == 0
            prompt_ids = warm.encode(prompt)
            reusable = max(reusable_from(ids, prompt_ids, any_prefix) for ids in held)
            assert got.stats.prompt_tokens_reused == reusable, prompt
            reused_any |= reusable > 0
        assert reused_any
    finally:
        warm.close()
        cold.close()


def reusable_from(held: list[int], prompt_ids: list[int], any_prefix: bool) -> int:
    shared = next((i for i, (a, b) in enumerate(zip(held, prompt_ids)) if a != b), min(len(held), len(prompt_ids)))
    reusable = min(shared, len(prompt_ids) - 1)  # the last prompt token is the first step's input
    return reusable if any_prefix or reusable == len(held) else 0


@pytest.mark.parametrize("name", ["llama (attention only)", "gemma3 (sliding windows)", "gemma3 quantized (lean cache)",
                                  "qwen3.5 (recurrent states)"])
def test_an_agent_working_on_two_texts_in_turn_keeps_both(models, name):
    """A file, another file, the first file grown by its completion: the third call continues the first call's
    cache, which was parked while the second ran; and a third text beyond the kept budget drops the oldest."""
    loaded, any_prefix = models[name]
    warm, cold = Engine(loaded, PromptLookupDrafter(4)), Engine(loaded, PromptLookupDrafter(4), prefix_cache=False)
    try:
        first = warm.generate(GenerationRequest(PROMPT, max_new_tokens=6))
        first_held = list(warm._target.ids)
        warm.generate(GenerationRequest("def add(a, b):\n    return a + b\n", max_new_tokens=6))
        assert len(warm._target._parked) == 1
        grown = PROMPT + first.text + " and"
        request = GenerationRequest(grown, max_new_tokens=10)
        got, expected = warm.generate(request), cold.generate(request)
        assert got.token_ids == expected.token_ids
        reusable = reusable_from(first_held, warm.encode(grown), any_prefix)
        assert got.stats.prompt_tokens_reused == reusable
        assert reusable >= len(warm.encode(PROMPT)) or not any_prefix  # (tokens may merge across the seam)
    finally:
        warm.close()
        cold.close()


def test_parked_caches_stay_within_the_budget(models, monkeypatch):
    from mtp_mcp.engine import engine as engine_module
    from mtp_mcp.engine.target import MAX_KEPT_SEQUENCES

    loaded, _ = models["llama (attention only)"]
    engine = Engine(loaded, NoDrafter())
    try:
        for i in range(MAX_KEPT_SEQUENCES + 3):
            engine.generate(GenerationRequest(f"{i} text number {i}", max_new_tokens=3))
        assert len(engine._target._parked) == MAX_KEPT_SEQUENCES
        one = engine._target.cache_bytes()
        monkeypatch.setattr(engine_module, "PREFIX_CACHE_MAX_BYTES", int(2.5 * one))
        engine.generate(GenerationRequest("yet another text", max_new_tokens=3))
        assert len(engine._target._parked) == 1 and engine._target.ids
    finally:
        engine.close()


def test_sampling_with_a_seed_draws_the_same_tokens_warm_and_cold(models):
    loaded, _ = models["gemma3 quantized (lean cache)"]
    warm, cold = Engine(loaded, PromptLookupDrafter(4)), Engine(loaded, PromptLookupDrafter(4), prefix_cache=False)
    try:
        warm.generate(GenerationRequest(PROMPT, max_new_tokens=8))
        request = GenerationRequest(PROMPT + " over", max_new_tokens=20, temperature=0.9, seed=7)
        got, expected = warm.generate(request), cold.generate(request)
        assert got.stats.prompt_tokens_reused > 0
        assert got.token_ids == expected.token_ids
    finally:
        warm.close()
        cold.close()


def test_drafters_that_read_every_prompt_hidden_state_prefill_the_whole_prompt(models):
    loaded, _ = models["qwen3.5 (recurrent states)"]
    engine = Engine(loaded, create_drafter("mtp", loaded, None, 3))
    try:
        engine.generate(GenerationRequest(PROMPT, max_new_tokens=6))
        again = engine.generate(GenerationRequest(PROMPT, max_new_tokens=6))
        assert again.stats.prompt_tokens_reused == 0 and again.stats.drafter.startswith("mtp")
    finally:
        engine.close()


def test_a_failed_request_leaves_no_cache_behind(models):
    loaded, _ = models["llama (attention only)"]
    engine = Engine(loaded, NoDrafter())
    try:
        engine.generate(GenerationRequest(PROMPT, max_new_tokens=4))
        assert engine._target.ids
        with pytest.raises(Exception, match="beyond the model's context"):
            engine.generate(GenerationRequest("word " * 600, max_new_tokens=4))
        assert not engine._target.ids and engine._target.cache_bytes() == 0 and not engine._target._parked
    finally:
        engine.close()

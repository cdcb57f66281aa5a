"""The decode loop on tiny random models: lossless against transformers' generate, exact rollback, stops, cancel."""

import threading

import pytest
import torch
from tiny_models import CONTEXT, VOCAB, tiny_gemma3, tiny_llama, train_tiny_tokenizer

from mtp_mcp.engine.decode import generate
from mtp_mcp.engine.drafters.autoregressive import NoDrafter
from mtp_mcp.engine.drafters.base import Draft, DraftContext
from mtp_mcp.engine.drafters.draft_model import DraftModelDrafter
from mtp_mcp.engine.drafters.prompt_lookup import PromptLookupDrafter
from mtp_mcp.engine.request import GenerationRequest, SamplingParams
from mtp_mcp.engine.sampling import probabilities
from mtp_mcp.engine.target import PREFILL_CHUNK_TOKENS, TargetModel

TOKENIZER = train_tiny_tokenizer(VOCAB)
EOS = frozenset({TOKENIZER.eos_token_id})
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "🙂🚀 日本語 テキスト",
]


def reference(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=TOKENIZER.eos_token_id, pad_token_id=TOKENIZER.pad_token_id,
    )
    return out[0, len(prompt_ids):].tolist()


def run(model, drafter, prompt_ids, max_new_tokens=40, prefill_chunk_tokens=PREFILL_CHUNK_TOKENS, **request_fields):
    request = GenerationRequest(prompt="unused: ids are given", max_new_tokens=max_new_tokens, **request_fields)
    return generate(TargetModel(model, prefill_chunk_tokens), drafter, TOKENIZER, request, prompt_ids, EOS, CONTEXT,
                    cancel=request_fields.pop("cancel", None))


class OracleDrafter:
    """Proposes the known continuation, with every `wrong_every`-th drafted token replaced by a wrong one, so that
    drafts are rejected in the middle. Checks the target's cache invariant at every proposal."""

    name = "oracle"
    reads_prompt_hidden_states = False

    def __init__(self, continuation: list[int], prompt_len: int, num_draft_tokens: int = 4, wrong_every: int = 0):
        self.continuation = continuation
        self.prompt_len = prompt_len
        self.num_draft_tokens = num_draft_tokens
        self.wrong_every = wrong_every
        self.drafted = 0

    def begin(self, prompt_ids, sampling, generator):
        pass

    def propose(self, context: DraftContext) -> Draft:
        # The invariant of engine.target: the cache holds every committed token but the last.
        assert context.target.cache_length == len(context.token_ids) - 1
        start = len(context.token_ids) - self.prompt_len
        tokens = self.continuation[start : start + min(self.num_draft_tokens, context.max_tokens)]
        proposal = []
        for token in tokens:
            self.drafted += 1
            wrong = self.wrong_every and self.drafted % self.wrong_every == 0
            proposal.append((token + 1) % VOCAB if wrong else token)
        return Draft(tokens=proposal)

    def observe(self, proposed, accepted):
        pass


DRAFTERS = {
    "none": lambda: NoDrafter(),
    "ngram": lambda: PromptLookupDrafter(num_draft_tokens=4),
    "draft-model-other": lambda: DraftModelDrafter(tiny_llama(seed=7), num_draft_tokens=3),
    "draft-model-self": lambda: DraftModelDrafter(tiny_gemma3(seed=0), num_draft_tokens=4),
}


@pytest.mark.parametrize("drafter_name", DRAFTERS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_is_identical_to_transformers_generate(drafter_name, prompt):
    model = tiny_gemma3(seed=0)
    prompt_ids = TOKENIZER(prompt)["input_ids"]
    expected = reference(model, prompt_ids, 40)
    result = run(model, DRAFTERS[drafter_name](), prompt_ids)
    assert result.token_ids == expected
    assert result.stats.new_tokens == len(expected)
    if drafter_name == "draft-model-self":  # a perfect drafter: several tokens per target pass
        assert result.stats.mean_tokens_per_pass > 3


@pytest.mark.parametrize("chunk", [1, 3, 8, 13])
def test_a_prompt_fed_in_chunks_gives_the_same_states_and_output(chunk):
    # Chunks smaller than, equal to and larger than the sliding window (8), so windows move within and across chunks.
    model = tiny_gemma3(seed=0)
    prompt_ids = TOKENIZER(" ".join(PROMPTS[:2]))["input_ids"]
    assert len(prompt_ids) > 3 * chunk
    whole = TargetModel(model, prefill_chunk_tokens=len(prompt_ids)).prefill(prompt_ids)
    chunked = TargetModel(model, prefill_chunk_tokens=chunk)
    torch.testing.assert_close(chunked.prefill(prompt_ids), whole)
    assert chunked.cache_length == len(prompt_ids)
    result = run(model, PromptLookupDrafter(4), prompt_ids, prefill_chunk_tokens=chunk)
    assert result.token_ids == reference(model, prompt_ids, 40)


def test_a_draft_model_fed_the_prompt_in_chunks_drafts_the_same():
    model = tiny_gemma3(seed=0)
    prompt_ids = TOKENIZER(" ".join(PROMPTS[:2]))["input_ids"]
    whole, chunked = (
        run(model, DraftModelDrafter(tiny_gemma3(seed=0), 4, prefill_chunk_tokens=chunk), prompt_ids)
        for chunk in (len(prompt_ids), 5)
    )
    assert chunked.token_ids == whole.token_ids == reference(model, prompt_ids, 40)
    # The draft model is the target itself: its drafts from a chunked prefill are right, several per pass.
    assert chunked.stats.draft_tokens_accepted == whole.stats.draft_tokens_accepted
    assert chunked.stats.mean_tokens_per_pass > 3


@pytest.mark.parametrize("drafter_name", ["ngram", "draft-model-other"])
def test_a_one_token_prompt_needs_no_prefill(drafter_name):
    model = tiny_gemma3(seed=0)
    prompt_ids = TOKENIZER("The")["input_ids"]  # this tokenizer adds no <bos>: a single token
    assert len(prompt_ids) == 1
    assert run(model, DRAFTERS[drafter_name](), prompt_ids, 20).token_ids == reference(model, prompt_ids, 20)


def test_greedy_on_a_second_architecture():
    model = tiny_llama(seed=3)
    for prompt in PROMPTS:
        prompt_ids = TOKENIZER(prompt)["input_ids"]
        assert run(model, PromptLookupDrafter(5), prompt_ids).token_ids == reference(model, prompt_ids, 40)


@pytest.mark.parametrize("wrong_every", [2, 3, 5])
def test_rejections_in_the_middle_of_a_draft_roll_back_exactly(wrong_every):
    model = tiny_gemma3(seed=0)
    prompt_ids = TOKENIZER(PROMPTS[0])["input_ids"]
    expected = reference(model, prompt_ids, 60)
    drafter = OracleDrafter(expected, len(prompt_ids), wrong_every=wrong_every)
    result = run(model, drafter, prompt_ids, max_new_tokens=60)
    assert result.token_ids == expected
    assert 0 < result.stats.acceptance_rate < 1
    assert 1 < result.stats.mean_tokens_per_pass


def test_statistics_count_every_pass_and_draft():
    model = tiny_gemma3(seed=0)
    prompt_ids = TOKENIZER(PROMPTS[0])["input_ids"]
    expected = reference(model, prompt_ids, 30)
    stats = run(model, OracleDrafter(expected, len(prompt_ids), num_draft_tokens=4), prompt_ids, 30).stats
    # A perfect drafter: 4 drafts + 1 bonus per pass, and the last pass is trimmed by max_new_tokens.
    assert stats.target_passes == 6 and stats.new_tokens == 30
    assert stats.acceptance_by_position == [1.0, 1.0, 1.0, 1.0]
    assert stats.draft_tokens_accepted == stats.draft_tokens_proposed == 24
    assert stats.time_to_first_token_s > 0 and stats.total_time_s >= stats.time_to_first_token_s


def clean_stop_string(tokens: list[int], length: int = 3) -> tuple[int, str]:
    """Finds tokens[i:i+length] whose text is whole characters, occurs first right there, and completes in the
    middle of a 5-token block (4 drafts + 1). Returns (i, that text). Random models emit plenty of byte junk."""
    full_text = TOKENIZER.decode(tokens)
    for i in range(4, len(tokens) - length):
        before, through = TOKENIZER.decode(tokens[:i]), TOKENIZER.decode(tokens[: i + length])
        stop = through[len(before):]
        whole_characters = "\ufffd" not in stop and full_text.startswith(through)
        if (i + length) % 5 and stop.strip() and whole_characters and full_text.find(stop) == len(before):
            return i, stop
    raise AssertionError("no clean stop string in this output")


def test_stop_string_inside_an_accepted_block_ends_text_and_tokens_there():
    model = tiny_gemma3(seed=0)
    prompt_ids = TOKENIZER(PROMPTS[0])["input_ids"]
    expected = reference(model, prompt_ids, 40)
    i, stop = clean_stop_string(expected)
    drafter = OracleDrafter(expected, len(prompt_ids), num_draft_tokens=4)
    streamed = []
    request = GenerationRequest(prompt="x", max_new_tokens=40, stop=(stop,))
    result = generate(TargetModel(model), drafter, TOKENIZER, request, prompt_ids, EOS, CONTEXT,
                      on_text=lambda text, _: streamed.append(text))
    assert result.finish_reason == "stop_string"
    assert result.text == TOKENIZER.decode(expected[:i]) == "".join(streamed)
    assert result.token_ids == expected[: i + 3]
    assert result.stats.mean_tokens_per_pass > 1  # the stop came inside a block of several accepted tokens


def test_cancel_stops_within_one_step_and_keeps_the_text_so_far():
    model = tiny_gemma3(seed=0)
    prompt_ids = TOKENIZER(PROMPTS[0])["input_ids"]
    cancel = threading.Event()
    tokens_when_cancelled = []

    def cancel_at_first_text(text, tokens_so_far):
        tokens_when_cancelled.append(tokens_so_far)
        cancel.set()

    request = GenerationRequest(prompt="x", max_new_tokens=200)
    result = generate(TargetModel(model), NoDrafter(), TOKENIZER, request, prompt_ids, EOS, CONTEXT,
                      cancel=cancel, on_text=cancel_at_first_text)
    assert result.finish_reason == "cancelled"
    # No target pass ran after the one that produced the text seen when cancelling.
    assert len(result.token_ids) == result.stats.target_passes == tokens_when_cancelled[0]
    assert result.text.startswith(TOKENIZER.decode(result.token_ids).rstrip("\ufffd"))


def test_eos_ends_generation_and_is_reported():
    model = tiny_gemma3(seed=0)
    prompt_ids = TOKENIZER(PROMPTS[0])["input_ids"]
    expected = reference(model, prompt_ids, 10)
    eos_at = expected[4]  # pretend the 5th greedy token is an end-of-sequence token
    request = GenerationRequest(prompt="x", max_new_tokens=10)
    result = generate(TargetModel(model), PromptLookupDrafter(4), TOKENIZER, request, prompt_ids, frozenset({eos_at}),
                      CONTEXT)
    assert result.finish_reason == "eos"
    assert result.token_ids == expected[: expected.index(eos_at) + 1]
    assert result.text == TOKENIZER.decode(expected[: expected.index(eos_at)])


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_gemma3(seed=0)
    prompt_ids = TOKENIZER(PROMPTS[0])["input_ids"]
    drafter = DraftModelDrafter(tiny_gemma3(seed=5), num_draft_tokens=3)
    first = run(model, drafter, prompt_ids, temperature=0.8, top_p=0.9, seed=11)
    again = run(model, drafter, prompt_ids, temperature=0.8, top_p=0.9, seed=11)
    other = run(model, drafter, prompt_ids, temperature=0.8, top_p=0.9, seed=12)
    assert first.token_ids == again.token_ids != other.token_ids


def test_speculative_sampling_end_to_end_matches_the_target_distribution():
    """First generated token over many seeded runs with a sampling draft model: chi-square against the target's
    own (top-k filtered) distribution at the end of the prompt."""
    model = tiny_gemma3(seed=0)
    prompt_ids = TOKENIZER(PROMPTS[0])["input_ids"]
    params = SamplingParams(temperature=1.5, top_k=3)
    with torch.inference_mode():
        p = probabilities(model(torch.tensor([prompt_ids])).logits[0, -1:], params)[0]
    support = p.nonzero().flatten().tolist()
    drafter = DraftModelDrafter(tiny_gemma3(seed=9), num_draft_tokens=2)
    counts = dict.fromkeys(support, 0)
    runs = 400
    for seed in range(runs):
        first = run(model, drafter, prompt_ids, max_new_tokens=3, temperature=1.5, top_k=3, seed=seed).token_ids[0]
        counts[first] += 1
    chi2 = sum((counts[t] - runs * float(p[t])) ** 2 / (runs * float(p[t])) for t in support)
    assert chi2 < 13.82  # chi-square, 2 degrees of freedom, significance 0.001

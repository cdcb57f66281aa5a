"""The resident engine: FIFO worker, bounded queue, failures isolated, bad input refused with one sentence."""

import threading

import pytest
import torch
from tiny_models import tiny_gemma3, train_tiny_tokenizer

from mtp_mcp.engine.drafters import create_drafter
from mtp_mcp.engine.drafters.autoregressive import NoDrafter
from mtp_mcp.engine.drafters.prompt_lookup import PromptLookupDrafter
from mtp_mcp.engine.engine import Engine
from mtp_mcp.engine.errors import EngineBusyError, EngineClosedError, EngineError, InvalidRequestError
from mtp_mcp.engine.loading import LoadedModel
from mtp_mcp.engine.request import GenerationRequest

TOKENIZER = train_tiny_tokenizer()
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"


def tiny_loaded(context: int = 512) -> LoadedModel:
    model = tiny_gemma3(seed=0, context=context)
    return LoadedModel(model, TOKENIZER, "tiny", "memory", torch.device("cpu"), torch.float32, context)


@pytest.fixture
def engine():
    engine = Engine(tiny_loaded(), PromptLookupDrafter(4), max_queued_requests=2)
    yield engine
    engine.close()


def test_generate_returns_text_tokens_and_stats(engine):
    result = engine.generate(GenerationRequest(PROMPT, max_new_tokens=12))
    assert len(result.token_ids) == 12 and result.finish_reason == "length"
    assert result.text == TOKENIZER.decode(result.token_ids)
    assert result.stats.drafter == "ngram" and result.stats.prompt_tokens == len(TOKENIZER(PROMPT)["input_ids"])
    assert engine.totals_snapshot()["requests"] == 1


class GateDrafter(NoDrafter):
    """Holds each request at its start until its gate opens, so tests can fill the queue behind it."""

    def __init__(self):
        self.entered = threading.Event()
        self.gate_open = threading.Event()
        self.fail_next = False

    def begin(self, prompt_ids, sampling, generator):
        self.entered.set()
        assert self.gate_open.wait(30)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("drafter bug")


@pytest.fixture
def gated():
    drafter = GateDrafter()
    engine = Engine(tiny_loaded(), drafter, max_queued_requests=2)
    yield engine, drafter
    drafter.gate_open.set()
    engine.close()


def test_a_full_queue_fails_at_once_and_the_engine_keeps_serving(gated):
    engine, drafter = gated
    running = engine.submit(GenerationRequest(PROMPT, max_new_tokens=4))
    assert drafter.entered.wait(30)
    queued = [engine.submit(GenerationRequest(PROMPT, max_new_tokens=2)) for _ in range(2)]
    with pytest.raises(EngineBusyError, match="busy"):
        engine.submit(GenerationRequest(PROMPT, max_new_tokens=2))
    drafter.gate_open.set()
    assert running.result(30).finish_reason == "length"
    assert all(h.result(30).finish_reason == "length" for h in queued)


def test_a_failing_request_is_reported_and_the_next_one_runs(gated):
    engine, drafter = gated
    drafter.fail_next = True
    drafter.gate_open.set()
    with pytest.raises(EngineError, match="drafter bug"):
        engine.generate(GenerationRequest(PROMPT, max_new_tokens=4))
    assert engine.generate(GenerationRequest(PROMPT, max_new_tokens=4)).finish_reason == "length"


def test_cancel_before_start_returns_cancelled(gated):
    engine, drafter = gated
    engine.submit(GenerationRequest(PROMPT, max_new_tokens=2))
    assert drafter.entered.wait(30)
    waiting = engine.submit(GenerationRequest(PROMPT, max_new_tokens=50))
    waiting.cancel()
    drafter.gate_open.set()
    assert waiting.result(30).finish_reason == "cancelled"


def test_requests_from_many_threads_are_all_answered_in_order(engine):
    order = []
    lock = threading.Lock()

    def call(i):
        handle = engine.submit(GenerationRequest(PROMPT, max_new_tokens=3, stop=()))
        with lock:
            order.append((i, handle))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results = [handle.result(30) for _, handle in order]
    assert [len(r.token_ids) for r in results] == [3, 3]
    assert results[0].token_ids == results[1].token_ids  # same request, same greedy answer


def test_cache_memory_is_released_after_each_request_without_the_prefix_cache():
    engine = Engine(tiny_loaded(), PromptLookupDrafter(4), prefix_cache=False)
    try:
        engine.generate(GenerationRequest(PROMPT, max_new_tokens=5))
        assert engine._target.cache is None
    finally:
        engine.close()


def test_the_prefix_cache_is_dropped_when_it_exceeds_its_budget(engine, monkeypatch):
    import mtp_mcp.engine.engine as engine_module

    engine.generate(GenerationRequest(PROMPT, max_new_tokens=5))
    assert engine._target.cache is not None  # kept for the next prompt
    monkeypatch.setattr(engine_module, "PREFIX_CACHE_MAX_BYTES", engine._target.cache_bytes() - 1)
    engine.generate(GenerationRequest(PROMPT, max_new_tokens=5))
    assert engine._target.cache is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"max_new_tokens": 0}, "max_new_tokens is 0"),
        ({"max_new_tokens": 10**9}, "from 1 to"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_request_values_are_refused_with_one_sentence(fields, message):
    with pytest.raises(InvalidRequestError, match=message) as error:
        GenerationRequest(**({"prompt": PROMPT} | fields))
    assert str(error.value).count(". ") == 0 and "\n" not in str(error.value)


def test_prompt_beyond_the_context_is_refused_and_the_engine_keeps_serving():
    engine = Engine(tiny_loaded(context=64), NoDrafter())
    try:
        with pytest.raises(InvalidRequestError, match="beyond the model's context of 64 tokens"):
            engine.generate(GenerationRequest(PROMPT * 5, max_new_tokens=4))
        with pytest.raises(InvalidRequestError, match="ask for at most"):
            engine.generate(GenerationRequest(PROMPT, max_new_tokens=60))
        assert engine.generate(GenerationRequest(PROMPT, max_new_tokens=4)).finish_reason == "length"
    finally:
        engine.close()


def test_closed_engine_refuses_new_requests():
    engine = Engine(tiny_loaded(), NoDrafter())
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.submit(GenerationRequest(PROMPT))


@pytest.mark.parametrize(
    ("name", "draft_model", "num", "message"),
    [
        ("medusa", None, 4, "unknown drafter 'medusa'"),
        ("ngram", None, 0, "num_draft_tokens is 0"),
        ("draft-model", None, 4, "needs --draft-model"),
        ("ngram", "some/model", 4, "only used with"),
    ],
)
def test_bad_drafter_choices_are_refused(name, draft_model, num, message):
    with pytest.raises(InvalidRequestError, match=message):
        create_drafter(name, tiny_loaded(), draft_model, num)


def test_a_cancelled_prefill_stops_between_chunks_and_the_engine_serves_the_next_request():
    loaded = tiny_loaded()
    engine = Engine(loaded, NoDrafter())
    engine._target.prefill_chunk_tokens = 4
    chunks_fed = []
    started = threading.Event()

    def count_and_cancel(module, args, kwargs):
        chunks_fed.append(kwargs["input_ids"].shape[1])
        started.set()

    hook = loaded.model.get_decoder().register_forward_pre_hook(count_and_cancel, with_kwargs=True)
    try:
        handle = engine.submit(GenerationRequest(PROMPT * 3, max_new_tokens=8))
        started.wait(5)
        handle.cancel()
        result = handle.result(timeout=30)
        assert result.finish_reason == "cancelled" and result.token_ids == []
        prompt_chunks = -(-(len(TOKENIZER(PROMPT * 3)["input_ids"]) - 1) // 4)
        assert len(chunks_fed) < prompt_chunks  # stopped before the end of the prompt
        chunks_fed.clear()
        after = engine.generate(GenerationRequest(PROMPT, max_new_tokens=8))
        assert after.finish_reason == "length" and len(after.token_ids) == 8
    finally:
        hook.remove()
        engine.close()


def test_a_draft_model_stops_its_first_feed_when_cancelled():
    from mtp_mcp.engine.drafters.base import DraftContext
    from mtp_mcp.engine.drafters.draft_model import DraftModelDrafter
    from mtp_mcp.engine.request import SamplingParams
    from mtp_mcp.engine.target import TargetModel

    draft = DraftModelDrafter(tiny_gemma3(seed=1), 3, prefill_chunk_tokens=4)
    draft.begin(list(range(3, 40)), SamplingParams(), torch.Generator())
    cancel = threading.Event()
    cancel.set()
    target = TargetModel(tiny_gemma3(seed=0))
    proposal = draft.propose(DraftContext(list(range(3, 40)), 3, torch.empty(0, 64), target, cancel))
    assert proposal.tokens == [] and len(draft._cached_ids) == 4  # one chunk, then it gave up


def test_drafter_caches_are_freed_after_each_request():
    from mtp_mcp.engine.drafters.draft_model import DraftModelDrafter

    drafter = DraftModelDrafter(tiny_gemma3(seed=1), 3)
    engine = Engine(tiny_loaded(), drafter)
    try:
        engine.generate(GenerationRequest(PROMPT, max_new_tokens=8))
        assert drafter._cache is None and drafter._cached_ids == []
        assert engine._target.cache is not None  # the target's is the prefix cache
    finally:
        engine.close()


def test_a_submit_that_races_close_is_answered():
    # close() lands between submit's check of the closed flag and its put into the queue: before the lock, close
    # drained an empty queue and stopped the worker, and the request queued after that never got an answer.
    engine = Engine(tiny_loaded(), NoDrafter())
    put = engine._queue.put_nowait
    closers: list[threading.Thread] = []

    def put_while_closing(item):
        closer = threading.Thread(target=engine.close)
        closers.append(closer)
        closer.start()
        closer.join(timeout=0.5)  # an unguarded close finishes here; a guarded one waits for this submit
        put(item)

    engine._queue.put_nowait = put_while_closing
    handle = engine.submit(GenerationRequest(PROMPT, max_new_tokens=1))
    closers[0].join(timeout=10)
    try:  # run by the worker before it stopped, or refused by close: either way answered, never left waiting
        assert handle.result(timeout=10).finish_reason == "length"
    except EngineClosedError:
        pass
    with pytest.raises(EngineClosedError):
        engine.submit(GenerationRequest(PROMPT, max_new_tokens=1))

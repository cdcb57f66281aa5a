"""Native multi-token prediction on tiny checkpoints saved like real ones: a Gemma 4 assistant, Qwen3.5's built-in
`mtp.*` layer on a hybrid (Gated DeltaNet) model, DeepSeek-V3's MTP layers. Lossless against transformers' generate,
exact hybrid rollback, drafts equal to a from-scratch recomputation, the sampled distribution, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mtp_checkpoints import build_deepseek_v3, build_gemma4, build_qwen3_5, cache_states
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_checkpoints import build_tiny_checkpoint
from tiny_models import CONTEXT, VOCAB, train_tiny_tokenizer
from transformers import DynamicCache, GenerationConfig
from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

from mtp_mcp.engine.cpu_kernels import use_cpu_kernels
from mtp_mcp.engine.decode import generate
from mtp_mcp.engine.drafters import create_drafter
from mtp_mcp.engine.drafters.base import Draft, DraftContext
from mtp_mcp.engine.drafters.draft_model import DraftModelDrafter
from mtp_mcp.engine.engine import Engine, EngineOptions
from mtp_mcp.engine.errors import InvalidRequestError, ModelLoadError
from mtp_mcp.engine.loading import LoadedModel, load_model
from mtp_mcp.engine.request import GenerationRequest, SamplingParams
from mtp_mcp.engine.sampling import probabilities
from mtp_mcp.engine.target import PREFILL_CHUNK_TOKENS, TargetModel

TOKENIZER = train_tiny_tokenizer(VOCAB)
EOS = frozenset({TOKENIZER.eos_token_id})
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(a, b):\n    return a + b\n\nclass Foo:\n",
]
# name: (builder, keyword arguments, the drafter name reported in the stats). The oracle checkpoints make the MTP
# module agree with the target by construction (see tests/mtp_checkpoints.py), the damping picked so that most but
# not all drafts are accepted.
CHECKPOINTS = {
    "gemma4": (build_gemma4, {}, "mtp:gemma4_assistant"),
    "gemma4-oracle": (build_gemma4, {"oracle": 0.15}, "mtp:gemma4_assistant"),
    "qwen3_5": (build_qwen3_5, {}, "mtp:qwen3_5"),
    "qwen3_5-oracle": (build_qwen3_5, {"oracle": 0.1}, "mtp:qwen3_5"),
    "deepseek_v3": (build_deepseek_v3, {}, "mtp:deepseek_v3"),
    "deepseek_v3-oracle": (build_deepseek_v3, {"oracle": 0.2}, "mtp:deepseek_v3"),
    "deepseek_v3-2-layers": (build_deepseek_v3, {"mtp_layers": 2}, "mtp:deepseek_v3"),
    "deepseek_v3-2-layers-oracle": (build_deepseek_v3, {"mtp_layers": 2, "oracle": 0.2}, "mtp:deepseek_v3"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every checkpoint of CHECKPOINTS on disk (~1 s in all)."""
    root = tmp_path_factory.mktemp("native-mtp")
    return {name: builder(root / name, **kwargs) for name, (builder, kwargs, _) in CHECKPOINTS.items()}


@pytest.fixture(scope="module")
def loaded(checkpoints) -> dict[str, LoadedModel]:
    """Each checkpoint loaded the way the engine loads models (engine.loading), on CPU in float32."""
    return {name: load_model(str(path), "cpu", "float32", progress=False) for name, path in checkpoints.items()}


def prompt_ids(prompt: str) -> list[int]:
    return TOKENIZER(prompt)["input_ids"]


def reference(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """The target alone: transformers' greedy generate."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=TOKENIZER.eos_token_id, pad_token_id=TOKENIZER.pad_token_id)
    return out[0, len(ids):].tolist()


def run(target: LoadedModel, drafter, ids: list[int], max_new_tokens: int = 40, eos_ids=EOS,
        prefill_chunk_tokens=PREFILL_CHUNK_TOKENS, **request_fields):
    request = GenerationRequest(prompt="unused: ids are given", max_new_tokens=max_new_tokens, **request_fields)
    return generate(TargetModel(target.model, prefill_chunk_tokens), drafter, TOKENIZER, request, ids, eos_ids,
                    CONTEXT)


@pytest.mark.parametrize("name", CHECKPOINTS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_is_identical_to_transformers_generate(loaded, name, prompt):
    target = loaded[name]
    ids = prompt_ids(prompt)
    drafter = create_drafter("mtp", target, None, 4)
    result = run(target, drafter, ids)
    assert result.token_ids == reference(target.model, ids, 40)
    assert result.stats.drafter == drafter.name == CHECKPOINTS[name][2]
    if name.endswith("oracle"):  # the acceptance path: several tokens per target pass
        assert result.stats.mean_tokens_per_pass > 1.4


@pytest.mark.parametrize("name", ["gemma4-oracle", "qwen3_5-oracle", "deepseek_v3-oracle"])
def test_a_prompt_fed_in_chunks_drafts_and_decodes_the_same(loaded, name):
    # Chunks of 5: sliding windows (Gemma 4), convolution and recurrent states (Qwen3.5) carry across chunks, and the
    # MTP drafter gets every prompt position's hidden state.
    target = loaded[name]
    ids = prompt_ids(" ".join(PROMPTS))
    whole = run(target, create_drafter("mtp", target, None, 4), ids, prefill_chunk_tokens=len(ids))
    chunked = run(target, create_drafter("mtp", target, None, 4), ids, prefill_chunk_tokens=5)
    assert chunked.token_ids == whole.token_ids == reference(target.model, ids, 40)
    assert chunked.stats.target_passes == whole.stats.target_passes


# -- drafts are what the MTP module computes from scratch, whatever was accepted before -------------------------------


def drafts_from_scratch(heads, target_hidden: torch.Tensor, tokens: list[int], k: int) -> list[int]:
    """The MTP drafts for committed `tokens` (N = len - 1), recomputed with a fresh cache: depth d reads pairs
    (depth d-1's output or the target's state at t, token t+d+1) for t = 0..N-1, the last depth then chains."""
    cache = DynamicCache(config=heads.config)
    last = len(tokens) - 1
    drafts: list[int] = []

    def draft(output: torch.Tensor) -> None:
        drafts.append(int(heads._project_to_logits(output[-1:]).argmax()))

    hidden = target_hidden
    for depth in range(len(heads.layers)):
        ids = [tokens[i] if i <= last else drafts[i - last - 1] for i in range(depth + 1, last + depth + 1)]
        hidden = heads.forward_layer(depth, hidden[None], torch.arange(last)[None], cache,
                                     input_ids=torch.tensor([ids]))[0]
        draft(hidden)
    position = last
    while len(drafts) < k:
        hidden = heads.forward_layer(len(heads.layers) - 1, hidden[-1:][None], torch.tensor([[position]]), cache,
                                     input_ids=torch.tensor([drafts[-1:]]))[0]
        draft(hidden)
        position += 1
    return drafts[:k]


@pytest.mark.parametrize("cpu_kernels", [False, True])
@pytest.mark.parametrize("name", ["qwen3_5", "deepseek_v3-2-layers"])
def test_incremental_drafts_equal_a_from_scratch_recomputation(loaded, checkpoints, name, cpu_kernels):
    """Commits a random text in uneven steps (as accepted drafts would) and compares every proposal with the MTP
    module run from scratch: the MTP caches hold exactly the committed pairs, whatever happened before. With the CPU
    kernels, greedy drafts come from the target's int8 argmax screen and must still be the heads' exact argmax."""
    if cpu_kernels:  # a fresh copy: the kernels change the model in place
        target = load_model(str(checkpoints[name]), "cpu", "float32", progress=False)
        assert use_cpu_kernels(target.model) > 0
    else:
        target = loaded[name]
    generator = torch.Generator().manual_seed(0)
    tokens = prompt_ids(PROMPTS[0]) + torch.randint(3, VOCAB, (30,), generator=generator).tolist()
    drafter = create_drafter("mtp", target, None, 3)
    head = target.model.get_output_embeddings()
    assert (getattr(head, "argmax_screen", None) is not None) == cpu_kernels and drafter.heads.shared_head is head
    # Random init leaves attention a small share of each MTP layer's output; enlarge it, so that any wrong entry in
    # the MTP caches changes the drafts.
    with torch.no_grad():
        for layer in drafter.heads.layers:
            layer.mtp_block.self_attn.o_proj.weight.mul_(50)
    with torch.inference_mode():
        scratch_target = TargetModel(target.model)
        all_hidden = scratch_target.prefill(tokens)
    drafter.begin(tokens, SamplingParams(), generator)
    committed, fed = len(prompt_ids(PROMPTS[0])), 0
    for step in [1, 3, 1, 2, 4, 1, 1, 5, 2]:
        context = DraftContext(tokens[:committed], 8, all_hidden[fed : committed - 1], scratch_target)
        fed = committed - 1
        with torch.inference_mode():
            proposed = drafter.propose(context).tokens
            expected = drafts_from_scratch(drafter.heads, all_hidden[: committed - 1], tokens[:committed], 3)
        assert proposed == expected
        committed += step


def test_gemma4_assistant_drafts_exactly_like_transformers(loaded):
    """Right after a prefill, the assistant's drafts equal those of transformers' own Gemma 4 candidate generator
    (the prompt is shorter than the sliding window, where both see the same keys/values)."""
    target = loaded["gemma4"]
    drafter = create_drafter("mtp", target, None, 4)
    ids = [0, 45, 67, 89, 12, 150]
    with torch.inference_mode():
        outputs = target.model(torch.tensor([ids]), output_hidden_states=True, return_shared_kv_states=True)
    committed = ids + [int(outputs.logits[0, -1].argmax())]
    theirs = SinglePositionMultiTokenCandidateGenerator(
        drafter.assistant, target.model.get_input_embeddings(), GenerationConfig(max_length=64)
    ).get_candidates(torch.tensor([committed]), {}, outputs, is_first_iteration=False, n_last_matches=0)[0]

    ours = TargetModel(target.model)
    hidden = ours.prefill(ids)
    drafter.begin(committed, SamplingParams(), torch.Generator())
    assert drafter.propose(DraftContext(committed, 8, hidden, ours)).tokens == theirs[0, len(committed):].tolist()


# -- hybrid (Gated DeltaNet) rollback ---------------------------------------------------------------------------------


def from_scratch_states(model, tokens: list[int]) -> list[torch.Tensor]:
    fresh = TargetModel(model)
    fresh.prefill(tokens)
    return cache_states(fresh.cache)


def assert_same_states(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("accepted", [0, 1, 3, 4])
def test_hybrid_rollback_restores_recurrent_conv_and_attention_state(loaded, accepted):
    model = loaded["qwen3_5"].model
    prefix = prompt_ids(PROMPTS[0])
    fed = [17, 99, 230, 41, 8]  # the last committed token and 4 drafts
    target = TargetModel(model)
    target.prefill(prefix)
    target.forward(fed)
    target.rollback(len(fed) - 1 - accepted)
    assert target.cache_length == len(prefix) + accepted + 1
    assert_same_states(cache_states(target.cache), from_scratch_states(model, prefix + fed[: accepted + 1]))


class PartlyWrongDrafter:
    """Proposes the known continuation with every `wrong_every`-th drafted token replaced, so drafts are rejected in
    the middle; at every proposal it checks the target's hybrid state against a from-scratch prefill."""

    name = "partly-wrong"
    reads_prompt_hidden_states = False

    def __init__(self, continuation: list[int], prompt_len: int, wrong_every: int):
        self.continuation, self.prompt_len, self.wrong_every = continuation, prompt_len, wrong_every
        self.drafted = self.checked = 0

    def begin(self, prompt_ids, sampling, generator):
        pass

    def propose(self, context: DraftContext) -> Draft:
        target = context.target
        assert target.cache_length == len(context.token_ids) - 1
        assert_same_states(cache_states(target.cache), from_scratch_states(target.model, context.token_ids[:-1]))
        self.checked += 1
        start = len(context.token_ids) - self.prompt_len
        proposal = []
        for token in self.continuation[start : start + min(4, context.max_tokens)]:
            self.drafted += 1
            proposal.append((token + 1) % VOCAB if self.drafted % self.wrong_every == 0 else token)
        return Draft(tokens=proposal)

    def observe(self, proposed, accepted):
        pass


@pytest.mark.parametrize("wrong_every", [2, 3])
def test_rejections_in_the_middle_leave_the_hybrid_state_as_a_from_scratch_run(loaded, wrong_every):
    target = loaded["qwen3_5"]
    ids = prompt_ids(PROMPTS[0])
    expected = reference(target.model, ids, 30)
    drafter = PartlyWrongDrafter(expected, len(ids), wrong_every)
    result = run(target, drafter, ids, max_new_tokens=30)
    assert result.token_ids == expected
    assert 0 < result.stats.acceptance_rate < 1 and drafter.checked == result.stats.target_passes


# -- sampling ---------------------------------------------------------------------------------------------------------

# Chi-square critical value, 9 degrees of freedom (10 bins), significance 0.001; the seeds are fixed.
CHI2_CRITICAL_DF9 = 27.88


def probability_integral_transform(model, ids: list[int], generated: list[int], params: SamplingParams,
                                   generator: torch.Generator) -> torch.Tensor:
    """u_i = P(token < t_i) + v_i * P(t_i), v_i uniform, under the target's own distribution given the prefix.
    For a sequence sampled token by token from the target (which a lossless engine must produce), the u_i are
    independent and uniform on [0, 1] (Rosenblatt), whatever the drafter proposed."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids + generated])).logits[0, len(ids) - 1 : -1]
    p = probabilities(logits, params)
    rows = torch.arange(len(generated))
    chosen = torch.tensor(generated)
    below = torch.cumsum(p, dim=-1)[rows, chosen] - p[rows, chosen]
    return below + torch.rand(len(generated), generator=generator) * p[rows, chosen]


@pytest.mark.parametrize("name", ["gemma4-oracle", "qwen3_5-oracle", "deepseek_v3-oracle", "deepseek_v3"])
def test_sampled_text_follows_the_target_distribution(loaded, name):
    """Speculative sampling with q from the MTP head: every generated token (accepted draft, correction or bonus)
    is distributed as the target's p given its prefix. 600 tokens, binned probability integral transform. The tiny
    models' logits are small, so a low temperature makes p peaked enough for the test to see a bias."""
    target = loaded[name]
    params = SamplingParams(temperature=0.05, top_k=20)
    drafter = create_drafter("mtp", target, None, 3)
    generator = torch.Generator().manual_seed(0)
    transforms = []
    proposed = accepted = 0
    for seed, prompt in enumerate(PROMPTS):
        ids = prompt_ids(prompt)
        result = run(target, drafter, ids, max_new_tokens=300, eos_ids=frozenset(), temperature=0.05, top_k=20,
                     seed=seed)
        proposed += result.stats.draft_tokens_proposed
        accepted += result.stats.draft_tokens_accepted
        transforms.append(probability_integral_transform(target.model, ids, result.token_ids, params, generator))
    u = torch.cat(transforms)
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    expected = len(u) / 10
    assert float(((counts - expected) ** 2 / expected).sum()) < CHI2_CRITICAL_DF9
    if name in ("qwen3_5-oracle", "deepseek_v3-oracle"):
        # The rule uses q: a module that agrees with the target gets almost every draft accepted (0.97 here),
        # where treating drafts as deterministic would accept with probability p(x) only (0.12 here).
        assert accepted / proposed > 0.6


@pytest.mark.parametrize("name", ["qwen3_5-oracle", "gemma4-oracle"])
def test_sampled_drafts_carry_the_distribution_they_were_drawn_from(loaded, name):
    target = loaded[name]
    drafter = create_drafter("mtp", target, None, 3)
    ids = prompt_ids(PROMPTS[0])
    params = SamplingParams(temperature=0.7, top_k=5)
    with torch.inference_mode():
        scratch = TargetModel(target.model)
        hidden = scratch.prefill(ids[:-1])
        drafter.begin(ids, params, torch.Generator().manual_seed(3))
        draft = drafter.propose(DraftContext(ids, 8, hidden, scratch))
    assert draft.probs.shape == (3, VOCAB)
    torch.testing.assert_close(draft.probs.sum(-1), torch.ones(3))
    assert all((row > 0).sum() <= 5 and row[token] > 0 for row, token in zip(draft.probs, draft.tokens))


# -- choosing the drafter ---------------------------------------------------------------------------------------------


def test_auto_picks_native_mtp_when_the_checkpoint_has_it(loaded):
    # auto runs the native MTP together with the suffix drafter (engine/drafters/combined.py)
    assert create_drafter("auto", loaded["qwen3_5"], None, 4).name == "mtp:qwen3_5+suffix"
    assert create_drafter("auto", loaded["deepseek_v3"], None, 4).name == "mtp:deepseek_v3+suffix"


def test_auto_finds_the_gemma4_assistant_beside_the_target_or_takes_the_one_given(loaded, checkpoints, tmp_path):
    assert create_drafter("auto", loaded["gemma4"], None, 4).name == "mtp:gemma4_assistant+suffix"
    moved = tmp_path / "elsewhere"
    checkpoints["gemma4"].with_name("gemma4-assistant").rename(moved)
    try:
        assert create_drafter("auto", loaded["gemma4"], None, 4).name == "suffix"
        assert create_drafter("auto", loaded["gemma4"], str(moved), 4).name == "mtp:gemma4_assistant+suffix"
        assert create_drafter("mtp", loaded["gemma4"], str(moved), 4).name == "mtp:gemma4_assistant"
    finally:
        moved.rename(checkpoints["gemma4"].with_name("gemma4-assistant"))


def test_auto_falls_back_to_suffix_without_native_mtp(tmp_path):
    plain = load_model(str(build_tiny_checkpoint(tmp_path / "plain")), "cpu", "float32", progress=False)
    assert create_drafter("auto", plain, None, 4).name == "suffix"


def test_engine_reports_the_native_drafter_and_stays_lossless(checkpoints, loaded):
    engine = Engine.load(EngineOptions(model=str(checkpoints["qwen3_5-oracle"]), drafter="mtp", num_draft_tokens=3,
                                       device="cpu", dtype="float32"))
    try:
        result = engine.generate(GenerationRequest(PROMPTS[0], max_new_tokens=20))
    finally:
        engine.close()
    assert engine.info["drafter"] == result.stats.drafter == "mtp:qwen3_5"
    assert result.token_ids == reference(loaded["qwen3_5-oracle"].model, prompt_ids(PROMPTS[0]), 20)
    assert result.stats.mean_tokens_per_pass > 1


# -- bad input: one clear sentence each -------------------------------------------------------------------------------


@pytest.mark.parametrize(("mismatch", "message"), [
    ({"assistant_hidden_size": 48}, "made for hidden size 48 and 'target' has 32"),
    ({"assistant_vocab": VOCAB + 4}, f"its vocabulary has {VOCAB + 4} tokens and 'target' has {VOCAB}"),
])
def test_an_assistant_made_for_another_target_is_refused(tmp_path, mismatch, message):
    path = build_gemma4(tmp_path / "target", **mismatch)
    target = load_model(str(path), "cpu", "float32", progress=False)
    for drafter in ("mtp", "auto"):
        with pytest.raises(InvalidRequestError) as error:
            create_drafter(drafter, target, None, 4)
        assert message in str(error.value) and str(error.value).count(";") == 1


def test_an_assistant_for_a_non_gemma4_target_is_refused(loaded, checkpoints):
    with pytest.raises(InvalidRequestError, match="it drafts for gemma4 models, and 'qwen3_5' is qwen3_5"):
        create_drafter("mtp", loaded["qwen3_5"], str(checkpoints["gemma4"].with_name("gemma4-assistant")), 4)


def test_a_checkpoint_that_claims_mtp_layers_without_their_tensors(tmp_path):
    target = load_model(str(build_qwen3_5(tmp_path / "no-mtp", mtp_tensors=False)), "cpu", "float32", progress=False)
    with pytest.raises(ModelLoadError, match=r"declares 1 MTP layer\(s\) but its checkpoint holds no 'mtp\.\*'"):
        create_drafter("mtp", target, None, 4)
    assert create_drafter("auto", target, None, 4).name == "suffix"


def test_a_checkpoint_with_incomplete_mtp_tensors(tmp_path):
    path = build_deepseek_v3(tmp_path / "partial")
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.2.eh_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    target = load_model(str(path), "cpu", "float32", progress=False)
    with pytest.raises(ModelLoadError, match="has incomplete MTP weights: 1 tensor"):
        create_drafter("mtp", target, None, 4)
    # auto does not fail the whole load over them: it drafts with suffix, or with the draft model it was given.
    assert create_drafter("auto", target, None, 4).name == "suffix"
    assert create_drafter("auto", target, str(build_tiny_checkpoint(tmp_path / "draft")), 4).name == "draft-model"


def test_auto_with_an_ordinary_draft_model_still_prefers_native_mtp(loaded, checkpoints, tmp_path):
    draft = build_tiny_checkpoint(tmp_path / "draft")
    assert create_drafter("auto", loaded["qwen3_5"], str(draft), 4).name == "mtp:qwen3_5+suffix"


def test_mtp_tensors_in_a_separate_file_are_found(tmp_path):
    """Some repositories add the MTP head later as its own `mtp.safetensors`, outside the main weights."""
    path = build_qwen3_5(tmp_path / "sidecar", oracle=0.1)
    tensors = load_file(path / "model.safetensors")
    save_file({name: tensors.pop(name) for name in list(tensors) if name.startswith("mtp.")}, path / "mtp.safetensors")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    target = load_model(str(path), "cpu", "float32", progress=False)
    ids = prompt_ids(PROMPTS[0])
    result = run(target, create_drafter("auto", target, None, 3), ids, max_new_tokens=20)
    assert result.stats.drafter == "mtp:qwen3_5+suffix" and result.stats.mean_tokens_per_pass > 1.4
    assert result.token_ids == reference(target.model, ids, 20)


@pytest.mark.parametrize("name", ["qwen3_5-oracle", "gemma4-oracle", "deepseek_v3-2-layers-oracle"])
def test_mtp_with_the_suffix_drafter_takes_the_longer_confident_draft_and_stays_lossless(loaded, name):
    """A retry: the suffix drafter remembers the first answer, so its drafts (longer and sure) win over the MTP
    head's; output stays the target's, greedy and with a seed."""
    target = loaded[name]
    ids = prompt_ids(PROMPTS[1])
    drafter = create_drafter("auto", target, None, None)  # MTP 4 drafts, suffix up to 16
    first = run(target, drafter, ids, max_new_tokens=40)
    drafter.remember([*ids, *first.token_ids])
    retry = run(target, drafter, ids, max_new_tokens=40)
    alone = run(target, create_drafter("mtp", target, None, None), ids, max_new_tokens=40)
    expected = reference(target.model, ids, 40)
    assert first.token_ids == retry.token_ids == alone.token_ids == expected
    assert retry.stats.mean_tokens_per_pass > 1.5 * alone.stats.mean_tokens_per_pass
    sampled = [run(target, drafter, ids, max_new_tokens=20, temperature=0.8, seed=3).token_ids for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_drafter_mtp_on_a_model_without_mtp(tmp_path):
    plain = load_model(str(build_tiny_checkpoint(tmp_path / "plain")), "cpu", "float32", progress=False)
    with pytest.raises(InvalidRequestError, match="has no multi-token prediction of its own"):
        create_drafter("mtp", plain, None, 4)


def test_an_assistant_is_not_a_draft_model(loaded, checkpoints):
    with pytest.raises(InvalidRequestError, match="is a Gemma 4 assistant"):
        create_drafter("draft-model", loaded["gemma4"], str(checkpoints["gemma4"].with_name("gemma4-assistant")), 4)


def test_draft_model_for_mtp_must_be_an_assistant(loaded, checkpoints):
    with pytest.raises(InvalidRequestError, match="is not a Gemma 4 assistant"):
        create_drafter("mtp", loaded["gemma4"], str(checkpoints["qwen3_5"]), 4)


def test_the_tiny_checkpoints_carry_the_real_mtp_tensor_names(checkpoints):
    """The names vLLM's qwen3_5_mtp.py loads, and DeepSeek-V3's layer-after-the-last layout."""
    with safe_open(checkpoints["qwen3_5"] / "model.safetensors", framework="pt") as qwen:
        names = set(qwen.keys())
        assert {"mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight",
                "mtp.norm.weight", "mtp.layers.0.self_attn.q_proj.weight"} <= names
        assert qwen.get_slice("mtp.fc.weight").get_shape() == [32, 64]
        assert not any(name.startswith("model.language_model.layers.4.") for name in names)
    config = json.loads((checkpoints["qwen3_5"] / "config.json").read_text())
    assert config["model_type"] == "qwen3_5" and config["text_config"]["mtp_num_hidden_layers"] == 1
    with safe_open(checkpoints["deepseek_v3"] / "model.safetensors", framework="pt") as deepseek:
        assert {"model.layers.2.eh_proj.weight", "model.layers.2.enorm.weight", "model.layers.2.hnorm.weight",
                "model.layers.2.shared_head.norm.weight"} <= set(deepseek.keys())


@pytest.mark.parametrize("name", ["gemma4-oracle", "qwen3_5-oracle", "deepseek_v3-oracle"])
def test_native_mtp_on_int8_weights_gives_the_engine_s_own_plain_decoding(checkpoints, name):
    # --quantize int8: the target's linear layers, output layer and embedding in int8, which the MTP heads share.
    target = load_model(str(checkpoints[name]), "cpu", "float32", quantize="int8", progress=False)
    assert target.quantization == "int8"
    for prompt in PROMPTS:
        ids = prompt_ids(prompt)
        plain = run(target, create_drafter("none", target, None, 4), ids)
        drafted = run(target, create_drafter("mtp", target, None, 4), ids)
        assert drafted.token_ids == plain.token_ids
        assert drafted.stats.target_passes < plain.stats.target_passes


def test_a_one_token_prompt_on_a_hybrid_model_drafts_from_the_first_step(loaded, tmp_path):
    # Nothing to prefill: the recurrent states are born in the first step. The cache records the (zero) state before
    # it too, so a rejection there is taken back exactly. (transformers < 5.25 could only crop it, which left the
    # rejected tokens folded into the state: the hidden state then differed by ~1e-3 from a run without them.)
    target = loaded["qwen3_5"]
    with torch.inference_mode():
        rolled_back = TargetModel(target.model)
        rolled_back.prefill([])
        rolled_back.forward([5, 6, 7], logits_for_last=0)
        rolled_back.rollback(2)
        clean = TargetModel(target.model)
        clean.prefill([])
        clean.forward([5], logits_for_last=0)
        torch.testing.assert_close(rolled_back.forward([10], logits_for_last=0).hidden,
                                   clean.forward([10], logits_for_last=0).hidden)

    class Recording(DraftModelDrafter):
        budgets: list[int] = []

        def propose(self, context):
            self.budgets.append(context.max_tokens)
            return super().propose(context)

    draft = load_model(str(build_tiny_checkpoint(tmp_path / "draft", seed=3)), "cpu", "float32", progress=False)
    drafter = Recording(draft.model, 4)
    ids = [TOKENIZER("The")["input_ids"][0]]
    result = run(target, drafter, ids, max_new_tokens=30)
    assert drafter.budgets[0] > 0  # drafts in the step that creates the state
    assert result.token_ids == reference(target.model, ids, 30)


@pytest.mark.parametrize("chunk", [PREFILL_CHUNK_TOKENS, 5])
def test_a_hybrid_draft_model_crops_its_recurrent_state_exactly(loaded, tmp_path, chunk):
    # Another hybrid model drafts, so drafts are rejected and its cache is cropped at most steps: after each
    # proposal its states must be those of a from-scratch run over the tokens it holds. (Cropped by a plain crop, its
    # recurrent state would keep the tokens of rejected drafts.) Fed in chunks of 5, the prompt takes several forwards.
    target = loaded["qwen3_5"]
    draft = load_model(str(build_qwen3_5(tmp_path / "draft", seed=1)), "cpu", "float32", progress=False)

    class Checked(DraftModelDrafter):
        crops = 0

        def propose(self, context):
            self.crops += len(self._cached_ids) > len(context.token_ids) - 1
            proposed = super().propose(context)
            assert_same_states(cache_states(self._cache), from_scratch_states(self.model, self._cached_ids))
            return proposed

    drafter = Checked(draft.model, 4, prefill_chunk_tokens=chunk)
    for prompt in PROMPTS:
        ids = prompt_ids(prompt)
        assert run(target, drafter, ids).token_ids == reference(target.model, ids, 40)
    assert drafter.crops >= 5

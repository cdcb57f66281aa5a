"""The CPU kernels of engine/cpu_kernels.py: the prepacked output layer and the Q8_0 argmax screen, and the exact
greedy argmax TargetModel builds on the screen (random weights; near-ties and softcap saturation made on purpose)."""

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from tiny_models import tiny_gemma3

from mtp_mcp.engine.cpu_kernels import PrepackedLinear, QuantizedArgmaxScreen, use_cpu_kernels
from mtp_mcp.engine.quantized import quantize_model
from mtp_mcp.engine.target import TargetModel


@pytest.mark.parametrize("min_rows", [2, 4])
def test_prepacked_linear_matches_the_stock_layer(min_rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 300, bias=min_rows == 4)
    packed = PrepackedLinear(linear, min_rows)
    with torch.inference_mode():
        for rows in range(1, min_rows):
            # Fewer rows take the stock path: bit-identical to what transformers computes when decoding.
            x = torch.randn(1, rows, 64)
            assert torch.equal(packed(x), linear(x))
        for rows in (min_rows, 5, 8, 16):
            x = torch.randn(1, rows, 64)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    assert packed.weight is linear.weight  # shared, not copied


def test_cpu_kernels_swap_the_output_layer_and_decoder_projections_of_float32_cpu_models():
    model = tiny_gemma3(seed=0)
    weight = model.get_output_embeddings().weight
    projections = sum(type(m) is torch.nn.Linear for m in model.get_decoder().modules())
    assert projections == 3 * 7  # q, k, v, o, gate, up, down per layer
    assert use_cpu_kernels(model) == 1 + projections
    head = model.get_output_embeddings()
    assert isinstance(head, PrepackedLinear) and head.weight is weight and head.argmax_screen is not None
    assert not any(type(m) is torch.nn.Linear for m in model.get_decoder().modules())
    assert use_cpu_kernels(tiny_gemma3(seed=0).to(torch.bfloat16)) == 0


def test_the_screen_keeps_the_argmax_among_few_candidates():
    torch.manual_seed(0)
    vocab, width = 6000, 128
    weight = torch.randn(vocab, width) * torch.rand(vocab, 1)  # rows of very different norms
    hidden = torch.randn(300, width) * 4
    hidden[:, 5] *= 30  # an outlier channel, as real hidden states have
    screen = QuantizedArgmaxScreen(weight)
    candidates, ceilings = screen.candidates(hidden)
    logits = F.linear(hidden, weight)
    sizes = []
    for row, ids, ceiling in zip(logits, candidates, ceilings):
        assert int(row.argmax()) in ids.tolist()
        left_out = torch.ones(vocab, dtype=torch.bool)
        left_out[ids] = False
        assert bool((row[left_out] < ceiling).all())
        sizes.append(len(ids))
    assert sorted(sizes)[len(sizes) // 2] <= 20  # the screen narrows; a superset of everything would be useless


@pytest.fixture
def screened_target():
    """A tiny Gemma 3 with the CPU kernels on, whose output layer holds an exact duplicate of row 3 (row 7) and a
    near-duplicate (row 9): argmax ties and near-ties that only an exact computation breaks as transformers does."""
    model = tiny_gemma3(seed=0)
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight[7] = weight[3]
        weight[9] = weight[3] * (1 + 1e-6)
    use_cpu_kernels(model)
    return TargetModel(model)


def test_greedy_tokens_equal_the_argmax_of_the_full_logits_rows(screened_target):
    torch.manual_seed(1)
    weight = screened_target.model.get_output_embeddings().weight
    hidden = torch.cat([torch.randn(40, weight.shape[1]) * 3, weight[[3, 9, 12]] * 50, -weight[[3]] * 50])
    expected = [int(screened_target.logits(row[None]).argmax()) for row in hidden]  # one row: the stock kernel
    assert screened_target.greedy_tokens(hidden) == expected
    for rows in (1, 2, 5):
        assert screened_target.greedy_tokens(hidden[:rows]) == expected[:rows]


def test_greedy_tokens_break_softcap_saturation_ties_as_the_model_does(screened_target):
    # A tiny cap saturates tanh: distinct raw logits become equal floats and argmax takes the first of them.
    screened_target._softcap = 0.05
    torch.manual_seed(2)
    hidden = torch.randn(30, screened_target.model.config.hidden_size) * 20
    expected = [int(screened_target.logits(row[None]).argmax()) for row in hidden]
    assert screened_target.greedy_tokens(hidden) == expected


def test_a_hidden_state_that_is_not_finite_gets_the_full_logits_answer(screened_target):
    hidden = torch.randn(3, screened_target.model.config.hidden_size)
    hidden[1, 4] = float("nan")
    hidden[2, 7] = float("inf")
    expected = [int(screened_target.logits(row[None]).argmax()) for row in hidden]
    assert screened_target.greedy_tokens(hidden) == expected


@pytest.mark.parametrize("quantized", [False, True])
def test_an_output_layer_with_a_bias_gets_no_screen_and_its_greedy_tokens_count_the_bias(quantized):
    # Phi, GPT-J and CodeGen heads add a bias, which the screen's bound on h . W_v does not cover.
    model = tiny_gemma3(seed=0)
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[7] = 1e3  # the argmax of h . W + b, never of h . W alone
    model.set_output_embeddings(biased)
    model.config.tie_word_embeddings = False
    if quantized:
        quantize_model(model, GGMLQuantizationType.Q8_0)
    use_cpu_kernels(model)
    assert getattr(model.get_output_embeddings(), "argmax_screen", None) is None
    target = TargetModel(model)
    with torch.inference_mode():
        hidden = target.prefill(list(range(3, 20)))
        assert target.greedy_tokens(hidden) == [7] * len(hidden)

"""The native CPU kernels (engine/native/, engine/native_ops.py): each format's products against a float64
reference, and the guarantee lossless decoding rests on: every output element the same bits whatever rows are fed
with it, whatever the thread count and whatever instruction set computes it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, dequantize, quantize

from mtp_mcp.engine import native_ops
from mtp_mcp.engine.native_ops import BlockWeight

LEGACY = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
          GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0)
K_QUANTS = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K)
INSTRUCTION_SETS = native_ops.instruction_sets()


@pytest.fixture(autouse=True)
def restore_kernels():
    chosen, threads = native_ops.instruction_set(), native_ops.threads()
    yield
    native_ops.use_instruction_set(chosen)
    native_ops.set_threads(threads)


def _half(value: float) -> np.ndarray:
    return np.frombuffer(np.float16(value).tobytes(), np.uint8)


def gguf_rows(kind: GGMLQuantizationType, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """GGUF rows in `kind`: gguf-py quantizes random floats for the 32-value formats; for the K-quants (which gguf-py
    cannot quantize) every byte is random but the float16 scales, which are set to moderate values."""
    rng = np.random.default_rng(seed)
    if kind in LEGACY:
        blocks = quantize(rng.standard_normal((rows, columns)).astype(np.float32), kind)
    else:
        size = {GGMLQuantizationType.Q4_K: 144, GGMLQuantizationType.Q5_K: 176, GGMLQuantizationType.Q6_K: 210}[kind]
        blocks = rng.integers(0, 256, (rows, columns // 256, size), dtype=np.uint8)
        if kind == GGMLQuantizationType.Q6_K:
            blocks[..., 208:210] = _half(0.01)
        else:
            blocks[..., 0:2], blocks[..., 2:4] = _half(0.02), _half(0.01)
        blocks = blocks.reshape(rows, -1)
    return blocks


def random_blocks(kind: GGMLQuantizationType, rows: int, columns: int, seed: int = 0) -> BlockWeight:
    return BlockWeight.from_gguf_rows(gguf_rows(kind, rows, columns, seed), int(kind), columns)


def activations_as_quantized(x: np.ndarray) -> np.ndarray:
    """x as the kernels quantize it: int8 per group of 32, scale max|x| / 127 (float32 operations, as in C)."""
    groups = x.reshape(len(x), -1, 32)
    amax = np.abs(groups).max(axis=-1, keepdims=True)
    inverse = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(groups * inverse), -127, 127)
    return (q * (amax / np.float32(127))).reshape(x.shape).astype(np.float64)


def outputs_by_instruction_set(x: torch.Tensor, weights: list[BlockWeight]) -> dict[str, torch.Tensor]:
    results = {}
    for name in INSTRUCTION_SETS:
        native_ops.use_instruction_set(name)
        results[name] = native_ops.products(x, weights)
    return results


@pytest.mark.parametrize("kind", LEGACY + K_QUANTS, ids=lambda kind: kind.name)
def test_each_format_computes_its_dequantized_weights_times_the_quantized_activations(kind):
    columns = 512
    weight = random_blocks(kind, 40, columns)
    dequantized = dequantize(gguf_rows(kind, 40, columns), kind).astype(np.float64)
    assert np.array_equal(native_ops.dequantized_rows(weight, torch.arange(40)).numpy(), dequantized)
    x = torch.randn(7, columns) * torch.logspace(-2, 2, 7)[:, None]
    x[2, 100] = 300.0  # an outlier in one group
    exact = activations_as_quantized(x.numpy()) @ dequantized.T
    scale = np.abs(activations_as_quantized(x.numpy())) @ np.abs(dequantized).T
    for name, got in outputs_by_instruction_set(x, [weight]).items():
        assert np.abs(got.numpy() - exact).max() <= 1e-6 * scale.max(), name


@pytest.mark.parametrize("rows", [3, 6, 21], ids=lambda rows: f"{rows}-rows")
@pytest.mark.parametrize("kind", LEGACY + K_QUANTS, ids=lambda kind: kind.name)
def test_every_instruction_set_gives_the_same_bits(kind, rows):
    # AVX-512 VNNI's wide path (two row blocks per register, 8 activation rows a tile) takes the legacy formats from
    # 5 rows, the K-quants from 16 (21: 8 + 8 + 5 rows). 20 weight rows: on 1 thread a pair of row blocks and a
    # partial one, on 2 threads 2 blocks and 1.
    weight = random_blocks(kind, 20, 768, seed=1)
    x = torch.randn(rows, 768) * torch.logspace(-2, 2, rows)[:, None]
    for threads in (1, 2):
        native_ops.set_threads(threads)
        results = outputs_by_instruction_set(x, [weight])
        for name, got in results.items():
            assert torch.equal(got, results["scalar"]), (name, threads)


@pytest.mark.parametrize("kind", (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q4_K,
                                  GGMLQuantizationType.Q6_K), ids=lambda kind: kind.name)
def test_a_row_gives_the_same_bits_whatever_is_fed_with_it_and_on_any_thread_count(kind):
    weights = [random_blocks(kind, 37, 512, seed=2), random_blocks(kind, 19, 512, seed=3)]
    x = torch.randn(11, 512) * torch.logspace(-3, 3, 11)[:, None]
    native_ops.set_threads(1)
    together = native_ops.products(x, weights)
    for threads in (1, 2, 3):
        native_ops.set_threads(threads)
        assert torch.equal(native_ops.products(x, weights), together)
        for i in range(len(x)):
            assert torch.equal(native_ops.products(x[i : i + 1], weights)[0], together[i])
            assert torch.equal(native_ops.products(x[[i, (i + 4) % 11, (i + 7) % 11]], weights)[0], together[i])
    # Two weights in one call are each weight alone, side by side.
    assert torch.equal(together, torch.cat([native_ops.products(x, [w]) for w in weights], dim=1))


def test_an_odd_number_of_groups_and_rows_from_a_wider_matrix():
    weight = random_blocks(GGMLQuantizationType.Q8_0, 9, 96)  # 3 groups of 32
    wide = torch.randn(5, 200)
    x = wide[:, 50:146]  # rows 200 floats apart
    expected = activations_as_quantized(x.contiguous().numpy()) @ dequantize(gguf_rows(GGMLQuantizationType.Q8_0, 9, 96),
                                                                             GGMLQuantizationType.Q8_0).T
    for got in outputs_by_instruction_set(x, [weight]).values():
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def reference_attention(q, keys, values, start, window, scale):
    n, heads, dim = q.shape
    group = heads // keys.shape[0]
    out = torch.empty(n, heads, dim, dtype=torch.float64)
    for i in range(n):
        position = start + i
        first = max(0, position - window + 1) if window else 0
        for h in range(heads):
            k, v = keys[h // group, first : position + 1].double(), values[h // group, first : position + 1].double()
            weights = torch.softmax(k @ q[i, h].double() * scale, dim=0)
            out[i, h] = weights @ v
    return out.reshape(n, heads * dim)


@pytest.mark.parametrize(("dim", "window", "start", "n"), [(256, 0, 17, 9), (256, 5, 17, 9), (48, 0, 17, 9),
                                                           (16, 3, 17, 9), (256, 0, 120, 150), (64, 200, 300, 40)])
def test_attention_matches_softmax_attention_and_every_row_is_its_own(dim, window, start, n):
    # Rows before, across and past the 128-position key chunks, windows inside and across them.
    torch.manual_seed(0)
    heads, kv_heads, capacity = 4, 2, 384
    keys, values = torch.randn(kv_heads, capacity, dim), torch.randn(kv_heads, capacity, dim)
    q = torch.randn(n, heads, dim) * 2
    scale = dim**-0.5
    results = {}
    for name in INSTRUCTION_SETS:
        native_ops.use_instruction_set(name)
        results[name] = native_ops.attention(q, keys, values, start, window, scale)
    expected = reference_attention(q, keys, values, start, window, scale)
    for name, got in results.items():
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(got, results["scalar"]), name
    together = results[INSTRUCTION_SETS[-1]]
    native_ops.use_instruction_set(INSTRUCTION_SETS[-1])
    for threads in (1, 2):
        native_ops.set_threads(threads)
        for i in range(0, n, 7):
            alone = native_ops.attention(q[i : i + 1], keys, values, start + i, window, scale)
            assert torch.equal(alone[0], together[i])


def test_the_small_operations_match_torch_and_give_the_same_bits_everywhere():
    torch.manual_seed(0)
    x, scale = torch.randn(5, 640) * 3, torch.rand(640) + 0.5
    residual = torch.randn(5, 640)
    gate_up = torch.randn(5, 2 * 96) * 4
    heads = torch.randn(5, 3, 64)
    head_scales = torch.rand(3, 64) + 0.5
    angles = torch.rand(5, 32) * 10
    cos, sin = torch.cat([angles.cos()] * 2, dim=1), torch.cat([angles.sin()] * 2, dim=1)
    results = {}
    for name in INSTRUCTION_SETS:
        native_ops.use_instruction_set(name)
        results[name] = (
            native_ops.rms_norm(x, scale, 1e-6),
            native_ops.add_rms_norm_(residual.clone(), x, scale, 1e-6),
            native_ops.gelu_tanh_mul(gate_up),
            native_ops.head_norm_rotary_(heads.clone(), head_scales, 1e-6, cos, sin),
        )
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale
    gate, up = gate_up.chunk(2, dim=1)
    head_normed = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-6) * head_scales
    rotated = head_normed * cos[:, None] + torch.cat([-head_normed[..., 32:], head_normed[..., :32]], -1) * sin[:, None]
    expected = (normed, residual + normed, F.gelu(gate, approximate="tanh") * up, rotated)
    for name, got in results.items():
        for index, (value, reference) in enumerate(zip(got, expected)):
            torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-5)
            assert torch.equal(value, results["scalar"][index]), name


def test_gelu_of_extreme_values_stays_finite():
    gate_up = torch.tensor([[-1000.0, -50.0, 0.0, 50.0, 1000.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    got = native_ops.gelu_tanh_mul(gate_up)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, F.gelu(gate_up[:, :5], approximate="tanh"), rtol=1e-6, atol=1e-6)


def test_bad_inputs_are_one_sentence_not_a_crash():
    weight = random_blocks(GGMLQuantizationType.Q8_0, 8, 64)
    with pytest.raises(ValueError, match="^x has 32 columns where 64 are needed$"):
        native_ops.products(torch.randn(2, 32), [weight])
    with pytest.raises(ValueError, match="^x must be a float32 CPU matrix with contiguous rows"):
        native_ops.products(torch.randn(2, 64, dtype=torch.float64), [weight])
    with pytest.raises(ValueError, match="^rows of 48 values do not fill whole Q4_K blocks$"):
        BlockWeight.from_gguf_rows(np.zeros((1, 144), np.uint8), int(GGMLQuantizationType.Q4_K), 48)
    with pytest.raises(ValueError, match=r"^GGUF rows must be uint8 \[n, 68\], not uint8 \(2, 60\)$"):
        BlockWeight.from_gguf_rows(np.zeros((2, 60), np.uint8), int(GGMLQuantizationType.Q8_0), 64)
    with pytest.raises(ValueError, match="^type 16 is not one of the block formats computed here$"):
        BlockWeight.from_gguf_rows(np.zeros((2, 60), np.uint8), 16, 64)
    with pytest.raises(ValueError, match="^blocks must be 544 contiguous uint8 on CPU"):
        BlockWeight(torch.zeros(100, dtype=torch.uint8), int(GGMLQuantizationType.Q8_0), 2, 64)
    with pytest.raises(ValueError, match=r"^row ids must lie in \[0, 8\) for this weight$"):
        native_ops.dequantized_rows(weight, torch.tensor([8]))
    with pytest.raises(ValueError, match="^instruction set 'avx1024' is not available on this CPU$"):
        native_ops.use_instruction_set("avx1024")


def test_products_of_many_rows_keep_their_shape_and_meaning():
    # A prefill chunk: rows split over threads in tiles; the result is the same as row by row.
    weight = random_blocks(GGMLQuantizationType.Q5_0, 70, 64)
    x = torch.randn(300, 64)
    native_ops.set_threads(2)
    together = native_ops.products(x, [weight])
    assert together.shape == (300, 70)
    assert all(torch.equal(native_ops.products(x[i : i + 1], [weight])[0], together[i]) for i in (0, 131, 299))
    assert math.isfinite(float(together.abs().max()))

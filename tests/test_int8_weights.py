"""Int8 weights (engine/int8_weights.py): rows computed independently of their neighbours, GGUF blocks loaded
straight into int8, the exact greedy screen over an int8 output layer, and drafting that stays lossless on them."""

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_loading import PROMPT, write_tiny_gguf
from tiny_checkpoints import build_tiny_checkpoint

from mtp_mcp.engine import gguf_loading
from mtp_mcp.engine.cpu_kernels import Int8ArgmaxScreen, use_cpu_kernels
from mtp_mcp.engine.drafters.autoregressive import NoDrafter
from mtp_mcp.engine.drafters.draft_model import DraftModelDrafter
from mtp_mcp.engine.drafters.prompt_lookup import PromptLookupDrafter
from mtp_mcp.engine.engine import Engine, EngineOptions
from mtp_mcp.engine.errors import InvalidRequestError
from mtp_mcp.engine.int8_weights import Int8Embedding, Int8Linear, quantize_rows
from mtp_mcp.engine.lean_gemma3 import lean_gemma3_supported
from mtp_mcp.engine.loading import CACHE_DIR_ENV, load_model
from mtp_mcp.engine.request import GenerationRequest
from mtp_mcp.engine.target import TargetModel

BLOCKS = (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q5_0)


def test_a_row_gives_the_same_output_whatever_rows_are_fed_with_it():
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.randn(300, 96), torch.randn(300))
    rows = torch.randn(9, 96) * torch.logspace(-3, 3, 9)[:, None]  # rows of very different scales
    rows[3, 7] = 500.0  # an outlier channel
    with torch.inference_mode():
        together = layer(rows)
        for i in range(len(rows)):
            assert torch.equal(layer(rows[i : i + 1])[0], together[i])
            assert torch.equal(layer(rows[[i, (i + 1) % 9, (i + 2) % 9]])[0], together[i])


def test_int8_linear_is_close_to_the_float_layer_it_quantizes():
    torch.manual_seed(0)
    weight, bias = torch.randn(300, 96), torch.randn(300)
    layer = Int8Linear.from_float(weight, bias)
    x = torch.randn(4, 96)
    with torch.inference_mode():
        dequantized = layer.dequantized_rows(torch.arange(300))
        exact = F.linear(x, dequantized, bias)
        # The two activation levels leave at most max|x| / 15876 per value, so y_v is off by at most that times
        # sum|W_v| (plus float rounding); the int8 weights' own error is larger.
        bound = x.abs().amax(1, keepdim=True) / 15876 * dequantized.abs().sum(1) + 1e-5
        assert bool(((layer(x) - exact).abs() <= bound).all())
        assert 0 < float((layer(x) - exact).abs().max()) < float((exact - F.linear(x, weight, bias)).abs().max())


def test_the_screen_over_an_int8_layer_keeps_the_exact_argmax():
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.randn(6000, 128) * torch.rand(6000, 1))
    screen = Int8ArgmaxScreen(layer)
    hidden = torch.randn(200, 128) * 4
    hidden[:, 5] *= 30
    logits = F.linear(hidden, layer.dequantized_rows(torch.arange(6000)))
    candidates, ceilings = screen.candidates(hidden)
    for row, ids, ceiling in zip(logits, candidates, ceilings):
        assert int(row.argmax()) in ids.tolist()
        left_out = torch.ones(6000, dtype=torch.bool)
        left_out[ids] = False
        assert bool((row[left_out] < ceiling).all())
        assert len(ids) < 100


@pytest.fixture(scope="module")
def block_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-q.gguf"
    write_tiny_gguf(path, BLOCKS)
    return path


def test_a_gguf_loads_into_int8_rows_of_its_dequantized_blocks(block_gguf: Path):
    int8 = load_model(str(block_gguf), device="cpu")
    float_ = load_model(str(block_gguf), device="cpu", quantize="none")
    assert (int8.quantization, float_.quantization) == ("int8", "none")
    decoder = int8.model.get_decoder()
    assert not any(type(m) is torch.nn.Linear for m in decoder.modules())
    assert sum(isinstance(m, Int8Linear) for m in decoder.modules()) == 6 * 7 + 1  # + the embedding's rows
    # Tied: the embedding reads the output layer's int8 rows, no second copy.
    embedding, head = int8.model.get_input_embeddings(), int8.model.get_output_embeddings()
    assert isinstance(embedding, Int8Embedding) and embedding.weights is head
    # Each int8 matrix is the per-row int8 form of the float model's (dequantized) matrix, and nothing else.
    reference = dict(float_.model.named_parameters())
    q_proj = decoder.layers[2].self_attn.q_proj
    expected_q, expected_scale = quantize_rows([reference["model.layers.2.self_attn.q_proj.weight"]])
    assert torch.equal(q_proj.quantized, expected_q) and torch.equal(q_proj.scale, expected_scale)
    ids = int8.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        scaled = float_.model.get_input_embeddings()(ids)
        torch.testing.assert_close(embedding(ids), scaled, rtol=0.02, atol=0.02 * float(scaled.abs().max()))
        int8_logits, float_logits = int8.model(ids).logits, float_.model(ids).logits
    assert float((int8_logits - float_logits).abs().max()) < 0.05 * float(float_logits.abs().max())


def test_float_gguf_tensors_stay_float_and_exact(tmp_path: Path):
    path = tmp_path / "tiny-f32.gguf"
    original = write_tiny_gguf(path)
    loaded = load_model(str(path), device="cpu")
    assert loaded.quantization == "int8" and not any(isinstance(m, Int8Linear) for m in loaded.model.modules())
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)


def test_safetensors_checkpoints_load_float_unless_int8_is_asked(tmp_path: Path):
    path = build_tiny_checkpoint(tmp_path / "tiny")
    assert load_model(str(path), device="cpu").quantization == "none"
    int8 = load_model(str(path), device="cpu", quantize="int8")
    assert int8.quantization == "int8"
    assert isinstance(int8.model.get_output_embeddings(), Int8Linear)
    with pytest.raises(InvalidRequestError, match="^int8 weights run on CPU in float32 only"):
        load_model(str(path), device="cpu", dtype="bfloat16", quantize="int8")
    with pytest.raises(InvalidRequestError, match="^quantize is 'int4'; it must be one of: auto, none, int8$"):
        load_model(str(path), device="cpu", quantize="int4")


@pytest.mark.parametrize("drafter", ["ngram", "draft-model"])
def test_drafting_on_int8_weights_gives_the_engine_s_own_plain_decoding(block_gguf: Path, drafter: str):
    # Lossless with a quantized target means: what the same int8 model decodes one token per pass.
    loaded = load_model(str(block_gguf), device="cpu")
    plain = Engine(loaded, NoDrafter())
    draft = load_model(str(block_gguf), device="cpu").model  # an int8 copy as its own draft model
    speculative = Engine(loaded, PromptLookupDrafter(4) if drafter == "ngram" else DraftModelDrafter(draft, 3))
    try:
        for prompt in (PROMPT, PROMPT * 3, "a b a b a b a b"):
            request = GenerationRequest(prompt, max_new_tokens=40)
            expected, got = plain.generate(request), speculative.generate(request)
            assert got.token_ids == expected.token_ids
            assert got.stats.target_passes <= expected.stats.target_passes
    finally:
        plain.close()
        speculative.close()


def test_engine_load_screens_the_int8_output_layer(block_gguf: Path):
    engine = Engine.load(EngineOptions(model=str(block_gguf), drafter="ngram", device="cpu"))
    try:
        assert engine.info["weights"] == "int8"
        assert engine.info["cpu_kernels"]["int8_argmax_screen"] is True
        plain = Engine(engine.loaded, NoDrafter())
        reference = load_model(str(block_gguf), device="cpu")  # int8, no screen: argmax of the full logits
        ids = reference.tokenizer(PROMPT, return_tensors="pt").input_ids
        expected = reference.model.generate(ids, max_new_tokens=30, do_sample=False)[0, ids.shape[1] :].tolist()
        assert plain.generate(GenerationRequest(PROMPT, max_new_tokens=30)).token_ids == expected
        assert engine.generate(GenerationRequest(PROMPT, max_new_tokens=30)).token_ids == expected
        plain.close()
    finally:
        engine.close()


def test_a_truncated_gguf_is_one_sentence(block_gguf: Path, tmp_path: Path):
    from mtp_mcp.engine.errors import ModelLoadError

    cut = tmp_path / "cut.gguf"
    data = block_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="^could not load model") as error:
        load_model(str(cut), device="cpu")
    assert "\n" not in str(error.value)
    np.testing.assert_equal(len(block_gguf.read_bytes()), len(data))


def lean_rows(loaded, tokens: list[int], prefill_chunk: int, steps: tuple[int, ...], prefill: int = 17
              ) -> torch.Tensor:
    """The lean pass's hidden state at every position after the first, fed as a chunked prefill and then steps of
    several tokens, each followed by two drafts that are rejected (rolled back)."""
    target = TargetModel(loaded.model, prefill_chunk_tokens=prefill_chunk)
    assert target._lean is not None
    with torch.inference_mode():
        rows = [target.prefill(tokens[:prefill])]
        position = prefill
        for step in steps:
            fed = tokens[position : position + step] + [0, 0]
            rows.append(target.forward(fed, logits_for_last=0).hidden[:step])
            target.rollback(2)
            position += step
        assert target.cache_length == position
        keys, values = target.key_value_states(0)
        assert keys.shape == values.shape == (1, 1, position, 16)
    return torch.cat(rows)


def test_the_lean_gemma3_pass_computes_what_transformers_computes_one_token_at_a_time(block_gguf: Path):
    # Prefill chunks past the sliding window (8), verification steps of several tokens, rollbacks. Transformers'
    # modules are fed one token per pass, each row alone as the lean pass computes every row. Their attention call
    # still rounds differently (it packs the query heads of a kv head into one call), and the int8 activation levels
    # turn a last-bit difference into up to one level (max|h| / 15876 per value): hence the tolerance.
    loaded = load_model(str(block_gguf), device="cpu")
    assert lean_gemma3_supported(loaded.model)
    torch.manual_seed(1)
    tokens = torch.randint(3, loaded.model.config.vocab_size, (40,)).tolist()
    lean = lean_rows(loaded, tokens, 5, (1, 4, 3, 1, 5))
    stock = TargetModel(loaded.model, prefill_chunk_tokens=1)
    stock._lean = None  # transformers' modules and DynamicCache
    with torch.inference_mode():
        expected = torch.cat([stock.prefill(tokens[:17])] + [
            stock.forward([token], logits_for_last=0).hidden for token in tokens[17 : len(lean)]])
    torch.testing.assert_close(lean, expected, rtol=0, atol=2e-3)
    assert float((lean - expected).norm() / expected.norm()) < 5e-4


def test_a_lean_row_is_the_same_however_the_tokens_are_fed(block_gguf: Path):
    """Bit for bit: so verifying k drafts computes what k + 1 plain steps compute, and a prompt whose start came
    from the prefix cache what a cold prefill computes (the int8 levels magnify any rounding difference)."""
    loaded = load_model(str(block_gguf), device="cpu")
    torch.manual_seed(2)
    # 100 positions: sliding-window blocks (window 8) and global blocks whose key spans end at 64 and at 128
    # (KEY_SPAN_STEP), fed alone and in batches of several blocks.
    tokens = torch.randint(3, loaded.model.config.vocab_size, (100,)).tolist()
    one_by_one = lean_rows(loaded, tokens, 1, (1,) * 70)
    assert torch.equal(lean_rows(loaded, tokens, 5, (1, 4, 3, 1, 5, 16, 40)), one_by_one)
    assert torch.equal(lean_rows(loaded, tokens, 17, (17, 13, 37, 3), prefill=17), one_by_one)


def test_gemma3_with_float_weights_keeps_transformers_modules(tmp_path: Path):
    path = tmp_path / "tiny-f32.gguf"
    write_tiny_gguf(path)
    assert not lean_gemma3_supported(load_model(str(path), device="cpu", quantize="none").model)


def test_later_loads_read_the_int8_rows_kept_by_the_first(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    path = tmp_path / "tiny-q.gguf"
    write_tiny_gguf(path, BLOCKS)
    first = load_model(str(path), device="cpu", progress=False)
    (kept,) = (tmp_path / "cache").rglob(gguf_loading.INT8_ROWS)

    dequantized_kinds = []
    real_dequantize = gguf_loading.dequantize

    def recording_dequantize(data, kind):
        dequantized_kinds.append(kind)
        return real_dequantize(data, kind)

    monkeypatch.setattr(gguf_loading, "dequantize", recording_dequantize)
    later = load_model(str(path), device="cpu", progress=False)
    assert not set(dequantized_kinds) & set(BLOCKS)  # only the float tensors (norms) were read from the file
    rows = {name: module for name, module in first.model.named_modules() if isinstance(module, Int8Linear)}
    assert rows
    for name, module in later.model.named_modules():
        if isinstance(module, Int8Linear):
            assert torch.equal(module.quantized, rows[name].quantized) and torch.equal(module.scale, rows[name].scale)
    request = GenerationRequest(PROMPT, max_new_tokens=12)
    engines = [Engine(loaded, NoDrafter()) for loaded in (first, later)]
    try:
        assert engines[0].generate(request).token_ids == engines[1].generate(request).token_ids
    finally:
        for engine in engines:
            engine.close()

    kept.write_bytes(b"not safetensors")  # a damaged file: ignored with a warning, made again
    dequantized_kinds.clear()
    with caplog.at_level(logging.WARNING):
        again = load_model(str(path), device="cpu", progress=False)
    assert "ignoring the kept int8 weights" in caplog.text and set(dequantized_kinds) & set(BLOCKS)
    assert isinstance(again.model.get_input_embeddings(), Int8Embedding)
    assert gguf_loading._read_int8_rows(kept)  # readable again


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_transformers_modules_with_int8_weights_give_each_row_alone_too(tmp_path: Path, arch: str):
    """Other int8 models run transformers' modules; their attention goes one row at a time as well (engine/
    row_attention.py), so verification rows equal one-token rows bit for bit. Gemma 3 here with its lean pass off."""
    path = build_tiny_checkpoint(tmp_path / arch, arch=arch)
    loaded = load_model(str(path), device="cpu", quantize="int8")
    use_cpu_kernels(loaded.model)
    assert loaded.model.config._attn_implementation == "mtp_mcp_row_by_row"
    torch.manual_seed(3)
    tokens = torch.randint(3, loaded.model.config.vocab_size, (40,)).tolist()

    def rows(chunk: int, steps: tuple[int, ...]) -> torch.Tensor:
        target = TargetModel(loaded.model, prefill_chunk_tokens=chunk)
        target._lean = None
        with torch.inference_mode():
            fed = [target.prefill(tokens[:12])]
            position = 12
            for step in steps:
                fed.append(target.forward(tokens[position : position + step] + [0, 0], logits_for_last=0).hidden[:step])
                target.rollback(2)
                position += step
        return torch.cat(fed)

    assert torch.equal(rows(5, (4, 3, 5, 16)), rows(1, (1,) * 28))

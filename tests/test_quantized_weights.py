"""Quantized weights (engine/quantized.py): a GGUF's blocks loaded exactly as stored, formats the kernels do not
compute requantized with one log line, `--quantize int8|int4` for float checkpoints, the lean Gemma 3 pass on them,
and drafting that stays lossless on them."""

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from test_loading import PROMPT, write_tiny_gguf
from tiny_checkpoints import build_tiny_checkpoint

from mtp_mcp.engine import native_ops
from mtp_mcp.engine.cpu_kernels import use_cpu_kernels
from mtp_mcp.engine.drafters import create_drafter
from mtp_mcp.engine.drafters.autoregressive import NoDrafter
from mtp_mcp.engine.drafters.draft_model import DraftModelDrafter
from mtp_mcp.engine.engine import Engine, EngineOptions
from mtp_mcp.engine.errors import InvalidRequestError, ModelLoadError
from mtp_mcp.engine.lean_gemma3 import lean_gemma3_supported
from mtp_mcp.engine.loading import CACHE_DIR_ENV, load_model
from mtp_mcp.engine.quantized import QuantizedEmbedding, QuantizedLinear
from mtp_mcp.engine.request import GenerationRequest
from mtp_mcp.engine.target import TargetModel

BLOCKS = (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q4_0,
          GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_1)


@pytest.fixture(scope="module")
def block_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-q.gguf"
    write_tiny_gguf(path, BLOCKS)
    return path


def test_a_gguf_loads_its_blocks_exactly_as_stored(block_gguf: Path):
    quantized = load_model(str(block_gguf), device="cpu")
    float_ = load_model(str(block_gguf), device="cpu", quantize="none")
    assert (quantized.quantization, float_.quantization) == ("gguf", "none")
    decoder = quantized.model.get_decoder()
    assert not any(type(m) is torch.nn.Linear for m in decoder.modules())
    assert sum(isinstance(m, QuantizedLinear) for m in decoder.modules()) == 6 * 7
    # Tied: the embedding reads the output layer's blocks, no second copy.
    embedding, head = quantized.model.get_input_embeddings(), quantized.model.get_output_embeddings()
    assert isinstance(embedding, QuantizedEmbedding) and embedding.weight_blocks is head.weight_blocks
    # Every matrix holds the file's values: its rows read back are gguf-py's dequantization of the tensor, bit for
    # bit, and the float model was dequantized from the same tensors.
    reader = gguf.GGUFReader(block_gguf)
    stored = {t.name: t for t in reader.tensors}
    for module_name, gguf_name in (("model.layers.2.self_attn.q_proj", "blk.2.attn_q.weight"),
                                   ("model.layers.4.mlp.down_proj", "blk.4.ffn_down.weight"),
                                   ("model.embed_tokens", "token_embd.weight")):
        module = quantized.model.get_submodule(module_name)
        tensor = stored[gguf_name]
        expected = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
        rows = module.weight_blocks.rows
        assert module.weight_blocks.type_name == tensor.tensor_type.name
        assert torch.equal(native_ops.dequantized_rows(module.weight_blocks, torch.arange(rows)), expected)
        assert torch.equal(float_.model.get_submodule(module_name).weight, expected)
    ids = quantized.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        quantized_logits, float_logits = quantized.model(ids).logits, float_.model(ids).logits
    # The only difference left: the kernels quantize activations to int8 per group of 32, as llama.cpp does.
    assert float((quantized_logits - float_logits).abs().max()) < 0.05 * float(float_logits.abs().max())


def test_a_format_the_kernels_do_not_compute_is_requantized_to_q8_0_with_one_log_line(tmp_path: Path, caplog):
    path = tmp_path / "tiny-mixed.gguf"
    write_tiny_gguf(path, (GGMLQuantizationType.Q8_0, GGMLQuantizationType.MXFP4, GGMLQuantizationType.F16))
    with caplog.at_level(logging.INFO):
        loaded = load_model(str(path), device="cpu", progress=False)
    assert loaded.quantization == "gguf"
    lines = [r.getMessage() for r in caplog.records if "CPU kernels do not compute" in r.getMessage()]
    assert lines == [("tiny-mixed.gguf stores some matrices as F16, MXFP4, which the CPU kernels do not compute: "
                      "those were dequantized and quantized to Q8_0")]
    types = {m.weight_blocks.type_name for m in loaded.model.get_decoder().modules() if isinstance(m, QuantizedLinear)}
    assert types == {"Q8_0"}
    engine = Engine(loaded, NoDrafter())
    try:
        assert len(engine.generate(GenerationRequest(PROMPT, max_new_tokens=5)).token_ids) == 5
    finally:
        engine.close()


def test_a_float_gguf_stays_float_and_exact(tmp_path: Path):
    path = tmp_path / "tiny-f32.gguf"
    original = write_tiny_gguf(path)
    loaded = load_model(str(path), device="cpu")
    assert loaded.quantization == "none" and not any(isinstance(m, QuantizedLinear) for m in loaded.model.modules())
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)
    assert not lean_gemma3_supported(loaded.model)


@pytest.mark.parametrize(("quantize", "format_name"), [("int8", "Q8_0"), ("int4", "Q4_1")])
def test_safetensors_checkpoints_load_float_unless_quantizing_is_asked(tmp_path: Path, quantize, format_name):
    path = build_tiny_checkpoint(tmp_path / "tiny")
    float_ = load_model(str(path), device="cpu")
    assert float_.quantization == "none"
    quantized = load_model(str(path), device="cpu", quantize=quantize)
    assert quantized.quantization == quantize
    head = quantized.model.get_output_embeddings()
    assert isinstance(head, QuantizedLinear) and head.weight_blocks.type_name == format_name
    ids = float_.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        got, expected = quantized.model(ids).logits, float_.model(ids).logits
    # Random weights have no structure that survives 4 bits well; the logits still point the same way.
    similarity = float(torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0))
    assert similarity > (0.999 if quantize == "int8" else 0.9)


def test_quantizing_on_a_device_or_dtype_the_kernels_do_not_run_is_one_sentence(tmp_path: Path):
    path = build_tiny_checkpoint(tmp_path / "tiny")
    with pytest.raises(InvalidRequestError, match="^int4 weights run on CPU in float32 only"):
        load_model(str(path), device="cpu", dtype="bfloat16", quantize="int4")
    with pytest.raises(InvalidRequestError, match="^quantize is 'int2'; it must be one of: auto, none, int8, int4$"):
        load_model(str(path), device="cpu", quantize="int2")


@pytest.mark.parametrize("drafter", ["ngram", "suffix", "draft-model"])
def test_drafting_on_quantized_weights_gives_the_engine_s_own_plain_decoding(block_gguf: Path, drafter: str):
    # Lossless with a quantized target means: what the same quantized model decodes one token per pass.
    loaded = load_model(str(block_gguf), device="cpu")
    use_cpu_kernels(loaded.model)
    plain = Engine(loaded, NoDrafter())
    if drafter == "draft-model":  # a copy of the target as its own draft model
        drafting = DraftModelDrafter(load_model(str(block_gguf), device="cpu").model, 3)
    else:
        drafting = create_drafter(drafter, loaded, None, None, None)
    speculative = Engine(loaded, drafting)
    try:
        for prompt in (PROMPT, PROMPT * 3, "a b a b a b a b"):
            request = GenerationRequest(prompt, max_new_tokens=40)
            expected, got = plain.generate(request), speculative.generate(request)
            assert got.token_ids == expected.token_ids
            assert got.stats.target_passes <= expected.stats.target_passes
    finally:
        plain.close()
        speculative.close()


def test_engine_load_runs_the_lean_pass_on_the_kernels(block_gguf: Path):
    engine = Engine.load(EngineOptions(model=str(block_gguf), drafter="ngram", device="cpu"))
    try:
        assert engine.info["weights"] == "gguf"
        kernels = engine.info["cpu_kernels"]
        assert kernels["argmax_screen"] is False and kernels["prepacked_layers"] == 0
        assert kernels["native_instruction_set"] in ("scalar", "avx2", "avx512vnni")
        assert engine._target._lean is not None
        assert len(engine.generate(GenerationRequest(PROMPT, max_new_tokens=30)).token_ids) == 30
    finally:
        engine.close()


def test_a_truncated_gguf_is_one_sentence(block_gguf: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    cut = tmp_path / "cut.gguf"
    data = block_gguf.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="^could not load model") as error:
        load_model(str(cut), device="cpu")
    assert "\n" not in str(error.value)


def test_what_earlier_versions_kept_beside_a_description_is_removed(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    path = tmp_path / "tiny-q.gguf"
    write_tiny_gguf(path, BLOCKS)
    load_model(str(path), device="cpu", progress=False)
    (described,) = (tmp_path / "cache").glob("gguf-described-v1/*")
    obsolete = described / "int8-rows-v1.safetensors"
    obsolete.write_bytes(b"0" * 1000)
    load_model(str(path), device="cpu", progress=False)
    assert not obsolete.exists()


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


def test_the_lean_gemma3_pass_computes_what_transformers_computes_over_the_same_layers(block_gguf: Path):
    # Prefill chunks past the sliding window (8), verification steps of several tokens, rollbacks. transformers'
    # modules over the same quantized layers, fed one token per pass, compute the same model with other float
    # operations (norms, softmax, GELU); the int8 activations turn some of those last-bit differences into a level
    # (1/127 of a group's largest value): hence the tolerance.
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
    assert float((lean - expected).norm() / expected.norm()) < 2e-2
    assert float(torch.nn.functional.cosine_similarity(lean, expected).min()) > 0.99


def test_a_lean_row_is_the_same_however_the_tokens_are_fed(block_gguf: Path):
    """Bit for bit: so verifying k drafts computes what k + 1 plain steps compute, and a prompt whose start came
    from the prefix cache what a cold prefill computes."""
    loaded = load_model(str(block_gguf), device="cpu")
    torch.manual_seed(2)
    tokens = torch.randint(3, loaded.model.config.vocab_size, (100,)).tolist()
    one_by_one = lean_rows(loaded, tokens, 1, (1,) * 70)
    assert torch.equal(lean_rows(loaded, tokens, 5, (1, 4, 3, 1, 5, 16, 40)), one_by_one)
    assert torch.equal(lean_rows(loaded, tokens, 17, (17, 13, 37, 3), prefill=17), one_by_one)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_transformers_modules_with_quantized_weights_give_each_row_alone_too(tmp_path: Path, arch: str):
    """Other quantized models run transformers' modules; their attention goes one row at a time (engine/
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

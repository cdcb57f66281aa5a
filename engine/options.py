"""What an engine is asked to be, and every check of it that needs no model and no torch.

Imported by the command line and the server before anything heavy: `mtp-mcp --help`, a bad option and the MCP
handshake must not wait seconds for torch and transformers to import. What can only be known with torch (is CUDA
there?) or with the files (is this hub id in the cache?) is checked when the model loads (engine/loading.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from mtp_mcp.engine.errors import InvalidRequestError, ModelLoadError

DRAFTER_NAMES = ("auto", "none", "ngram", "suffix", "draft-model", "mtp")
MAX_NUM_DRAFT_TOKENS = 16
DEFAULT_NUM_DRAFT_TOKENS = 4
# The suffix drafter's drafts come with a confidence per token and are cut to what pays (engine/draft_payoff.py),
# so it may offer long ones: a retried request or a repeated passage is then verified many tokens per pass.
DEFAULT_SUFFIX_DRAFT_TOKENS = 16
DEFAULT_MAX_QUEUED_REQUESTS = 16
DEVICE_CHOICES = ("auto", "cpu", "cuda")  # and cuda:N
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE_CHOICES = ("auto", "none", "int8", "int4")

_CUDA_DEVICE = re.compile(r"cuda(:\d+)?")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True, slots=True)
class EngineOptions:
    model: str | None = None  # None: the embedded default (Gemma 3 270M)
    drafter: str = "auto"
    draft_model: str | None = None
    num_draft_tokens: int | None = None  # None: the drafter's default (DEFAULT_NUM_DRAFT_TOKENS, suffix: 16)
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "auto"  # auto (a GGUF's blocks as stored on CPU, else none), none, int8, int4
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS
    prefix_cache: bool = True  # keep the last request's cache; a prompt that starts the same prefills only the rest
    # The suffix drafter's index of earlier texts is saved in the user cache directory and read at the next start.
    drafter_memory: bool = True
    # Verify only as much of each draft as is expected to pay, and pause a drafter that keeps losing
    # (engine/draft_payoff.py); False verifies every drafted token.
    draft_when_it_pays: bool = True


def check_options(options: EngineOptions) -> None:
    """Raises the one-sentence error for anything wrong with `options` that shows without loading a model."""
    check_device(options.device)
    if options.dtype not in DTYPE_CHOICES:
        raise InvalidRequestError(f"dtype is '{options.dtype}'; it must be one of: {', '.join(DTYPE_CHOICES)}")
    check_quantize(options.quantize, options.device, options.dtype)
    check_drafter_choice(options.drafter, options.draft_model, options.num_draft_tokens)
    check_source(options.model)
    if options.draft_model is not None:
        check_source(options.draft_model)
    if options.max_queued_requests < 1:
        raise InvalidRequestError(f"max_queued_requests is {options.max_queued_requests}; it must be at least 1")


def check_device(device: str) -> None:
    if device not in DEVICE_CHOICES and not _CUDA_DEVICE.fullmatch(device):
        raise InvalidRequestError(f"device is '{device}'; it must be one of: auto, cpu, cuda, cuda:N")


def check_quantize(quantize: str, device: str, dtype: str) -> None:
    """device and dtype as resolved ('cpu', 'float32') or as asked ('auto'); 'auto' passes here and is judged once
    it is resolved."""
    if quantize not in QUANTIZE_CHOICES:
        raise InvalidRequestError(f"quantize is '{quantize}'; it must be one of: {', '.join(QUANTIZE_CHOICES)}")
    if quantize in ("int8", "int4") and (device.startswith("cuda") or dtype not in ("auto", "float32")):
        raise InvalidRequestError(
            f"{quantize} weights run on CPU in float32 only (the CPU kernels), not on {device} in {dtype}; use "
            "--quantize none, or --device cpu with --dtype float32")


def check_drafter_choice(name: str, draft_model: str | None, num_draft_tokens: int | None) -> None:
    if name not in DRAFTER_NAMES:
        raise InvalidRequestError(f"unknown drafter '{name}'; choose one of: {', '.join(DRAFTER_NAMES)}")
    if num_draft_tokens is not None and (
            not isinstance(num_draft_tokens, int) or not 1 <= num_draft_tokens <= MAX_NUM_DRAFT_TOKENS):
        raise InvalidRequestError(
            f"num_draft_tokens is {num_draft_tokens!r}; it must be a whole number from 1 to {MAX_NUM_DRAFT_TOKENS}"
        )
    if draft_model is not None and name not in ("auto", "draft-model", "mtp"):
        raise InvalidRequestError(
            f"--draft-model is only used with --drafter draft-model, mtp (a Gemma 4 assistant) or auto, not '{name}'"
        )


def check_source(source: str | None) -> None:
    """Raises the ModelLoadError that loading would for a `source` that is not a usable local path (or a hub id,
    whose presence in the local cache is checked when it loads). None or "": the embedded default."""
    if not source:
        return
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model path '{source}' is neither a directory nor a .gguf file")
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory '{source}' has no config.json; pass a directory written by "
                                 "save_pretrained (or a hub snapshot), or a .gguf file")
    elif path.exists():
        raise ModelLoadError(f"model path '{source}' is neither a directory nor a .gguf file")
    elif not is_hub_id(source):
        raise ModelLoadError(f"model path '{source}' does not exist; pass a local model directory, a .gguf file, "
                             "a hub id already in the local cache, or nothing for the embedded default")


def is_hub_id(source: str) -> bool:
    """'owner/name' that is not a local path: looked up in the local hub cache (never downloaded)."""
    return bool(_HUB_ID.fullmatch(source)) and not source.endswith(".gguf") and not Path(source).expanduser().exists()


# --- the OpenAI-compatible upstream backend (engine/openai_upstream.py) ---

UPSTREAM_KEY_ENV = "MTP_MCP_UPSTREAM_API_KEY"
# Longest silence from the upstream (no connection, no next chunk) before a call is given up.
DEFAULT_UPSTREAM_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class UpstreamOptions:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    api_key: str | None = None
    model: str | None = None  # the upstream's model name; None: the one it serves
    tokenizer: str | None = None  # a local folder with the upstream model's tokenizer files; None: ask the upstream
    timeout_s: float = DEFAULT_UPSTREAM_TIMEOUT_S
    max_queued_requests: int = DEFAULT_MAX_QUEUED_REQUESTS

    def __repr__(self) -> str:  # never show the key
        return f"UpstreamOptions(base_url={redacted(self.base_url)!r}, model={self.model!r})"


def check_upstream_options(options: UpstreamOptions) -> None:
    """Raises the one-sentence error for anything wrong that shows without asking the upstream."""
    parts = urlsplit(options.base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequestError(f"--base-url is {redacted(options.base_url)!r}; it must be an http:// or https:// "
                                  "address such as http://127.0.0.1:8000/v1")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise InvalidRequestError(f"--base-url {redacted(options.base_url)!r} holds credentials, a query or a fragment; "
                                  f"give the bare address, and a key through {UPSTREAM_KEY_ENV} or --api-key")
    if not options.timeout_s > 0:
        raise InvalidRequestError(f"--upstream-timeout is {options.timeout_s}; it must be more than 0 seconds")
    if options.max_queued_requests < 1:
        raise InvalidRequestError(f"max_queued_requests is {options.max_queued_requests}; it must be at least 1")
    if options.tokenizer is not None and not Path(options.tokenizer).expanduser().is_dir():
        raise InvalidRequestError(f"--tokenizer is {options.tokenizer!r}; it must be a folder holding the upstream "
                                  "model's tokenizer files (tokenizer.json, tokenizer_config.json)")


def redacted(url: str) -> str:
    """The URL without credentials, query or fragment: what messages and logs may show of an upstream's address."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

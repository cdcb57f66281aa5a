"""mtp-mcp engine: speculative decoding on transformers models; greedy output the target's own tokens (equal to
transformers' generate on every prompt measured), sampling from the target's distribution.

The names below are imported on first use, so that importing a light module of the engine (options, errors,
request) does not import torch and transformers.
"""

from importlib import import_module

_EXPORTS = {
    "Engine": "mtp_mcp.engine.engine",
    "EngineOptions": "mtp_mcp.engine.options",
    "GenerationRequest": "mtp_mcp.engine.request",
    "GenerationResult": "mtp_mcp.engine.request",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)

"""mtp-mcp engine: speculative decoding on transformers models; greedy output the target's own tokens (equal to
transformers' generate on every prompt measured), sampling from the target's distribution."""

from engine.engine import Engine, EngineOptions
from engine.request import GenerationRequest, GenerationResult

__all__ = ["Engine", "EngineOptions", "GenerationRequest", "GenerationResult"]

"""mtp-mcp engine: speculative decoding on transformers models, output identical to the target model alone."""

from engine.engine import Engine, EngineOptions
from engine.request import GenerationRequest, GenerationResult

__all__ = ["Engine", "EngineOptions", "GenerationRequest", "GenerationResult"]

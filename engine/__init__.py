"""mtp-mcp engine: speculative decoding on transformers models."""

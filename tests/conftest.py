"""Shared fixtures. Keep each self-contained and say what it costs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtp_mcp.engine.loading import CACHE_DIR_ENV, LoadedModel, load_model

# The tiny test models do microsecond-sized matmuls, where a second intra-op thread only adds synchronisation: with
# anything else running on a 2-core machine (the stdio server subprocess, say) its spin-waits made a tiny-model test
# 20x slower (285 s vs 13 s measured). The embedded-model tests, which would gain from two, are a small part.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def mtp_mcp_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test runs with MTP_MCP_CACHE_DIR in one session tmp dir: the user's own cache is never read or written."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("mtp-mcp-cache")
        patch.setenv(CACHE_DIR_ENV, str(path))
        yield path


@pytest.fixture(scope="session")
def embedded_model(mtp_mcp_cache_dir: Path) -> LoadedModel:
    """The embedded Gemma 3 270M on CPU in float32, shared by the whole session: do not modify it.

    Float weights (quantize="none"), dequantized from the GGUF's blocks: the reference transformers' own generate
    runs on. The first use reads the GGUF's metadata into the session cache (~1 min on 2 cores); after that,
    load_model(None) anywhere in the session reads the description (~10-20 s).
    """
    return load_model(None, device="cpu", dtype="float32", quantize="none")

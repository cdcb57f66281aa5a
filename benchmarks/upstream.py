"""`mtp-mcp bench --upstream URL`: what the MCP front costs in front of an OpenAI-compatible upstream, and what the
upstream's batching gives, measured on the shipped prompts.

For each concurrency level c, the prompts are sent c at a time two ways, interleaved level by level:

    direct   straight to the upstream's /v1/completions, streamed, with the very body the backend sends
    mcp      as `generate` calls through the MCP server (in memory) over --backend openai: prompt checks, tokenizer
             calls, streaming into progress notifications and the /metrics readings included

Wall time covers the whole batch. Greedy texts of the two ways are compared (equal unless the upstream's batching
changes its arithmetic). Start vLLM with --no-enable-prefix-caching to compare the ways: otherwise the second way
finds the prompts in vLLM's prefix cache (the table shows how many prompt tokens came from it).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx2
from fastmcp import Client

from mtp_mcp.benchmarks.workloads import Prompt
from mtp_mcp.engine.openai_upstream import UpstreamBackend
from mtp_mcp.engine.request import GenerationRequest
from mtp_mcp.engine.upstream_http import server_root
from mtp_mcp.engine.upstream_metrics import ACCEPTED_TOKENS, PREFIX_CACHE_HITS, parse_counters
from mtp_mcp.server.app import create_server

DEFAULT_CONCURRENCY = (1, 4, 8)


@dataclass(frozen=True, slots=True)
class BatchRun:
    way: str  # direct or mcp
    concurrency: int
    wall_s: float
    tokens: int
    mean_call_s: float
    texts: tuple[str, ...]
    # From vLLM's /metrics over the whole batch (exact when nothing else runs on the upstream); None: not reported.
    draft_tokens_accepted: int | None
    prompt_tokens_cached: int | None  # read from vLLM's prefix cache

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


async def run_upstream_bench(backend: UpstreamBackend, prompts: list[Prompt], max_new_tokens: int,
                             levels: tuple[int, ...] = DEFAULT_CONCURRENCY) -> list[BatchRun]:
    """prompts: plain text (add_special_tokens), as generate(prompt=...) sends them."""
    runs: list[BatchRun] = []
    headers = {"Authorization": f"Bearer {backend.options.api_key}"} if backend.options.api_key else {}
    timeout = backend.options.timeout_s
    async with (Client(create_server(backend)) as client,
                httpx2.AsyncClient(base_url=backend.options.base_url.rstrip("/") + "/", timeout=timeout,
                                   headers=headers) as http,
                httpx2.AsyncClient(base_url=server_root(backend.options.base_url) + "/", timeout=timeout,
                                   headers=headers) as root):

        async def counters() -> dict[str, float | None]:
            response = await root.get("metrics")
            text = response.text if response.is_success else ""
            return {name: (parse_counters(text, backend.model, (name,)) or {}).get(name)
                    for name in (ACCEPTED_TOKENS, PREFIX_CACHE_HITS)}

        for level in levels:
            runs.append(await _batch("direct", level, prompts, lambda p: _direct(http, backend, p, max_new_tokens),
                                     counters))
            runs.append(await _batch("mcp", level, prompts, lambda p: _through_mcp(client, p, max_new_tokens),
                                     counters))
    return runs


async def _batch(way: str, level: int, prompts: list[Prompt], call, counters) -> BatchRun:
    gate = asyncio.Semaphore(level)

    async def one(prompt: Prompt):
        async with gate:
            started = time.perf_counter()
            text, tokens = await call(prompt)
            return text, tokens, time.perf_counter() - started

    before = await counters()
    started = time.perf_counter()
    results = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - started
    after = await counters()
    share = {name: None if before[name] is None or after[name] is None else int(after[name] - before[name])
             for name in before}
    return BatchRun(way, level, wall, sum(r[1] for r in results), sum(r[2] for r in results) / len(results),
                    tuple(r[0] for r in results), share[ACCEPTED_TOKENS], share[PREFIX_CACHE_HITS])


async def _direct(http: httpx2.AsyncClient, backend: UpstreamBackend, prompt: Prompt, max_new_tokens: int):
    request = GenerationRequest(prompt.text, max_new_tokens=max_new_tokens,
                                add_special_tokens=prompt.add_special_tokens)
    parts, tokens = [], 0
    async with http.stream("POST", "completions", json=backend.completion_body(request)) as response:
        response.raise_for_status()
        async for event in httpx2.EventSource(response):
            if event.data.strip() == "[DONE]":
                break
            chunk = json.loads(event.data)
            parts.extend(choice.get("text", "") for choice in chunk.get("choices", []))
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    return "".join(parts), tokens


async def _through_mcp(client: Client, prompt: Prompt, max_new_tokens: int):
    result = await client.call_tool("generate", {"prompt": prompt.text, "max_new_tokens": max_new_tokens})
    out = result.structured_content
    return out["text"], out["completion_tokens"]


def upstream_table(runs: list[BatchRun], model: str, where: str) -> str:
    lines = [f"# --backend openai in front of {model} at {where}", "",
             ("| concurrency | way | wall s | tok/s (all calls) | mean s per call | drafts accepted | prompt tokens "
              "from the upstream's prefix cache | mcp text = direct |"),
             "|---|---|---|---|---|---|---|---|"]
    direct = {run.concurrency: run for run in runs if run.way == "direct"}
    for run in runs:
        same = "" if run.way == "direct" else str(run.texts == direct[run.concurrency].texts).lower()
        accepted = "not reported" if run.draft_tokens_accepted is None else str(run.draft_tokens_accepted)
        cached = "not reported" if run.prompt_tokens_cached is None else str(run.prompt_tokens_cached)
        lines.append(f"| {run.concurrency} | {run.way} | {run.wall_s:.2f} | {run.tokens_per_second:.1f} | "
                     f"{run.mean_call_s:.2f} | {accepted} | {cached} | {same} |")
    return "\n".join(lines)

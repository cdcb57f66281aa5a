"""`mtp-mcp bench --agent-trace`: a coding agent's session of tool calls, replayed through the MCP server (in
memory) by several engine set-ups on one model, call by call interleaved, and timed as a whole.

The calls are benchmarks/workloads/agent/trace.json: a file completed again as it grows, one text summarised in three
styles, a retried generation, near-duplicate prompts, new material in between. Every set-up answers the same call
before the next call is made; greedy decoding makes their answers identical (checked), so a growing file grows the
same way for all. Each call's wall time is measured here around the MCP call: prefill, decoding, the tool's own
framing and the server included.

    plain         --drafter none, no prefix cache: plain decoding, every prompt read in full
    ngram         --drafter ngram, no prefix cache, every drafted token verified: speculation as it was per request
    suffix        the server's defaults for a model without MTP: the suffix drafter (starting with an empty memory),
                  the prefix cache, and drafts cut to what pays
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
from fastmcp import Client

from mtp_mcp.benchmarks.workloads import workloads_dir
from mtp_mcp.engine.drafters import create_drafter
from mtp_mcp.engine.engine import Engine
from mtp_mcp.engine.loading import LoadedModel
from mtp_mcp.server.app import create_server

log = logging.getLogger(__name__)

TRACE_FILE = "agent/trace.json"


@dataclass(frozen=True, slots=True)
class SetUp:
    name: str
    drafter: str
    prefix_cache: bool
    draft_when_it_pays: bool


SET_UPS = (
    SetUp("plain", "none", prefix_cache=False, draft_when_it_pays=False),
    SetUp("ngram", "ngram", prefix_cache=False, draft_when_it_pays=False),
    SetUp("suffix", "suffix", prefix_cache=True, draft_when_it_pays=True),
)


@dataclass(frozen=True, slots=True)
class CallRecord:
    call: int
    tool: str
    set_up: str
    seconds: float  # wall time of the MCP call
    prompt_tokens: int
    prompt_tokens_reused: int
    new_tokens: int
    target_passes: int
    steps_without_draft: int
    text: str


class TraceState:
    """The trace's own memory: each file's latest complete_code prefix and completion, for `grow`."""

    def __init__(self) -> None:
        self.prefixes: dict[str, str] = {}
        self.completions: dict[str, str] = {}
        self.latest_file: str | None = None

    def arguments(self, call: dict) -> tuple[str, dict]:
        """(tool, MCP arguments) for one trace entry."""
        tool = call["tool"]
        if tool == "generate":
            return tool, {"prompt": call["prompt"], "max_new_tokens": call.get("max_new_tokens", 96)}
        if tool == "summarise":
            return tool, {"text": _read(call["file"]).strip(), "style": call["style"]}
        file = call.get("file") or self.latest_file
        if "grow" in call:
            grown = self.prefixes[file] + self.completions[file]
            prefix = grown + ("" if grown.endswith("\n") else "\n") + "\n" + call["grow"] + "\n"
        else:
            source = _read(file)
            prefix = source[: source.index(call["through"] + "\n") + len(call["through"]) + 1]
            prefix = call.get("edit", "") + prefix
        self.prefixes[file], self.latest_file = prefix, file
        return tool, {"prefix": prefix, "language": "python", "max_new_tokens": call.get("max_new_tokens", 128)}

    def answered(self, tool: str, text: str) -> None:
        if tool == "complete_code":
            self.completions[self.latest_file] = text


def load_trace() -> list[dict]:
    return json.loads((workloads_dir() / TRACE_FILE).read_text(encoding="utf-8"))["calls"]


def run_agent_trace(loaded: LoadedModel, say: Callable[..., None] = log.info) -> list[CallRecord]:
    """Replays the trace once per set-up, interleaved call by call (the set-up that goes first rotates)."""
    with tempfile.TemporaryDirectory(prefix="mtp-mcp-trace-memory-") as memory_dir:
        engines = {
            set_up.name: Engine(loaded, create_drafter(set_up.drafter, loaded, None, None, Path(memory_dir)),
                                prefix_cache=set_up.prefix_cache, draft_when_it_pays=set_up.draft_when_it_pays)
            for set_up in SET_UPS
        }
        try:
            return anyio.run(_replay, engines, load_trace(), say)
        finally:
            for engine in engines.values():
                engine.close()


async def _replay(engines: dict[str, Engine], calls: list[dict], say: Callable[..., None]) -> list[CallRecord]:
    records: list[CallRecord] = []
    clients = {name: Client(create_server(engine)) for name, engine in engines.items()}
    names = list(engines)
    for client in clients.values():
        await client.__aenter__()
    try:
        state = TraceState()
        for index, call in enumerate(calls):
            tool, arguments = state.arguments(call)
            texts = set()
            order = names[index % len(names):] + names[: index % len(names)]
            for name in order:
                started = time.perf_counter()
                result = await clients[name].call_tool(tool, arguments)
                seconds = time.perf_counter() - started
                out = result.structured_content
                speculation = out["speculation"]
                records.append(CallRecord(
                    index, tool, name, seconds, out["prompt_tokens"], out["prompt_tokens_reused"],
                    out["completion_tokens"], speculation["target_passes"], speculation["steps_without_draft"],
                    out["text"]))
                texts.add(out["text"])
            if len(texts) != 1:
                raise AssertionError(f"call {index} ({tool}): the set-ups answered differently; greedy output must "
                                     "be identical")
            state.answered(tool, texts.pop())
            say("call %d/%d %s: %s", index + 1, len(calls), tool, ", ".join(
                f"{r.set_up} {r.new_tokens / r.seconds:.1f} tok/s" for r in records[-len(names):]))
    finally:
        for client in clients.values():
            await client.__aexit__(None, None, None)
    return records


def trace_table(records: list[CallRecord]) -> str:
    """Per call: tokens, and per set-up tok/s (tokens per target pass); then the whole trace."""
    set_ups = list(dict.fromkeys(r.set_up for r in records))
    calls = sorted({r.call for r in records})
    by = {(r.call, r.set_up): r for r in records}
    header = ["call", "tool", "prompt tokens", "new tokens", *(f"{s} tok/s (tokens/pass)" for s in set_ups)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for call in calls:
        first = by[(call, set_ups[0])]
        cells = [str(call + 1), first.tool, str(first.prompt_tokens), str(first.new_tokens)]
        for s in set_ups:
            r = by[(call, s)]
            cells.append(f"{r.new_tokens / r.seconds:.1f} ({r.new_tokens / max(r.target_passes, 1):.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    totals = summarise_trace(records)
    cells = ["all", "", str(sum(by[(c, set_ups[0])].prompt_tokens for c in calls)), str(totals[set_ups[0]]["new_tokens"])]
    cells += [f"{totals[s]['tokens_per_second']:.1f} ({totals[s]['tokens_per_pass']:.2f})" for s in set_ups]
    lines.append("| " + " | ".join(f"**{c}**" if c else c for c in cells) + " |")
    base = totals[set_ups[0]]["tokens_per_second"]
    lines.append("")
    lines.append("Whole trace, wall time: " + ", ".join(
        f"{s} {totals[s]['seconds']:.1f} s ({totals[s]['tokens_per_second'] / base:.2f}x {set_ups[0]})"
        for s in set_ups))
    return "\n".join(lines)


def summarise_trace(records: list[CallRecord]) -> dict[str, dict]:
    totals: dict[str, dict] = {}
    for r in records:
        t = totals.setdefault(r.set_up, {"seconds": 0.0, "new_tokens": 0, "target_passes": 0, "prompt_tokens": 0,
                                         "prompt_tokens_reused": 0, "steps_without_draft": 0})
        t["seconds"] += r.seconds
        t["new_tokens"] += r.new_tokens
        t["target_passes"] += r.target_passes
        t["prompt_tokens"] += r.prompt_tokens
        t["prompt_tokens_reused"] += r.prompt_tokens_reused
        t["steps_without_draft"] += r.steps_without_draft
    for t in totals.values():
        t["tokens_per_second"] = t["new_tokens"] / t["seconds"]
        t["tokens_per_pass"] = t["new_tokens"] / max(t["target_passes"], 1)
    return totals


def records_json(records: list[CallRecord]) -> list[dict]:
    return [asdict(r) for r in records]


def _read(name: str) -> str:
    return (workloads_dir() / name).read_text(encoding="utf-8")

"""Benchmark output: a fixed-width table for stdout, a JSON document, and a PNG plot."""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from mtp_mcp.benchmarks.runner import MethodSummary
from mtp_mcp.engine import native_ops
from mtp_mcp.benchmarks.verify_cost import VerifyCost

_NUMBER_LIST = re.compile(r"\[\s*([-+0-9.eE,\s]+?)\s*\]")


def machine_info() -> dict:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        # Which SIMD the CPU has matters as much as its name (machines here are AVX2-only or AVX-512 with VNNI),
        # and which of them the native kernels use.
        "cpu_simd": _cpu_simd(),
        "native_kernels": native_ops.instruction_set(),
    }


_SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
               "amx_tile", "amx_int8")


def _cpu_simd() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return []
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [flag for flag in _SIMD_FLAGS if flag in flags]
    return []


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def bench_table(summaries: list[MethodSummary]) -> str:
    header = ("workload", "method", "tok/s", "vs tf", "vs none", "vs llama.cpp", "tok/pass", "= ref", "peak MiB")
    rows = [
        (
            s.workload,
            s.method,
            f"{s.tokens_per_second:.2f}",
            _times(s.speedup_vs_transformers),
            _times(s.speedup_vs_engine_none),
            _times(s.speedup_vs_llama_cpp),
            f"{s.tokens_per_pass:.2f}",
            f"{s.equal_to_reference}/{s.runs}",
            f"{s.peak_memory_mib:.0f}",
        )
        for s in summaries
    ]
    return _format(header, rows)


def verify_cost_table(costs: list[VerifyCost]) -> str:
    header = ("variant", "n", "greedy step ms", "ratio to n=1", "of which greedy head ms", "full logits ms")
    rows = [
        (c.variant, str(c.positions), f"{c.forward_ms:.1f}", f"{c.ratio_to_one:.2f}", f"{c.greedy_head_ms:.1f}",
         f"{c.logits_ms:.1f}")
        for c in costs
    ]
    return _format(header, rows)


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _format(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    # Text columns left-aligned, numbers right-aligned.
    left = [i < 2 for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if l else cell.rjust(w) for cell, w, l in zip(row, widths, left)).rstrip()
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, document: dict) -> None:
    """Indented, but with lists of numbers (token ids, per-repeat rates) kept on one line each."""
    text = json.dumps(document, indent=2)
    text = _NUMBER_LIST.sub(lambda match: "[" + " ".join(match.group(1).split()) + "]", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")


def plot_bench(path: Path, summaries: list[MethodSummary], title: str) -> None:
    """Grouped bars: tokens/s per method (bars) per workload (groups)."""
    plt = _pyplot()
    workloads = list(dict.fromkeys(s.workload for s in summaries))
    methods = list(dict.fromkeys(s.method for s in summaries))
    rate = {(s.workload, s.method): s.tokens_per_second for s in summaries}
    figure, axes = plt.subplots(figsize=(8, 4), dpi=100)
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        xs = [w + (i - (len(methods) - 1) / 2) * width for w in range(len(workloads))]
        axes.bar(xs, [rate.get((workload, method), 0.0) for workload in workloads], width, label=method)
    axes.set_xticks(range(len(workloads)), workloads)
    axes.set_ylabel("tokens / s (median)")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=7, ncols=2)
    axes.grid(axis="y", alpha=0.3)
    _save(figure, path)


def plot_verify_cost(path: Path, costs: list[VerifyCost], title: str) -> None:
    """Cost of one greedy verification step over n positions relative to n = 1, one line per variant."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for variant in dict.fromkeys(c.variant for c in costs):
        points = [(c.positions, c.ratio_to_one) for c in costs if c.variant == variant]
        axes.plot(*zip(*points), marker="o", label=variant)
    axes.axhline(1.0, color="gray", linewidth=0.8)
    axes.set_xlabel("positions per forward (n = drafts + 1)")
    axes.set_ylabel("step time / step time at n = 1")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    _save(figure, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(figure)

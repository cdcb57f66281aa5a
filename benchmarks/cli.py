"""`mtp-mcp bench`: its command line. What it runs is in benchmarks/bench.py (imported when it runs: this module is
read by every `mtp-mcp` invocation, which must not import torch).

    mtp-mcp bench                   every method x workload, interleaved; table on stdout, progress on stderr
    mtp-mcp bench --verify-cost     one greedy verification step over n = 1..16 positions, as ratios to n = 1
    mtp-mcp bench --agent-trace     a coding agent's session of tool calls, replayed by plain decoding, per-request
                                    ngram and the server's defaults (suffix drafter, prefix cache)
    mtp-mcp bench --upstream URL    prompts sent to an OpenAI-compatible upstream straight and through the MCP
                                    tools (--backend openai), at several concurrency levels
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mtp_mcp.benchmarks.llama_cpp import DEFAULT_PREFIX, PINNED_VERSION
from mtp_mcp.benchmarks.workloads import VERIFY_COST_CACHE_TOKENS, VERIFY_COST_POSITIONS, WORKLOAD_NAMES

DEFAULT_REPEATS = 3
# engine/native/module.c's names, narrowest first (what this CPU runs is checked when the bench starts).
NATIVE_INSTRUCTION_SETS = ("scalar", "avx2", "avx512vnni")
DEFAULT_VERIFY_COST_TRIALS = 15


def add_bench_arguments(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The bench subcommand with its own options; the caller adds the engine's."""
    parser = commands.add_parser(
        "bench",
        help="benchmark the engine against transformers on shipped workloads",
        description="Runs transformers generate (plain and prompt lookup), this engine with every available drafter "
        "(or --drafter and none), interleaved in one process on the same prompts; prints "
        "tokens/s, speedups, tokens per target pass, equality with the transformers greedy output and peak memory.",
    )
    parser.add_argument("--workloads", type=_workload_list, default=list(WORKLOAD_NAMES),
                        help=f"comma-separated, from {','.join(WORKLOAD_NAMES)} (default: all)")
    parser.add_argument("--prompts-per-workload", type=_positive_int, default=2,
                        help="how many of each workload's shipped prompts to run (default: 2)")
    parser.add_argument("--repeats", type=_positive_int,
                        help=f"timed repeats per method and prompt (default: {DEFAULT_REPEATS}; with --verify-cost, "
                        f"trials per n, default {DEFAULT_VERIFY_COST_TRIALS})")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=128, help="per prompt (default: 128)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every run and summary as JSON")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="also write a PNG plot (needs matplotlib)")
    parser.add_argument("--verify-cost", action="store_true",
                        help=f"instead: time one greedy verification step (target forward + greedy tokens) over "
                        f"n = {', '.join(map(str, VERIFY_COST_POSITIONS))} positions "
                        f"with {VERIFY_COST_CACHE_TOKENS} tokens in the cache, stock modules vs the engine's CPU kernels")
    parser.add_argument("--agent-trace", action="store_true",
                        help="instead: replay a coding agent's session of tool calls (benchmarks/workloads/agent) "
                        "through the MCP server with plain decoding, per-request ngram without a prefix cache, and "
                        "the defaults (suffix drafter, prefix cache, drafts cut to what pays); per call and overall")
    parser.add_argument("--upstream", metavar="URL",
                        help="instead: time the shipped code and summarise prompts sent to an OpenAI-compatible "
                        "upstream (e.g. http://127.0.0.1:8000/v1) straight and through the MCP tools over "
                        "--backend openai, at each --concurrency; the key comes from $MTP_MCP_UPSTREAM_API_KEY")
    parser.add_argument("--concurrency", type=_positive_int_list, default=[1, 4, 8],
                        help="with --upstream: calls in flight at once, comma-separated (default: 1,4,8)")
    parser.add_argument("--threads", type=_positive_int,
                        help="torch CPU threads for the whole run (default: torch's, one per core); on a machine "
                        "shared with other busy processes, 1 avoids threads waiting for each other at every operation")
    parser.add_argument("--llama-cpp", type=Path, default=DEFAULT_PREFIX, metavar="PREFIX",
                        help="where node-llama-cpp is installed (npm install --prefix PREFIX "
                        f"node-llama-cpp@{PINNED_VERSION}); when it is, a GGUF model on CPU also runs through "
                        f"llama.cpp, same file and threads (default: {DEFAULT_PREFIX})")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out even when it is installed")
    parser.add_argument("--native-kernels", choices=NATIVE_INSTRUCTION_SETS, metavar="NAME",
                        help="the instruction set the native kernels run for the whole run, one of "
                        f"{', '.join(NATIVE_INSTRUCTION_SETS)} that this CPU has (default: the widest it has); "
                        "each computes the same floats, so this measures, say, an AVX2-only CPU's speed on a newer one")
    parser.add_argument("--stock-kernels", action="store_true",
                        help="run the engine on stock transformers modules, without engine.cpu_kernels")
    parser.set_defaults(run=_run_bench)
    return parser


def _run_bench(args: argparse.Namespace) -> int:
    from mtp_mcp.benchmarks.bench import run_bench

    return run_bench(args)


def _workload_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in WORKLOAD_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"'{value}' is not a list of workloads; give a comma-separated list from: {', '.join(WORKLOAD_NAMES)}"
        )
    return list(dict.fromkeys(names))


def _positive_int_list(value: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",")]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise argparse.ArgumentTypeError(f"'{value}' is not a comma-separated list of whole numbers from 1")
    return numbers


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"'{value}' is not a whole number of at least 1")
    return number

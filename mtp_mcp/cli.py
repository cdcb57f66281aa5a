"""The `mtp-mcp` command line: generate (one request), serve (the MCP server), bench (benchmarks), install (add the
server to an MCP host). It sits above the engine, the server and the benchmarks; none of them imports it.

stdout carries only results (or, for `serve` on stdio, the MCP protocol); progress and logs go to stderr.
Bad input exits with status 2 and one sentence on stderr. Only light modules are imported until a command runs, so
`--help` and a bad option answer at once; torch and transformers come with the engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mtp_mcp.benchmarks.cli import add_bench_arguments
from mtp_mcp.engine.errors import EngineError, InvalidRequestError, ModelLoadError
from mtp_mcp.engine.options import (
    DEFAULT_NUM_DRAFT_TOKENS,
    DEFAULT_SUFFIX_DRAFT_TOKENS,
    DEVICE_CHOICES,
    DRAFTER_NAMES,
    DTYPE_CHOICES,
    QUANTIZE_CHOICES,
    EngineOptions,
)
from mtp_mcp.engine.request import GenerationRequest
from mtp_mcp.server.cli import add_serve_arguments
from mtp_mcp.server.host_install import add_install_arguments

USAGE_ERROR = 2


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """The model/drafter/device options shared by every subcommand that loads an engine."""
    group = parser.add_argument_group("engine")
    group.add_argument("--model", help="local model directory, .gguf file, or hub id already in the local cache "
                       "(default: the embedded Gemma 3 270M)")
    group.add_argument("--drafter", default="auto", help=f"one of {', '.join(DRAFTER_NAMES)} (default: auto: the model's own MTP, else --draft-model, else "
                       "suffix)")
    group.add_argument("--draft-model", help="draft model for --drafter draft-model (same tokenizer as the target), or a Gemma 4 assistant for --drafter mtp")
    group.add_argument("--num-draft-tokens", type=int,
                       help=f"most tokens drafted per target pass (default: {DEFAULT_SUFFIX_DRAFT_TOKENS} for suffix, "
                       f"{DEFAULT_NUM_DRAFT_TOKENS} for the others)")
    group.add_argument("--device", default="auto", choices=list(DEVICE_CHOICES))
    group.add_argument("--dtype", default="auto", choices=list(DTYPE_CHOICES),
                       help="auto: float32 on CPU, bfloat16 on CUDA")
    group.add_argument("--quantize", default="auto", choices=list(QUANTIZE_CHOICES),
                       help="weights of the linear layers and embedding: auto (what the checkpoint is: a .gguf's "
                       "quantized blocks as stored, on CPU; float otherwise), none (float), int8 or int4 (quantized "
                       "to Q8_0 or Q4_1 at load; CPU, float32)")
    group.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                       help="do not keep the last request's cache for a next prompt that starts the same way")
    group.add_argument("--no-drafter-memory", dest="drafter_memory", action="store_false",
                       help="the suffix drafter forgets earlier requests when the server stops (by default they are "
                       "kept in the user cache directory, bounded, readable by the user alone)")
    group.add_argument("--always-draft", dest="draft_when_it_pays", action="store_false",
                       help="verify every drafted token, even when the measured cost and acceptance say that fewer "
                       "(or none) would be faster")
    group.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """The EngineOptions fields that the command's arguments give (the same names); the others keep their
    defaults (max_queued_requests: only serve has it)."""
    return EngineOptions(**{name: getattr(args, name) for name in EngineOptions.__slots__ if hasattr(args, name)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtp-mcp", description="Fast local text generation with multi-token "
                                     "prediction (speculative decoding), as a CLI and an MCP server.")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate text for one prompt")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids, "
                     "finish_reason and stats instead of streaming text")
    add_engine_options(gen)
    add_engine_options(add_serve_arguments(commands))
    add_engine_options(add_bench_arguments(commands))
    add_install_arguments(commands, add_engine_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=getattr(args, "log_level", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command != "install":  # install passes on only the engine options given, as serve arguments
        args.engine_options = engine_options(args)
    try:
        return args.run(args) if hasattr(args, "run") else run_generate(args)
    except (InvalidRequestError, ModelLoadError) as error:
        print(f"mtp-mcp: {error}", file=sys.stderr)
        return USAGE_ERROR
    except EngineError as error:
        print(f"mtp-mcp: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run_generate(args: argparse.Namespace) -> int:
    # Validate the request before spending a minute loading the model.
    request = GenerationRequest(
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    from mtp_mcp.engine.engine import Engine

    engine = Engine.load(args.engine_options)
    on_text = None if args.json else (lambda text, _: print(text, end="", flush=True))
    handle = engine.submit(request, on_text)
    try:
        result = handle.result()
        if args.json:
            json.dump(result.to_dict(), sys.stdout)
            sys.stdout.write("\n")
        else:
            print()
            stats = result.stats
            logging.getLogger("mtp-mcp").info(
                "%d tokens, finish %s, %.2f tok/s, %.2f tokens per target pass (drafter %s)",
                stats.new_tokens, result.finish_reason, stats.tokens_per_second, stats.mean_tokens_per_pass,
                stats.drafter,
            )
    finally:
        # Ctrl-C (KeyboardInterrupt) lands here too: stop the generation within a step instead of finishing it.
        handle.cancel()
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

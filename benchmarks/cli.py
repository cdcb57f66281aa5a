"""`mtp-mcp bench`: the command line of the benchmarks.

    mtp-mcp bench                   every method x workload, interleaved; table on stdout, progress on stderr
    mtp-mcp bench --verify-cost     one greedy verification step over n = 1..16 positions, as ratios to n = 1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import logging
import os
from pathlib import Path

import torch

from benchmarks.llama_cpp import DEFAULT_PREFIX, PINNED_VERSION, LlamaCppMethod, llama_cpp_missing
from benchmarks.memory import PeakMemory
from benchmarks.methods import TRANSFORMERS_LOOKUP_TOKENS, EngineMethod, Method, TransformersMethod
from benchmarks.report import (
    bench_table,
    machine_info,
    plot_bench,
    plot_verify_cost,
    verify_cost_table,
    write_json,
)
from benchmarks.runner import run_interleaved, summarise_runs
from benchmarks.verify_cost import CACHE_TOKENS, POSITIONS, measure_verify_cost
from benchmarks.workloads import WORKLOAD_NAMES, load_prompts
from engine.cli import add_engine_options
from engine.cpu_kernels import use_cpu_kernels
from engine.drafters import DRAFTER_NAMES, Drafter, create_drafter
from engine.drafters.gemma4_assistant import is_gemma4_assistant
from engine.errors import InvalidRequestError, ModelLoadError
from engine.loading import LoadedModel, load_model, resolve_quantize
from engine.target import TargetModel

log = logging.getLogger("mtp-mcp.bench")

DEFAULT_REPEATS = 3
DEFAULT_VERIFY_COST_TRIALS = 15


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
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
                        f"n = {', '.join(map(str, POSITIONS))} positions "
                        f"with {CACHE_TOKENS} tokens in the cache, stock modules vs the engine's CPU kernels")
    parser.add_argument("--threads", type=_positive_int,
                        help="torch CPU threads for the whole run (default: torch's, one per core); on a machine "
                        "shared with other busy processes, 1 avoids threads waiting for each other at every operation")
    parser.add_argument("--llama-cpp", type=Path, default=DEFAULT_PREFIX, metavar="PREFIX",
                        help="where node-llama-cpp is installed (npm install --prefix PREFIX "
                        f"node-llama-cpp@{PINNED_VERSION}); when it is, a GGUF model on CPU also runs through "
                        f"llama.cpp, same file and threads (default: {DEFAULT_PREFIX})")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out even when it is installed")
    parser.add_argument("--stock-kernels", action="store_true",
                        help="run the engine on stock transformers modules, without engine.cpu_kernels")
    add_engine_options(parser)
    parser.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    _check_optional_packages(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    # transformers runs the float model (a GGUF dequantized): the reference every engine row is checked against.
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, quantize="none")
    memory = PeakMemory(loaded.device)
    meta = machine_info() | {
        "arguments": {name: value if isinstance(value, int | float | list | None) else str(value)
                      for name, value in vars(args).items() if name not in ("run", "command")},
        "model": loaded.name,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "load_average_before": os.getloadavg(),
        "peak_memory_resettable": memory.resettable,
    }
    if args.verify_cost:
        return _run_verify_cost(args, loaded, meta)

    prompts = load_prompts(args.workloads, loaded.tokenizer, args.prompts_per_workload)
    _check_prompts_fit(prompts, loaded, args.max_new_tokens)
    repeats = args.repeats or DEFAULT_REPEATS
    engine_loaded = _engine_model(args, loaded)
    drafters = _drafters(args, engine_loaded)
    methods: list[Method] = [TransformersMethod(loaded, None), TransformersMethod(loaded, TRANSFORMERS_LOOKUP_TOKENS)]
    methods += [EngineMethod(engine_loaded, drafter) for drafter in drafters]
    llama_cpp = _llama_cpp_method(args, loaded)
    if llama_cpp is not None:
        methods.append(llama_cpp)
    names = [m.name for m in methods]
    log.info("benchmarking %s on %d prompts (%s), %d repeats, %d new tokens each", ", ".join(names), len(prompts),
             ", ".join(args.workloads), repeats, args.max_new_tokens)
    try:
        records = run_interleaved(methods, prompts, repeats, args.max_new_tokens, memory)
    finally:
        for method in methods:
            method.close()
    summaries = summarise_runs(records, names, args.workloads)
    print(bench_table(summaries))
    meta |= {
        "load_average_after": os.getloadavg(),
        "engine_kernels": "stock" if args.stock_kernels else "engine.cpu_kernels",
        "engine_weights": engine_loaded.quantization,
        "num_draft_tokens": args.num_draft_tokens,
        "transformers_prompt_lookup_num_tokens": TRANSFORMERS_LOOKUP_TOKENS,
        "max_new_tokens": args.max_new_tokens,
        "llama_cpp": None if llama_cpp is None else {"node_llama_cpp": llama_cpp.version,
                                                      "threads": llama_cpp.threads},
        "repeats": repeats,
        "prompts": [{"workload": p.workload, "name": p.name} for p in prompts],
    }
    if args.json:
        write_json(args.json, {
            "meta": meta,
            "summaries": [s.to_dict() for s in summaries],
            "runs": [dataclasses.asdict(r) for r in records],
        })
    if args.plot:
        plot_bench(args.plot, summaries, f"{_setup(meta)}, {args.max_new_tokens} new tokens\n{meta['processor']}")
    return 0


def _engine_model(args: argparse.Namespace, loaded: LoadedModel) -> LoadedModel:
    """The model the engine rows run: the float reference with the CPU kernels, or (--quantize int8, or auto for a
    GGUF on CPU) a second copy with int8 weights, whose greedy tokens then agree with the reference's rather than
    equal them."""
    return _int8_copy(args, loaded) or (loaded if args.stock_kernels else _with_cpu_kernels(loaded))


def _int8_copy(args: argparse.Namespace, loaded: LoadedModel) -> LoadedModel | None:
    """The model with int8 weights, CPU kernels applied, when --quantize asks for them (auto: a GGUF on CPU)."""
    if not resolve_quantize(args.quantize, loaded.device, loaded.dtype, is_gguf=loaded.path.endswith(".gguf")):
        return None
    int8_loaded = load_model(args.model, device=args.device, dtype=args.dtype, quantize="int8")
    use_cpu_kernels(int8_loaded.model)
    return int8_loaded


def _run_verify_cost(args: argparse.Namespace, loaded: LoadedModel, meta: dict) -> int:
    # Real tokens, so attention sees a realistic cache: the first code prompt, repeated if it is short.
    text = load_prompts(["code"], loaded.tokenizer, 1)[0].text
    token_ids = loaded.tokenizer(text)["input_ids"]
    needed = CACHE_TOKENS + max(POSITIONS)
    token_ids = (token_ids * (needed // len(token_ids) + 1))[:needed]
    targets = {"stock": TargetModel(loaded.model)}
    if not args.stock_kernels:
        targets["engine"] = TargetModel(_with_cpu_kernels(loaded).model)
        if (int8_loaded := _int8_copy(args, loaded)) is not None:
            targets["engine-int8"] = TargetModel(int8_loaded.model)
    costs = measure_verify_cost(targets, token_ids, args.repeats or DEFAULT_VERIFY_COST_TRIALS)
    print(verify_cost_table(costs))
    if args.json:
        document = {"meta": meta | {"cache_tokens": CACHE_TOKENS}, "verify_cost": [c.to_dict() for c in costs]}
        write_json(args.json, document)
    if args.plot:
        plot_verify_cost(args.plot, costs, f"{_setup(meta)}, {CACHE_TOKENS}-token cache\n{meta['processor']}")
    return 0


def _setup(meta: dict) -> str:
    threads = meta["torch_threads"]
    if meta["device"] != "cpu":
        return f"{meta['model']}, {meta['device']} {meta['dtype']}"
    return f"{meta['model']}, {meta['device']} {meta['dtype']}, {threads} thread{'s' if threads > 1 else ''}"


def _with_cpu_kernels(loaded: LoadedModel) -> LoadedModel:
    """The engine's view of the model: what Engine.load runs (engine.cpu_kernels applied), on a copy of the module
    tree that shares every weight tensor with `loaded`, so transformers keeps running its stock modules and the
    weights are in memory once."""
    shared = {id(tensor): tensor for tensor in (*loaded.model.parameters(), *loaded.model.buffers())}
    model = copy.deepcopy(loaded.model, memo=shared)
    use_cpu_kernels(model)
    return dataclasses.replace(loaded, model=model)


def _drafters(args: argparse.Namespace, loaded: LoadedModel) -> list[Drafter]:
    """`none` always (the engine baseline); with --drafter auto every other drafter this model can use, else the
    one asked for. draft-model runs only when --draft-model names one."""
    if args.drafter == "auto":
        names = [n for n in DRAFTER_NAMES if n != "auto" and (n != "draft-model" or args.draft_model)]
    else:
        names = list(dict.fromkeys(["none", args.drafter]))
    drafters = []
    for name in names:
        try:
            # A Gemma 4 assistant given as --draft-model is the mtp drafter's; an ordinary one the draft-model's.
            wants_draft_model = name == "draft-model" or (
                name == "mtp" and args.draft_model is not None and is_gemma4_assistant(args.draft_model))
            drafters.append(create_drafter(name, loaded, args.draft_model if wants_draft_model else None,
                                           args.num_draft_tokens))
        except (InvalidRequestError, ModelLoadError) as error:
            if args.drafter != "auto":
                raise
            log.info("skipping drafter %s: %s", name, error)
    return drafters


def _llama_cpp_method(args: argparse.Namespace, loaded: LoadedModel) -> LlamaCppMethod | None:
    """llama.cpp on the same GGUF with the same thread count, when the model is a GGUF on CPU and node-llama-cpp is
    installed; otherwise None, with one line saying why."""
    if args.no_llama_cpp:
        return None
    if not (loaded.path.endswith(".gguf") and loaded.device.type == "cpu"):
        log.info("llama.cpp not compared: it runs GGUF files on CPU here, and the model is %s on %s", loaded.name,
                 loaded.device)
        return None
    missing = llama_cpp_missing(args.llama_cpp)
    if missing is not None:
        log.info("llama.cpp not compared: %s", missing)
        return None
    return LlamaCppMethod(Path(loaded.path), args.llama_cpp, torch.get_num_threads())


def _check_optional_packages(args: argparse.Namespace) -> None:
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise InvalidRequestError("--plot needs matplotlib, which is not installed; pip install 'mtp-mcp[bench]'")


def _check_prompts_fit(prompts: list, loaded: LoadedModel, max_new_tokens: int) -> None:
    for prompt in prompts:
        length = len(loaded.tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"])
        if length >= loaded.context_length:
            raise InvalidRequestError(
                f"the {prompt.workload} prompt '{prompt.name}' is {length} tokens, beyond the model's context of "
                f"{loaded.context_length} tokens; leave out the {prompt.workload} workload for this model"
            )
        if length + max_new_tokens > loaded.context_length:
            raise InvalidRequestError(
                f"the {prompt.workload} prompt '{prompt.name}' ({length} tokens) plus --max-new-tokens "
                f"{max_new_tokens} exceeds the model's context of {loaded.context_length} tokens; ask for at most "
                f"{loaded.context_length - length} new tokens"
            )


def _workload_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in WORKLOAD_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"'{value}' is not a list of workloads; give a comma-separated list from: {', '.join(WORKLOAD_NAMES)}"
        )
    return list(dict.fromkeys(names))


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"'{value}' is not a whole number of at least 1")
    return number

"""`mtp-mcp bench`: this engine against transformers (and llama.cpp) on the shipped workloads, interleaved in one
process; `--verify-cost` instead times one greedy verification step over n positions. The command line is in
benchmarks/cli.py."""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import importlib.util
import logging
import os
from pathlib import Path

import torch

from mtp_mcp.benchmarks.agent_trace import records_json, run_agent_trace, summarise_trace, trace_table
from mtp_mcp.benchmarks.cli import DEFAULT_REPEATS, DEFAULT_VERIFY_COST_TRIALS
from mtp_mcp.benchmarks.llama_cpp import LlamaCppMethod, llama_cpp_missing
from mtp_mcp.benchmarks.memory import PeakMemory
from mtp_mcp.benchmarks.methods import TRANSFORMERS_LOOKUP_TOKENS, EngineMethod, Method, TransformersMethod
from mtp_mcp.benchmarks.report import (
    bench_table,
    machine_info,
    plot_bench,
    plot_verify_cost,
    verify_cost_table,
    write_json,
)
from mtp_mcp.benchmarks.runner import run_interleaved, summarise_runs
from mtp_mcp.benchmarks.upstream import run_upstream_bench, upstream_table
from mtp_mcp.benchmarks.verify_cost import measure_verify_cost
from mtp_mcp.benchmarks.workloads import VERIFY_COST_CACHE_TOKENS, VERIFY_COST_POSITIONS, load_prompts
from mtp_mcp.engine import native_ops
from mtp_mcp.engine.cpu_kernels import use_cpu_kernels
from mtp_mcp.engine.drafters import Drafter, create_drafter
from mtp_mcp.engine.drafters.gemma4_assistant import is_gemma4_assistant
from mtp_mcp.engine.drafters.suffix import SuffixDrafter
from mtp_mcp.engine.drafters.suffix_index import GlobalIndex
from mtp_mcp.engine.errors import InvalidRequestError, ModelLoadError
from mtp_mcp.engine.loading import LoadedModel, load_model
from mtp_mcp.engine.openai_upstream import UpstreamBackend
from mtp_mcp.engine.options import DEFAULT_SUFFIX_DRAFT_TOKENS, DRAFTER_NAMES, UPSTREAM_KEY_ENV, UpstreamOptions
from mtp_mcp.engine.target import TargetModel

log = logging.getLogger("mtp-mcp.bench")

def run_bench(args: argparse.Namespace) -> int:
    _check_optional_packages(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.native_kernels:
        _use_native_kernels(args.native_kernels)
    if args.agent_trace:
        return _run_agent_trace(args)
    if args.upstream:
        return _run_upstream(args)
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
        "engine_kernels": "stock" if args.stock_kernels else "mtp_mcp.engine.cpu_kernels",
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
    """The model the engine rows run: the float reference with the CPU kernels, or (--quantize int8 or int4, or auto
    for a quantized GGUF on CPU) a second copy with quantized weights, whose greedy tokens then agree with the
    reference's rather than equal them."""
    return _quantized_copy(args, loaded) or (loaded if args.stock_kernels else _with_cpu_kernels(loaded))


def _quantized_copy(args: argparse.Namespace, loaded: LoadedModel) -> LoadedModel | None:
    """The model with quantized weights, CPU kernels applied, when --quantize asks for them (auto: a quantized
    GGUF on CPU, its blocks as stored)."""
    if args.quantize == "none" or (args.quantize == "auto" and not loaded.path.endswith(".gguf")):
        return None
    quantized = load_model(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    if quantized.quantization == "none":
        return None
    use_cpu_kernels(quantized.model)
    return quantized


def _run_verify_cost(args: argparse.Namespace, loaded: LoadedModel, meta: dict) -> int:
    # Real tokens, so attention sees a realistic cache: the first code prompt, repeated if it is short.
    text = load_prompts(["code"], loaded.tokenizer, 1)[0].text
    token_ids = loaded.tokenizer(text)["input_ids"]
    needed = VERIFY_COST_CACHE_TOKENS + max(VERIFY_COST_POSITIONS)
    token_ids = (token_ids * (needed // len(token_ids) + 1))[:needed]
    targets = {"stock": TargetModel(loaded.model)}
    if not args.stock_kernels:
        targets["engine"] = TargetModel(_with_cpu_kernels(loaded).model)
        if (quantized := _quantized_copy(args, loaded)) is not None:
            targets[f"engine-{quantized.quantization}"] = TargetModel(quantized.model)
    costs = measure_verify_cost(targets, token_ids, args.repeats or DEFAULT_VERIFY_COST_TRIALS)
    print(verify_cost_table(costs))
    if args.json:
        document = {"meta": meta | {"cache_tokens": VERIFY_COST_CACHE_TOKENS}, "verify_cost": [c.to_dict() for c in costs]}
        write_json(args.json, document)
    if args.plot:
        plot_verify_cost(args.plot, costs, f"{_setup(meta)}, {VERIFY_COST_CACHE_TOKENS}-token cache\n{meta['processor']}")
    return 0


def _run_agent_trace(args: argparse.Namespace) -> int:
    """The engine's model only (what the server would load), no transformers reference: the set-ups are checked
    against each other, and plain decoding against transformers in the other benchmarks."""
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
    use_cpu_kernels(loaded.model)
    meta = machine_info() | {
        "model": loaded.name, "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch."),
        "weights": loaded.quantization, "load_average_before": os.getloadavg(),
    }
    records = run_agent_trace(loaded)
    print(trace_table(records))
    if args.json:
        write_json(args.json, {"meta": meta | {"load_average_after": os.getloadavg()},
                               "summary": summarise_trace(records), "calls": records_json(records)})
    return 0


def _run_upstream(args: argparse.Namespace) -> int:
    """No model here: the upstream generates; its own tokenizer renders the prompts."""
    options = UpstreamOptions(base_url=args.upstream, api_key=os.environ.get(UPSTREAM_KEY_ENV) or None)
    backend = UpstreamBackend.load(options, start_wait_s=0)
    try:
        workloads = [w for w in args.workloads if w != "chat"]  # plain prompts only: generate(prompt=...) sends those
        prompts = load_prompts(workloads, backend.tokenizer, args.prompts_per_workload)
        runs = asyncio.run(run_upstream_bench(backend, prompts, args.max_new_tokens, tuple(args.concurrency)))
    finally:
        backend.close()
    print(upstream_table(runs, backend.model, backend.where))
    if args.json:
        meta = machine_info() | {"upstream": backend.info, "prompts": len(prompts),
                                 "max_new_tokens": args.max_new_tokens}
        write_json(args.json, {"meta": meta, "runs": [dataclasses.asdict(run) | {"tokens_per_second":
                                                                                  run.tokens_per_second}
                                                       for run in runs]})
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
            if name == "suffix":
                # Each prompt runs several times here: a memory across requests would turn repeats into retries.
                # These rows draft from the prompt alone; --agent-trace measures the memory.
                drafters.append(SuffixDrafter(args.num_draft_tokens or DEFAULT_SUFFIX_DRAFT_TOKENS, GlobalIndex(0)))
                continue
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


def _use_native_kernels(name: str) -> None:
    available = native_ops.instruction_sets()
    if name not in available:
        raise InvalidRequestError(f"--native-kernels {name} is not available on this CPU; it runs "
                                  f"{', '.join(available)}")
    native_ops.use_instruction_set(name)


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

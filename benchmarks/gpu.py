"""GPU readiness: the engine itself on an accelerator, without a network or a downloaded model.

    python -m mtp_mcp.benchmarks.gpu            (benchmarks/gpu.sh runs this; --tiny runs a toy shape on CPU for tests)

A random-weight model of a realistic shape (Qwen3-0.6B: 28 layers, hidden 1024, GQA 16/8, vocab 151936) is saved
as a checkpoint and loaded by the engine as the server loads one (engine.loading, bfloat16 on CUDA: the quantized
CPU kernels do not apply there). Then:
- the shipped code and summarise prompts (the workloads of `mtp-mcp bench`) go through `Engine` with the none,
  ngram and suffix drafters, wall time with the prefill, tokens per pass, and whether every drafter's tokens equal
  plain decoding's: what the server does on this GPU;
- an oracle drafter at set acceptance rates goes through `Engine` too (random weights give real drafters nothing
  to find), for the speedup over plain decoding as a function of acceptance;
- beside them, a static KV cache with each step shape (1 position for plain decoding, k+1 for verification)
  captured once as a CUDA graph, so its steps carry no Python or kernel-launch overhead: the bound a
  graph-captured engine step could reach, and the verify-cost curve.
The real embedded model cannot be used there: the device machine has no network and takes at most 64 MiB of files,
and the model's package is 253 MB.

The weights are random, but the next token is made unambiguous so that greedy verification is well defined:
embeddings are scaled up and the layers' residual writes down (the residual stream stays close to the input token's
embedding) and the output layer is the embedding table permuted, so the target's greedy next token is
successor[input token], with a margin of ~sqrt(hidden) standard deviations over the rest of the vocabulary.
The compute per step is exactly that of the real shape. The prompts are tokenized word by word (each distinct word
of the shipped workloads a token), so their lengths are those of real text.

An oracle drafter knows the target's greedy continuation (from the plain run) and proposes each of its k drafts
correctly with probability p (else a wrong token). Expected tokens per target pass: (1 - p^(k+1)) / (1 - p).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, StaticCache

from mtp_mcp.benchmarks.methods import EngineMethod, synchronize
from mtp_mcp.benchmarks.workloads import VERIFY_COST_POSITIONS, load_prompts, workloads_dir
from mtp_mcp.engine.drafters import create_drafter
from mtp_mcp.engine.drafters.base import Draft, DraftContext
from mtp_mcp.engine.engine import Engine
from mtp_mcp.engine.loading import LoadedModel, load_model
from mtp_mcp.engine.request import GenerationRequest

ACCEPTANCE_RATES = (0.5, 0.6, 0.7, 0.8, 0.9)
DRAFT_LENGTHS = (2, 4, 8)
WORKLOADS = ("code", "summarise")
ENGINE_DRAFTERS = ("none", "ngram", "suffix")
PROMPT_TOKENS = 128
# Embeddings scaled up and the layers' writes to the residual stream (o_proj, down_proj) scaled down, so that 28
# random layers only perturb the input token's embedding (values, not shapes: the compute is unchanged).
EMBEDDING_SCALE = 20.0
RESIDUAL_WRITE_SCALE = 0.01

SHAPES = {
    # Qwen3-0.6B's published config (output layer untied here so it can be the permuted embedding).
    "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}


@dataclass(frozen=True, slots=True)
class SpeculationResult:
    acceptance: float  # p: probability that each oracle draft is right
    draft_tokens: int  # k
    tokens_per_pass: float
    expected_tokens_per_pass: float  # (1 - p^(k+1)) / (1 - p)
    tokens_per_second: float
    speedup: float  # over plain decoding with the same static cache and graphs
    equal_to_plain: bool
    engine_tokens_per_second: float  # the same oracle through the engine's decode loop
    engine_speedup: float  # over the engine's plain decoding
    engine_equal_to_plain: bool


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[Qwen3ForCausalLM, list[int]]:
    """The random model and its successor table (successor[t] is the greedy token after t)."""
    config = Qwen3Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype).eval().requires_grad_(False)
    embedding = model.get_input_embeddings().weight
    embedding.mul_(EMBEDDING_SCALE)
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.mul_(RESIDUAL_WRITE_SCALE)
        layer.mlp.down_proj.weight.mul_(RESIDUAL_WRITE_SCALE)
    successor = torch.randperm(config.vocab_size, device=device)
    predecessor = torch.empty_like(successor)
    predecessor[successor] = torch.arange(config.vocab_size, device=device)
    # logit_j = E[predecessor[j]] . h, with h ~ E[t] after the final norm: largest for j = successor[t].
    model.get_output_embeddings().weight.copy_(embedding[predecessor])
    return model, successor.tolist()


class StaticDecoder:
    """One sequence in a static cache; step(tokens) appends them and returns the greedy token after each.

    Rolling back rejected drafts moves the write position back; the stale slots are masked until overwritten.
    The attention mask is built here from the positions (key slot j visible to query i iff j <= position_i), so the
    captured graph holds no host-side mask logic.
    """

    def __init__(self, model: Qwen3ForCausalLM, max_length: int):
        self.model = model
        self.device = model.device
        self.cache = StaticCache(config=model.config, max_cache_len=max_length)
        self.position = 0  # tokens in the cache
        self._slots = torch.arange(max_length, device=self.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.inference_mode()
    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [1, n] -> greedy next tokens [n]
        visible = (self._slots[None, :] <= positions[0, :, None])[None, None]  # [1, 1, n, max_length]
        logits = self.model(input_ids=input_ids, position_ids=positions, cache=self.cache, use_cache=True,
                            attention_mask={"full_attention": visible}).logits
        return logits[0].argmax(dim=-1)

    def capture(self, sizes: set[int]) -> str:
        """Records a CUDA graph for each step size; returns "on", or "off (why)" when a capture failed (e.g. an op
        that synchronises with the host), in which case every step runs eagerly."""
        try:
            for n in sorted(sizes):
                self._capture(n)
        except RuntimeError as error:
            self._graphs.clear()
            print(f"gpu bench: CUDA graph capture failed, running eager: {error}", file=sys.stderr)
            return f"off (capture failed: {str(error).splitlines()[0]})"
        return "on"

    @torch.inference_mode()
    def _capture(self, n: int) -> None:
        """Records the n-position step (warm-up runs write into slots that are later overwritten)."""
        input_ids = torch.zeros(1, n, dtype=torch.long, device=self.device)
        positions = torch.arange(n, device=self.device)[None]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(input_ids, positions)
                self.cache.crop(-n)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records without running: the cache does not move
            output = self._forward(input_ids, positions)
        self._graphs[n] = (graph, input_ids, positions, output)

    def reset(self) -> None:
        self.rollback(self.position)

    def rollback(self, n: int) -> None:
        if n:
            self.cache.crop(-n)
            self.position -= n

    def step(self, tokens: list[int]) -> list[int]:
        n = len(tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        positions = torch.arange(self.position, self.position + n, device=self.device)[None]
        if n in self._graphs:
            graph, static_ids, static_positions, output = self._graphs[n]
            static_ids.copy_(ids)
            static_positions.copy_(positions)
            graph.replay()
        else:
            output = self._forward(ids, positions)
        self.position += n
        return output.tolist()


def decode_plain(decoder: StaticDecoder, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    decoder.reset()
    decoder.step(prompt[:-1])  # prefill (not timed: both methods do the same one)
    synchronize(decoder.device)
    started = time.perf_counter()
    generated = [prompt[-1]]
    while len(generated) <= new_tokens:
        generated.append(decoder.step([generated[-1]])[0])
    return generated[1:], time.perf_counter() - started


def decode_speculative(
    decoder: StaticDecoder,
    prompt: list[int],
    new_tokens: int,
    reference: list[int],
    p: float,
    k: int,
    rng: random.Random,
) -> tuple[list[int], float, int]:
    """Greedy speculative decoding with the oracle drafter; returns (tokens, seconds, target passes)."""
    vocab_size = decoder.model.config.vocab_size
    decoder.reset()
    decoder.step(prompt[:-1])
    synchronize(decoder.device)
    started = time.perf_counter()
    generated: list[int] = []
    last, passes = prompt[-1], 0
    while len(generated) < new_tokens:
        # The oracle: draft i is the true token with probability p, else a wrong one.
        truth = reference[len(generated) : len(generated) + k]
        drafts = [t if rng.random() < p else (t + 1) % vocab_size for t in truth]
        drafts += [0] * (k - len(drafts))  # past the reference's end: pad so every pass has k+1 positions
        targets = decoder.step([last, *drafts])
        passes += 1
        accepted = 0
        while accepted < k and drafts[accepted] == targets[accepted]:
            accepted += 1
        decoder.rollback(k - accepted)
        generated += [*drafts[:accepted], targets[accepted]]
        last = generated[-1]
    return generated[:new_tokens], time.perf_counter() - started, passes


class OracleDrafter:
    """An engine drafter (engine.drafters.base.Drafter) that knows the target's greedy continuation and proposes
    each of its k drafts correctly with probability p, else a wrong token."""

    name = "oracle"
    reads_prompt_hidden_states = False

    def __init__(self, reference: list[int], p: float, k: int, vocab_size: int, rng: random.Random):
        self._reference, self._p, self._k, self._vocab_size, self._rng = reference, p, k, vocab_size, rng
        self._prompt_length = 0

    def begin(self, prompt_ids: list[int], sampling, generator) -> None:
        self._prompt_length = len(prompt_ids)

    def propose(self, context: DraftContext) -> Draft:
        done = len(context.token_ids) - self._prompt_length
        truth = self._reference[done : done + min(self._k, context.max_tokens)]
        return Draft([t if self._rng.random() < self._p else (t + 1) % self._vocab_size for t in truth])

    def observe(self, proposed: int, accepted: int) -> None:
        pass

    def release(self) -> None:
        pass

    def remember(self, token_ids: list[int]) -> None:
        pass


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Token i is the i-th distinct word of the shipped workloads (split at whitespace), then fillers <w i> up to the
    vocabulary size: real prompts keep their lengths, and random weights have no vocabulary of their own."""
    words: dict[str, int] = {"<unk>": 0}
    for path in sorted(workloads_dir().rglob("*")):
        if path.is_file() and path.suffix in (".py", ".txt"):
            for word in re.findall(r"\S+", path.read_text(encoding="utf-8")):
                if len(words) < vocab_size:
                    words.setdefault(word, len(words))
    for i in range(len(words), vocab_size):
        words[f"<w{i}>"] = i
    backend = Tokenizer(WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def request_tokens(engine: Engine, prompt: list[int], new_tokens: int, drafter=None) -> tuple[list[int], float, int]:
    """One greedy request of token ids through the engine (its worker thread, prefill included); returns the
    tokens, the seconds and the target passes."""
    tokenizer = engine.tokenizer
    request = GenerationRequest(prompt=tokenizer.decode(prompt), max_new_tokens=new_tokens, add_special_tokens=False)
    result = engine.generate(request)
    return result.token_ids, result.stats.total_time_s, result.stats.target_passes


def engine_on_workloads(loaded: LoadedModel, new_tokens: int, prompts_per_workload: int) -> dict:
    """Each drafter through Engine on the shipped prompts, as `mtp-mcp bench` runs them: per drafter and workload
    tok/s (prefill included) and tokens per pass, and whether every prompt's tokens equal plain decoding's."""
    prompts = load_prompts(list(WORKLOADS), loaded.tokenizer, prompts_per_workload)
    rows, plain_tokens = [], {}
    for name in ENGINE_DRAFTERS:
        method = EngineMethod(loaded, create_drafter(name, loaded, None, None, None))
        try:
            method.run(prompts[0], 8)  # warm-up
            runs = [(prompt, method.run(prompt, new_tokens)) for prompt in prompts]
        finally:
            method.close()
        for prompt, run in runs:
            plain_tokens.setdefault(prompt.name, run.token_ids)
        for workload in WORKLOADS:
            mine = [run for prompt, run in runs if prompt.workload == workload]
            rows.append({
                "drafter": name, "workload": workload, "prompts": len(mine),
                "tokens_per_second": sum(len(r.token_ids) for r in mine) / sum(r.seconds for r in mine),
                "tokens_per_pass": sum(len(r.token_ids) for r in mine) / sum(r.target_passes for r in mine),
                "equal_to_plain": all(run.token_ids == plain_tokens[prompt.name] for prompt, run in runs
                                      if prompt.workload == workload),
            })
    return {"prompt_tokens": {p.name: len(loaded.tokenizer(p.text)["input_ids"]) for p in prompts}, "rows": rows}


def verify_cost(decoder: StaticDecoder, prompt: list[int], trials: int) -> dict[int, float]:
    """Median ms of one step over n positions after the prompt is cached."""
    decoder.reset()
    decoder.step(prompt)
    times: dict[int, list[float]] = {n: [] for n in VERIFY_COST_POSITIONS}
    for _ in range(trials):
        for n in VERIFY_COST_POSITIONS:
            synchronize(decoder.device)
            started = time.perf_counter()
            decoder.step(prompt[:n])
            synchronize(decoder.device)
            times[n].append((time.perf_counter() - started) * 1e3)
            decoder.rollback(n)
    return {n: statistics.median(ms) for n, ms in times.items()}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    started = time.perf_counter()
    model, successor = build_model(args.shape, device, dtype, args.seed)
    longest_step = max(args.new_tokens + max(DRAFT_LENGTHS) + 1, max(VERIFY_COST_POSITIONS))
    use_graphs = device.type == "cuda" and not args.no_graphs
    decoder = StaticDecoder(model, PROMPT_TOKENS + longest_step)
    rng = random.Random(args.seed)
    prompt = [rng.randrange(model.config.vocab_size) for _ in range(PROMPT_TOKENS)]
    graphs = "off"
    if use_graphs:
        graphs = decoder.capture({1, *VERIFY_COST_POSITIONS, *(k + 1 for k in DRAFT_LENGTHS)})

    costs = verify_cost(decoder, prompt, args.repeats * 5)
    plain_runs = [decode_plain(decoder, prompt, args.new_tokens) for _ in range(args.repeats)]
    reference = plain_runs[0][0]
    # The model was built so that greedy decoding follows the successor table; check it, as the oracle relies on it.
    follows_successor = all(b == successor[a] for a, b in zip([prompt[-1], *reference], reference))
    plain_seconds = statistics.median(seconds for _, seconds in plain_runs)

    tokenizer = word_tokenizer(model.config.vocab_size)
    with tempfile.TemporaryDirectory(prefix="mtp-mcp-gpu-") as folder:
        # Saved and loaded as the server loads a checkpoint (engine.loading): dtype, device, context length.
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        loaded = load_model(folder, device=args.device, dtype=args.dtype, progress=False)
    workloads = engine_on_workloads(loaded, args.new_tokens, args.prompts_per_workload)
    engine = Engine(loaded, create_drafter("none", loaded, None, None, None), prefix_cache=False)
    try:
        request_tokens(engine, prompt, 8)  # warm-up
        engine_plain = [request_tokens(engine, prompt, args.new_tokens) for _ in range(args.repeats)]
    finally:
        engine.close()
    engine_plain_seconds = statistics.median(seconds for _, seconds, _ in engine_plain)
    engine_reference = engine_plain[0][0]

    results = []
    for p in ACCEPTANCE_RATES:
        for k in DRAFT_LENGTHS:
            runs = [decode_speculative(decoder, prompt, args.new_tokens, reference, p, k, rng)
                    for _ in range(args.repeats)]
            seconds = statistics.median(r[1] for r in runs)
            oracle = Engine(loaded, OracleDrafter(engine_reference, p, k, model.config.vocab_size, rng),
                            prefix_cache=False, draft_when_it_pays=False)
            try:
                engine_runs = [request_tokens(oracle, prompt, args.new_tokens) for _ in range(args.repeats)]
            finally:
                oracle.close()
            engine_seconds = statistics.median(r[1] for r in engine_runs)
            results.append(SpeculationResult(
                acceptance=p,
                draft_tokens=k,
                tokens_per_pass=sum(len(r[0]) for r in runs) / sum(r[2] for r in runs),
                expected_tokens_per_pass=(1 - p ** (k + 1)) / (1 - p),
                tokens_per_second=args.new_tokens / seconds,
                speedup=plain_seconds / seconds,
                equal_to_plain=all(r[0] == reference for r in runs),
                engine_tokens_per_second=args.new_tokens / engine_seconds,
                engine_speedup=engine_plain_seconds / engine_seconds,
                engine_equal_to_plain=all(r[0] == engine_reference for r in engine_runs),
            ))
    return {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "cuda_graphs": graphs,
        "new_tokens": args.new_tokens,
        "plain_tokens_per_second": args.new_tokens / plain_seconds,
        "engine_plain_tokens_per_second": args.new_tokens / engine_plain_seconds,
        "engine_equal_to_graphs": engine_reference == reference,
        "greedy_follows_successor_table": follows_successor,
        "verify_cost_ms": costs,
        "verify_cost_ratio": {n: ms / costs[1] for n, ms in costs.items()},
        "speculation": [asdict(r) for r in results],
        "workloads": workloads,
        "seconds": time.perf_counter() - started,
    }


def format_table(report: dict) -> str:
    lines = [
        f"{report['shape']} (random weights), {report['device']}, {report['dtype']}, "
        f"CUDA graphs {report['cuda_graphs']}, plain {report['plain_tokens_per_second']:.1f} tok/s "
        f"(the engine: {report['engine_plain_tokens_per_second']:.1f} tok/s, prefill included)",
        "verify cost n=" + " ".join(f"{n}:{r:.2f}x" for n, r in report["verify_cost_ratio"].items()),
        "p     " + "".join(f"   k={k}: tok/pass speedup engine" for k in DRAFT_LENGTHS) + "   = plain",
    ]
    for p in ACCEPTANCE_RATES:
        row = [r for r in report["speculation"] if r["acceptance"] == p]
        cells = "".join(f"{r['tokens_per_pass']:14.2f} {r['speedup']:6.2f}x {r['engine_speedup']:5.2f}x" for r in row)
        equal = all(r["equal_to_plain"] and r["engine_equal_to_plain"] for r in row)
        lines.append(f"{p:<6.1f}{cells}   {'yes' if equal else 'NO'}")
    lines.append("the engine on the shipped prompts (prefill included): drafter, workload, tok/s, tokens per pass, "
                 "= plain")
    for row in report["workloads"]["rows"]:
        lines.append(f"  {row['drafter']:<7} {row['workload']:<10} {row['tokens_per_second']:8.1f} "
                     f"{row['tokens_per_pass']:6.2f}   {'yes' if row['equal_to_plain'] else 'NO'}")
    lines.append(f"total {report['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_const", const="tiny", dest="shape", default="qwen3-0.6b",
                        help="a toy shape (for CPU tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts-per-workload", type=int, default=2,
                        help="shipped prompts of each workload run through the engine (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-graphs", action="store_true", help="eager steps even on CUDA")
    parser.add_argument("--json", type=Path, help="also write the report as JSON")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"device is '{args.device}' but this torch ({torch.__version__}) sees no CUDA device; "
                     "use --device cpu (with --tiny for a quick run)")
    if args.new_tokens < 1 or args.repeats < 1:
        parser.error("--new-tokens and --repeats must be at least 1")
    report = run(args)
    print(format_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

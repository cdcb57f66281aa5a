"""`mtp-mcp bench` on a tiny model (table, JSON, plot), the verify-cost mode, and benchmarks/gpu.sh.

Speed is never asserted (these machines are noisy); what is asserted is that every run happened, was counted, and
that greedy outputs equal transformers' own.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_checkpoints import build_tiny_checkpoint

from mtp_mcp.benchmarks import prefill_cost
from mtp_mcp.benchmarks.agent_trace import load_trace
from mtp_mcp.benchmarks.workloads import WORKLOAD_NAMES, cut_after_def
from mtp_mcp.cli import main
from mtp_mcp.engine import native_ops

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # The tiny byte-level tokenizer spends ~1 token per character: the shipped code prompts need a long context.
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bench"), context_length=4096))


def test_bench_prints_table_and_writes_json_and_plot(tiny_dir, tmp_path, capsys):
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--model", tiny_dir, "--repeats", "1", "--max-new-tokens", "6", "--prompts-per-workload",
                 "1", "--json", str(json_path), "--plot", str(plot_path)])
    assert code == 0

    methods = ["transformers", "transformers-lookup", "engine-none", "engine-ngram", "engine-suffix"]
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["workload", "method", "tok/s"]
    rows = {tuple(line.split()[:2]) for line in table[2:]}
    assert rows == {(w, m) for w in [*WORKLOAD_NAMES, "all"] for m in methods}

    document = json.loads(json_path.read_text())
    assert len(document["runs"]) == len(WORKLOAD_NAMES) * len(methods)
    assert all(run["new_tokens"] == len(run["token_ids"]) > 0 for run in document["runs"])
    summaries = {(s["workload"], s["method"]): s for s in document["summaries"]}
    for workload in [*WORKLOAD_NAMES, "all"]:
        # Lossless: every method's greedy tokens equal transformers' plain greedy tokens for the same prompt.
        assert all(summaries[(workload, m)]["equal_to_reference"] == summaries[(workload, m)]["runs"] for m in methods)
        assert summaries[(workload, "transformers")]["speedup_vs_transformers"] == pytest.approx(1.0)
        assert summaries[(workload, "engine-none")]["tokens_per_pass"] == pytest.approx(1.0)
        assert summaries[(workload, "engine-ngram")]["tokens_per_pass"] >= 1.0
    assert document["meta"]["engine_kernels"] == "mtp_mcp.engine.cpu_kernels"
    assert plot_path.read_bytes().startswith(PNG_MAGIC)


def test_agent_trace_replays_every_call_through_the_server_with_each_set_up(tmp_path, capsys):
    # Summaries of the shipped texts need a longer context than the other workloads with this tokenizer.
    # Attention only (llama): any shared prefix is reusable, as in the lean Gemma 3 cache the embedded model runs.
    model = build_tiny_checkpoint(tmp_path / "tiny", arch="llama", context_length=8192, eos="not_by_greedy")
    json_path = tmp_path / "trace.json"
    assert main(["bench", "--agent-trace", "--model", str(model), "--json", str(json_path)]) == 0
    table = capsys.readouterr().out
    document = json.loads(json_path.read_text())
    calls = load_trace()
    assert len(document["calls"]) == 3 * len(calls)
    assert {c["set_up"] for c in document["calls"]} == {"plain", "ngram", "suffix"}
    # The replay fails unless every set-up answered every call with the same text (greedy is lossless).
    by_call = {}
    for call in document["calls"]:
        by_call.setdefault(call["call"], set()).add(call["text"])
        assert call["new_tokens"] >= 1 and call["seconds"] > 0
    assert all(len(texts) == 1 for texts in by_call.values())
    summary = document["summary"]
    assert summary["plain"]["tokens_per_pass"] == pytest.approx(1.0)
    assert summary["plain"]["prompt_tokens_reused"] == summary["ngram"]["prompt_tokens_reused"] == 0
    # The grown file, the retry and the restyled summaries start like earlier prompts.
    assert summary["suffix"]["prompt_tokens_reused"] > 0
    assert summary["suffix"]["tokens_per_pass"] > summary["plain"]["tokens_per_pass"]
    assert "Whole trace, wall time: plain" in table


def test_prefill_cost_times_one_piece_and_every_chunk_size(tiny_dir, capsys):
    prefill_cost.main(["--model", tiny_dir, "--repeats", "1", "--lengths", "300,600"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split(" | ")[2:] == [f"chunks of {chunk}" for chunk in prefill_cost.CHUNKS]
    for line, length in zip(lines[2:], (300, 600), strict=True):
        cells = line.split(" | ")
        assert int(cells[0]) == length and len(cells) == 2 + len(prefill_cost.CHUNKS)
        # the hidden states of a chunked prefill equal the one-piece prefill's to float rounding
        assert all(float(cell.split("(")[1].rstrip(")")) < 1e-3 for cell in cells[2:])


def test_verify_cost_times_every_position_count_for_both_kernels(tiny_dir, tmp_path, capsys):
    json_path = tmp_path / "verify.json"
    assert main(["bench", "--verify-cost", "--model", tiny_dir, "--repeats", "2", "--json", str(json_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["variant", "n", "greedy"]
    costs = json.loads(json_path.read_text())["verify_cost"]
    assert [(c["variant"], c["positions"]) for c in costs] == [
        (variant, n) for variant in ("stock", "engine") for n in (1, 2, 3, 4, 5, 8, 16)
    ]
    assert all(c["forward_ms"] > c["greedy_head_ms"] > 0 and c["logits_ms"] > 0 for c in costs)
    assert [c["ratio_to_one"] for c in costs if c["positions"] == 1] == [1.0, 1.0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workloads", "code,poetry"], "not a list of workloads"),
        (["--repeats", "0"], "not a whole number of at least 1"),
        (["--native-kernels", "neon"], "invalid choice: 'neon'"),
    ],
)
def test_bad_bench_options_exit_2_with_one_sentence(args, message, tiny_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--model", tiny_dir, *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def native_kernels_restored():
    chosen = native_ops.instruction_set()
    yield
    native_ops.use_instruction_set(chosen)


def test_the_native_kernels_instruction_set_is_chosen_for_the_run_and_recorded(tiny_dir, tmp_path,
                                                                              native_kernels_restored):
    json_path = tmp_path / "verify.json"
    assert main(["bench", "--verify-cost", "--model", tiny_dir, "--repeats", "1", "--native-kernels", "scalar",
                 "--json", str(json_path)]) == 0
    assert json.loads(json_path.read_text())["meta"]["native_kernels"] == native_ops.instruction_set() == "scalar"


def test_native_kernels_this_cpu_lacks_are_refused_in_one_sentence(tiny_dir, capsys, monkeypatch,
                                                                   native_kernels_restored):
    monkeypatch.setattr(native_ops, "instruction_sets", lambda: ("scalar", "avx2"))
    assert main(["bench", "--model", tiny_dir, "--native-kernels", "avx512vnni"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "mtp-mcp: --native-kernels avx512vnni is not available on this CPU; it runs scalar, avx2"


def test_a_bench_beyond_the_context_is_refused_before_running(tiny_dir, capsys):
    assert main(["bench", "--model", tiny_dir, "--max-new-tokens", "4000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mtp-mcp: ") and "exceeds the model's context of 4096 tokens" in err


def test_code_prompts_end_after_a_def_line():
    source = "import os\n\ndef a():\n    return 1\n\ndef b():\n    return 2\n\ndef c():\n    return 3\n"
    assert cut_after_def(source, source.index("def c")) == source[: source.index("    return 2")]
    assert cut_after_def("x = 1\ny = 2\nz = 3\n", 9) == "x = 1\n"


def test_gpu_script_runs_a_tiny_shape_on_cpu(tmp_path):
    json_path = tmp_path / "gpu.json"
    result = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--tiny", "--device", "cpu", "--dtype", "float32",
         "--new-tokens", "12", "--repeats", "1", "--json", str(json_path)],
        capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr
    assert "speedup" in result.stdout and "verify cost" in result.stdout
    report = json.loads(json_path.read_text())
    assert report["greedy_follows_successor_table"] and report["cuda_graphs"] == "off"
    assert len(report["speculation"]) == 15
    for row in report["speculation"]:
        # Verification is exact, so the oracle's acceptance rate changes the speed, never the output.
        assert row["equal_to_plain"]
        assert 1.0 <= row["tokens_per_pass"] <= row["draft_tokens"] + 1
    assert set(report["verify_cost_ratio"]) == {"1", "2", "3", "4", "5", "8", "16"}

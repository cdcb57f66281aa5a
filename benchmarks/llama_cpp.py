"""llama.cpp's plain greedy decoding as a benchmark method: the same GGUF file, the same thread count.

llama.cpp runs in a node process (benchmarks/llama_cpp_runner.mjs) through node-llama-cpp, whose npm package ships
prebuilt CPU binaries (llama-cpp-python compiles from source, 12-20 minutes on our machines). The package is
optional and never a test dependency: install it once with

    npm install --prefix ~/.cache/mtp-mcp/llama-cpp node-llama-cpp@3.22.1

(or anywhere, and pass --llama-cpp PREFIX). The version measured is the one in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs

from mtp_mcp.benchmarks.workloads import Prompt

if TYPE_CHECKING:
    from mtp_mcp.benchmarks.methods import MethodRun

DEFAULT_PREFIX = Path(platformdirs.user_cache_dir("mtp-mcp")) / "llama-cpp"
PINNED_VERSION = "3.22.1"


def llama_cpp_missing(prefix: Path) -> str | None:
    """Why llama.cpp cannot run here (one sentence), or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    package = prefix / "node_modules" / "node-llama-cpp" / "package.json"
    if not package.is_file():
        return (f"node-llama-cpp is not installed under {prefix} (npm install --prefix {prefix} "
                f"node-llama-cpp@{PINNED_VERSION})")
    return None


class LlamaCppMethod:
    """llama.cpp greedy decoding of a GGUF file; the model stays loaded in one node process between prompts."""

    name = "llama.cpp"

    def __init__(self, gguf: Path, prefix: Path, threads: int, context_tokens: int = 8192):
        runner = Path(str(files("mtp_mcp.benchmarks").joinpath("llama_cpp_runner.mjs")))
        self.version = json.loads((prefix / "node_modules" / "node-llama-cpp" / "package.json").read_text())["version"]
        self._process = subprocess.Popen(
            ["node", str(runner), str(prefix), str(gguf), str(threads), str(context_tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(self._process.stdout.readline() or "{}")
        if not ready.get("ready"):
            self.close()
            raise RuntimeError(f"llama.cpp did not start on {gguf} (see its messages above)")
        self.threads = ready["threads"]

    def run(self, prompt: Prompt, max_new_tokens: int) -> MethodRun:
        request = {"prompt": prompt.text, "add_bos": prompt.add_special_tokens, "max_tokens": max_new_tokens}
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        answer = json.loads(self._process.stdout.readline())
        # Imported here: the bench command line reads this module's defaults, and benchmarks.methods imports torch.
        from mtp_mcp.benchmarks.methods import MethodRun

        # One forward pass per token: the prefill yields the first.
        return MethodRun(answer["token_ids"], answer["seconds"], len(answer["token_ids"]))

    def peak_memory_mib(self) -> float:
        """The node process's peak resident set since it started (the model's load included)."""
        for line in Path(f"/proc/{self._process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()

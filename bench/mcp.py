"""What MCP costs, both ways: a chain started and awaited through `handoff mcp` against the same
through the client API, and an LLM agent's MCP tool call inside a hop against a direct call of
the same function.

    python -m bench.mcp [--chain-samples 50] [--tool-samples 30]

writes bench/results/mcp.json (also printed) and bench/results/mcp.md; `python -m bench` runs it
too, under "mcp". Everything runs on one machine, in the same run:

- chains: an embedded server started here, with handoff's chain worker and agent worker in
  processes of their own, and `handoff mcp` over stdio, started as an MCP client starts it and
  driven by the MCP SDK's own `ClientSession`. A 1-hop relay chain started and awaited with one
  `start_chain` tool call (`wait_s`) takes turns with the same chain through `start_chain` +
  `wait_chain` of the client API, one chain at a time.
- tool calls: an LLM agent's handler on an instant scripted model (`handoff.testing.ScriptedModel`)
  whose model calls `lookup_owner` `CALLS` times in the hop, then finishes: the tool on a real MCP
  server (`bench/tool_server.py`, over stdio and over streamable HTTP), against the same function
  given to the agent as its own tool. Each hop opens one session per server (for stdio, the
  server's process) when its first call needs it and closes it at its end, as every hop does.
  What is compared is the hop's own time, the model's excluded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from temporalio.client import Client

from bench.agents import ALL as BENCH_AGENTS
from bench.agents import IDS
from bench.control import WARM_UP, ratio, summary, taking_turns
from bench.tool_server import OWNERS, lookup_owner
from handoff.agents.llm import llm_agent
from handoff.agents.mcp_tools import McpHttpServer, McpStdioServer
from handoff.client import connect, start_chain, wait_chain
from handoff.models import AgentCapability, ChainStatus, HandoffContext
from handoff.payloads.storage import PAYLOAD_DIR_ENV
from handoff.registry import wait_live
from handoff.servers.embedded import EmbeddedServer, free_port, port_open
from handoff.testing import ScriptedModel, call

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HANDOFF = str(Path(sys.executable).parent / "handoff")

TASK = "bench mcp"
WAIT_S = 60
"""How long the `start_chain` tool waits for the chain (the chain takes milliseconds)."""
CALLS = 5
"""Tool calls the model makes in each hop of the tool-call figures."""
TOOL = "lookup_owner"
PATH = "workflows/chain.py"


# -- chains through handoff mcp and through the client API ------------------------------------

@asynccontextmanager
async def stack(tmp: Path) -> AsyncIterator[tuple[Client, dict[str, str]]]:
    """An embedded server and a process for each worker: handoff's chain worker and its agent
    worker (the bench relays). Yields a client and the environment of a process of it."""
    server = EmbeddedServer(port=free_port(), ui_port=free_port(), db=str(tmp / "mcp.db"), extra_args=["--headless"])
    server.start()
    env = {**os.environ, "TEMPORAL_ADDRESS": server.address, "PYTHONPATH": str(ROOT),
           PAYLOAD_DIR_ENV: os.environ[PAYLOAD_DIR_ENV]}
    commands = [[HANDOFF, "worker", "--chains"], [HANDOFF, "worker", "--agent", "bench.agents:ALL"]]
    workers = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands]
    try:
        client = await connect(address=server.address)
        await wait_live(client, {a.id for a in BENCH_AGENTS}, timeout_s=120)
        yield client, env
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)
        server.stop()


@asynccontextmanager
async def handoff_mcp(env: dict[str, str]) -> AsyncIterator[ClientSession]:
    """`handoff mcp` over stdio, started as an MCP client starts it, and a session with it."""
    params = StdioServerParameters(command=HANDOFF, args=["mcp"], env=env)
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


class Chains:
    """A 1-hop relay chain, started and awaited each way (`bench.control.Sample`)."""

    def __init__(self, client: Client, session: ClientSession) -> None:
        self.client = client
        self.session = session

    async def through_mcp(self) -> float:
        started = time.perf_counter()
        result = await self.session.call_tool("start_chain", {"to_agent": IDS[0], "task": TASK,
                                                              "context": {"hops": 1}, "wait_s": WAIT_S})
        took = (time.perf_counter() - started) * 1000
        record = result.structured_content or {}
        if result.is_error or record.get("status") != ChainStatus.COMPLETED.value or len(record["hops"]) != 1:
            raise RuntimeError(f"the chain through handoff mcp answered {result.content}")
        return took

    async def through_client_api(self) -> float:
        started = time.perf_counter()
        chain_id = await start_chain(self.client, to_agent=IDS[0], task_description=TASK, context_data={"hops": 1})
        record = await wait_chain(self.client, chain_id)
        took = (time.perf_counter() - started) * 1000
        if record.status is not ChainStatus.COMPLETED or len(record.hops) != 1:
            raise RuntimeError(f"the chain through the client API ended {record.status.value}: {record.error}")
        return took


async def chain_figures(tmp: Path, samples: int) -> dict:
    async with stack(tmp) as (client, env), handoff_mcp(env) as session:
        chains = Chains(client, session)
        found = await taking_turns({"mcp": chains.through_mcp, "client_api": chains.through_client_api}, samples)
    mcp, api = summary(found["mcp"]), summary(found["client_api"])
    return {"mcp_stdio_ms": mcp, "client_api_ms": api, "ratio_p50": ratio(mcp["p50"], api["p50"])}


# -- an MCP tool call inside a hop against a direct call -------------------------------------

def calling_the_tool(tool: str):
    """The scripted model: `CALLS` calls of `tool` in the hop, then `finish` with the last answer."""
    def answer(request: dict, n: int):
        results = [m["content"] for m in request["messages"] if m["role"] == "tool"]
        if len(results) < CALLS:
            return call(tool, path=PATH)
        if results[-1] != OWNERS[PATH]:
            raise RuntimeError(f"{tool} answered {results[-1]!r}")
        return call("finish", answer=results[-1])
    return answer


@asynccontextmanager
async def tool_server_over_http() -> AsyncIterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.tool_server", "http", str(port)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if port_open(port):
                break
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(timeout=30)


async def nobody_else() -> list:
    """The agent's directory: no agent to hand to (the hop finishes)."""
    return []


async def hop_own_ms(servers: list, tool: str, samples: int) -> tuple[list[float], list[list[float]]]:
    """The hop's own time (the model's excluded) of `samples` hops whose model calls `tool`
    `CALLS` times, after `WARM_UP` hops not counted; and each counted hop's recorded MCP calls'
    durations."""
    own, calls = [], []
    async with ScriptedModel(calling_the_tool(tool)) as model:
        agent = llm_agent(id="bench-mcp", name="Bench MCP", capabilities=[AgentCapability.CODE_ANALYSIS],
                          instructions="Find the owner, then finish.", model="scripted", base_url=model.url,
                          api_key="bench", directory=nobody_else, mcp_servers=servers, max_tool_rounds=CALLS,
                          tools=[] if servers else [lookup_owner])
        ctx = HandoffContext(to_agent=agent.id, task_description=f"who owns {PATH}?")
        for turn in range(WARM_UP + samples):
            started = time.perf_counter()
            result = await agent.handler(ctx)
            took = (time.perf_counter() - started) * 1000
            decision = result.decision
            failed = [c for c in decision.mcp_calls if c.error]
            if decision.tool != "finish" or len(decision.tool_calls) != CALLS or failed:
                raise RuntimeError(f"the hop decided {decision.tool} after {decision.tool_calls}: {decision.mcp_calls}")
            if turn >= WARM_UP:
                own.append(took - decision.model_ms)
                calls.append([c.duration_ms for c in decision.mcp_calls])
    return own, calls


async def tool_figures(samples: int) -> dict:
    mcp_tool = f"mcp__owners__{TOOL}"
    direct, _ = await hop_own_ms([], TOOL, samples)
    stdio = McpStdioServer(name="owners", command=sys.executable, args=["-m", "bench.tool_server"], cwd=str(ROOT))
    over_stdio, stdio_calls = await hop_own_ms([stdio], mcp_tool, samples)
    async with tool_server_over_http() as url:
        over_http, http_calls = await hop_own_ms([McpHttpServer(name="owners", url=url)], mcp_tool, samples)
    figures: dict[str, Any] = {"calls_per_hop": CALLS, "direct_hop_ms": summary(direct)}
    base = summary(direct)["p50"]
    for name, own, recorded in (("stdio", over_stdio, stdio_calls), ("http", over_http, http_calls)):
        hop = summary(own)
        first, later = summary([c[0] for c in recorded]), summary([d for c in recorded for d in c[1:]])
        figures[name] = {
            "hop_ms": hop, "first_call_ms": first, "later_call_ms": later,
            "session_ms_p50": round(first["p50"] - later["p50"], 2),
            "overhead_per_call_ms_p50": round((hop["p50"] - base) / CALLS, 2),
        }
    return figures


# -- the figures -------------------------------------------------------------------------

CHAIN_TARGET = "mcp: 1-hop chain through handoff mcp (stdio) <= 1.5x the client API (p50)"


def mcp_targets(results: dict) -> dict[str, tuple[float, float, bool]]:
    """(value, target, met) of each MCP target."""
    chain = results["chains"]["ratio_p50"]
    return {CHAIN_TARGET: (chain, 1.5, chain <= 1.5)}


NOTES = [
    f"chains: a 1-hop relay chain, one `start_chain` tool call with `wait_s` {WAIT_S} through `handoff mcp` over "
    "stdio (the MCP SDK's ClientSession) against `start_chain` + `wait_chain` of the client API, on the same "
    "embedded server and workers, taking turns (the order reversed every other turn), after "
    f"{WARM_UP} unmeasured of each; each checked to have completed its hop.",
    f"tool calls: an LLM agent's handler on an instant scripted model that calls `{TOOL}` {CALLS} times in the "
    "hop, then finishes; the hop's own time (the model's excluded) with the tool on a real MCP server "
    "(`bench/tool_server.py`) against the same function as the agent's own tool. Each hop opens its session "
    "(over stdio, the server's process) at its first call and closes it at its end; the first call's time "
    "includes the opening, and the hop's time its closing. A call: its recorded duration (McpCall.duration_ms) "
    "once the session is open; opening it: the first call's p50 over a later call's; overhead a call: the hop's "
    "p50 over the direct hop's, divided by the calls.",
]


def mcp_rows(results: dict, goal) -> list[str]:
    """Rows of the results table (| measure | handoff | baseline | ratio | target | met |);
    `goal(name, text)` gives the target and met cells."""
    chains, tools = results["chains"], results["tools"]

    def ms(s: dict) -> str:
        return f"{s['p50']:.1f} / {s['p95']:.1f} ms"

    rows = [
        f"| 1-hop chain started and awaited through `handoff mcp` (stdio), p50 / p95 | {ms(chains['mcp_stdio_ms'])} "
        f"| the client API (start_chain + wait_chain) {ms(chains['client_api_ms'])} | {chains['ratio_p50']:.2f} | "
        f"{goal(CHAIN_TARGET, '<= {}')} |",
    ]
    for name in ("stdio", "http"):
        t = tools[name]
        rows.append(
            f"| LLM agent hop with {tools['calls_per_hop']} MCP tool calls over {name} (model excluded), p50 / p95 "
            f"| {ms(t['hop_ms'])}: a call {t['later_call_ms']['p50']:.2f} ms p50 once the hop's session is open, "
            f"opening it {t['session_ms_p50']:.1f} ms | the same function as the agent's own tool "
            f"{ms(tools['direct_hop_ms'])} | +{t['overhead_per_call_ms_p50']:.1f} ms a call, the session included "
            "| | |")
    return rows


def markdown(results: dict) -> str:
    """mcp.md: the rows with their targets, then how they were measured."""
    def goal(name: str, text: str) -> str:
        check = results["targets"][name]
        return f"{text.format(check['target'])} | {'yes' if check['met'] else '**no**'}"

    rows = ["| measure | handoff | baseline | ratio | target | met |", "|---|---|---|---|---|---|",
            *mcp_rows(results, goal), "", " ".join(results["notes"])]
    return "\n".join(rows) + "\n"


def run_mcp(chain_samples: int = 50, tool_samples: int = 30) -> dict:
    """Every MCP figure, on a stack of its own (a minute or two)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[PAYLOAD_DIR_ENV] = str(Path(tmp) / "payloads")  # this process's client stores like the workers
        results = {"settings": {"chain_samples": chain_samples, "tool_samples": tool_samples, "warm_up": WARM_UP},
                   "chains": asyncio.run(chain_figures(Path(tmp), chain_samples)),
                   "tools": asyncio.run(tool_figures(tool_samples)), "notes": NOTES}
    results["targets"] = {name: {"value": v, "target": t, "met": met}
                          for name, (v, t, met) in mcp_targets(results).items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mcp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chain-samples", type=int, default=50, help="chains each way")
    parser.add_argument("--tool-samples", type=int, default=30, help="hops each way (stdio, HTTP, direct)")
    parser.add_argument("--out", default=str(RESULTS / "mcp.json"), help="the JSON; the table (.md) goes beside it")
    args = parser.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               **run_mcp(args.chain_samples, args.tool_samples)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

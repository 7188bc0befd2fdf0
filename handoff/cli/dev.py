"""`handoff dev`: the embedded server, the chain worker, every example agent, the A2A and MCP
servers and the console (on loopback) in one process."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Awaitable
from contextlib import aclosing, suppress
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from rich.console import Console
from temporalio.client import Client

from handoff.cli.render import chain_table, ui_url
from handoff.client import approve_chain, connect, follow_chain, reject_chain, start_chain
from handoff.constants import STARTER_AGENT
from handoff.models import AgentCapability, ChainRecord, ChainStatus, HopStatus
from handoff.observability.telemetry import Telemetry
from handoff.registry import wait_live
from handoff.servers.embedded import EmbeddedServer
from handoff.workers.main import run_workers, stop_on_signals

T = TypeVar("T")

DEMO_TASK = "Review {name} before release"
DEMO_POLICY = {"approval_required": [AgentCapability.DEPLOYMENT.value]}
"""A person approves the release decision: the demo's chain waits for it."""
DEMO_APPROVER = "handoff dev --approve"
APPROVAL_POLL_S = 0.2
"""How often the demo looks for a hop that waits for approval (one query each)."""


async def run_demo(client, console: Console, source_file: Path, ui_base: str | None = None, *,
                   approve: bool = False, triage: bool = False) -> ChainStatus:
    """The demo chain over `source_file`: the analysis fans out to the audit and the test plan,
    and the release decision that joins them waits for a person's approval. `triage`: the chain
    starts at the LLM triage agent, which picks the specialist that starts."""
    from handoff.examples.triage import TRIAGE_TARGETS

    policy = dict(DEMO_POLICY)
    if triage:
        policy["allowed_handoffs"] = {STARTER_AGENT: ["triage"], "triage": TRIAGE_TARGETS, "*": ["*"]}
    chain_id = await start_chain(
        client,
        to_agent="triage" if triage else "analyzer",
        task_description=DEMO_TASK.format(name=source_file.name),
        context_data={"source": source_file.read_text(), "filename": source_file.name},
        policy=policy,
    )
    record = await through_approvals(client, console, chain_id, approve=approve)
    console.print(chain_table(record))
    console.print(f"Web UI: {ui_url(str(record.chain_id), client.namespace, ui_base)}", soft_wrap=True)
    return record.status


async def through_approvals(client: Client, console: Console, chain_id: UUID, *, approve: bool) -> ChainRecord:
    """Wait for the chain's end, answering each hop that waits for approval: at once with
    `approve`, at a prompt on a terminal, else by `handoff approve` from another shell."""
    asked: set[UUID | None] = set()
    async with aclosing(follow_chain(client, chain_id, every_s=APPROVAL_POLL_S)) as records:
        async for record in records:
            if record.status.ended:
                return record
            for hop in record.all_hops():
                if hop.status is not HopStatus.AWAITING_APPROVAL or hop.handoff_id in asked:
                    continue
                asked.add(hop.handoff_id)
                console.print(f"hop {hop.hop}: {hop.from_agent} -> {hop.to_agent} awaits approval: "
                              f"{hop.task_description}", markup=False, highlight=False)
                await _answer(client, console, chain_id, hop.handoff_id, approve)
    raise AssertionError("a followed chain always ends with its record")


async def _answer(client: Client, console: Console, chain_id: UUID, handoff_id: UUID | None, approve: bool) -> None:
    if not approve and not sys.stdin.isatty():
        console.print(f"  approve it with `handoff approve {chain_id}`, or reject it with "
                      f"`handoff reject {chain_id} --reason ...`", markup=False, highlight=False)
        return
    answer = "y" if approve else (await _line_from_stdin("  approve? [y/N] ")).strip().lower()
    if answer in ("y", "yes"):
        comment = "the demo runs unattended" if approve else "approved at the prompt"
        entry = await approve_chain(client, chain_id, by=DEMO_APPROVER if approve else "handoff dev",
                                    comment=comment, handoff_id=handoff_id)
    else:
        entry = await reject_chain(client, chain_id, by="handoff dev", reason="rejected at the prompt",
                                   handoff_id=handoff_id)
    if entry.approval is not None:
        console.print(f"  {entry.approval.decision} by {entry.approval.by}", markup=False, highlight=False)


def _line_from_stdin(prompt: str) -> asyncio.Future[str]:
    """A line typed at the terminal, read in a daemon thread: a stop while the prompt waits
    leaves the thread behind instead of waiting for Enter (`asyncio.to_thread` would)."""
    loop = asyncio.get_running_loop()
    typed: asyncio.Future[str] = loop.create_future()

    def answered(line: str) -> None:
        if not typed.done():
            typed.set_result(line)

    def read() -> None:
        try:
            line = input(prompt)
        except (EOFError, OSError):
            line = ""
        try:
            loop.call_soon_threadsafe(answered, line)
        except RuntimeError:  # the loop has closed: nobody waits for the answer
            pass

    threading.Thread(target=read, name="approval-prompt", daemon=True).start()
    return typed


async def _unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """`work`'s result, or None once `stop` is set first (Ctrl-C, SIGTERM): `work` is cancelled,
    and whatever it raised meanwhile (the server stopping under it) is dropped."""
    task, stopped = asyncio.ensure_future(work), asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not stop.is_set():
        return task.result()
    task.cancel()
    with suppress(BaseException):
        await task
    return None


async def run_dev(
    server: EmbeddedServer, console: Console, *, demo: Path | None, exit_after_demo: bool,
    telemetry: Telemetry | None = None, approve: bool = False, llm_url: str | None = None,
    a2a_port: int | None = None, mcp_port: int | None = None, console_port: int | None = None,
) -> int:
    """`llm_url`: a local model's OpenAI-compatible URL; the LLM triage agent runs too and the
    demo chain starts at it. `a2a_port`: serve A2A there (loopback); `mcp_port`: serve MCP over
    streamable HTTP there (loopback, its one caller an operator); `console_port`: serve the
    console there (loopback, its one user the person running it, an operator)."""
    from handoff.examples import ALL_AGENTS

    agents = list(ALL_AGENTS)
    if llm_url is not None:
        from handoff.examples.triage import triage

        agents.append(triage)
    telemetry = telemetry or Telemetry()
    client = await connect(address=server.address, runtime=telemetry.runtime, tracing=telemetry.tracing)
    served = await serve_beside(client, a2a_port=a2a_port, mcp_port=mcp_port, console_port=console_port,
                                ui_base=server.ui_url)
    stop = asyncio.Event()
    stop_on_signals(stop)
    workers = asyncio.create_task(run_workers(client, agents, chains=True, stop=stop))
    console.print(f"Temporal server on {server.address}, Web UI {server.ui_url}")
    if server.codec_endpoint:
        console.print(f"Web UI codec server: {server.codec_endpoint}")
    if telemetry.metrics_url:
        console.print(f"Prometheus metrics: {telemetry.metrics_url}")
    if llm_url is not None:
        console.print(f"local model: {llm_url}")
    for line in served.values():
        console.print(line, soft_wrap=True)
    await _unless_stopped(wait_live(client, {a.id for a in agents}, timeout_s=30), stop)
    if not stop.is_set():
        console.print(f"agents live: {', '.join(a.id for a in agents)}")
    code = 0
    if demo is not None and not stop.is_set():
        status = await _unless_stopped(
            run_demo(client, console, demo, server.ui_url, approve=approve, triage=llm_url is not None), stop)
        if status is None:
            console.print("stopped before the demo chain ended")
        else:
            code = 0 if status is ChainStatus.COMPLETED else 1
        if exit_after_demo:
            stop.set()
    if not stop.is_set():
        console.print("running; Ctrl-C stops the server and the workers")
    await workers
    for http_server in served:
        await http_server.stop()
    return code


async def serve_beside(client: Client, *, a2a_port: int | None, mcp_port: int | None,
                       console_port: int | None = None, ui_base: str | None = None) -> dict[Any, str]:
    """The A2A and MCP servers and the console `handoff dev` offers on loopback, started, each with
    the line that announces it; if one cannot start (its port in use, say), none is left serving."""
    served: dict[Any, str] = {}
    try:
        if a2a_port is not None:
            from handoff.a2a.cards import CARD_PATH
            from handoff.a2a.server import A2AServer

            a2a = await A2AServer(client, port=a2a_port).start()
            served[a2a] = f"A2A server: {a2a.url} (card {a2a.url}{CARD_PATH})"
        if mcp_port is not None:
            from handoff.mcp import McpHttpServer

            mcp = await McpHttpServer(client, port=mcp_port).start()
            served[mcp] = f"MCP server: {mcp.url}"
        if console_port is not None:
            from handoff.console import ConsoleServer

            console = await ConsoleServer(client, port=console_port, ui_base=ui_base).start()
            served[console] = f"console: {console.url}/ (approvals, chains as live trees, agents)"
    except BaseException:
        for http_server in served:
            await http_server.stop()
        raise
    return served

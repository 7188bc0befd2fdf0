"""`handoff dev`: the embedded server, the chain worker and every example agent in one process."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from rich.console import Console

from handoff.client import connect, run_chain
from handoff.models import ChainStatus
from handoff.registry import agent_statuses
from handoff.render import chain_table, ui_url
from handoff.server import EmbeddedServer
from handoff.telemetry import Telemetry
from handoff.workers.main import run_workers, stop_on_signals

DEMO_TASK = "Review {name} before release"


async def wait_until_live(client, agent_ids: set[str], timeout_s: float = 30.0) -> None:
    """Wait until every agent is registered and polling its queue."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        live = {s.card.agent_id for s in await agent_statuses(client) if s.stats.live}
        if agent_ids <= live:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"agents not live after {timeout_s:g}s: {sorted(agent_ids - live)}")


async def run_demo(client, console: Console, source_file: Path, ui_base: str | None = None) -> ChainStatus:
    record = await run_chain(
        client,
        to_agent="analyzer",
        task_description=DEMO_TASK.format(name=source_file.name),
        context_data={"source": source_file.read_text(), "filename": source_file.name},
    )
    console.print(chain_table(record))
    console.print(f"Web UI: {ui_url(str(record.chain_id), client.namespace, ui_base)}", soft_wrap=True)
    return record.status


async def run_dev(
    server: EmbeddedServer, console: Console, *, demo: Path | None, exit_after_demo: bool,
    telemetry: Telemetry | None = None,
) -> int:
    from handoff.examples import ALL_AGENTS

    telemetry = telemetry or Telemetry()
    client = await connect(address=server.address, runtime=telemetry.runtime, tracing=telemetry.tracing)
    stop = asyncio.Event()
    stop_on_signals(stop)
    workers = asyncio.create_task(run_workers(client, ALL_AGENTS, chains=True, stop=stop))
    console.print(f"Temporal server on {server.address}, Web UI {server.ui_url}")
    if server.codec_endpoint:
        console.print(f"Web UI codec server: {server.codec_endpoint}")
    if telemetry.metrics_url:
        console.print(f"Prometheus metrics: {telemetry.metrics_url}")
    await wait_until_live(client, {a.id for a in ALL_AGENTS})
    console.print(f"agents live: {', '.join(a.id for a in ALL_AGENTS)}")
    code = 0
    if demo is not None:
        status = await run_demo(client, console, demo, server.ui_url)
        code = 0 if status is ChainStatus.COMPLETED else 1
        if exit_after_demo:
            stop.set()
    if not stop.is_set():
        console.print("running; Ctrl-C stops the server and the workers")
    await workers
    return code

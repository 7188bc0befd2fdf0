"""The capability registry, discovery and fallback by capability, against the real server."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from uuid import uuid4

import pytest
from temporalio.client import WorkflowUpdateFailedError

from handoff import AgentCapability, ChainStatus, HopStatus, PermanentError, run_chain
from handoff.constants import CHAIN_TASK_QUEUE, REGISTRY_WORKFLOW
from handoff.models import AgentCard
from handoff.registry import (
    AgentStatus,
    QueueStats,
    agent_statuses,
    rank,
    Directory,
    register_agent_checked,
    registered_agents,
)
from handoff.constants import DEREGISTER_SIGNAL, REGISTER_SIGNAL, REGISTRATION_QUERY
from tests.support import make_agent, running, wait_live

pytestmark = pytest.mark.usefixtures("chains")

SEC = AgentCapability.SECURITY_AUDIT


async def answer(ctx):
    return ctx.complete({"by": ctx.to_agent})


async def _start_registry(client, **state):
    return await client.start_workflow(
        REGISTRY_WORKFLOW, state or None, id=f"registry-test-{uuid4()}", task_queue=CHAIN_TASK_QUEUE)


def _reg(agent_id, capabilities=("TESTING",), instance="i1", version="1", name=None):
    return {"agent_id": agent_id, "name": name or agent_id, "capabilities": list(capabilities),
            "max_concurrent": 2, "version": version, "instance": instance}


@pytest.mark.parametrize("registration, message", [
    (_reg("Bad Id"), "invalid agent id"),
    (_reg("ok", capabilities=["MIND_READING"]), "unknown capabilities"),
    (_reg("ok", capabilities=[]), "no capability"),
])
async def test_registration_validator_rejects_bad_cards(client, registration, message):
    handle = await _start_registry(client)
    with pytest.raises(WorkflowUpdateFailedError) as failure:
        await handle.execute_update("register", registration)
    assert message in str(failure.value.cause)
    assert await handle.query("agents") == []
    await handle.terminate(reason="test over")


async def test_conflicting_reregistration_is_rejected_but_a_new_version_replaces(client):
    handle = await _start_registry(client)
    await handle.execute_update("register", _reg("svc", ["TESTING"]))
    with pytest.raises(WorkflowUpdateFailedError) as failure:
        await handle.execute_update("register", _reg("svc", ["DEPLOYMENT"], instance="i2"))
    assert "already registered" in str(failure.value.cause)
    await handle.execute_update("register", _reg("svc", ["DEPLOYMENT"], instance="i2", version="2"))
    [card] = await handle.query("agents", result_type=list[AgentCard])
    assert card.capabilities == [AgentCapability.DEPLOYMENT] and card.version == "2"
    await handle.terminate(reason="test over")


async def test_replicas_share_a_card_until_the_last_one_leaves(client):
    handle = await _start_registry(client)
    await handle.execute_update("register", _reg("svc", instance="a"))
    await handle.execute_update("register", _reg("svc", instance="b"))
    assert await handle.execute_update("deregister", {"agent_id": "svc", "instance": "a"}) is True
    assert [c["agent_id"] for c in await handle.query("agents")] == ["svc"]
    await handle.execute_update("deregister", {"agent_id": "svc", "instance": "b"})
    assert await handle.query("agents") == []
    assert await handle.execute_update("deregister", {"agent_id": "svc", "instance": "b"}) is False
    await handle.terminate(reason="test over")


async def test_registry_continues_as_new_keeping_its_cards(client):
    handle = await _start_registry(client, max_history_events=30)
    first_run = (await handle.describe()).run_id
    for i in range(12):
        await handle.execute_update("register", _reg(f"svc{i}", instance=f"i{i}"))
    for _ in range(50):
        if (await client.get_workflow_handle(handle.id).describe()).run_id != first_run:
            break
        await asyncio.sleep(0.1)
    current = client.get_workflow_handle(handle.id)
    assert (await current.describe()).run_id != first_run, "registry should have continued as new"
    cards = await current.query("agents", result_type=list[AgentCard])
    assert [c.agent_id for c in cards] == sorted(f"svc{i}" for i in range(12))
    await current.terminate(reason="test over")


async def test_worker_registers_on_start_and_deregisters_on_stop(client, uid):
    agent = make_agent(f"reg-{uid}", answer, [SEC, AgentCapability.TESTING])
    async with running(client, agent, register=True):
        [status] = [s for s in await agent_statuses(client) if s.card.agent_id == agent.id]
        assert status.stats.live and status.stats.pollers >= 1
        assert status.card.capabilities == [SEC, AgentCapability.TESTING]
        assert status.card.task_queue == f"agent.{agent.id}"
    for _ in range(50):  # the deregistration is a signal: the memo follows within a workflow task
        if agent.id not in {c.agent_id for c in await registered_agents(client)}:
            break
        await asyncio.sleep(0.1)
    assert agent.id not in {c.agent_id for c in await registered_agents(client)}


async def test_registered_agent_without_a_worker_is_down(client, uid):
    agent = make_agent(f"ghost-{uid}", answer, [AgentCapability.API_INTEGRATION])
    await register_agent_checked(client, agent, "test")
    [status] = [s for s in await agent_statuses(client) if s.card.agent_id == agent.id]
    assert not status.stats.live and status.stats.pollers == 0
    [candidate] = await Directory(client).candidates(AgentCapability.API_INTEGRATION)
    assert candidate.agent_id == agent.id and not candidate.live
    from handoff.registry import deregister_agent

    assert await deregister_agent(client, agent.id, "test")


def test_rank_prefers_live_then_least_loaded_then_id_and_spreads_equals_by_turns():
    def status(agent_id, live, backlog, limit=2):
        card = AgentCard(agent_id=agent_id, name=agent_id, capabilities=[SEC], max_concurrent=limit,
                         task_queue=f"agent.{agent_id}")
        return AgentStatus(card=card, stats=QueueStats(pollers=int(live), live=live, backlog=backlog,
                                                       last_poll=datetime.now(timezone.utc)))

    def ids(ranked):
        return [c.agent_id for c, _ in ranked]

    pairs = [(s.card, s.stats) for s in (status("d", False, 0), status("c", True, 4), status("b", True, 4, limit=8),
                                         status("a", True, 4))]
    assert ids(rank(pairs, {})) == ["b", "a", "c", "d"]
    equals = [(s.card, s.stats) for s in (status("x", True, 0), status("y", True, 0), status("z", False, 0))]
    assert ids(rank(equals, {})) == ["x", "y", "z"]
    assert ids(rank(equals, {"x": 2.0, "y": 1.0}))[0] == "y"  # the least recently returned goes first


async def test_capability_hop_falls_back_to_another_agent_after_failure(client, uid):
    broken, healthy = f"sec-broken-{uid}", f"sec-ok-{uid}"

    async def fails(ctx):
        raise PermanentError("scanner crashed")

    agents = [make_agent(broken, fails, [SEC]), make_agent(healthy, answer, [SEC])]
    async with running(client, *agents, register=True):
        records = [await run_chain(client, capability="SECURITY_AUDIT", task_description=f"audit {i}")
                   for i in range(4)]
    for record in records:
        assert record.status is ChainStatus.COMPLETED
        assert record.final_result == {"by": healthy}
        assert record.hops[-1].to_agent == healthy
    fallbacks = [r for r in records if len(r.hops) == 2]
    for record in fallbacks:
        assert record.hops[0].status is HopStatus.FAILED and record.hops[0].to_agent == broken
        assert record.hops[1].fallback_for == broken
        assert record.hops[1].candidates == [healthy]


async def test_hop_by_name_to_a_failing_agent_falls_back_by_its_capability(client, uid):
    broken, healthy = f"dba-broken-{uid}", f"dba-ok-{uid}"

    async def fails(ctx):
        raise PermanentError("db locked")

    cap = AgentCapability.DATABASE_OPERATIONS
    async with running(client, make_agent(broken, fails, [cap]), make_agent(healthy, answer, [cap]),
                       register=True):
        record = await run_chain(client, to_agent=broken, task_description="migrate")
    assert record.status is ChainStatus.COMPLETED
    assert [(h.to_agent, h.status) for h in record.hops] == [
        (broken, HopStatus.FAILED), (healthy, HopStatus.COMPLETED)]
    assert record.hops[1].fallback_for == broken


async def test_capability_with_no_live_agent_fails_with_a_clear_error(client, uid):
    record = await run_chain(client, capability="PERFORMANCE_OPTIMIZATION", task_description="tune")
    assert record.status is ChainStatus.FAILED
    assert record.hops[0].status is HopStatus.UNREACHABLE
    assert "no live agent with capability PERFORMANCE_OPTIMIZATION" in record.error


async def test_capability_hop_that_could_only_loop_is_refused(client, uid):
    lone = f"lone-{uid}"

    async def again(ctx):
        return ctx.handoff(capability=AgentCapability.DEPLOYMENT, task_description=ctx.task_description)

    async with running(client, make_agent(lone, again, [AgentCapability.DEPLOYMENT]), register=True):
        record = await run_chain(client, capability="DEPLOYMENT", task_description="ship")
    assert record.status is ChainStatus.LOOP_DETECTED
    assert [h.status for h in record.hops] == [HopStatus.COMPLETED, HopStatus.REFUSED]


async def test_discovery_succeeds_while_agents_start_and_stop(client, uid):
    """Lookups keep finding a live agent while other agents of the capability churn."""
    cap = AgentCapability.PERFORMANCE_OPTIMIZATION
    stable = make_agent(f"perf-stable-{uid}", answer, [cap])
    stop = asyncio.Event()

    async def churn():
        n = 0
        while not stop.is_set():
            agent = make_agent(f"perf-churn{n % 3}-{uid}", answer, [cap])
            async with running(client, agent, register=True):
                await asyncio.sleep(0.3)
            n += 1
        return n

    directory = Directory(client)
    async with running(client, stable, register=True):
        churner = asyncio.create_task(churn())
        lookups, found = 0, 0
        deadline = asyncio.get_running_loop().time() + 8
        while asyncio.get_running_loop().time() < deadline:
            candidates = await directory.candidates(cap)
            lookups += 1
            found += bool(candidates) and candidates[0].live
            await asyncio.sleep(0.02)
        stop.set()
        cycles = await churner
    rate = found / lookups
    print(f"discovery: {found}/{lookups} lookups found a live agent ({rate:.2%}), {cycles} churn cycles")
    assert cycles >= 3 and lookups >= 100
    assert rate >= 0.99
    await wait_live(client, set())


async def test_registrations_by_signal_are_applied_together_and_refusals_published(client):
    """A storm of registrations (Updates allow ten in flight per workflow; signals have no such
    limit): all applied, the memo published per batch, a refused one named with its reason."""
    handle = await _start_registry(client)
    regs = [_reg(f"storm{i}", instance=f"i{i}") for i in range(60)]
    await asyncio.gather(*(handle.signal(REGISTER_SIGNAL, [r]) for r in regs))
    await handle.signal(REGISTER_SIGNAL, [_reg("storm0", ["DEPLOYMENT"], instance="x"), _reg("Bad Id")])
    for _ in range(100):
        memo = await (await handle.describe()).memo()
        if len(memo.get("agents", [])) == 60 and "rejected" in memo:
            break
        await asyncio.sleep(0.1)
    assert sorted(c["agent_id"] for c in memo["agents"]) == sorted(f"storm{i}" for i in range(60))
    assert "already registered" in memo["rejected"]["storm0"] and "invalid agent id" in memo["rejected"]["Bad Id"]
    assert await handle.query(REGISTRATION_QUERY, "storm7") == "registered 1"
    assert (await handle.query(REGISTRATION_QUERY, "nobody")) == "unknown"
    await handle.signal(DEREGISTER_SIGNAL, [{"agent_id": f"storm{i}", "instance": f"i{i}"} for i in range(30)])
    for _ in range(100):
        if len(await handle.query("agents")) == 30:
            break
        await asyncio.sleep(0.1)
    assert len(await handle.query("agents")) == 30
    history = await handle.fetch_history()
    upserts = sum(e.HasField("workflow_properties_modified_event_attributes") for e in history.events)
    assert upserts < 62, f"the memo is published per batch of signals, not per registration ({upserts})"
    await handle.terminate(reason="test over")


async def test_the_directory_answers_from_its_cache_and_never_picks_a_stale_agent(client, uid):
    """Cards at most a second old and queue stats refreshed in the background: a lookup sends no
    describe in the steady state; an agent that stopped without deregistering is not chosen."""
    cap = AgentCapability.API_INTEGRATION
    live = make_agent(f"dir-live-{uid}", answer, [cap])
    stale = make_agent(f"dir-stale-{uid}", answer, [cap])
    await register_agent_checked(client, stale, "gone")  # registered, no worker ever polls
    directory = Directory(client, cards_ttl_s=0.5, live_ttl_s=0.5)
    try:
        async with running(client, live, register=True):
            first = await directory.candidates(cap)
            assert [c.agent_id for c in first if c.live] == [live.id]
            assert stale.id in [c.agent_id for c in first] and first[0].agent_id == live.id
            calls = 0
            original = client.workflow_service.describe_task_queue

            async def counting(*args, **kwargs):
                nonlocal calls
                calls += 1
                return await original(*args, **kwargs)

            client.workflow_service.describe_task_queue = counting
            try:
                started = asyncio.get_running_loop().time()
                for _ in range(50):
                    again = await directory.candidates(cap)
                    assert again[0].agent_id == live.id and again[0].live
                took = asyncio.get_running_loop().time() - started
            finally:
                client.workflow_service.describe_task_queue = original
            assert calls == 0, "a lookup within the stats' age sends no describe"
            assert took < 1.0
            before = directory._stats[live.id][0]
            await asyncio.sleep(0.6)
            again = await directory.candidates(cap)  # past its age: served, and refreshed in the background
            assert again[0].agent_id == live.id
            await asyncio.sleep(0.3)
            assert directory._stats[live.id][0] > before and directory._refresher.done()
    finally:
        from handoff.registry import deregister_agent

        await deregister_agent(client, stale.id)

"""The capability registry, discovery and fallback by capability, against the real server."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timezone
from uuid import uuid4

import pytest
from pydantic_core import to_json
from temporalio.client import WorkflowUpdateFailedError
from temporalio.worker import Replayer

from handoff import AgentCapability, ChainStatus, HopStatus, PermanentError, run_chain
from handoff.constants import CHAIN_TASK_QUEUE, REGISTRY_WORKFLOW, REGISTRY_WORKFLOW_ID
from handoff.models import AgentCard, Registration
from handoff.models.wire import LEASE_S, MAX_DESCRIPTION_BYTES, MAX_INSTANCE_BYTES, MAX_NAME_BYTES, MAX_VERSION_BYTES
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
from handoff.workers.agent_worker import agent_worker, instance_name, registered
from handoff.workers.chain_worker import sandboxed_runner
from handoff.workflows.registry import (
    AgentRegistryWorkflow,
    MAX_CARD_BYTES,
    MAX_CARDS,
    MAX_REASON_CHARS,
    MAX_REJECTED,
    RegistryState,
    card_of,
    check_bounds,
    rejection_key,
)
from tests.support import make_agent, running, wait_live

pytestmark = pytest.mark.usefixtures("chains")

SEC = AgentCapability.SECURITY_AUDIT


async def answer(ctx):
    return ctx.complete({"by": ctx.to_agent})


async def _start_registry(client, **state):
    """A registry of the test's own, started as this version's clients start one: with a lease
    (the default's, unless `lease_s` says)."""
    started = await client.start_workflow(REGISTRY_WORKFLOW, RegistryState(**{"lease_s": LEASE_S, **state}),
                                          id=f"registry-test-{uuid4()}", task_queue=CHAIN_TASK_QUEUE)
    return client.get_workflow_handle(started.id)  # whichever run is current: it continues as new


def _reg(agent_id, capabilities=("TESTING",), instance="i1", version="1", name=None, **fields):
    return {"agent_id": agent_id, "name": name or agent_id, "capabilities": list(capabilities),
            "max_concurrent": 2, "version": version, "instance": instance, **fields}


@pytest.mark.parametrize("registration, message", [
    (_reg("Bad Id"), "invalid agent id"),
    (_reg("ok", capabilities=["MIND_READING"]), "unknown capabilities"),
    (_reg("ok", capabilities=[]), "no capability"),
    (_reg("ok", name="n" * (MAX_NAME_BYTES + 1)), f"the name is {MAX_NAME_BYTES + 1} bytes of JSON"),
    (_reg("ok", name="\u00e9" * MAX_NAME_BYTES), f"the name is {2 * MAX_NAME_BYTES} bytes of JSON"),
    (_reg("ok", version="v" * 1_000), f"the version is 1,000 bytes of JSON (at most {MAX_VERSION_BYTES})"),
    (_reg("ok", instance="i" * 5_000), f"the instance is 5,000 bytes of JSON (at most {MAX_INSTANCE_BYTES})"),
    (_reg("ok", capabilities=["TESTING"] * 20), "20 capabilities (at most 7, each once)"),
    (_reg("ok", capabilities=["TESTING", "DEPLOYMENT", "TESTING"]), "capabilities repeated: 'TESTING'"),
    (_reg("ok", max_concurrent=10**9), "max_concurrent must be 1 to 10,000"),
    (_reg("ok", max_concurrent=0), "max_concurrent must be 1 to 10,000"),
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
        if len(memo.get("agents", [])) == 60 and len(memo.get("rejected", {})) == 2:
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


# -- bounds and leases: what any client with namespace access can send ---------------------------

CJK = range(0x4E00, 0xA000)
MEMO_BOUND = 1_200_000
"""What the registry's memo takes at most (workflows/registry.py), whatever arrives."""


def _fat(i: int, **fields) -> dict:
    """A flood's registration with its fields at their bounds, in text that barely compresses (so
    the codec's compression does not hide how large the memo grows)."""
    rng = random.Random(i)

    def text(chars: int) -> str:  # three bytes a character
        return "".join(map(chr, rng.choices(CJK, k=chars)))

    return {**_reg(f"fake-{i}", instance=f"flood-{i}", name=text(MAX_NAME_BYTES // 3), description=text(500)), **fields}


async def _flood(handle, first: int, count: int, batch: int = 300) -> None:
    for start in range(first, first + count, batch):
        await handle.signal(REGISTER_SIGNAL, [_fat(i) for i in range(start, min(start + batch, first + count))])


async def _outcome(handle, agent_id: str, timeout_s: float = 20) -> str:
    """What the registry says of `agent_id` once it knows of it."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (said := await handle.query(REGISTRATION_QUERY, agent_id)) == "unknown":
        assert asyncio.get_running_loop().time() < deadline, f"the registry still says {said!r} of {agent_id}"
        await asyncio.sleep(0.05)
    return said


async def _memo_when(handle, predicate, timeout_s: float = 20) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate(memo := await (await handle.describe()).memo()):
        assert asyncio.get_running_loop().time() < deadline, "the registry's memo never showed it"
        await asyncio.sleep(0.05)
    return memo


async def _histories(client, workflow_id: str):
    """The history of every run of `workflow_id`, the current one first."""
    run_id = None
    while True:
        history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        yield history
        run_id = history.events[0].workflow_execution_started_event_attributes.continued_execution_run_id
        if not run_id:
            return


async def _failed_tasks(client, workflow_id: str) -> int:
    return sum([sum(e.HasField("workflow_task_failed_event_attributes") for e in history.events)
                async for history in _histories(client, workflow_id)])


async def _replays(client, workflow_id: str) -> None:
    """Every run of `workflow_id` replays under the SDK's restricted sandbox, as the golden
    histories do (tests/test_replay.py): its lease decisions come out as they were made."""
    replayer = Replayer(workflows=[AgentRegistryWorkflow], data_converter=client.data_converter,
                        workflow_runner=sandboxed_runner())
    async for history in _histories(client, workflow_id):
        assert (await replayer.replay_workflow(history, raise_on_replay_failure=False)).replay_failure is None


def _memo_upserts(history) -> int:
    return sum(e.HasField("workflow_properties_modified_event_attributes") for e in history.events)


def _tasks_with_signals(history) -> int:
    """The workflow tasks of a history that delivered signals."""
    tasks, signals = 0, 0
    for event in history.events:
        signals += event.HasField("workflow_execution_signaled_event_attributes")
        if event.HasField("workflow_task_started_event_attributes"):
            tasks, signals = tasks + bool(signals), 0
    return tasks


def test_a_card_with_every_field_at_its_bound_fits_max_card_bytes():
    escaped = "\u0001"  # six bytes of JSON
    at_bounds = Registration(agent_id="a" * 63, name=escaped * (MAX_NAME_BYTES // 6),
                             version='"' * (MAX_VERSION_BYTES // 2), capabilities=[c.value for c in AgentCapability],
                             max_concurrent=10_000, instance="i" * MAX_INSTANCE_BYTES, description=escaped * 10_000)
    check_bounds(at_bounds)
    card = card_of(at_bounds, datetime.now(timezone.utc))
    assert len(to_json(card.description)) - 2 <= MAX_DESCRIPTION_BYTES
    assert len(to_json(card.model_dump(mode="json"))) <= MAX_CARD_BYTES
    assert len(instance_name(make_agent("a" * 63, answer))) <= MAX_INSTANCE_BYTES


async def test_a_flood_fills_the_registry_to_its_bound_and_it_goes_on_publishing(client):
    """3,000 registrations at the field bounds, in signals of 300: the registry takes `MAX_CARDS`,
    refuses the rest as full (a new agent after the flood too), still takes a registered agent's
    registrations, keeps its memo under its bound, and completes every workflow task."""
    handle = await _start_registry(client)
    await _flood(handle, 0, 3 * MAX_CARDS)
    await handle.signal(REGISTER_SIGNAL, [_reg("late-agent")])
    said = await _outcome(handle, "late-agent")
    assert said.startswith("rejected: the registry is full (1,000 agents); a card leaves 30 min after"), said
    with pytest.raises(WorkflowUpdateFailedError) as failure:
        await handle.execute_update("register", _reg("late-agent"))
    assert "the registry is full" in str(failure.value.cause)
    await handle.signal(REGISTER_SIGNAL, [_fat(7, description="seen again")])
    memo = await _memo_when(handle, lambda m: any(c["description"] == "seen again" for c in m.get("agents", [])))
    assert len(memo["agents"]) == MAX_CARDS
    assert len(to_json(memo["agents"])) <= MAX_CARDS * MAX_CARD_BYTES
    assert "registry is full" in memo["rejected"]["late-agent"] and len(memo["rejected"]) <= MAX_REJECTED
    stored = sum(len(p.data) for p in (await handle.describe()).raw_info.memo.fields.values())
    assert max(stored, len(to_json(memo))) < MEMO_BOUND, f"the memo: {stored:,} bytes as the server holds it"
    assert await _failed_tasks(client, handle.id) == 0
    await handle.terminate(reason="test over")
    await _replays(client, handle.id)


async def test_oversized_fields_are_refused_with_a_short_reason_and_the_registry_goes_on(client):
    huge = "x" * 1_900_000
    refused = {
        "big-name": (_reg("big-name", name=huge), "the name is 1,900,000 bytes of JSON (at most 64)"),
        huge: (_reg(huge), "invalid agent id 'xxxx"),
        "big-version": (_reg("big-version", version=huge), "the version is 1,900,000 bytes of JSON (at most 32)"),
        "big-instance": (_reg("big-instance", instance=huge), "the instance is 1,900,000 bytes of JSON"),
        "many-caps": (_reg("many-caps", capabilities=["TESTING"] * 100_000), "100,000 capabilities (at most 7"),
        "odd-caps": (_reg("odd-caps", capabilities=[huge]), "unknown capabilities ['xxxx"),
    }
    handle = await _start_registry(client)
    for registration, _ in refused.values():  # one a signal: together they would pass the 2 MB payload limit
        await handle.signal(REGISTER_SIGNAL, [registration])
    await handle.signal(REGISTER_SIGNAL, [_reg("long-told", description=huge), _reg("fine")])
    assert await _outcome(handle, "fine") == "registered 1"
    for agent_id, (_, reason) in refused.items():
        said = await handle.query(REGISTRATION_QUERY, agent_id)
        assert said.startswith(f"rejected: {reason}") and len(said) <= len("rejected: ") + MAX_REASON_CHARS, said
    memo = await _memo_when(handle, lambda m: len(m.get("rejected", {})) == len(refused))
    assert set(memo["rejected"]) == {rejection_key(agent_id) for agent_id in refused}
    assert len(to_json(memo)) < 10_000, "no reason quotes more than a few characters of what it refuses"
    [told] = [c for c in memo["agents"] if c["agent_id"] == "long-told"]
    assert told["description"] == "x" * 500
    with pytest.raises(WorkflowUpdateFailedError) as failure:
        await handle.execute_update("register", _reg("big-name", name=huge))
    assert "the name is 1,900,000 bytes of JSON" in str(failure.value.cause)
    assert await _failed_tasks(client, handle.id) == 0
    await handle.terminate(reason="test over")


async def test_flooded_cards_leave_with_their_lease_while_refreshed_cards_stay(client):
    """A registry filled by a one-off flood: an agent that refreshes keeps its card; an agent
    refused as full is taken at its first refresh after the flood's cards' lease has passed."""
    lease_s = 3.0
    handle = await _start_registry(client, lease_s=lease_s)
    await handle.signal(REGISTER_SIGNAL, [_reg("resident")])
    assert await _outcome(handle, "resident") == "registered 1"
    [resident] = await handle.query("agents", result_type=list[AgentCard])
    await handle.signal(REGISTER_SIGNAL, [_reg(f"fake-{i}") for i in range(MAX_CARDS - 1)])
    flooded_at = asyncio.get_running_loop().time()
    await handle.signal(REGISTER_SIGNAL, [_reg("newcomer")])
    assert (await _outcome(handle, "newcomer")).startswith("rejected: the registry is full")
    while (said := await handle.query(REGISTRATION_QUERY, "newcomer")) != "registered 1":
        assert asyncio.get_running_loop().time() < flooded_at + 3 * lease_s, said
        for agent_id in ("resident", "newcomer"):  # each refreshes, as its worker would
            await handle.signal(REGISTER_SIGNAL, [_reg(agent_id)])
        await asyncio.sleep(lease_s / 6)
    waited = asyncio.get_running_loop().time() - flooded_at
    assert waited >= lease_s - 0.1, f"taken after {waited:.1f} s: only once the flood's lease has passed"
    cards = {c.agent_id: c for c in await handle.query("agents", result_type=list[AgentCard])}
    assert set(cards) == {"resident", "newcomer"}
    assert cards["resident"].registered_at == resident.registered_at, "the resident kept its card throughout"
    memo = await _memo_when(handle, lambda m: len(m["agents"]) == 2)
    assert "newcomer" not in memo["rejected"]
    await handle.terminate(reason="test over")
    await _replays(client, handle.id)


async def test_a_refresh_that_changes_nothing_is_not_published(client):
    """A fleet's refreshes cost a signal each, not a memo upsert of every card; a change is."""
    handle = await _start_registry(client)
    await handle.signal(REGISTER_SIGNAL, [_reg("steady")])
    await _memo_when(handle, lambda m: len(m.get("agents", [])) == 1)
    for instance in ("i1", "i2", "i1", "i3"):  # refreshes, and replicas of the same card
        seen = (await handle.query("agents", result_type=list[AgentCard]))[0].last_seen
        await handle.signal(REGISTER_SIGNAL, [_reg("steady", instance=instance)])
        while (await handle.query("agents", result_type=list[AgentCard]))[0].last_seen == seen:
            await asyncio.sleep(0.02)
    assert _memo_upserts(await handle.fetch_history()) == 2, "the run's start, and the registration"
    await handle.signal(REGISTER_SIGNAL, [_reg("steady", description="does what it says")])
    await _memo_when(handle, lambda m: m["agents"][0]["description"] == "does what it says")
    assert _memo_upserts(await handle.fetch_history()) == 3
    await handle.terminate(reason="test over")


async def test_a_registry_recorded_before_leases_goes_on_as_recorded_then_continues_with_the_lease(client):
    """A run whose state has no lease (started without one, or continued by earlier code) applies
    registrations as it did then; its next run holds the cards to the bounds and the lease."""
    started = await client.start_workflow(REGISTRY_WORKFLOW, RegistryState(max_history_events=40),
                                          id=f"registry-test-{uuid4()}", task_queue=CHAIN_TASK_QUEUE)
    handle = client.get_workflow_handle(started.id)
    await handle.signal(REGISTER_SIGNAL, [_reg("roomy", name="n" * (MAX_NAME_BYTES + 1)), _reg("plain")])
    assert await _outcome(handle, "roomy") == "registered 1", "the bounds of a run recorded before"
    deadline = asyncio.get_running_loop().time() + 20
    while (await handle.describe()).run_id == started.result_run_id:  # "plain" refreshes
        assert asyncio.get_running_loop().time() < deadline, "the registry should have continued as new"
        await handle.signal(REGISTER_SIGNAL, [_reg("plain")])
        await asyncio.sleep(0.05)
    first_run = await client.get_workflow_handle(handle.id, run_id=started.result_run_id).fetch_history()
    assert _memo_upserts(first_run) >= _tasks_with_signals(first_run) >= 5, "published after every one"
    next_input = (await handle.fetch_history()).events[0].workflow_execution_started_event_attributes.input
    assert RegistryState.model_validate_json(next_input.payloads[0].data).lease_s == LEASE_S
    assert [c.agent_id for c in await handle.query("agents", result_type=list[AgentCard])] == ["plain"]
    await handle.terminate(reason="test over")


async def test_a_running_worker_registers_again_every_refresh_period(client, uid):
    """The shared registry's card of a running worker is seen again at every refresh, and leaves
    with the worker."""
    agent = make_agent(f"refresher-{uid}", answer)
    registry = client.get_workflow_handle(REGISTRY_WORKFLOW_ID)

    async def last_seen():
        return next((c.last_seen for c in await registry.query("agents", result_type=list[AgentCard])
                     if c.agent_id == agent.id), None)

    async with agent_worker(client, agent), registered(client, agent, refresh_every_s=0.3):
        await wait_live(client, {agent.id})
        first = await last_seen()
        deadline = asyncio.get_running_loop().time() + 5
        while (seen := await last_seen()) == first:
            assert asyncio.get_running_loop().time() < deadline, "the worker never registered again"
            await asyncio.sleep(0.05)
        assert seen > first
    for _ in range(50):
        if await last_seen() is None:
            break
        await asyncio.sleep(0.1)
    assert await last_seen() is None, "deregistered on the way out"

"""Watching a chain as it runs (`watch_chain`): one ordered stream of what it does, read from its
history, that a watcher resumes after its last cursor without losing or repeating an event, also
across a chain worker killed and the server restarted; progress notes from inside a hop, bounded."""

from __future__ import annotations

import asyncio
import signal
from uuid import UUID

import pytest

from handoff import (
    Branch,
    ChainStatus,
    Join,
    approve_chain,
    get_chain,
    start_chain,
    steer_chain,
    wait_chain,
)
from handoff.client import connect
from handoff.client.changes import Entry, entries
from handoff.client.watch import ChainWatch, watch_chain
from handoff.errors import ChainNotFound
from handoff.models import EventKind as K
from handoff.models.events import PROGRESS_PER_HOP
from tests.support import make_agent, running
from tests.test_faults import chain_worker_process, server, stop  # noqa: F401 (a fixture)


def _completes(result: dict | None = None):
    async def handle(ctx):
        return ctx.complete(result or {"by": ctx.to_agent})

    return handle


async def _collect(client, chain_id, *, after=0, until=None):
    """The chain's events after `after`, to its end (or to the first of kind `until`)."""
    seen = []
    async for event in watch_chain(client, chain_id, after=after):
        seen.append(event)
        if until is not None and event.kind is until:
            break
    return seen


async def test_a_chain_with_a_fan_out_an_approval_and_a_fallback_reads_as_the_expected_events(client, chains, uid):
    lead, w1, w2, spare, joiner, closer = (f"{n}-{uid}" for n in ("lead", "w1", "w2", "spare", "join", "close"))
    spare_done = asyncio.Event()

    async def fan(ctx):
        return ctx.fan_out([Branch(to_agent=w1, task_description="left"),
                            Branch(to_agent=w2, task_description="right")],
                           join=Join(to_agent=joiner, task_description="decide"), result_data={"fanned": 2})

    async def slow_left(ctx):
        await spare_done.wait()
        await asyncio.sleep(0.5)  # its end lands in a workflow task of its own
        return ctx.complete({"side": "left"})

    async def broken(ctx):
        return ctx.fail("out of licences")

    async def covers(ctx):
        spare_done.set()
        return ctx.complete({"side": "right", "by": "spare"})

    async def join(ctx):
        return ctx.handoff(to_agent=closer, task_description="ship it", require_approval=True,
                           result_data={"joined": len(ctx.branches)})

    async def close(ctx):
        await ctx.progress("packing", {"step": 1})
        await asyncio.sleep(1.1)
        await ctx.progress("shipping", {"step": 2})
        await asyncio.sleep(1.1)
        return ctx.complete({"shipped": True, "steering": [m.message for m in ctx.steering]})

    agents = [make_agent(lead, fan), make_agent(w1, slow_left), make_agent(w2, broken), make_agent(spare, covers),
              make_agent(joiner, join), make_agent(closer, close)]
    async with running(client, *agents):
        chain_id = await start_chain(client, to_agent=lead, task_description="release 1.2",
                                     policy={"fallback_agent": spare}, search_attributes=False)
        seen = []
        async for event in watch_chain(client, chain_id):
            seen.append(event)
            if event.kind is K.APPROVAL_AWAITED:  # the stream tells a person when to act
                await steer_chain(client, chain_id, message="mind the changelog", by="lead-dev")
                await approve_chain(client, chain_id, by="on-call", comment="go")
        record = await wait_chain(client, chain_id)

    assert record.status is ChainStatus.COMPLETED, record.error
    assert [(e.kind, e.agent) for e in seen] == [
        (K.CHAIN_STARTED, ""),
        (K.HOP_SCHEDULED, lead), (K.HOP_COMPLETED, lead), (K.FAN_OUT_OPENED, lead),
        (K.HOP_SCHEDULED, w1), (K.HOP_SCHEDULED, w2),
        (K.HOP_FAILED, w2), (K.FALLBACK, spare), (K.HOP_SCHEDULED, spare),
        (K.HOP_COMPLETED, spare), (K.BRANCH_ENDED, w2),
        (K.HOP_COMPLETED, w1), (K.BRANCH_ENDED, w1), (K.JOIN_STARTED, joiner),
        (K.HOP_COMPLETED, joiner), (K.APPROVAL_AWAITED, closer),
        (K.STEERING_RECEIVED, ""), (K.APPROVAL_DECIDED, closer), (K.HOP_SCHEDULED, closer),
        (K.HOP_PROGRESS, closer), (K.HOP_PROGRESS, closer), (K.HOP_COMPLETED, closer),
        (K.CHAIN_ENDED, ""),
    ]
    assert [e.cursor for e in seen] == list(range(1, len(seen) + 1))
    assert all(e.chain_id == record.chain_id for e in seen)
    # compared with the record: every entry's place, and what its events say of it
    places = {item.hop.handoff_id: item.place for item in entries(record.hops) if isinstance(item, Entry)}
    ends = [e for e in seen if e.kind in (K.HOP_COMPLETED, K.HOP_FAILED)]
    assert [e.place for e in ends] == [places[UUID(e.data["handoff_id"])] for e in ends]
    assert {e.place for e in ends} >= {"hop 0", "hop 1 [b0.0]", "hop 1 [b0.1]"}
    for event in ends:
        hop = next(h for h in record.all_hops() if str(h.handoff_id) == event.data["handoff_id"])
        assert (event.data["status"], event.data["attempts"], event.data.get("duration_ms")) == (
            hop.status.value, hop.attempts, hop.duration_ms)
    decided = next(e for e in seen if e.kind is K.APPROVAL_DECIDED)
    assert (decided.data["decision"], decided.data["by"]) == ("approved", "on-call")
    assert [e.summary for e in seen if e.kind is K.HOP_PROGRESS] == ["packing", "shipping"]
    assert [e.data["data"] for e in seen if e.kind is K.HOP_PROGRESS] == [{"step": 1}, {"step": 2}]
    assert seen[-1].data["status"] == "completed" and record.hops[-1].result_data["steering"] == ["mind the changelog"]

    # a watcher that left after event k and comes back with cursor k gets k+1... once each
    for k in (0, 1, 7, 16, len(seen) - 1):
        again = await _collect(client, chain_id, after=k)
        assert [e.model_dump() for e in again] == [e.model_dump() for e in seen[k:]]
    assert await _collect(client, chain_id, after=len(seen)) == []


async def test_a_watcher_resumes_across_the_chain_worker_killed_and_the_server_restarted(server, uid):  # noqa: F811
    first_agent, gate = f"wr-a-{uid}", f"wr-gate-{uid}"

    async def hand_on(ctx):
        return ctx.handoff(to_agent=gate, task_description="release", result_data={"built": True})

    client = await connect(address=server.address)
    first = chain_worker_process(server)
    second = None
    try:
        async with running(client, make_agent(first_agent, hand_on), make_agent(gate, _completes())):
            chain_id = await start_chain(client, to_agent=first_agent, task_description="build and release",
                                         policy={"approval_required": [gate]}, search_attributes=False)
            before = await asyncio.wait_for(_collect(client, chain_id, until=K.APPROVAL_AWAITED), 60)
            k = before[-1].cursor
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            await asyncio.to_thread(server.stop)
            await asyncio.to_thread(server.start)
            # the watcher comes back while nothing runs the chain, and waits for what follows
            rest = asyncio.create_task(_collect(client, chain_id, after=k))
            second = chain_worker_process(server)
            await asyncio.wait_for(approve_chain(client, chain_id, by="on-call"), 60)
            after = await asyncio.wait_for(rest, 60)
            whole = await _collect(client, chain_id)
    finally:
        stop(first, second)
    assert [e.kind for e in before] == [K.CHAIN_STARTED, K.HOP_SCHEDULED, K.HOP_COMPLETED, K.APPROVAL_AWAITED]
    assert [e.kind for e in after] == [K.APPROVAL_DECIDED, K.HOP_SCHEDULED, K.HOP_COMPLETED, K.CHAIN_ENDED]
    assert [e.model_dump() for e in before + after] == [e.model_dump() for e in whole]


async def test_a_watcher_still_watching_when_the_server_restarts_misses_nothing(server, uid):  # noqa: F811
    gate = f"wk-gate-{uid}"
    client = await connect(address=server.address)
    chains_process = chain_worker_process(server)
    try:
        async with running(client, make_agent(gate, _completes())):
            chain_id = await start_chain(client, to_agent=gate, task_description="release",
                                         policy={"approval_required": [gate]}, search_attributes=False)
            watch = ChainWatch(client, chain_id)
            seen = []

            async def follow():
                async for event in watch:
                    seen.append(event)

            following = asyncio.create_task(follow())
            for _ in range(300):
                if seen and seen[-1].kind is K.APPROVAL_AWAITED:
                    break
                await asyncio.sleep(0.1)
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(1)
            await asyncio.to_thread(server.start)
            await asyncio.wait_for(approve_chain(client, chain_id, by="on-call"), 60)
            await asyncio.wait_for(following, 60)
    finally:
        stop(chains_process)
    assert [e.kind for e in seen] == [K.CHAIN_STARTED, K.APPROVAL_AWAITED, K.APPROVAL_DECIDED, K.HOP_SCHEDULED,
                                      K.HOP_COMPLETED, K.CHAIN_ENDED]
    assert watch.record is not None and watch.record.status is ChainStatus.COMPLETED


async def test_an_agent_that_says_a_hundred_thousand_things_stays_within_its_bound(client, chains, uid):
    chatty = f"chatty-{uid}"

    async def chatter(ctx):
        for i in range(100_000):
            await ctx.progress(f"item {i}", {"i": i})
            if i % 5_000 == 0:
                await asyncio.sleep(0.2)  # lets the notes' signals out
        return ctx.complete({"items": 100_000})

    async with running(client, make_agent(chatty, chatter)):
        chain_id = await start_chain(client, to_agent=chatty, task_description="count", search_attributes=False)
        seen = await asyncio.wait_for(_collect(client, chain_id), 120)
        history = await client.get_workflow_handle(str(chain_id)).fetch_history()
    notes = [e for e in seen if e.kind is K.HOP_PROGRESS]
    assert 2 <= len(notes) <= PROGRESS_PER_HOP
    signals = sum(1 for e in history.events if e.HasField("workflow_execution_signaled_event_attributes"))
    assert signals <= PROGRESS_PER_HOP
    assert len(history.events) < 20 + 4 * PROGRESS_PER_HOP, "each note adds a signal and at most a workflow task"
    numbers = [n.data["data"]["i"] for n in notes]
    assert numbers == sorted(numbers) and numbers[0] == 0, "in order, the latest kept when coalesced"
    assert sum(n.data["coalesced"] for n in notes) > 0
    assert seen[-1].kind is K.CHAIN_ENDED and seen[-1].data["status"] == "completed"


async def test_hostile_progress_and_bad_cursors_are_refused_or_left_out(client, chains, uid):
    slow = f"hostile-{uid}"
    release = asyncio.Event()

    async def waits(ctx):
        await release.wait()
        return ctx.complete()

    async with running(client, make_agent(slow, waits)):
        chain_id = await start_chain(client, to_agent=slow, task_description="wait", search_attributes=False)
        handle = client.get_workflow_handle(str(chain_id))
        for _ in range(100):
            if (await get_chain(client, chain_id)).hops:
                break
            await asyncio.sleep(0.05)
        hop = (await get_chain(client, chain_id)).hops[0]
        # anyone who can signal the chain: malformed notes, a note for no hop, one too large
        await handle.signal("progress", {"not": "a note"})
        await handle.signal("progress", {"handoff_id": "00000000-0000-0000-0000-000000000000", "attempt": 1,
                                         "message": "ghost", "at": "2026-01-01T00:00:00Z"})
        await handle.signal("progress", {"handoff_id": str(hop.handoff_id), "attempt": 1, "message": "x" * 10_000,
                                         "at": "2026-01-01T00:00:00Z"})
        await handle.signal("progress", {"handoff_id": str(hop.handoff_id), "attempt": 1, "message": "real",
                                         "at": "2026-01-01T00:00:00Z"})
        release.set()
        seen = await asyncio.wait_for(_collect(client, chain_id), 60)
    assert [e.summary for e in seen if e.kind is K.HOP_PROGRESS] == ["real"]
    assert seen[-1].data["status"] == "completed"
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="cursor"):
            ChainWatch(client, chain_id, after=bad)
    with pytest.raises(ChainNotFound):
        await _collect(client, "00000000-0000-0000-0000-000000000001")


async def test_many_watchers_in_one_process_share_one_reader_and_see_the_same_events(client, chains, uid):
    from handoff.client import watch

    ids = [f"crowd{i}-{uid}" for i in range(3)]
    release = asyncio.Event()

    async def relay(ctx):
        await release.wait()
        i = ids.index(ctx.to_agent)
        if i + 1 < len(ids):
            return ctx.handoff(to_agent=ids[i + 1], task_description=f"step {i + 1}")
        return ctx.complete()

    async with running(client, *[make_agent(i, relay) for i in ids]):
        chain_id = await start_chain(client, to_agent=ids[0], task_description="crowd", search_attributes=False)
        watching = [asyncio.create_task(_collect(client, chain_id)) for _ in range(100)]
        late = asyncio.create_task(_collect(client, chain_id, after=2))
        await asyncio.sleep(0.5)
        assert len([k for k in watch._readers[client] if k == str(chain_id)]) == 1
        release.set()
        seen = await asyncio.wait_for(asyncio.gather(*watching), 60)
        rest = await late
    first = [e.model_dump() for e in seen[0]]
    assert all([e.model_dump() for e in s] == first for s in seen)
    assert [e.model_dump() for e in rest] == first[2:]
    assert seen[0][-1].kind is K.CHAIN_ENDED
    assert str(chain_id) not in watch._readers.get(client, {}), "the reader goes once nobody watches"

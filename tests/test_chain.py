"""The chain rules of the design (docs/design.md), each against the real server and the real chain worker."""

from __future__ import annotations

import asyncio
import time
from uuid import uuid4

import pytest
from temporalio import activity

from handoff import (
    AgentCapability,
    ChainStatus,
    ContextTooLarge,
    HandoffContext,
    HandoffResult,
    HopStatus,
    InvalidRequest,
    PermanentError,
    get_chain,
    run_chain,
    start_chain,
)
from handoff.activities.hop import CANCEL_WITHIN_S
from handoff.client import cancel_chain, wait_chain
from handoff.constants import CHAIN_TASK_QUEUE, CHAIN_WORKFLOW, MAX_CONTEXT_BYTES
from tests.support import make_agent, running

pytestmark = pytest.mark.usefixtures("chains")

FAST = {"retry_initial_s": 0.1}


def relay(ids: list[str], seen: list[dict]):
    """A handler for agent ids[i] that records what it saw and hands off to ids[i+1]."""

    async def handle(ctx: HandoffContext):
        seen.append({
            "agent": ctx.to_agent,
            "queue": activity.info().task_queue,
            "from": ctx.from_agent,
            "depth": ctx.chain_depth,
            "previous": list(ctx.previous_results),
            "context": dict(ctx.context_data),
        })
        index = ids.index(ctx.to_agent)
        if index + 1 < len(ids):
            return ctx.handoff(to_agent=ids[index + 1], task_description=f"step {index + 1}",
                               result_data={"by": ctx.to_agent}, context_data={f"k{index}": index})
        return ctx.complete({"by": ctx.to_agent, "last": True})

    return handle


async def test_five_hop_chain_runs_each_hop_on_its_agents_queue(client, uid):
    ids = [f"p{i}-{uid}" for i in range(5)]
    seen: list[dict] = []
    agents = [make_agent(i, relay(ids, seen)) for i in ids]
    async with running(client, *agents):
        record = await run_chain(client, to_agent=ids[0], task_description="start",
                                 context_data={"repo": "x"})
    assert record.status is ChainStatus.COMPLETED
    assert [h.to_agent for h in record.hops] == ids
    assert [h.from_agent for h in record.hops] == ["starter", *ids[:4]]
    assert [s["queue"] for s in seen] == [f"agent.{i}" for i in ids]
    assert [s["depth"] for s in seen] == [0, 1, 2, 3, 4]
    # previous_results accumulate in order; context enrichment reaches later hops
    assert [len(s["previous"]) for s in seen] == [0, 1, 2, 3, 4]
    assert seen[4]["previous"] == [{"by": i} for i in ids[:4]]
    assert seen[4]["context"] == {"repo": "x", "k0": 0, "k1": 1, "k2": 2, "k3": 3}
    assert [h.context_added for h in record.hops] == [["k0"], ["k1"], ["k2"], ["k3"], []]
    assert record.final_result == {"by": ids[4], "last": True}
    assert all(h.attempts == 1 and h.status is HopStatus.COMPLETED for h in record.hops)
    assert await get_chain(client, record.chain_id) == record


async def test_sixth_handoff_ends_depth_exceeded_keeping_results(client, uid):
    ids = [f"d{i}-{uid}" for i in range(6)]
    seen: list[dict] = []
    async with running(client, *[make_agent(i, relay(ids, seen)) for i in ids]):
        record = await run_chain(client, to_agent=ids[0], task_description="deep")
    assert record.status is ChainStatus.DEPTH_EXCEEDED
    assert len(seen) == 5, "the sixth agent never runs"
    assert [h.status for h in record.hops] == [HopStatus.COMPLETED] * 5 + [HopStatus.REFUSED]
    assert record.hops[5].to_agent == ids[5] and record.hops[5].from_agent == ids[4]
    assert record.final_result == {"by": ids[4]}
    assert "depth 5" in record.error


async def test_max_depth_can_be_lowered(client, uid):
    ids = [f"l{i}-{uid}" for i in range(3)]
    async with running(client, *[make_agent(i, relay(ids, [])) for i in ids]):
        record = await run_chain(client, to_agent=ids[0], task_description="t", max_depth=2)
    assert record.status is ChainStatus.DEPTH_EXCEEDED
    assert [h.status for h in record.hops] == [HopStatus.COMPLETED] * 2 + [HopStatus.REFUSED]


async def test_max_depth_cannot_be_raised(client):
    with pytest.raises(InvalidRequest, match="max_depth"):
        await start_chain(client, to_agent="a", task_description="t", max_depth=6)


async def test_handoff_back_with_the_original_task_is_a_loop(client, uid):
    a, b = f"a-{uid}", f"b-{uid}"

    async def handle_a(ctx):
        return ctx.handoff(to_agent=b, task_description="check", result_data={"a": 1})

    async def handle_b(ctx):
        return ctx.handoff(to_agent=a, task_description="review", result_data={"b": 1})

    async with running(client, make_agent(a, handle_a), make_agent(b, handle_b)):
        record = await run_chain(client, to_agent=a, task_description="review")
    assert record.status is ChainStatus.LOOP_DETECTED
    assert [h.status for h in record.hops] == [HopStatus.COMPLETED, HopStatus.COMPLETED, HopStatus.REFUSED]
    assert record.final_result == {"b": 1}
    assert "already asked" in record.error


async def test_handoff_back_with_a_new_task_is_allowed_once(client, uid):
    a, b = f"a-{uid}", f"b-{uid}"

    async def handle_a(ctx):
        return ctx.handoff(to_agent=b, task_description=f"check {ctx.chain_depth}")

    async def handle_b(ctx):
        return ctx.handoff(to_agent=a, task_description=f"fix {ctx.chain_depth}")

    async with running(client, make_agent(a, handle_a), make_agent(b, handle_b)):
        record = await run_chain(client, to_agent=a, task_description="review")
    # a, b, a (new task: allowed), b (new task: allowed), a again: third visit refused
    assert record.status is ChainStatus.LOOP_DETECTED
    assert [(h.to_agent, h.status) for h in record.hops] == [
        (a, HopStatus.COMPLETED), (b, HopStatus.COMPLETED), (a, HopStatus.COMPLETED),
        (b, HopStatus.COMPLETED), (a, HopStatus.REFUSED)]
    assert "visited 2 times" in record.error


async def test_hop_that_fails_once_is_retried(client, uid):
    calls: list[int] = []

    async def flaky(ctx):
        calls.append(activity.info().attempt)
        if len(calls) == 1:
            raise ConnectionError("transient")
        return ctx.complete({"ok": True})

    agent = make_agent(f"f-{uid}", flaky)
    async with running(client, agent):
        record = await run_chain(client, to_agent=agent.id, task_description="t", policy=FAST)
    assert record.status is ChainStatus.COMPLETED
    assert record.hops[0].attempts == 2
    assert calls == [1, 2]


async def test_retries_are_bounded_and_earlier_results_kept(client, uid):
    first, broken = f"ok-{uid}", f"broken-{uid}"

    async def ok(ctx):
        return ctx.handoff(to_agent=broken, task_description="next", result_data={"kept": True})

    async def always_fails(ctx):
        raise RuntimeError("disk on fire")

    async with running(client, make_agent(first, ok), make_agent(broken, always_fails)):
        record = await run_chain(client, to_agent=first, task_description="t",
                                 policy={**FAST, "max_attempts": 3})
    assert record.status is ChainStatus.FAILED
    assert record.hops[1].status is HopStatus.FAILED
    assert record.hops[1].attempts == 3
    assert "disk on fire" in record.hops[1].error
    assert record.final_result == {"kept": True}
    assert record.hops[0].result_data == {"kept": True}


async def _permanent_error(ctx):
    raise PermanentError("source is not Python")


async def _wrong_type(ctx):
    return {"not": "a HandoffResult"}


async def _too_large(ctx):
    return ctx.complete({"blob": "x" * (MAX_CONTEXT_BYTES + 10)})


async def _invalid_fan_out(ctx):
    from handoff.models import Branch, FanOut, Join

    bad = FanOut.model_construct(branches=[Branch(to_agent="a", task_description="t")], context_data={},
                                 join=Join.model_construct(to_agent="j", task_description="j", deadline_s=-1.0))
    return HandoffResult(handoff_id=ctx.handoff_id, success=True, fan_out=bad)


@pytest.mark.parametrize("handler, error", [
    (_permanent_error, "source is not Python"),
    (_wrong_type, "returned dict, not HandoffResult"),
    (_too_large, "over the 1,900,000-byte payload limit"),
    (_invalid_fan_out, "returned an invalid handoff"),
])
async def test_failures_retrying_cannot_fix_are_not_retried(client, uid, handler, error):
    agent = make_agent(f"once-{uid}", handler)
    async with running(client, agent):
        record = await run_chain(client, to_agent=agent.id, task_description="t", policy=FAST)
    assert record.status is ChainStatus.FAILED
    assert record.hops[0].attempts == 1
    assert error in record.hops[0].error


async def test_agent_reporting_failure_ends_the_chain_failed(client, uid):
    async def refuses(ctx):
        return ctx.fail("cannot parse", {"partial": 1})

    agent = make_agent(f"no-{uid}", refuses)
    async with running(client, agent):
        record = await run_chain(client, to_agent=agent.id, task_description="t")
    assert record.status is ChainStatus.FAILED
    assert record.hops[0].status is HopStatus.FAILED
    assert record.hops[0].error == "cannot parse"
    assert record.hops[0].result_data == {"partial": 1, "error": "cannot parse"}


async def test_hop_over_its_timeout_ends_the_chain(client, uid):
    async def slow(ctx):
        await asyncio.sleep(30)
        return ctx.complete({})

    agent = make_agent(f"slow-{uid}", slow)
    async with running(client, agent):
        record = await asyncio.wait_for(
            run_chain(client, to_agent=agent.id, task_description="t", hop_timeout=1,
                      policy={**FAST, "max_attempts": 2}),
            timeout=20,
        )
    assert record.status is ChainStatus.FAILED
    assert record.hops[0].status is HopStatus.TIMED_OUT
    assert record.hops[0].attempts == 2


async def test_a_hop_whose_attempts_all_went_silent_is_scheduled_again(client, uid):
    """Every attempt of the first round stops heartbeating (its worker's event loop stalls, as a
    worker cut off from the server looks): the hop is not failed but scheduled again, and the
    record counts every attempt."""
    runs = []

    async def stalls_three_times(ctx):
        runs.append(ctx.handoff_id)
        if len(runs) <= 3:
            time.sleep(2.5)  # no heartbeat gets out: the server hears nothing from this attempt
        return ctx.complete({"run": len(runs)})

    agent = make_agent(f"stall-{uid}", stalls_three_times)
    async with running(client, agent):
        record = await asyncio.wait_for(
            run_chain(client, to_agent=agent.id, task_description="t",
                      policy={**FAST, "heartbeat_timeout_s": 1, "max_attempts": 3}), 60)
    assert record.status is ChainStatus.COMPLETED, record.error
    # a run past the first round completed (before silent rounds, the hop failed after its 3
    # attempts). Under load a stalled loop can also delay a later run past its heartbeat timeout,
    # or time out an attempt before its handler ran: every run is in the attempts, never beyond 9
    assert record.hops[0].result_data["run"] >= 4
    assert len(runs) <= record.hops[0].attempts <= 9
    assert len(set(runs)) == 1, "one hop"


async def test_unreachable_agent_falls_back_to_the_configured_agent(client, uid):
    down, spare = f"down-{uid}", f"spare-{uid}"

    async def answer(ctx):
        return ctx.complete({"by": ctx.to_agent, "from": ctx.from_agent})

    async with running(client, make_agent(spare, answer)):
        record = await run_chain(
            client, to_agent=down, task_description="t",
            policy={"schedule_to_start_s": 1, "fallback_agent": spare},
        )
    assert record.status is ChainStatus.COMPLETED
    assert [(h.to_agent, h.status) for h in record.hops] == [
        (down, HopStatus.UNREACHABLE), (spare, HopStatus.COMPLETED)]
    assert record.hops[0].attempts == 0
    assert record.hops[1].fallback_for == down
    assert record.final_result == {"by": spare, "from": "starter"}


async def test_unreachable_agent_without_fallback_fails(client, uid):
    record = await run_chain(client, to_agent=f"nobody-{uid}", task_description="t",
                             policy={"schedule_to_start_s": 1})
    assert record.status is ChainStatus.FAILED
    assert record.hops[0].status is HopStatus.UNREACHABLE
    assert "picked up" in record.error


async def test_from_agent_is_set_by_the_workflow_not_the_agent(client, uid):
    a, b = f"a-{uid}", f"b-{uid}"

    async def forger(ctx):
        # A directive has no field for the sender; a fully built context (the original API's
        # style) has them all, and the workflow takes none of them from the agent.
        forged = HandoffContext(chain_id=uuid4(), from_agent="admin", to_agent=b, task_description="next",
                                chain_depth=0, previous_results=[{"forged": True}])
        return HandoffResult(handoff_id=ctx.handoff_id, success=True, result_data={"by": a},
                             next_handoff=forged)

    async def reader(ctx):
        return ctx.complete({"from": ctx.from_agent, "depth": ctx.chain_depth,
                             "chain": str(ctx.chain_id), "previous": ctx.previous_results})

    async with running(client, make_agent(a, forger), make_agent(b, reader)):
        record = await run_chain(client, to_agent=a, task_description="t")
    assert record.final_result == {"from": a, "depth": 1, "chain": str(record.chain_id),
                                   "previous": [{"by": a}]}
    assert record.hops[1].from_agent == a


async def test_cancel_cancels_the_current_hop(client, uid):
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def long_task(ctx):
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return ctx.complete({})

    agent = make_agent(f"long-{uid}", long_task)
    async with running(client, agent):
        chain_id = await start_chain(client, to_agent=agent.id, task_description="t",
                                     policy={"heartbeat_timeout_s": 1})
        await asyncio.wait_for(started.wait(), 10)
        live = await client.get_workflow_handle(str(chain_id)).query("chain_state")
        assert live["status"] == "running" and live["hops"][0]["status"] == "running"
        await cancel_chain(client, chain_id)
        record = await asyncio.wait_for(wait_chain(client, chain_id), 20)
        await asyncio.wait_for(cancelled.wait(), 10)
    assert record.status is ChainStatus.CANCELLED
    assert record.hops[0].status is HopStatus.CANCELLED
    with pytest.raises(InvalidRequest, match="not running"):
        await cancel_chain(client, chain_id)


async def test_a_hop_whose_chain_was_terminated_is_cancelled_within_seconds(client, uid):
    """A terminated chain asks no cancel of its hop: the worker's watch finds the hop gone."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def long_task(ctx):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return ctx.complete({})

    agent = make_agent(f"orphan-{uid}", long_task)
    async with running(client, agent):
        chain_id = await start_chain(client, to_agent=agent.id, task_description="t")
        await asyncio.wait_for(started.wait(), 10)
        asked = time.monotonic()
        await client.get_workflow_handle(str(chain_id)).terminate(reason="gone")
        await asyncio.wait_for(cancelled.wait(), 10)
    assert time.monotonic() - asked < CANCEL_WITHIN_S + 2, "within a second and a round trip"


async def test_a_cancel_reaches_a_handler_past_its_first_heartbeat_at_once(client, uid):
    """With the default 10 s heartbeat timeout a hop heartbeats every 8 s: a cancel sent 3 s into
    an 8 s handler would wait for the next beat, after the handler had finished. The worker asks
    the server each second instead, and the cancel arrives within `CANCEL_WITHIN_S` and a
    round trip (3 s allowed here, on a shared machine)."""
    started, cancelled = asyncio.Event(), asyncio.Event()
    outcome: dict[str, float] = {}

    async def eight_seconds(ctx):
        started.set()
        try:
            await asyncio.sleep(8)
        except asyncio.CancelledError:
            outcome["cancelled_at"] = time.monotonic()
            cancelled.set()
            raise
        outcome["finished_at"] = time.monotonic()
        return ctx.complete({})

    agent = make_agent(f"eight-{uid}", eight_seconds)
    async with running(client, agent):
        chain_id = await start_chain(client, to_agent=agent.id, task_description="t")
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.sleep(3)  # past the first heartbeats
        asked = time.monotonic()
        await cancel_chain(client, chain_id)
        await asyncio.wait_for(cancelled.wait(), 10)
        record = await asyncio.wait_for(wait_chain(client, chain_id), 20)
    assert "finished_at" not in outcome, "the handler was cancelled, not run to its end"
    assert outcome["cancelled_at"] - asked < CANCEL_WITHIN_S + 2, "within a second and a round trip"
    assert record.status is ChainStatus.CANCELLED
    assert record.hops[0].status is HopStatus.CANCELLED and record.hops[0].attempts == 1


async def test_running_chain_is_rebuilt_from_history_without_workers(client, uid):
    chain_id = await start_chain(client, to_agent=f"absent-{uid}", task_description="wait",
                                 context_data={"n": 1})
    await asyncio.sleep(0.5)
    record = await get_chain(client, chain_id)
    assert record.status is ChainStatus.RUNNING
    assert record.hops[0].status is HopStatus.RUNNING
    assert record.hops[0].to_agent == f"absent-{uid}"
    await client.get_workflow_handle(str(chain_id)).terminate(reason="test over")
    record = await get_chain(client, chain_id)
    assert record.status is ChainStatus.FAILED
    assert "test over" in record.error


async def test_oversized_context_is_refused_before_anything_starts(client, uid):
    chain_id = uuid4()
    with pytest.raises(ContextTooLarge):
        await start_chain(client, to_agent="a", task_description="t", chain_id=chain_id,
                          context_data={"blob": "x" * MAX_CONTEXT_BYTES})
    with pytest.raises(Exception, match="no chain"):
        await get_chain(client, chain_id)


async def test_context_grown_past_the_limit_mid_chain_fails_keeping_results(client, uid):
    a, b = f"a-{uid}", f"b-{uid}"

    async def grow(ctx):
        return ctx.handoff(to_agent=b, task_description="t2", result_data={"kept": 1},
                           context_data={"blob": "y" * (MAX_CONTEXT_BYTES // 2 + 1000)})

    async def never(ctx):
        raise AssertionError("must not run")

    async with running(client, make_agent(a, grow), make_agent(b, never)):
        # each half fits; merged into the next hop's context they cross the limit
        record = await run_chain(client, to_agent=a, task_description="t",
                                 context_data={"seed": "z" * (MAX_CONTEXT_BYTES // 2)})
    assert record.status is ChainStatus.FAILED
    assert record.hops[1].status is HopStatus.REFUSED
    assert record.final_result == {"kept": 1}


async def test_duplicate_chain_id_is_refused(client, uid):
    chain_id = uuid4()
    await start_chain(client, to_agent=f"x-{uid}", task_description="t", chain_id=chain_id)
    with pytest.raises(InvalidRequest, match="already exists"):
        await start_chain(client, to_agent=f"x-{uid}", task_description="t", chain_id=chain_id)
    await client.get_workflow_handle(str(chain_id)).terminate(reason="test over")


@pytest.mark.parametrize("kwargs, message", [
    ({"to_agent": "Bad Id"}, "invalid agent id"),
    ({"capability": "WIZARDRY"}, "unknown capability"),
    ({"to_agent": "a", "capability": "TESTING"}, "exactly one"),
    ({"to_agent": "a", "chain_id": "not-a-uuid"}, "UUID"),
    ({"to_agent": "a", "hop_timeout": -1}, "hop_timeout_s"),
])
async def test_bad_requests_raise_a_typed_error(client, kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        await start_chain(client, task_description="t", **kwargs)


async def test_undecodable_input_fails_the_workflow_instead_of_sticking(client):
    handle = await client.start_workflow(
        CHAIN_WORKFLOW, {"garbage": True}, id=str(uuid4()), task_queue=CHAIN_TASK_QUEUE,
    )
    with pytest.raises(Exception):
        await asyncio.wait_for(handle.result(), 15)
    description = await handle.describe()
    assert description.status.name == "FAILED"


async def test_handoff_by_capability_goes_to_a_live_registered_agent(client, uid):
    lead, auditor = f"lead-{uid}", f"audit-{uid}"

    async def handle_lead(ctx):
        return ctx.handoff(capability=AgentCapability.SECURITY_AUDIT, task_description="audit")

    async def handle_audit(ctx):
        return ctx.complete({"audited_by": ctx.to_agent, "cap": ctx.to_capability.value})

    agents = [make_agent(lead, handle_lead, [AgentCapability.CODE_ANALYSIS]),
              make_agent(auditor, handle_audit, [AgentCapability.SECURITY_AUDIT])]
    async with running(client, *agents, register=True):
        record = await run_chain(client, to_agent=lead, task_description="t")
    assert record.status is ChainStatus.COMPLETED
    assert record.hops[1].to_agent == auditor
    assert record.hops[1].capability is AgentCapability.SECURITY_AUDIT
    assert auditor in record.hops[1].candidates
    assert record.final_result == {"audited_by": auditor, "cap": "SECURITY_AUDIT"}


async def test_worker_enforces_max_concurrent(client, uid):
    inside, peak = 0, 0

    async def busy(ctx):
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        await asyncio.sleep(0.3)
        inside -= 1
        return ctx.complete({})

    agent = make_agent(f"one-{uid}", busy, max_concurrent=1)
    async with running(client, agent):
        records = await asyncio.gather(*(
            run_chain(client, to_agent=agent.id, task_description=f"t{i}") for i in range(3)))
    assert all(r.status is ChainStatus.COMPLETED for r in records)
    assert peak == 1


async def test_handoff_policy_refuses_a_handoff_it_does_not_allow(client, uid):
    a, b, c = f"a-{uid}", f"b-{uid}", f"c-{uid}"

    async def to_b(ctx):
        return ctx.handoff(to_agent=b, task_description="b's part", result_data={"a": 1})

    async def to_c(ctx):
        return ctx.handoff(to_agent=c, task_description="c's part", result_data={"b": 1})

    async def never(ctx):
        raise AssertionError("the policy must stop the chain before c")

    policy = {"allowed_handoffs": {"starter": [a], a: [b, "SECURITY_AUDIT"], b: ["DEPLOYMENT"]}}
    async with running(client, make_agent(a, to_b), make_agent(b, to_c), make_agent(c, never)):
        record = await run_chain(client, to_agent=a, task_description="t", policy=policy)
        blocked_start = await run_chain(client, to_agent=b, task_description="t", policy=policy)
    assert record.status is ChainStatus.REJECTED
    assert [h.status for h in record.hops] == [HopStatus.COMPLETED, HopStatus.COMPLETED, HopStatus.REFUSED]
    assert record.hops[2].to_agent == c and "policy" in record.error
    assert record.final_result == {"b": 1}
    assert blocked_start.status is ChainStatus.REJECTED and len(blocked_start.hops) == 1


async def test_handoff_policy_with_bad_names_is_refused_at_the_edge(client):
    with pytest.raises(InvalidRequest, match="invalid agent id"):
        await start_chain(client, to_agent="a", task_description="t",
                          policy={"allowed_handoffs": {"a": ["Not An Agent"]}})


async def test_sender_can_limit_what_the_next_agent_sees(client, uid):
    a, b, c = f"a-{uid}", f"b-{uid}", f"c-{uid}"
    seen: dict[str, dict] = {}

    async def share_little(ctx):
        return ctx.handoff(to_agent=b, task_description="look at the public part",
                           result_data={"a": "private finding"}, context_data={"note": "from a"},
                           visible_context_keys=["public"], visible_previous_results=0)

    async def look(ctx):
        seen[ctx.to_agent] = {"context": dict(ctx.context_data), "previous": list(ctx.previous_results)}
        if ctx.to_agent == b:
            return ctx.handoff(to_agent=c, task_description="look at everything", result_data={"b": 1})
        return ctx.complete({"c": 1})

    async with running(client, make_agent(a, share_little), make_agent(b, look), make_agent(c, look)):
        chain_id = await start_chain(client, to_agent=a, task_description="t",
                                     context_data={"public": 1, "secret": 2})
        record = await wait_chain(client, chain_id)
    assert record.status is ChainStatus.COMPLETED
    assert seen[b] == {"context": {"public": 1}, "previous": []}
    assert seen[c]["context"] == {"public": 1, "secret": 2, "note": "from a"}
    assert seen[c]["previous"] == [{"a": "private finding"}, {"b": 1}]
    assert record.hops[1].withheld_context_keys == ["note", "secret"]
    assert record.hops[1].previous_results_shown == 0
    assert record.hops[2].withheld_context_keys == [] and record.hops[2].previous_results_shown is None

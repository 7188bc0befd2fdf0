"""What a chain costs on the server, kept at its floor without losing a guarantee: a large result is
carried once in history (later hops and the record name it, and every reader still sees it whole);
a chain's capability hops share one registry lookup; no progress timer (tests/test_observability.py
shows progress without one). The actions and bytes themselves are measured in `bench/cost.py`."""

from __future__ import annotations

import json

import pytest
from temporalio.contrib.pydantic import pydantic_data_converter

from handoff import AgentCapability, ChainStatus, HandoffContext, get_chain, run_chain, wait_chain
from handoff.client.chains import start_request
from handoff.client.requests import build_request
from handoff.client.audit import hop_contexts, record_from_history
from handoff.constants import INLINE_RESULT_BYTES
from handoff.models import IN_HISTORY, HopInput
from tests.support import make_agent, running

pytestmark = pytest.mark.usefixtures("chains")

BLOB = 5 * INLINE_RESULT_BYTES


def big(agent: str) -> dict:
    return {"by": agent, "blob": agent.split("-")[1] * BLOB}


def scheduled_inputs(history) -> list[HopInput]:
    """Every hop activity's input, as history holds it (results named, not filled in)."""
    return [HopInput.model_validate_json(e.activity_task_scheduled_event_attributes.input.payloads[0].data)
            for e in history.events if e.HasField("activity_task_scheduled_event_attributes")
            and e.activity_task_scheduled_event_attributes.activity_type.name == "handoff.hop"]


def returned(history) -> dict:
    """The record as the workflow returned it, undecoded."""
    last = history.events[-1]
    if last.HasField("workflow_execution_completed_event_attributes"):
        return json.loads(last.workflow_execution_completed_event_attributes.result.payloads[0].data)
    details = last.workflow_execution_failed_event_attributes.failure.application_failure_info.details
    return json.loads(details.payloads[0].data)


async def test_a_large_result_is_carried_once_and_every_reader_sees_it_whole(client, uid):
    a, b, c = f"big-a-{uid}", f"big-b-{uid}", f"big-c-{uid}"
    seen: dict[str, list[dict]] = {}

    def relay(me: str, to: str | None):
        async def handle(ctx: HandoffContext):
            seen[me] = ctx.previous_results
            if to is None:
                return ctx.complete(big(me))
            return ctx.handoff(to_agent=to, task_description=f"after {me}", result_data=big(me))
        return handle

    async with running(client, make_agent(a, relay(a, b)), make_agent(b, relay(b, c)), make_agent(c, relay(c, None))):
        record = await run_chain(client, to_agent=a, task_description="large results",
                                 context_data={"note": "small"})
    assert record.status is ChainStatus.COMPLETED, record.error
    assert seen == {a: [], b: [big(a)], c: [big(a), big(b)]}, "each handler got every earlier result whole"
    assert [h.result_data for h in record.hops] == [big(a), big(b), big(c)]
    assert record.final_result == big(c)

    history = await client.get_workflow_handle(str(record.chain_id)).fetch_history()
    inputs = scheduled_inputs(history)
    assert [i.result_refs for i in inputs] == [[], [record.hops[0].handoff_id],
                                               [record.hops[0].handoff_id, record.hops[1].handoff_id]]
    assert all(r == {} for i in inputs for r in i.context.previous_results), "named, not repeated"
    carried = returned(history)
    assert [set(h["result_data"]) for h in carried["hops"]] == [{IN_HISTORY}] * 3
    assert carried["final_result"] == big(c), "the final result stays in the workflow's result"
    stored = b"".join(e.SerializeToString() for e in history.events)
    assert [stored.count(big(agent)["blob"].encode()) for agent in (a, b, c)] == [1, 1, 2], \
        "each result once in history, the last one again as the final result"

    assert await get_chain(client, record.chain_id) == record
    assert await record_from_history(history, pydantic_data_converter, replay=True) == record
    contexts = await hop_contexts(history, pydantic_data_converter)
    assert [ctx.previous_results for ctx in contexts] == [[], [big(a)], [big(a), big(b)]]


async def test_small_results_are_carried_inline(client, uid):
    a, b = f"small-a-{uid}", f"small-b-{uid}"

    async def first(ctx):
        return ctx.handoff(to_agent=b, task_description="next", result_data={"n": 1})

    async def last(ctx):
        return ctx.complete({"seen": ctx.previous_results})

    async with running(client, make_agent(a, first), make_agent(b, last)):
        record = await run_chain(client, to_agent=a, task_description="small results")
    assert record.final_result == {"seen": [{"n": 1}]}
    history = await client.get_workflow_handle(str(record.chain_id)).fetch_history()
    assert [i.result_refs for i in scheduled_inputs(history)] == [[], []]
    assert [h["result_data"] for h in returned(history)["hops"]] == [{"n": 1}, {"seen": [{"n": 1}]}]


async def test_an_unsuccessful_chain_gives_back_its_large_results_too(client, uid):
    a, b = f"fails-a-{uid}", f"fails-b-{uid}"

    async def first(ctx):
        return ctx.handoff(to_agent=b, task_description="next", result_data=big(a))

    async def broken(ctx):
        return ctx.fail("no luck", {"earlier": ctx.previous_results})

    async with running(client, make_agent(a, first), make_agent(b, broken)):
        record = await run_chain(client, to_agent=a, task_description="fails late")
    assert record.status is ChainStatus.FAILED
    assert record.hops[0].result_data == big(a)
    assert record.hops[1].result_data["earlier"] == [big(a)]
    history = await client.get_workflow_handle(str(record.chain_id)).fetch_history()
    assert [set(h["result_data"]) for h in returned(history)["hops"]] == [{IN_HISTORY}, {IN_HISTORY}]
    assert await get_chain(client, record.chain_id) == record


async def test_a_chains_capability_hops_share_one_registry_lookup(client, uid):
    caps = [AgentCapability.DATABASE_OPERATIONS, AgentCapability.API_INTEGRATION, AgentCapability.DEPLOYMENT]
    ids = [f"cap{i}-{uid}" for i in range(3)]

    def relay(index: int):
        async def handle(ctx):
            if index + 1 < len(caps):
                return ctx.handoff(capability=caps[index + 1], task_description=f"step {index + 1}",
                                   result_data={"at": index})
            return ctx.complete({"at": index})
        return handle

    agents = [make_agent(i, relay(n), [cap]) for n, (i, cap) in enumerate(zip(ids, caps))]
    async with running(client, *agents, register=True):
        record = await run_chain(client, capability=caps[0], task_description="by capability")
    assert record.status is ChainStatus.COMPLETED, record.error
    assert [h.to_agent for h in record.hops] == ids
    assert all(h.candidates and h.candidates[0] == h.to_agent for h in record.hops)
    history = await client.get_workflow_handle(str(record.chain_id)).fetch_history()
    markers = [e for e in history.events if e.HasField("marker_recorded_event_attributes")]
    assert len(markers) == 1, "one lookup of every capability served all three hops"
    assert not any(e.HasField("timer_started_event_attributes") for e in history.events), "no progress timer"


async def test_a_chain_of_the_protocol_before_runs_as_it_did(client, uid):
    """An older client's request (protocol 3) on today's chain worker: a progress timer, and every
    result carried in every later hop's input and in the record, as its chains were recorded."""
    a, b = f"old-a-{uid}", f"old-b-{uid}"

    async def first(ctx):
        return ctx.handoff(to_agent=b, task_description="next", result_data=big(a))

    async def last(ctx):
        return ctx.complete({"earlier": ctx.previous_results})

    request = build_request(to_agent=a, task_description="protocol 3").model_copy(update={"protocol": 3})
    async with running(client, make_agent(a, first), make_agent(b, last)):
        handle = await start_request(client, request)
        record = await wait_chain(client, handle.id)
    assert record.status is ChainStatus.COMPLETED and record.final_result == {"earlier": [big(a)]}
    history = await client.get_workflow_handle(handle.id).fetch_history()
    assert [i.result_refs for i in scheduled_inputs(history)] == [[], []]
    assert returned(history)["hops"][0]["result_data"] == big(a)
    assert any(e.HasField("timer_started_event_attributes") for e in history.events)

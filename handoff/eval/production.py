"""Cases from production: chains that visited an agent, each turned into a case whose expectation
is the path the chain took (to be edited into what it should have taken)."""

from __future__ import annotations

from datetime import datetime

from pydantic import ValidationError
from temporalio.client import Client, WorkflowHistory

from handoff.client import context_limit
from handoff.client.audit import record_from_history
from handoff.client.search import chain_query, find_chains
from handoff.errors import unless_missing
from handoff.eval.cases import MAX_EXPECTED_HOPS, MAX_KEY_CHARS, MAX_LINE_BYTES, MAX_LISTED, Case, validation_line
from handoff.eval.scoring import label, positions, visited
from handoff.models import ChainRecord, ChainRequest


def case_from_chain(request: ChainRequest, record: ChainRecord, *, deployment_limit: int) -> Case:
    """The case of one recorded chain: its start as requested, and as its expectation the path
    it took (every top-level hop's target: the agent, or the capability it was addressed by),
    its status and its final result's keys, and for a chain that fanned out the agents it visited.
    `deployment_limit`: the context limit the client sets by itself, left out of the policy."""
    policy = request.policy.model_dump(mode="json", exclude_defaults=True)
    if policy.get("max_context_bytes") == deployment_limit:
        del policy["max_context_bytes"]
    expect: dict = {"hops": [label(p.chosen) for p in positions(record)][:MAX_EXPECTED_HOPS] or None,
                    "status": record.status}
    keys = [k for k in sorted(record.final_result) if 0 < len(k) <= MAX_KEY_CHARS][:MAX_LISTED]
    if keys:
        expect["result_keys"] = keys
    if any(hop.fan_out is not None for hop in record.all_hops()):
        agents = sorted(set(visited(record)))[:MAX_LISTED]
        if agents:
            expect["visits"] = {"agents": agents, "ordered": False}
    return Case.model_validate({
        "name": f"chain {record.chain_id}",
        "to_agent": request.to_agent or None,
        "capability": request.capability,
        "task": request.task_description,
        "context": request.context_data or None,
        "policy": policy or None,
        "expect": {k: v for k, v in expect.items() if v is not None},
    })


async def _request_of(history: WorkflowHistory, client: Client) -> ChainRequest:
    started = history.events[0].workflow_execution_started_event_attributes
    [request] = await client.data_converter.decode(list(started.input.payloads), [ChainRequest])
    return request


async def cases_from_chains(client: Client, agent: str, *, since: datetime | None = None,
                            limit: int = 100) -> tuple[list[Case], list[str]]:
    """Cases from the chains that visited `agent` (started since `since`, newest first, at most
    `limit`), and a line for each chain left out and why (still running, started from an earlier
    handoff, or too large for a case's line)."""
    cases, left_out = [], []
    deployment_limit = context_limit(client)
    for row in await find_chains(client, chain_query(agent=agent, since=since), limit=limit):
        chain_id = row["chain_id"]
        history = await unless_missing(client.get_workflow_handle(chain_id).fetch_history())
        if history is None or not history.events:
            left_out.append(f"chain {chain_id}: its history is gone")
            continue
        record = await record_from_history(history, client.data_converter)
        if not record.status.ended:
            left_out.append(f"chain {chain_id}: still running")
            continue
        request = await _request_of(history, client)
        if request.start_depth or request.previous_results:
            left_out.append(f"chain {chain_id}: it continues an earlier handoff, which a case cannot start")
            continue
        try:
            case = case_from_chain(request, record, deployment_limit=deployment_limit)
        except ValidationError as err:  # say, a task longer than a case's
            left_out.append(f"chain {chain_id}: it makes no valid case: {validation_line(err)}")
            continue
        size = len(case.model_dump_json(exclude_none=True).encode())
        if size > MAX_LINE_BYTES:
            left_out.append(f"chain {chain_id}: its case is {size:,} bytes, over the {MAX_LINE_BYTES:,} of a line")
            continue
        cases.append(case)
    return cases, left_out

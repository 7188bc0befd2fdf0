"""Re-run a recorded chain from one of its hops: a new chain that starts with the original's
entries before that hop, carried as they were (their agents are not called again), and runs the
hop again, on the same agent or another, with the context and earlier results it had."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from pydantic import ValidationError
from temporalio.client import Client

from handoff.client.audit import hop_contexts, record_from_history
from handoff.client.chains import start_request
from handoff.client.requests import build_request, chain_uuid, checked
from handoff.errors import ChainNotFound, InvalidRequest, unless_missing
from handoff.models import AgentCapability, ChainPolicy, ChainRecord, ChainRequest, RerunOf
from handoff.models.checks import one_line


async def rerun_request(
    client: Client, chain_id: UUID | str, *, from_hop: int, to_agent: str | None = None,
    capability: AgentCapability | str | None = None, task_description: str | None = None,
    context_data: dict[str, Any] | None = None, policy: ChainPolicy | Mapping[str, Any] | None = None,
) -> ChainRequest:
    """The request of a re-run of `chain_id` from its hop `from_hop` (see `rerun_chain`)."""
    if to_agent and capability:
        raise InvalidRequest("a re-run goes to an agent or to a capability, not both")
    original_id = chain_uuid(chain_id)
    history = await unless_missing(client.get_workflow_handle(str(original_id)).fetch_history())
    if history is None:
        raise ChainNotFound(str(chain_id))
    record = await record_from_history(history, client.data_converter)
    index = _rerun_index(record, from_hop)
    hop = record.hops[index]
    contexts = {ctx.handoff_id: ctx for ctx in await hop_contexts(history, client.data_converter)}
    context = contexts.get(hop.handoff_id) if hop.handoff_id is not None else None
    if context is None:
        raise InvalidRequest(f"hop {hop.hop} of chain {chain_id} never ran ({hop.status.value}): "
                             "nothing to re-run it from")
    started = history.events[0].workflow_execution_started_event_attributes
    [original] = await client.data_converter.decode(list(started.input.payloads), [ChainRequest])
    fresh = build_request(
        task_description=task_description or hop.task_description,
        to_agent=to_agent if (to_agent or capability) else (hop.to_agent if not hop.capability else None),
        capability=capability if (to_agent or capability) else hop.capability,
        context_data=context.context_data if context_data is None else context_data,
        policy=original.policy if policy is None else policy,
    )
    try:
        request = fresh.model_copy(update={
            "started_by": hop.from_agent, "start_depth": hop.hop,
            "previous_results": context.previous_results,
            "rerun_of": RerunOf(chain_id=original_id, hop=hop.hop),
            "carried_hops": [h.model_dump(mode="json") for h in record.hops[:index]],
        })
        request = ChainRequest.model_validate(request.model_dump())
    except ValidationError as err:
        raise InvalidRequest(one_line(err)) from None
    return checked(request)


def _rerun_index(record: ChainRecord, from_hop: int) -> int:
    """Which of the record's entries a re-run from hop `from_hop` runs again: the first entry at
    that depth, or, for a hop inside a fan-out's branches, the hop that fanned out."""
    for index, hop in enumerate(record.hops):
        if hop.hop == from_hop:
            return index
        if hop.hop > from_hop and index > 0 and record.hops[index - 1].fan_out is not None:
            return index - 1
    raise InvalidRequest(f"chain {record.chain_id} has no hop {from_hop} (its hops: "
                         f"{', '.join(str(h.hop) for h in record.hops) or 'none'})")


async def rerun_chain(client: Client, chain_id: UUID | str, *, from_hop: int,
                      memo: Mapping[str, Any] | None = None, **changes: Any) -> UUID:
    """Start a re-run of `chain_id` from its hop `from_hop`; the new chain's id. The new chain
    starts with the original's entries before that hop (`carried_from` set on them; their agents
    are not called again) and runs the hop again with the context and earlier results it had, on
    the same agent unless `to_agent` or `capability` says otherwise, with `task_description`,
    `context_data` or `policy` replacing the original's when given. Its record says where it came
    from (`rerun_of`), and `handoff list --rerun-of` finds it. The use: roll out a fixed version of
    an agent (`handoff rollout`), then re-run the chains it got wrong from its hop. `memo`: what
    the starter keeps with the new chain (see `start_request`)."""
    request = await rerun_request(client, chain_id, from_hop=from_hop, **changes)
    await start_request(client, request, memo=memo)
    return request.chain_id

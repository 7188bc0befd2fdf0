"""Hop results carried once, in their hops' activity results in the chain's history: a later hop's
input (`HopInput.result_refs`) and the record the workflow returns (`IN_HISTORY`) name them, and
the agent's worker and the client put them back from the history here."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import UUID

from temporalio.api.history.v1 import HistoryEvent
from temporalio.converter import DataConverter

from handoff.constants import HOP_ACTIVITY
from handoff.models import ChainRecord, HandoffContext, HopOutput


class ResultMissing(LookupError):
    """A result a hop or a record names is not in the chain's history."""


async def hop_results(events: Iterable[HistoryEvent], converter: DataConverter,
                      wanted: set[UUID] | None = None) -> dict[UUID, dict[str, Any]]:
    """The result data of every completed hop activity in `events` (of those in `wanted`, when
    given), by the hop's handoff id."""
    hops: set[int] = set()  # the event ids of scheduled hop activities
    results: dict[UUID, dict[str, Any]] = {}
    for event in events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            if event.activity_task_scheduled_event_attributes.activity_type.name == HOP_ACTIVITY:
                hops.add(event.event_id)
        elif event.HasField("activity_task_completed_event_attributes"):
            attrs = event.activity_task_completed_event_attributes
            if attrs.scheduled_event_id in hops:
                [output] = await converter.decode(list(attrs.result.payloads), [HopOutput])
                handoff_id = output.result.handoff_id
                if wanted is None or handoff_id in wanted:
                    results[handoff_id] = output.result.result_data
    return results


def needs_results(record: ChainRecord) -> set[UUID]:
    """The handoff ids of the hops whose results `record` carries in its history only."""
    return {hop.handoff_id for hop in record.all_hops() if hop.result_in_history and hop.handoff_id}


def put_back(record: ChainRecord, results: dict[UUID, dict[str, Any]]) -> ChainRecord:
    """`record` with every result it carries in its history back in place (from `hop_results`)."""
    for hop in record.all_hops():
        if hop.result_in_history and hop.handoff_id is not None:
            if hop.handoff_id not in results:
                raise ResultMissing(f"the result of hop {hop.hop} ({hop.handoff_id}) is not in the chain's history")
            hop.result_data = results[hop.handoff_id]
    return record


def fill_context(context: HandoffContext, refs: list[UUID | None], results: dict[UUID, dict[str, Any]]) -> None:
    """Put the earlier results `refs` names back into `context.previous_results`, in place."""
    for index, ref in enumerate(refs[:len(context.previous_results)]):
        if ref is not None:
            if ref not in results:
                raise ResultMissing(f"the result of hop {ref} is not in the chain's history")
            context.previous_results[index] = results[ref]

"""Rebuild a chain's record from its workflow history, the audit trail Temporal keeps.

A chain that completed carries its record as the workflow result. For any other state
(running, cancelled, failed, terminated) the record is rebuilt event by event from the hop
activities' inputs and outcomes, so `handoff show` works with no worker running.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from temporalio.api.enums.v1 import TimeoutType
from temporalio.api.failure.v1 import Failure
from temporalio.client import WorkflowHistory
from temporalio.converter import DataConverter

from handoff.constants import HOP_ACTIVITY
from handoff.models import (
    ChainRecord,
    ChainRequest,
    ChainStatus,
    HandoffContext,
    HopInput,
    HopOutput,
    HopRecord,
    HopStatus,
)


def _time(event: Any) -> datetime:
    return event.event_time.ToDatetime(tzinfo=timezone.utc)


async def _decode_one(converter: DataConverter, payloads: Any, type_hint: type) -> Any:
    [value] = await converter.decode(list(payloads.payloads), [type_hint])
    return value


def _close(hop: HopRecord, status: HopStatus, when: datetime, error: str | None = None) -> None:
    hop.status = status
    hop.error = error
    hop.completed_at = when
    if hop.started_at is not None:
        hop.duration_ms = (when - hop.started_at).total_seconds() * 1000


def _failure_text(failure: Failure) -> str:
    return failure.message or "failed"


async def record_from_history(history: WorkflowHistory, converter: DataConverter) -> ChainRecord:
    record: ChainRecord | None = None
    hops: dict[int, HopRecord] = {}
    for event in history.events:
        kind = event.WhichOneof("attributes")
        attrs = getattr(event, kind) if kind else None
        when = _time(event)
        if kind == "workflow_execution_started_event_attributes":
            request: ChainRequest = await _decode_one(converter, attrs.input, ChainRequest)
            record = ChainRecord(
                chain_id=request.chain_id,
                status=ChainStatus.RUNNING,
                task_description=request.task_description,
                started_at=when,
            )
        elif kind == "activity_task_scheduled_event_attributes" and attrs.activity_type.name == HOP_ACTIVITY:
            hop_input: HopInput = await _decode_one(converter, attrs.input, HopInput)
            ctx = hop_input.context
            hops[event.event_id] = HopRecord(
                hop=hop_input.hop,
                handoff_id=ctx.handoff_id,
                from_agent=ctx.from_agent,
                to_agent=ctx.to_agent,
                capability=ctx.to_capability,
                task_description=ctx.task_description,
                status=HopStatus.RUNNING,
                started_at=when,
                fallback_for=hop_input.fallback_for,
                withheld_context_keys=hop_input.withheld_context_keys,
                previous_results_shown=hop_input.previous_results_shown,
            )
        elif kind == "activity_task_started_event_attributes" and attrs.scheduled_event_id in hops:
            hops[attrs.scheduled_event_id].attempts = attrs.attempt
        elif kind == "activity_task_completed_event_attributes" and attrs.scheduled_event_id in hops:
            hop = hops[attrs.scheduled_event_id]
            output: HopOutput = await _decode_one(converter, attrs.result, HopOutput)
            hop.attempts = output.attempt
            hop.result_data = output.result.result_data
            if output.result.next_handoff is not None:
                hop.context_added = sorted(output.result.next_handoff.context_data)
            ok = output.result.success
            _close(hop, HopStatus.COMPLETED if ok else HopStatus.FAILED, when,
                   None if ok else str(output.result.result_data.get("error", "agent reported failure")))
        elif kind == "activity_task_failed_event_attributes" and attrs.scheduled_event_id in hops:
            _close(hops[attrs.scheduled_event_id], HopStatus.FAILED, when, _failure_text(attrs.failure))
        elif kind == "activity_task_timed_out_event_attributes" and attrs.scheduled_event_id in hops:
            hop = hops[attrs.scheduled_event_id]
            timeout = attrs.failure.timeout_failure_info.timeout_type
            if timeout == TimeoutType.TIMEOUT_TYPE_SCHEDULE_TO_START:
                hop.attempts = 0
                _close(hop, HopStatus.UNREACHABLE, when, f"no worker of {hop.to_agent!r} picked up the hop")
            else:
                name = TimeoutType.Name(timeout).removeprefix("TIMEOUT_TYPE_").lower()
                _close(hop, HopStatus.TIMED_OUT, when, f"hop timed out ({name})")
        elif kind == "activity_task_canceled_event_attributes" and attrs.scheduled_event_id in hops:
            _close(hops[attrs.scheduled_event_id], HopStatus.CANCELLED, when, "hop cancelled")
        elif kind == "workflow_execution_completed_event_attributes":
            return await _decode_one(converter, attrs.result, ChainRecord)
        elif record is not None and kind in _TERMINAL:
            status, error = _TERMINAL[kind](attrs)
            for hop in hops.values():
                if hop.status is HopStatus.RUNNING:
                    _close(hop, HopStatus.CANCELLED if status is ChainStatus.CANCELLED else HopStatus.FAILED,
                           when, error)
            record.status, record.error = status, error
            record.completed_at = when
            record.duration_ms = (when - record.started_at).total_seconds() * 1000
    if record is None:
        raise ValueError("history has no workflow start event")
    record.hops = list(hops.values())
    done = [h for h in record.hops if h.status is HopStatus.COMPLETED]
    record.final_result = done[-1].result_data if done else {}
    return record


_TERMINAL = {
    "workflow_execution_canceled_event_attributes": lambda a: (ChainStatus.CANCELLED, "chain cancelled"),
    "workflow_execution_failed_event_attributes": lambda a: (ChainStatus.FAILED, _failure_text(a.failure)),
    "workflow_execution_terminated_event_attributes": lambda a: (
        ChainStatus.FAILED, f"terminated: {a.reason or 'no reason given'}"),
    "workflow_execution_timed_out_event_attributes": lambda a: (ChainStatus.FAILED, "chain timed out"),
}


async def hop_contexts(history: WorkflowHistory, converter: DataConverter) -> list[HandoffContext]:
    """The context of every hop the chain scheduled (fallbacks included), in order."""
    contexts = []
    for event in history.events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            attrs = event.activity_task_scheduled_event_attributes
            if attrs.activity_type.name == HOP_ACTIVITY:
                hop_input: HopInput = await _decode_one(converter, attrs.input, HopInput)
                contexts.append(hop_input.context)
    return contexts

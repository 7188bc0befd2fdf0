"""A chain's record, read back from its workflow history: the audit trail Temporal keeps.

There is one source of truth for what a record says, the chain workflow itself. A chain that
ended carries its record: a completed one as the workflow's result, an unsuccessful one in the
details of its workflow failure. For any other state (running, cancelled,
failed, terminated) the history is replayed through the chain workflow's own code with the
SDK's `Replayer`, in this process and with no worker, and the record is read from the replayed
workflow. Only what the workflow cannot see is applied afterwards, here: a termination, a
workflow timeout or a workflow failure ends the chain and closes the hops still running.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ExecuteWorkflowInput,
    Interceptor,
    Replayer,
    UnsandboxedWorkflowRunner,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
)

from handoff.constants import HOP_ACTIVITY, UNSUCCESSFUL_CHAIN_ERROR
from handoff.errors import HandoffError
from handoff.payloads.history import fill_context, hop_results, needs_results, put_back
from handoff.models import ChainRecord, ChainStatus, HandoffContext, HopInput, HopStatus
from handoff.workflows.chain import HandoffChainWorkflow


class HistoryUnreadable(HandoffError):
    """A chain's history cannot be read back into a record (not a chain, or it does not replay)."""


class _Holder(Interceptor):
    """Keeps the workflow instance a replay creates, and its record as the history left it.

    A replay ends by evicting the workflow, which cancels its running tasks: a fan-out's
    branches would close their hops as cancelled in the instance's record. So the record is
    copied as the eviction begins (the SDK's eviction step, the one place it can be seen from
    outside the workflow), before any task hears of it."""

    def __init__(self) -> None:
        self.instances: dict[str, HandoffChainWorkflow] = {}
        self.records: dict[str, ChainRecord] = {}

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor]:
        holder = self

        class Keep(WorkflowInboundInterceptor):
            async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
                workflow_id = workflow.info().workflow_id
                instance = holder.instances[workflow_id] = workflow.instance()
                runtime = workflow._Runtime.current()
                evict = getattr(runtime, "_apply_remove_from_cache", None)
                if evict is not None:
                    def copied_then_evicted(job: Any) -> None:
                        holder.records[workflow_id] = instance.record.model_copy(deep=True)
                        evict(job)

                    runtime._apply_remove_from_cache = copied_then_evicted  # type: ignore[attr-defined]
                return await super().execute_workflow(input)

        return Keep


def _time(event: Any) -> datetime:
    return event.event_time.ToDatetime(tzinfo=timezone.utc)


async def _decode_one(converter: DataConverter, payloads: Any, type_hint: type) -> Any:
    [value] = await converter.decode(list(payloads.payloads), [type_hint])
    return value


# What ends a chain that its workflow does not see (it ends the chain's status; the hops still
# running close with it). A cancellation the workflow sees and records itself; it is listed for
# a chain cancelled before its workflow ran at all.
_UNSEEN_ENDS: dict[str, Callable[[Any], tuple[ChainStatus, HopStatus, str]]] = {
    "workflow_execution_failed_event_attributes": lambda a: (
        ChainStatus.FAILED, HopStatus.FAILED, "the chain workflow failed"),
    "workflow_execution_terminated_event_attributes": lambda a: (
        ChainStatus.FAILED, HopStatus.FAILED, f"terminated: {a.reason or 'no reason given'}"),
    "workflow_execution_timed_out_event_attributes": lambda a: (
        ChainStatus.FAILED, HopStatus.FAILED, "chain timed out"),
    "workflow_execution_canceled_event_attributes": lambda a: (
        ChainStatus.CANCELLED, HopStatus.CANCELLED, "chain cancelled"),
}


def record_in_failure(error: BaseException | None) -> ChainRecord | None:
    """The record a chain that ended unsuccessfully carries in its workflow failure, or None."""
    if isinstance(error, ApplicationError) and error.type == UNSUCCESSFUL_CHAIN_ERROR and error.details:
        return ChainRecord.model_validate(error.details[0])
    return None


async def record_from_history(
    history: WorkflowHistory, converter: DataConverter, *, replay: bool = False
) -> ChainRecord:
    """The chain's record as its workflow computed it. `replay`: replay the history even when
    the workflow's result holds the record (to check that both agree)."""
    carried = await _carried(history, converter, replay=replay)
    if carried is not None:
        return carried
    [read] = await _replayed_records([history], converter)
    if isinstance(read, HistoryUnreadable):
        raise read
    return await _with_unseen_end(read, history, converter)


async def records_from_histories(
    histories: Sequence[WorkflowHistory], converter: DataConverter
) -> list[ChainRecord | HandoffError]:
    """The records of several chains (as `record_from_history` reads each), those that must be
    replayed in one replay run, which costs about half as much per chain as one run each; a
    history that cannot be read gives its error in its place."""
    found: list[ChainRecord | HandoffError | None] = []
    for history in histories:
        try:
            found.append(await _carried(history, converter))
        except HandoffError as err:
            found.append(err)
    replay = [h for h, f in zip(histories, found) if f is None]
    replayed = iter(await _replayed_records(replay, converter)) if replay else iter(())
    records: list[ChainRecord | HandoffError] = []
    for history, record in zip(histories, found):
        if record is None:
            read = next(replayed)
            record = read if isinstance(read, HandoffError) else await _with_unseen_end(read, history, converter)
        records.append(record)
    return records


async def _carried(history: WorkflowHistory, converter: DataConverter, *, replay: bool = False) -> ChainRecord | None:
    """The record a chain that ended carries (its results put back), or None: it must be replayed."""
    if not history.events:
        raise HistoryUnreadable(f"the history of {history.workflow_id} has no events")
    last = history.events[-1]
    carried = None
    if not replay and last.HasField("workflow_execution_completed_event_attributes"):
        carried = await _decode_one(converter, last.workflow_execution_completed_event_attributes.result, ChainRecord)
    if not replay and last.HasField("workflow_execution_failed_event_attributes"):
        carried = record_in_failure(await converter.decode_failure(last.workflow_execution_failed_event_attributes.failure))
    if carried is not None:  # with the results it carries in history put back
        wanted = needs_results(carried)
        return put_back(carried, await hop_results(history.events, converter, wanted)) if wanted else carried
    return None


async def _with_unseen_end(record: ChainRecord, history: WorkflowHistory, converter: DataConverter) -> ChainRecord:
    """A replayed record with what the workflow cannot see applied: a termination, a workflow
    timeout or failure ends it; a replay that ends a chain whose history has not closed does not."""
    last = history.events[-1]
    kind = last.WhichOneof("attributes")
    if kind in _UNSEEN_ENDS and record.status is ChainStatus.RUNNING:
        attrs = getattr(last, kind)
        status, hop_status, error = _UNSEEN_ENDS[kind](attrs)
        if kind == "workflow_execution_failed_event_attributes":  # its message may be encrypted
            error = str(await converter.decode_failure(attrs.failure)) or error
        when = _time(last)
        record.close_running(hop_status, error, when)
        record.end(status, error, when)
    elif kind not in _CLOSED and record.status.ended:
        _not_ended_yet(record, history)
    return record


_CLOSED = {*_UNSEEN_ENDS, "workflow_execution_completed_event_attributes",
           "workflow_execution_continued_as_new_event_attributes"}
"""The events that close a workflow execution."""


def _not_ended_yet(record: ChainRecord, history: WorkflowHistory) -> None:
    """A replay that ends a chain whose history has not closed: the workflow task that ends it
    has not completed (it failed, say on a result too large for the server, or it runs now).
    The chain is running as far as Temporal is concerned, so its record says so, and why."""
    failed = next((e.workflow_task_failed_event_attributes for e in reversed(history.events)
                   if e.HasField("workflow_task_failed_event_attributes")), None)
    why = f": {failed.failure.message[:300]}" if failed is not None and failed.failure.message else ""
    record.error = (f"its end ({record.status.value}) is not recorded: the workflow task that ends it has not "
                    f"completed{why}")
    record.status, record.completed_at, record.duration_ms = ChainStatus.RUNNING, None, None


async def _replayed_records(histories: Sequence[WorkflowHistory],
                            converter: DataConverter) -> list[ChainRecord | HistoryUnreadable]:
    """Each history replayed through the chain workflow, in one replay run: its record, or why it
    cannot be read."""
    holder = _Holder()
    replayer = Replayer(
        workflows=[HandoffChainWorkflow],
        data_converter=converter,
        interceptors=[holder],
        workflow_runner=UnsandboxedWorkflowRunner(),
        # on the caller's event loop, not in a thread of the replayer's own: a record is read in
        # processes that run other asyncio code (the A2A server), which the replay must not share
        # a thread with
        debug_mode=True,
    )

    async def given() -> AsyncIterator[WorkflowHistory]:
        for history in histories:
            yield history

    read: list[ChainRecord | HistoryUnreadable] = []
    replayed = iter(histories)  # the results come in the order of the histories given
    async with replayer.workflow_replay_iterator(given()) as results:
        async for result in results:
            read.append(_replayed(next(replayed), result, holder))
    return read


def _replayed(history: WorkflowHistory, result: Any, holder: _Holder) -> ChainRecord | HistoryUnreadable:
    instance = holder.instances.pop(history.workflow_id, None)  # taken: the next history may be the same chain's
    record = holder.records.pop(history.workflow_id, None)
    if instance is None:
        reason = f": {result.replay_failure}" if result.replay_failure else ""
        return HistoryUnreadable(f"the history of {history.workflow_id} is not a chain's that replays{reason}")
    if result.replay_failure is not None and not _workflow_failed(history):
        return HistoryUnreadable(
            f"the history of {history.workflow_id} does not replay with this version of the chain "
            f"workflow: {result.replay_failure}")
    return record if record is not None else instance.record.model_copy(deep=True)


def _workflow_failed(history: WorkflowHistory) -> bool:
    """Whether the workflow itself failed (bad input, a bug): replaying it fails the same way."""
    return history.events[-1].HasField("workflow_execution_failed_event_attributes")


async def hop_contexts(history: WorkflowHistory, converter: DataConverter) -> list[HandoffContext]:
    """The context of every hop the chain scheduled (fallbacks included), in order."""
    contexts, results = [], None
    async for _, hop_input in _scheduled_hops(history, converter):
        if any(hop_input.result_refs):  # earlier results it was given by reference
            results = results if results is not None else await hop_results(history.events, converter)
            fill_context(hop_input.context, hop_input.result_refs, results)
        contexts.append(hop_input.context)
    return contexts


async def hop_events(history: WorkflowHistory, converter: DataConverter) -> dict[UUID, int]:
    """The id of the event that scheduled each hop's activity, by the hop's handoff id."""
    return {hop_input.context.handoff_id: event_id async for event_id, hop_input in _scheduled_hops(history, converter)}


async def _scheduled_hops(history: WorkflowHistory, converter: DataConverter) -> AsyncIterator[tuple[int, HopInput]]:
    for event in history.events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            attrs = event.activity_task_scheduled_event_attributes
            if attrs.activity_type.name == HOP_ACTIVITY:
                yield event.event_id, await _decode_one(converter, attrs.input, HopInput)

"""Watching a chain as it runs: one ordered, resumable stream of what it does (`watch_chain`),
read from the chain's workflow history as the server writes it.

The history is the chain's durable log: every hop scheduled and ended, every approval, every
steering message and every progress note (`ctx.progress`, the `progress` signal) is in it, in
order, and it survives a restart of any worker or of the server. A watcher long-polls it
(`GetWorkflowExecutionHistory` with `wait_new_event`: a read, not a billed action, and nothing
the chain itself does), and at the end of every workflow task replays the history so far
through the chain workflow's own code (`handoff.client.audit`) to read its record; the events
are what changed between two records (`handoff.client.changes`), plus the steering, stop and
progress messages as the history holds them. So the same history always yields the same events
with the same cursors: a watcher that resumes after cursor k (`after=k`) reads the history
again and gets events k+1... once each.

A chain nobody watches costs nothing more; each watcher costs the server one waiting request.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from datetime import timezone
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

from pydantic_core import to_json
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHistory
from temporalio.service import RPCError, RPCStatusCode

from handoff.client.audit import record_from_history
from handoff.client.changes import Change, Entry, changes, entries, short
from handoff.client.requests import chain_uuid
from handoff.constants import PROGRESS_SIGNAL, STEER_UPDATE, STOP_UPDATE
from handoff.errors import ChainNotFound, ServerUnreachable
from handoff.models import ChainEvent, ChainRecord, EventKind, ProgressNote, Steering, StopRequest, walk_hops
from handoff.models.events import MAX_PROGRESS_DATA_BYTES, PROGRESS_PER_HOP

PAGE_EVENTS = 256
"""Events asked for per read of the history; a full page means more are there at once."""
RECONNECT_FOR_S = 120.0
"""How long a watcher keeps trying to reach a server that went away (a restart, say) before it
raises `ServerUnreachable`."""

# What a workflow task's completion writes with it, in the same transaction: the events of its
# commands and of the Updates it accepted. A workflow task's outcome is read once all are in.
_COMMAND_EVENTS = frozenset({
    "activity_task_scheduled_event_attributes",
    "activity_task_cancel_requested_event_attributes",
    "timer_started_event_attributes",
    "timer_canceled_event_attributes",
    "marker_recorded_event_attributes",
    "upsert_workflow_search_attributes_event_attributes",
    "workflow_properties_modified_event_attributes",
    "workflow_execution_update_accepted_event_attributes",
    "workflow_execution_update_completed_event_attributes",
    "start_child_workflow_execution_initiated_event_attributes",
    "signal_external_workflow_execution_initiated_event_attributes",
    "request_cancel_external_workflow_execution_initiated_event_attributes",
    "workflow_execution_completed_event_attributes",
    "workflow_execution_failed_event_attributes",
    "workflow_execution_canceled_event_attributes",
    "workflow_execution_continued_as_new_event_attributes",
})
_CLOSING = frozenset({
    "workflow_execution_completed_event_attributes",
    "workflow_execution_failed_event_attributes",
    "workflow_execution_canceled_event_attributes",
    "workflow_execution_continued_as_new_event_attributes",
    "workflow_execution_terminated_event_attributes",
    "workflow_execution_timed_out_event_attributes",
})
# Events after which a workflow task is about to complete: a watcher waits a moment before it asks
# again, so the task's events come in one answer instead of one each.
_TASK_COMING = frozenset({
    "workflow_task_scheduled_event_attributes",
    "workflow_task_started_event_attributes",
    "activity_task_completed_event_attributes",
    "activity_task_failed_event_attributes",
    "activity_task_timed_out_event_attributes",
    "activity_task_canceled_event_attributes",
    "timer_fired_event_attributes",
    "workflow_execution_signaled_event_attributes",
    "workflow_execution_update_admitted_event_attributes",
    "workflow_execution_cancel_requested_event_attributes",
})
TASK_COMING_WAIT_S = 0.01
"""How long a watcher waits, when a workflow task is about to complete, before it asks again:
fewer requests for the server (a thousand watched chains: 1.18x the server's CPU, against 1.49x
without), at the price of those milliseconds (`ChainWatch(settle_s=...)`)."""

# Events between workflow tasks that change nothing the record says: a workflow task they alone
# caused is not replayed.
_QUIET = frozenset({
    "workflow_task_scheduled_event_attributes",
    "workflow_task_started_event_attributes",
    "workflow_task_completed_event_attributes",
    "workflow_task_timed_out_event_attributes",
    "workflow_task_failed_event_attributes",
})


def _kind(event: HistoryEvent) -> str:
    return event.WhichOneof("attributes") or ""


def checked_cursor(after: object) -> int:
    """`after` as a cursor: a whole number from 0 (ValueError otherwise)."""
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ValueError(f"a cursor is a whole number from 0, not {after!r}")
    return after


class ChainWatch:
    """One watcher of one chain: iterate it (`async for event in watch`) for its events after
    cursor `after`, as they happen, until the chain ends; `record` is the chain's record as of
    the last event read (None before the first)."""

    def __init__(self, client: Client, chain_id: UUID | str, *, after: int = 0,
                 reconnect_for_s: float = RECONNECT_FOR_S, settle_s: float = TASK_COMING_WAIT_S) -> None:
        self._client = client
        self.chain_id = str(chain_uuid(chain_id))
        self.record: ChainRecord | None = None
        self.cursor = 0
        """The cursor of the last event read (counting those at or before `after`)."""
        self._after = checked_cursor(after)
        self._reconnect_for_s = reconnect_for_s
        self._settle_s = settle_s
        self._history: list[HistoryEvent] = []
        self._unit: int | None = None  # where the open workflow task's completion is in the history
        self._changed = True  # something besides progress notes since the last replay
        self._notes: dict[UUID, int] = {}  # progress notes shown, by hop
        self.ended = False
        self.caught_up = False
        """Whether the events read so far reach what the history held when the watch began."""
        self.backlog = True
        """Whether the events being read were in the history when the watch began (False for the
        events that happen while it watches)."""

    def __aiter__(self) -> AsyncIterator[ChainEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[ChainEvent]:
        async for batch in self.batches():
            for event in batch:
                yield event

    async def batches(self) -> AsyncIterator[list[ChainEvent]]:
        """The events (after `after`) each answer of the server brings, as a list, possibly empty
        (a long poll that timed out); `record` is up to date when each is yielded."""
        async for page, full in self._pages():
            found: list[ChainEvent] = []
            for event in page:
                for change in await self._take(event):
                    found.extend(self._numbered(change))
            if not full and self._unit is not None:
                for change in await self._close_unit(len(self._history) - 1):
                    found.extend(self._numbered(change))
            self.backlog = not self.caught_up
            self.caught_up = self.caught_up or not full
            yield found
            if self.ended:
                return

    def _numbered(self, change: Change) -> list[ChainEvent]:
        self.cursor += 1
        if self.cursor <= self._after:
            return []
        return [ChainEvent(cursor=self.cursor, chain_id=UUID(self.chain_id), kind=change.kind, at=change.at,
                           place=change.place, agent=change.agent, summary=change.summary,
                           data=change.data or {})]

    # -- reading the history ---------------------------------------------------------------

    async def _pages(self) -> AsyncIterator[tuple[list[HistoryEvent], bool]]:
        """The history's new events as the server writes them, page by page, with whether the
        page was full; across a server that goes away and comes back, from where it was."""
        handle = self._client.get_workflow_handle(self.chain_id)
        token: bytes | None = None
        failing_since: float | None = None
        while True:
            pages = handle.fetch_history_events(page_size=PAGE_EVENTS, next_page_token=token, wait_new_event=True)
            try:
                await pages.fetch_next_page()
            except RPCError as err:
                if err.status is RPCStatusCode.NOT_FOUND and not self._history:
                    raise ChainNotFound(self.chain_id) from None
                if err.status in (RPCStatusCode.INVALID_ARGUMENT, RPCStatusCode.NOT_FOUND):
                    token = None  # a page token the server no longer knows: read again from the start
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self._reconnect_for_s:
                    raise ServerUnreachable(
                        f"the history of chain {self.chain_id} cannot be read: {err.message}") from err
                await asyncio.sleep(1.0)
                continue
            failing_since = None
            page = list(pages.current_page or ())
            token = pages.next_page_token
            known = len(self._history)
            yield [e for e in page if e.event_id > known], len(page) >= PAGE_EVENTS
            if self._settle_s and self._history and _kind(self._history[-1]) in _TASK_COMING:
                await asyncio.sleep(self._settle_s)
            if not token:
                if not self.ended:  # the history ended without a close this watcher understood
                    raise ServerUnreachable(f"the history of chain {self.chain_id} ended before the chain did")
                return

    async def _take(self, event: HistoryEvent) -> list[Change]:
        """The events one more history event brings (most bring none until their workflow task
        completes)."""
        found: list[Change] = []
        kind = _kind(event)
        if self._unit is not None and kind not in _COMMAND_EVENTS:
            found.extend(await self._close_unit(len(self._history) - 1))
        self._history.append(event)
        if kind == "workflow_task_completed_event_attributes":
            self._unit = len(self._history) - 1
        elif kind in _CLOSING and self._unit is None:  # terminated or timed out: no workflow task
            found.extend(await self._read_record(len(self._history) - 1, closing=True))
        elif kind == "workflow_execution_signaled_event_attributes":
            found.extend(await self._progress(event))
        elif kind not in _QUIET:
            self._changed = True
        return found

    async def _close_unit(self, last: int) -> list[Change]:
        """A workflow task's outcome, once every event its completion wrote is read."""
        first, self._unit = self._unit, None
        assert first is not None
        found: list[Change] = []
        closing = False
        for event in self._history[first:last + 1]:
            kind = _kind(event)
            closing = closing or kind in _CLOSING
            if kind == "workflow_execution_update_accepted_event_attributes":
                found.extend(await self._accepted(event))
            elif kind not in _QUIET:
                self._changed = True
        if self._changed or closing or self.record is None:
            found.extend(await self._read_record(last, closing=closing))
        return found

    async def _read_record(self, last: int, *, closing: bool) -> list[Change]:
        history = WorkflowHistory(self.chain_id, self._history[:last + 1])
        record = await record_from_history(history, self._client.data_converter)
        found = changes(self.record, record)
        self.record, self._changed = record, False
        self.ended = self.ended or closing
        return found

    # -- what the history holds as it is ------------------------------------------------------

    async def _decoded(self, payloads: Any, model: type) -> Any:
        try:
            [value] = await self._client.data_converter.decode(list(payloads.payloads), [model])
        except Exception:  # malformed, or in an encoding this client cannot read: not an event
            return None
        return value

    async def _accepted(self, event: HistoryEvent) -> list[Change]:
        request = event.workflow_execution_update_accepted_event_attributes.accepted_request
        name, at = request.input.name, event.event_time.ToDatetime().replace(tzinfo=timezone.utc)
        if name == STEER_UPDATE:
            steering = await self._decoded(request.input.args, Steering)
            if steering is None:
                return []
            to = f" (next handoff to {steering.redirect})" if steering.redirect else ""
            return [Change(EventKind.STEERING_RECEIVED, at, summary=f"{steering.by}: {short(steering.message, 80)}{to}",
                           data=steering.model_dump(mode="json", exclude_none=True))]
        if name == STOP_UPDATE:
            stop = await self._decoded(request.input.args, StopRequest)
            if stop is None:
                return []
            return [Change(EventKind.STOP_REQUESTED, at,
                           summary=f"{stop.by} asked the chain to stop after its running hops",
                           data=stop.model_dump(mode="json", exclude_none=True))]
        return []

    async def _progress(self, event: HistoryEvent) -> list[Change]:
        """A running hop's note, shown while its hop is open and within the hop's bound; anything
        else a signal could carry is not an event."""
        attrs = event.workflow_execution_signaled_event_attributes
        if attrs.signal_name != PROGRESS_SIGNAL or self.record is None:
            return []
        note = await self._decoded(attrs.input, ProgressNote)
        if note is None or len(to_json(note.data, fallback=str)) > MAX_PROGRESS_DATA_BYTES:
            return []
        hop = next((h for h in walk_hops(self.record.hops) if h.handoff_id == note.handoff_id and h.status.open), None)
        shown = self._notes.get(note.handoff_id, 0)
        if hop is None or shown >= PROGRESS_PER_HOP:
            return []
        self._notes[note.handoff_id] = shown + 1
        place = _place_of(self.record, note.handoff_id)
        return [Change(EventKind.HOP_PROGRESS, note.at, place, hop.to_agent, short(note.message, 200),
                       note.model_dump(mode="json", exclude={"handoff_id"}))]


def _place_of(record: ChainRecord, handoff_id: UUID) -> str:
    return next((item.place for item in entries(record.hops)
                 if isinstance(item, Entry) and item.hop.handoff_id == handoff_id), "")


async def watched_records(client: Client, chain_id: UUID | str, *,
                          settle_s: float = 0.0) -> AsyncIterator[ChainRecord]:
    """The chain's record as it stands, then again each time it changes, last as the chain ended:
    what a follower of a chain's state needs (the A2A server's tasks), read from its history as
    `ChainWatch` reads it, with no query of the chain. `settle_s` 0 by default: a request that
    answers when the chain ends waits on it."""
    watch = ChainWatch(client, chain_id, settle_s=settle_s)
    shown = False
    async for batch in watch.batches():
        if watch.record is not None and watch.caught_up and (batch or not shown):
            shown = True
            yield watch.record


class _Shared:
    """One reader of one chain (`ChainWatch`) for every watcher of it in this process: a hundred
    watchers of a chain cost the server what one does. It keeps the chain's events (a chain's are
    bounded: its hops, and at most `PROGRESS_PER_HOP` notes each) so a watcher that comes later,
    or resumes, starts from any cursor."""

    def __init__(self, client: Client, chain_id: str, readers: dict[str, _Shared]) -> None:
        self.events: list[ChainEvent] = []
        self.watchers = 0
        self.done = False
        self.error: BaseException | None = None
        self._more = asyncio.Event()
        self._readers = readers
        self._chain_id = chain_id
        self._task = asyncio.create_task(self._read(client))

    async def _read(self, client: Client) -> None:
        try:
            async for event in ChainWatch(client, self._chain_id):
                self.events.append(event)
                self._wake()
        except Exception as err:  # ChainNotFound, ServerUnreachable: every watcher hears it
            self.error = err
        finally:
            self.done = True
            self._wake()

    def _wake(self) -> None:
        self._more.set()
        self._more = asyncio.Event()

    def _forget(self) -> None:
        """Once nobody watches, the reader stops (a later watcher starts another)."""
        if self.watchers:
            return
        if self._readers.get(self._chain_id) is self:
            del self._readers[self._chain_id]
        if not self.done:
            self._task.cancel()

    async def after(self, cursor: int) -> AsyncIterator[ChainEvent]:
        self.watchers += 1
        try:
            shown = cursor
            while True:
                while shown < len(self.events):
                    shown += 1
                    yield self.events[shown - 1]
                if self.done:
                    if self.error is not None:
                        raise self.error
                    return
                await self._more.wait()
        finally:
            self.watchers -= 1
            self._forget()


_readers: weakref.WeakKeyDictionary[Client, dict[str, _Shared]] = weakref.WeakKeyDictionary()


def watch_chain(client: Client, chain_id: UUID | str, *, after: int = 0) -> AsyncIterator[ChainEvent]:
    """The chain's events after cursor `after` (0: from its start), each as it happens, ending
    with `chain.ended`. Resume with the last cursor seen to get every later event once, in
    order, across restarts of workers and of the server. Watchers of one chain in one process
    share one reader of its history. Raises `ChainNotFound` for an unknown chain,
    `ServerUnreachable` if the server stays away longer than `RECONNECT_FOR_S`."""
    checked_cursor(after)
    key = str(chain_uuid(chain_id))
    readers = _readers.setdefault(client, {})
    shared = readers.get(key)
    if shared is None:
        shared = readers[key] = _Shared(client, key, readers)
    return shared.after(after)

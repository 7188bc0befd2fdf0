"""A running hop's progress notes on their way to its chain (`ctx.progress`): each note is a
`progress` signal to the chain workflow, so it lands in the chain's history in order with
everything else the chain does, and every watcher reads it from there.

The bounds keep an agent that says a million things from growing the chain's history or the
bill: the first note goes at once, then at most one every `PROGRESS_EVERY_S` (notes in between
are coalesced, the latest kept and sent when the time comes), and at most `PROGRESS_PER_HOP` per
attempt. Sending runs beside the handler and never blocks or fails it; what is still waiting
when the hop ends is dropped (the hop's result says the rest)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any

import structlog
from pydantic_core import to_json
from temporalio import activity

from handoff.constants import PROGRESS_SIGNAL
from handoff.models import ProgressNote
from handoff.models.events import MAX_PROGRESS_CHARS, MAX_PROGRESS_DATA_BYTES, PROGRESS_EVERY_S, PROGRESS_PER_HOP

log = structlog.get_logger("handoff.progress")


def _bounded_data(data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        return {"left_out": f"data must be a dict, not {type(data).__name__}"}
    try:
        size = len(to_json(data, fallback=str))
    except ValueError as err:  # cycles, say
        return {"left_out": f"data is not JSON: {err}"[:200]}
    if size > MAX_PROGRESS_DATA_BYTES:
        return {"left_out": f"{size:,} bytes of data, over the {MAX_PROGRESS_DATA_BYTES:,}-byte bound"}
    return data


class ProgressSender:
    """The notes of one hop attempt, sent to its chain within the bounds above."""

    def __init__(self, chain_id: str, handoff_id: Any, attempt: int) -> None:
        self._chain_id = chain_id
        self._handle: Any = None  # the chain's handle, from the first note on: most hops say nothing
        self._handoff_id = handoff_id
        self._attempt = attempt
        self._sent = 0
        self._last_sent = float("-inf")
        self._waiting: ProgressNote | None = None
        self._coalesced = 0
        self._flush: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._in_order = asyncio.Lock()  # one signal at a time, in the order said (the lock is FIFO)

    async def note(self, message: str, data: dict[str, Any] | None = None) -> None:
        if self._sent >= PROGRESS_PER_HOP:
            return
        if self._waiting is not None:
            self._coalesced += 1
        self._waiting = ProgressNote(handoff_id=self._handoff_id, attempt=self._attempt,
                                     message=str(message)[:MAX_PROGRESS_CHARS], data=_bounded_data(data),
                                     at=datetime.now(timezone.utc))
        due = self._last_sent + PROGRESS_EVERY_S - time.monotonic()
        if due <= 0:
            self._send()
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(due, self._send)

    def _send(self) -> None:
        self._flush = None
        note, self._waiting = self._waiting, None
        if note is None or self._sent >= PROGRESS_PER_HOP:
            return
        note.coalesced, self._coalesced = self._coalesced, 0
        self._sent += 1
        self._last_sent = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._signal(note))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _signal(self, note: ProgressNote) -> None:
        try:
            async with self._in_order:
                if self._handle is None:
                    self._handle = activity.client().get_workflow_handle(self._chain_id)
                await self._handle.signal(PROGRESS_SIGNAL, note)
        except Exception as err:  # no worker (ActivityEnvironment), the chain ended, the server away
            log.debug("progress_not_sent", error=str(err)[:200])

    def close(self) -> None:
        """The hop ended: what waits is dropped, what is on its way finishes on its own."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._waiting = None

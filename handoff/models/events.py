"""What a chain does, as events a watcher reads in order (`handoff.client.watch`), and what an
agent says it is doing from inside a hop (`ProgressNote`, the chain's `progress` signal)."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any
from uuid import UUID

from pydantic import BaseModel, Field, field_validator

from handoff.models.checks import aware_utc

MAX_PROGRESS_CHARS = 300
"""The longest progress message kept; a longer one is cut."""
MAX_PROGRESS_DATA_BYTES = 4096
"""The most a progress note's `data` may hold, as JSON; larger data is left out of the note."""
PROGRESS_PER_HOP = 20
"""The most progress notes one hop attempt sends to its chain (each is a signal, in history);
later ones are counted, not sent. Watchers show no more than this many per hop."""
PROGRESS_EVERY_S = 1.0
"""The least time between two notes a hop sends: notes in between are coalesced, the latest kept."""


class ProgressNote(BaseModel):
    """One note of what a running hop is doing, as its worker sends it to the chain."""

    handoff_id: UUID
    attempt: int = Field(ge=1)
    message: str = Field(max_length=MAX_PROGRESS_CHARS)
    data: dict[str, Any] = Field(default_factory=dict)
    at: datetime
    coalesced: int = Field(default=0, ge=0)
    """Notes said since the one before that were not sent (the rate or the count bound)."""

    _aware = field_validator("at")(aware_utc)


class EventKind(str, Enum):
    """What happened: the `kind` of a `ChainEvent`."""

    CHAIN_STARTED = "chain.started"
    HOP_SCHEDULED = "hop.scheduled"
    HOP_CARRIED = "hop.carried"
    FALLBACK = "hop.fallback"
    HOP_PROGRESS = "hop.progress"
    HOP_COMPLETED = "hop.completed"
    HOP_FAILED = "hop.failed"
    HOP_REFUSED = "hop.refused"
    HOP_CANCELLED = "hop.cancelled"
    APPROVAL_AWAITED = "approval.awaited"
    APPROVAL_DECIDED = "approval.decided"
    FAN_OUT_OPENED = "fanout.opened"
    BRANCH_ENDED = "branch.ended"
    JOIN_STARTED = "join.started"
    STEERING_RECEIVED = "steering.received"
    STOP_REQUESTED = "stop.requested"
    CHAIN_ENDED = "chain.ended"


class ChainEvent(BaseModel):
    """One thing a chain did. `cursor` numbers a chain's events from 1, in the order they
    happened; the same history always yields the same events with the same cursors, so a watcher
    resumes after the last cursor it saw (`watch_chain(..., after=cursor)`)."""

    cursor: int = Field(ge=1)
    chain_id: UUID
    kind: EventKind
    at: datetime
    place: str = ""
    """The hop's place in the chain's tree: `hop 2`, `hop 2 [b0.1]` (branch 1 of the fan-out at
    hop 0), empty for the chain's own events."""
    agent: str = ""
    summary: str = ""
    """One line for a person."""
    data: dict[str, Any] = Field(default_factory=dict)
    """The event's facts, by kind: the hop's entry fields, a decision, the chain's status..."""

    _aware = field_validator("at")(aware_utc)

    def line(self) -> str:
        """The event as one line of text: cursor, time, place, what happened."""
        where = f" {self.place}" if self.place else ""
        return f"{self.cursor:>4} {self.at.strftime('%H:%M:%S.%f')[:-3]}{where} {self.kind.value}: {self.summary}"

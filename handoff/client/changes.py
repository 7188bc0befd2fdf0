"""What changed between two records of one chain, as events (`ChainEvent`, without their cursor):
a pure function of the two records, so the same history always reads as the same events.

The chain workflow is the one source of what a record says; this module only compares two of
its records, entry by entry. An entry is known by its place in the chain's tree (which list of
hops, which position in it): the workflow only appends entries, and changes them in place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from pydantic_core import to_json

from handoff.models import (
    BranchRecord,
    ChainRecord,
    EventKind,
    HopKind,
    HopRecord,
    HopStatus,
)

SUMMARY_CHARS = 120
"""How much of a task, a result or an error an event's one-line summary shows."""

_NEVER = datetime.fromtimestamp(0, timezone.utc)
"""The time of an entry that has none of its own (never the case for an entry the workflow wrote)."""

_RAN = {HopStatus.COMPLETED, HopStatus.FAILED, HopStatus.TIMED_OUT}
_ENDS = {
    HopStatus.COMPLETED: EventKind.HOP_COMPLETED,
    HopStatus.FAILED: EventKind.HOP_FAILED,
    HopStatus.TIMED_OUT: EventKind.HOP_FAILED,
    HopStatus.REFUSED: EventKind.HOP_REFUSED,
    HopStatus.UNREACHABLE: EventKind.HOP_REFUSED,
    HopStatus.CANCELLED: EventKind.HOP_CANCELLED,
}


@dataclass(frozen=True)
class Change:
    """One event as a record comparison finds it; the watcher numbers it."""

    kind: EventKind
    at: datetime
    place: str = ""
    agent: str = ""
    summary: str = ""
    data: dict[str, Any] | None = None


def short(value: Any, limit: int = SUMMARY_CHARS) -> str:
    """`value` as one line of at most `limit` characters (JSON for anything but a string)."""
    text = value if isinstance(value, str) else to_json(value, fallback=str).decode()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Entry:
    """A hop entry with where it sits: its key (stable for the chain's life) and its place."""

    key: tuple[Any, ...]
    place: str
    hop: HopRecord
    before: HopRecord | None
    """The entry before it in its list of hops (whose agent handed to it, unless a fallback)."""


BranchEntry = tuple[str, tuple[Any, ...], BranchRecord]
"""A branch as `entries` lists it: its label, its key, its record."""


def entries(hops: list[HopRecord], label: str = "", key: tuple[Any, ...] = ()) -> Iterator[Entry | BranchEntry]:
    """The tree in order: each entry, then its fan-out's branches (their entries, then the
    branch itself, as `(label, key, branch)`, once its hops are listed)."""
    for position, hop in enumerate(hops):
        here = (*key, position)
        yield Entry(here, f"hop {hop.hop} [{label}]" if label else f"hop {hop.hop}", hop,
                    hops[position - 1] if position else None)
        if hop.fan_out is not None:
            for branch in hop.fan_out.branches:
                name = f"b{hop.hop}.{branch.index}"
                branch_label = f"{label}/{name}" if label else name
                branch_key = (*here, "b", branch.index)
                yield from entries(branch.hops, branch_label, branch_key)
                yield branch_label, branch_key, branch


def _hop_data(hop: HopRecord) -> dict[str, Any]:
    data = hop.model_dump(mode="json", exclude={"result_data", "fan_out", "decision"}, exclude_none=True)
    if hop.result_data:
        data["result_summary"] = short(hop.result_data)
    if hop.decision is not None:
        data["decision"] = hop.decision.summary
    return data


def _scheduled(entry: Entry) -> Iterator[Change]:
    hop = entry.hop
    at = hop.started_at or hop.completed_at or _NEVER
    if hop.fallback_for:
        yield Change(EventKind.FALLBACK, at, entry.place, hop.to_agent,
                     f"{hop.fallback_for} failed: trying {hop.to_agent}",
                     {"from": hop.fallback_for, "to": hop.to_agent})
    kind = EventKind.JOIN_STARTED if hop.kind is HopKind.JOIN else EventKind.HOP_SCHEDULED
    by = f" by {hop.capability.value}" if hop.capability else ""
    why = entry.before.decision.summary if (entry.before is not None and entry.before.decision is not None
                                            and not hop.fallback_for) else ""
    data = _hop_data(hop)
    if why:
        data["chosen_by"] = why
    yield Change(kind, at, entry.place, hop.to_agent,
                 f"{hop.from_agent} → {hop.to_agent}{by}: {short(hop.task_description, 80)}", data)


def _ended(entry: Entry) -> Change:
    hop = entry.hop
    kind = _ENDS[hop.status]
    if hop.status is HopStatus.COMPLETED:
        took = f" in {hop.duration_ms:,.0f} ms" if hop.duration_ms is not None else ""
        text = f"{hop.to_agent} completed{took} (attempt {hop.attempts})"
        if hop.result_data:
            text += f": {short(hop.result_data, 80)}"
    else:
        text = f"{hop.to_agent or 'no agent'} {hop.status.value}: {short(hop.error or '', 100)}"
    return Change(kind, hop.completed_at or hop.started_at or _NEVER, entry.place, hop.to_agent, text,
                  _hop_data(hop))


def hop_changes(entry: Entry, old: HopRecord | None) -> Iterator[Change]:
    """What happened to one entry between its `old` state (None: it is new) and now."""
    hop = entry.hop
    if old is None and hop.carried_from is not None:
        yield Change(EventKind.HOP_CARRIED, hop.completed_at or hop.started_at or _NEVER, entry.place,
                     hop.to_agent, f"{hop.to_agent} {hop.status.value}, carried from chain {hop.carried_from}",
                     _hop_data(hop))
        return
    approval = hop.approval
    if approval is not None and old is None:
        yield Change(EventKind.APPROVAL_AWAITED, approval.requested_at, entry.place, hop.to_agent,
                     f"{hop.from_agent} → {hop.to_agent} waits for a person's approval "
                     f"(asked by {approval.asked_by})",
                     _hop_data(hop))
    if approval is not None and approval.decision and (old is None or old.approval is None
                                                       or not old.approval.decision):
        comment = f": {short(approval.comment, 80)}" if approval.comment else ""
        yield Change(EventKind.APPROVAL_DECIDED, approval.decided_at or approval.requested_at, entry.place,
                     hop.to_agent, f"{approval.decision} by {approval.by or 'nobody'}{comment}",
                     approval.model_dump(mode="json", exclude_none=True))
    was_scheduled = old is not None and (old.status is HopStatus.RUNNING or old.status in _RAN
                                         or (old.status is HopStatus.CANCELLED and old.attempts > 0))
    ran = hop.status is HopStatus.RUNNING or hop.status in _RAN or (
        hop.status is HopStatus.CANCELLED
        and (hop.attempts > 0 or (old is not None and old.status is HopStatus.RUNNING)))
    if ran and not was_scheduled:
        yield from _scheduled(entry)
    if not hop.status.open and (old is None or old.status.open):
        yield _ended(entry)
    if hop.fan_out is not None and (old is None or old.fan_out is None):
        size = len(hop.fan_out.branches)
        yield Change(EventKind.FAN_OUT_OPENED, hop.completed_at or hop.started_at or _NEVER, entry.place,
                     hop.to_agent, f"{hop.to_agent} fanned out to {size} branch{'es' if size != 1 else ''}",
                     {"branches": [b.outcome().model_dump(mode="json", include={"index", "to_agent", "capability",
                                                                                "task_description"})
                                   for b in hop.fan_out.branches],
                      "wait_for": hop.fan_out.wait_for})


def changes(old: ChainRecord | None, new: ChainRecord) -> list[Change]:
    """Every event between record `old` (None: before the chain started) and record `new`."""
    found: list[Change] = []
    if old is None:
        found.append(Change(EventKind.CHAIN_STARTED, new.started_at, summary=short(new.task_description, 100),
                            data={"task_description": new.task_description,
                                  **({"rerun_of": new.rerun_of.model_dump(mode="json")} if new.rerun_of else {})}))
    before: dict[tuple[Any, ...], Any] = {}
    if old is not None:
        for item in entries(old.hops):
            if isinstance(item, Entry):
                before[item.key] = item.hop
            else:
                before[item[1]] = item[2]
    for item in entries(new.hops):
        if isinstance(item, Entry):
            found.extend(hop_changes(item, before.get(item.key)))
            continue
        label, key, branch = item
        was = before.get(key)
        if branch.status.ended and (was is None or not was.status.ended):
            error = f": {short(branch.error, 80)}" if branch.error else ""
            found.append(Change(EventKind.BRANCH_ENDED, branch.completed_at or new.started_at, f"[{label}]",
                                branch.to_agent, f"branch {label} {branch.status.value}{error}",
                                branch.outcome().model_dump(mode="json", exclude={"final_result"}, exclude_none=True)))
    if new.status.ended and (old is None or not old.status.ended):
        took = f" in {new.duration_ms:,.0f} ms" if new.duration_ms is not None else ""
        error = f": {short(new.error, 100)}" if new.error else ""
        found.append(Change(EventKind.CHAIN_ENDED, new.completed_at or new.started_at,
                            summary=f"{new.status.value}{took}{error}",
                            data={"status": new.status.value, "error": new.error, "duration_ms": new.duration_ms,
                                  **({"usage": new.usage.model_dump(mode="json")} if new.usage else {})}))
    return found

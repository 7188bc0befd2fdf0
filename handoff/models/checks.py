"""Checks every edge applies to what crosses it: agent ids, where a handoff is addressed, task
text, nesting depth, aware UTC times. Each returns what is wrong (or raises `InvalidRequest`)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from handoff.constants import MAX_NESTING
from handoff.errors import InvalidRequest


AGENT_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


def utc_now() -> datetime:
    """The current time, timezone-aware UTC (never the naive `datetime.utcnow()`)."""
    return datetime.now(timezone.utc)


def check_agent_id(value: str) -> str:
    """Return `value` if it is a valid agent id, else raise `InvalidRequest` saying what is wrong
    (a `ValueError`, so pydantic validators report it as theirs)."""
    if not isinstance(value, str) or not AGENT_ID_RE.match(value):
        raise InvalidRequest(
            f"invalid agent id {value!r}: use a lowercase letter, then up to 62 of a-z 0-9 _ -"
        )
    return value


def address_problem(to_agent: str | None, capability: object | None) -> str | None:
    """What is wrong with where a chain or a handoff is addressed: it names exactly one agent
    or one capability. None when nothing is."""
    if bool(to_agent) == (capability is not None):
        return "give exactly one of an agent (to_agent) or a capability"
    if to_agent and not AGENT_ID_RE.match(to_agent):
        return f"invalid agent id {to_agent!r}"
    return None


def task_problem(task: str) -> str | None:
    """What is wrong with a task description: it says something, in text that can be stored
    (valid UTF-8). None when nothing is."""
    if not task.strip():
        return "the task description is empty"
    try:
        task.encode("utf-8")
    except UnicodeEncodeError:
        return "the task description is not valid UTF-8 text"
    return None


def nesting_problem(value: Any, what: str, limit: int = MAX_NESTING) -> str | None:
    """What is wrong with a JSON-like value: it nests lists and objects at most `limit` deep
    (deeper input would exhaust a decoder's recursion on the way through Temporal). None when
    nothing is. Walks iteratively, so any depth is measured without recursion."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if depth >= limit:
            return f"{what} nests more than {limit} levels deep"
        stack.extend((child, depth + 1) for child in children)
    return None


def aware_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("datetime must be timezone-aware (UTC)")
    return value.astimezone(timezone.utc)


def one_line(err: ValidationError) -> str:
    """A validation error as one readable line: where, and what is wrong."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "input"
    return f"{where}: {first['msg']}"

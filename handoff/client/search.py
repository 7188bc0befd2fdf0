"""Finding chains through Temporal visibility (the search attributes the chain workflow upserts)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

from temporalio.client import Client, WorkflowExecutionStatus

from handoff.client.requests import chain_uuid
from handoff.constants import CHAIN_WORKFLOW, SA_AGENTS, SA_COST, SA_DEPTH, SA_RERUN_OF, SA_STATUS
from handoff.errors import InvalidRequest
from handoff.models import ChainStatus, check_agent_id

# How a chain ended when its workflow execution ended without writing its status: failed (a
# bug, bad input), terminated or timed out count as failed, as `handoff show` reads them.
_ENDED_AS = {
    WorkflowExecutionStatus.FAILED: ChainStatus.FAILED,
    WorkflowExecutionStatus.TERMINATED: ChainStatus.FAILED,
    WorkflowExecutionStatus.TIMED_OUT: ChainStatus.FAILED,
    WorkflowExecutionStatus.CANCELED: ChainStatus.CANCELLED,
}
_FINAL = {s.value for s in ChainStatus if s.ended}
"""Statuses a chain's workflow writes when it ends; any other one is stale once the execution ended."""
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
MAX_SCANNED = 1000
"""Chains `find_chains` looks through (newest first) for those its `keep` accepts."""


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """`30m`, `2h`, `7d` (ago), or an ISO 8601 time (UTC if it has no zone)."""
    now = now or datetime.now(timezone.utc)
    match = _DURATION.match(value.strip())
    if match:
        try:
            return now - timedelta(**{_UNITS[match[2]]: int(match[1])})
        except OverflowError:
            raise InvalidRequest(f"--since {value} reaches back before the year 1") from None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidRequest(
            f"--since takes a duration like 30m, 2h, 7d or an ISO time, got {value!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def chain_query(*, agent: str | None = None, status: str | None = None,
                since: datetime | None = None, rerun_of: UUID | str | None = None,
                min_cost: float | None = None) -> str:
    """A visibility query for chains; values are validated so the query cannot be malformed."""
    clauses = [f"WorkflowType = '{CHAIN_WORKFLOW}'"]
    if agent is not None:
        check_agent_id(agent)
        clauses.append(f"{SA_AGENTS.name} = '{agent}'")
    if status is not None:
        known = [s.value for s in ChainStatus]
        if status not in known:
            raise InvalidRequest(f"unknown status {status!r} (known: {', '.join(known)})")
        clauses.append(f"{SA_STATUS.name} = '{status}'")
    if since is not None:
        clauses.append(f"StartTime >= '{since.astimezone(timezone.utc).isoformat()}'")
    if rerun_of is not None:
        clauses.append(f"{SA_RERUN_OF.name} = '{chain_uuid(rerun_of)}'")
    if min_cost is not None:
        if not 0 <= float(min_cost) < 1e12:
            raise InvalidRequest(f"--min-cost {min_cost} is not a cost (0 or more)")
        clauses.append(f"{SA_COST.name} >= {float(min_cost)!r}")
    return " AND ".join(clauses)


async def find_chains(client: Client, query: str, *, limit: int = 20,
                      keep: Callable[[Mapping[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
    """Newest first: id, status, agents visited, depth reached, start time. `keep`: only the
    chains whose memo it accepts (a server keeping its callers' chains apart), looked for among
    the newest `MAX_SCANNED` the query finds."""
    rows: list[dict[str, Any]] = []
    async for execution in client.list_workflows(query, limit=limit if keep is None else MAX_SCANNED):
        if len(rows) >= limit:
            break
        if keep is not None and not keep(await execution.memo()):
            continue
        attrs = execution.typed_search_attributes
        status = attrs.get(SA_STATUS)
        ended = _ENDED_AS.get(execution.status) if execution.status is not None else None
        if ended is not None and status not in _FINAL:
            status = ended.value  # the execution ended without the workflow saying so (terminated, ...)
        elif status is None and execution.status is not None:
            status = execution.status.name.lower()
        rows.append({
            "chain_id": execution.id,
            "status": status or "",
            "agents": list(attrs.get(SA_AGENTS) or []),
            "depth": attrs.get(SA_DEPTH),
            "started_at": execution.start_time,
            **({"rerun_of": attrs.get(SA_RERUN_OF)} if attrs.get(SA_RERUN_OF) else {}),
            **({"cost": attrs.get(SA_COST)} if attrs.get(SA_COST) is not None else {}),
        })
    return rows

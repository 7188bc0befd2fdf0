"""Finding chains through Temporal visibility (the search attributes the chain workflow upserts)."""

from __future__ import annotations

from typing import Any

from temporalio.client import Client

from handoff.constants import CHAIN_WORKFLOW, SA_AGENTS, SA_DEPTH, SA_STATUS
from handoff.errors import InvalidRequest
from handoff.models import ChainStatus, check_agent_id


def chain_query(*, agent: str | None = None, status: str | None = None) -> str:
    """A visibility query for chains; values are validated so the query cannot be malformed."""
    clauses = [f"WorkflowType = '{CHAIN_WORKFLOW}'"]
    if agent is not None:
        try:
            check_agent_id(agent)
        except ValueError as err:
            raise InvalidRequest(str(err)) from None
        clauses.append(f"{SA_AGENTS.name} = '{agent}'")
    if status is not None:
        known = [s.value for s in ChainStatus]
        if status not in known:
            raise InvalidRequest(f"unknown status {status!r} (known: {', '.join(known)})")
        clauses.append(f"{SA_STATUS.name} = '{status}'")
    return " AND ".join(clauses)


async def find_chains(client: Client, query: str, *, limit: int = 20) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async for execution in client.list_workflows(query, limit=limit):
        attrs = execution.typed_search_attributes
        rows.append({
            "chain_id": execution.id,
            "status": attrs.get(SA_STATUS) or execution.status.name.lower() if execution.status else "",
            "agents": list(attrs.get(SA_AGENTS) or []),
            "depth": attrs.get(SA_DEPTH),
            "started_at": execution.start_time,
            "task": None,
        })
    return rows

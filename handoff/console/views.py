"""What the console's pages show, read through the client API (visibility, chain histories, the
registry): the approvals inbox, a chain with its policy, the chains list, the fleet."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import UUID

from temporalio.api.workflowservice.v1 import ListWorkflowExecutionsRequest
from temporalio.client import Client, WorkflowHistory

from handoff.client.audit import hop_events, record_from_history, records_from_histories
from handoff.client.changes import short
from handoff.client.requests import chain_uuid
from handoff.client.search import chain_query, find_chains
from handoff.client.versioning import Routing, routing_of
from handoff.errors import ChainNotFound, HandoffError, unless_missing
from handoff.models import ChainPolicy, ChainRecord, ChainRequest, ChainStatus, HopRecord, HopStatus, walk_hops
from handoff.registry import AgentStatus, agent_statuses

INBOX_PAGE = 25
CHAINS_PAGE = 50
INBOX_SCANNED = 10_000
"""Waiting chains the inbox orders (oldest first); more are counted as "more than"."""
READS_AT_ONCE = 8
"""Chain histories read at once for one page."""
RESULT_CHARS = 160


@dataclass(frozen=True)
class ChainView:
    """A chain's record and the policy it runs under (None when its input cannot be read); on a
    chain's own page also its run and, by handoff id, the event that scheduled each hop."""

    record: ChainRecord
    policy: ChainPolicy | None
    run_id: str | None = None
    events: dict[UUID, int] = field(default_factory=dict)

    def deadline_of(self, hop: HopRecord) -> datetime | None:
        """Until when a hop waits for approval before it is refused."""
        if hop.approval is None or self.policy is None:
            return None
        return hop.approval.requested_at + timedelta(seconds=self.policy.approval_timeout_s)


async def chain_view(client: Client, chain_id: UUID | str) -> ChainView:
    """The chain's record, rebuilt from its history, and its policy (the workflow's input)."""
    history = await _history(client, str(chain_uuid(chain_id)))
    if history is None:
        raise ChainNotFound(str(chain_id))
    record = await record_from_history(history, client.data_converter)
    try:
        events = await hop_events(history, client.data_converter)
    except Exception:  # a hop input this client cannot decode: the page links to the chain alone
        events = {}
    return ChainView(record, await _policy_of(history, client), history.run_id, events)


async def _history(client: Client, chain_id: str) -> WorkflowHistory | None:
    return await unless_missing(client.get_workflow_handle(chain_id).fetch_history())


async def _policy_of(history: WorkflowHistory, client: Client) -> ChainPolicy | None:
    started = history.events[0].workflow_execution_started_event_attributes
    try:
        [request] = await client.data_converter.decode(list(started.input.payloads), [ChainRequest])
    except Exception:  # an input this client cannot decode: the page shows the record without it
        return None
    return request.policy


@dataclass(frozen=True)
class Waiting:
    """One hop waiting for a person, with what the approver needs to decide it."""

    chain: ChainView
    hop: HopRecord
    why: str
    earlier: list[tuple[str, str]]
    """The earlier hops of its path that completed: (agent, result summary)."""

    @property
    def requested_at(self) -> datetime:
        assert self.hop.approval is not None
        return self.hop.approval.requested_at


@dataclass
class Inbox:
    waiting: list[Waiting] = field(default_factory=list)
    chains: int = 0
    """Chains awaiting approval in all (up to `INBOX_SCANNED`)."""
    page: int = 1
    pages: int = 1
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    """Waiting chains this console cannot read: (id, why)."""


async def inbox(client: Client, page: int = 1) -> Inbox:
    """The hops awaiting approval, oldest chain first, `INBOX_PAGE` chains a page."""
    found = await waiting_chains(client)
    pages = max(1, -(-len(found) // INBOX_PAGE))
    page = min(max(page, 1), pages)
    read = await _views(client, [chain_id for *_, chain_id in found[(page - 1) * INBOX_PAGE: page * INBOX_PAGE]])
    waiting = [w for view in read if isinstance(view, ChainView) for w in _waiting_in(view)]
    waiting.sort(key=lambda w: w.requested_at)
    unreadable = [item for item in read if isinstance(item, tuple)]
    return Inbox(waiting, len(found), page, pages, unreadable)


async def waiting_chains(client: Client) -> list[tuple[int, int, str]]:
    """(start seconds, nanoseconds, id) of every chain awaiting approval, oldest first, up to
    `INBOX_SCANNED`. Visibility lists newest first and cannot be asked to order otherwise, so all
    are listed; the raw list call, which reads only what is asked of each execution, takes about a
    third of the SDK's iterator, which builds each one whole."""
    request = ListWorkflowExecutionsRequest(namespace=client.namespace, page_size=1000,
                                            query=chain_query(status=ChainStatus.AWAITING_APPROVAL.value))
    found: list[tuple[int, int, str]] = []
    while len(found) < INBOX_SCANNED:
        response = await client.workflow_service.list_workflow_executions(request)
        found.extend((e.start_time.seconds, e.start_time.nanos, e.execution.workflow_id) for e in response.executions)
        if not response.next_page_token:
            break
        request.next_page_token = response.next_page_token
    return sorted(found[:INBOX_SCANNED])


async def _views(client: Client, chain_ids: list[str]) -> list[ChainView | tuple[str, str]]:
    """Each chain's view, or (its id, why it cannot be read: a payload this console has no key
    for, say); a chain gone since the search is left out. The histories are read `READS_AT_ONCE`
    at once and replayed in one run."""
    gate = asyncio.Semaphore(READS_AT_ONCE)

    async def fetched(chain_id: str) -> WorkflowHistory | None:
        async with gate:
            return await _history(client, chain_id)

    histories = [h for h in await asyncio.gather(*(fetched(c) for c in chain_ids)) if h is not None]
    records = await records_from_histories(histories, client.data_converter)
    views: list[ChainView | tuple[str, str]] = []
    for history, record in zip(histories, records):
        if isinstance(record, HandoffError):
            views.append((history.workflow_id, " ".join(str(record).split())[:300]))
        else:
            views.append(ChainView(record, await _policy_of(history, client)))
    return views


def _waiting_in(view: ChainView) -> list[Waiting]:
    found = []

    def walk(hops: list[HopRecord], earlier: list[tuple[str, str]]) -> None:
        for position, hop in enumerate(hops):
            if hop.status is HopStatus.AWAITING_APPROVAL and hop.approval is not None:
                before = hops[position - 1] if position else None
                found.append(Waiting(view, hop, why_of(hop, before), list(earlier)))
            if hop.status is HopStatus.COMPLETED and hop.result_data:
                earlier = [*earlier, (hop.to_agent, short(hop.result_data, RESULT_CHARS))]
            if hop.fan_out is not None:
                for branch in hop.fan_out.branches:
                    walk(branch.hops, earlier)

    walk(view.record.hops, [])
    return found


def why_of(hop: HopRecord, before: HopRecord | None) -> str:
    """Why a hop was handed to its agent: the sending model's choice and reason, a fallback, a
    capability, or the sender's directive."""
    if hop.fallback_for:
        return f"fallback: {hop.fallback_for} failed"
    if before is not None and before.decision is not None:
        return before.decision.summary
    if hop.capability is not None:
        return f"{hop.from_agent} asked for {hop.capability.value}"
    return f"{hop.from_agent} handed it to {hop.to_agent}"


@dataclass(frozen=True)
class ChainsPage:
    rows: list[dict[str, Any]]
    before: str | None
    """The start time of the last row, for the next page (None: no more)."""


async def chains(client: Client, *, status: str | None = None, agent: str | None = None,
                 since: datetime | None = None, min_cost: float | None = None,
                 before: datetime | None = None) -> ChainsPage:
    """Chains newest first, `CHAINS_PAGE` a page; `before`: those that started before it."""
    query = chain_query(status=status, agent=agent, since=since, min_cost=min_cost)
    if before is not None:
        query += f" AND StartTime < '{before.astimezone(timezone.utc).isoformat()}'"
    rows = await find_chains(client, query, limit=CHAINS_PAGE + 1)
    more = len(rows) > CHAINS_PAGE
    rows = rows[:CHAINS_PAGE]
    return ChainsPage(rows, rows[-1]["started_at"].isoformat() if more and rows else None)


LATELY = 200
"""The newest chains the fleet page tallies for what each agent did lately."""


@dataclass
class Lately:
    """What an agent did in the newest `LATELY` chains: those it took part in, and of them those
    that failed."""

    chains: int = 0
    failed: int = 0


@dataclass(frozen=True)
class Fleet:
    agents: list[tuple[AgentStatus, Routing | None, Lately]]
    lately_of: int
    """The chains tallied (at most `LATELY`)."""


async def fleet(client: Client) -> Fleet:
    """Every registered agent with its task queue's state, its versions' routing and what it
    did in the newest chains."""
    gate = asyncio.Semaphore(READS_AT_ONCE)

    async def routing(agent_id: str) -> Routing | None:
        async with gate:
            try:
                return await routing_of(client, agent_id)
            except Exception:  # the deployment cannot be read now: the page shows no versions
                return None

    statuses, newest = await asyncio.gather(agent_statuses(client), find_chains(client, chain_query(), limit=LATELY))
    lately: dict[str, Lately] = {}
    for row in newest:
        for agent in set(row["agents"]):
            tally = lately.setdefault(agent, Lately())
            tally.chains += 1
            tally.failed += row["status"] == ChainStatus.FAILED.value
    routings = await asyncio.gather(*(routing(s.card.agent_id) for s in statuses))
    return Fleet([(s, r, lately.get(s.card.agent_id, Lately())) for s, r in zip(statuses, routings)], len(newest))


def hop_of(record: ChainRecord, handoff_id: UUID) -> HopRecord | None:
    return next((h for h in walk_hops(record.hops) if h.handoff_id == handoff_id), None)

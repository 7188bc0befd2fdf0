"""Client-side access to the capability registry and to the agents' task queues.

Used by agent workers (register/deregister), by the resolve activity (candidates for a
capability) and by `handoff agents`.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

from pydantic import BaseModel
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy

from handoff.agent import Agent
from handoff.constants import (
    CHAIN_TASK_QUEUE,
    DEREGISTER_SIGNAL,
    LIVE_POLLER_WINDOW_S,
    REGISTER_SIGNAL,
    REGISTRATION_QUERY,
    REGISTRY_MEMO_KEY,
    REGISTRY_REJECTED_MEMO_KEY,
    REGISTRY_WORKFLOW,
    REGISTRY_WORKFLOW_ID,
    agent_task_queue,
)
from handoff.errors import unless_missing
from handoff.models import AgentCapability, AgentCard, Candidate, Deregistration

RPC_TIMEOUT = timedelta(seconds=5)


class QueueStats(BaseModel):
    pollers: int
    live: bool
    backlog: int
    last_poll: datetime | None = None


class AgentStatus(BaseModel):
    """An agent card with what its task queue says now (`handoff agents`)."""

    card: AgentCard
    stats: QueueStats

    @property
    def load(self) -> float:
        return self.stats.backlog / max(self.card.max_concurrent, 1)


async def register_agent(client: Client, agent: Agent, instance: str) -> None:
    """Register `agent` (creating the registry workflow if it does not exist yet): one
    signal-with-start, which the registry applies however many arrive at once. A registration it
    refuses is in `rejected_registrations`."""
    await client.start_workflow(
        REGISTRY_WORKFLOW,
        None,
        id=REGISTRY_WORKFLOW_ID,
        task_queue=CHAIN_TASK_QUEUE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        static_summary="handoff capability registry",
        start_signal=REGISTER_SIGNAL,
        start_signal_args=[[agent.registration(instance)]],
        rpc_timeout=RPC_TIMEOUT,
    )


async def register_agent_checked(client: Client, agent: Agent, instance: str) -> AgentCard:
    """Register `agent` through the registry's `register` Update, whose validator answers at once
    (an operator's tool: a fleet's workers use `register_agent`; Updates are limited to ten in
    flight per workflow)."""
    start = WithStartWorkflowOperation(
        REGISTRY_WORKFLOW,
        None,
        id=REGISTRY_WORKFLOW_ID,
        task_queue=CHAIN_TASK_QUEUE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        static_summary="handoff capability registry",
    )
    return await client.execute_update_with_start_workflow(
        "register", agent.registration(instance), start_workflow_operation=start, result_type=AgentCard
    )


async def leave_registry(client: Client, agent_id: str, instance: str) -> None:
    """Deregister one instance of an agent by signal (a worker stopping gracefully)."""
    handle = client.get_workflow_handle(REGISTRY_WORKFLOW_ID)
    await handle.signal(DEREGISTER_SIGNAL, [Deregistration(agent_id=agent_id, instance=instance)],
                        rpc_timeout=RPC_TIMEOUT)


async def registration_of(client: Client, agent_id: str) -> str:
    """What became of an agent's registration, as the registry says: `registered <version>`,
    `rejected: <why>` or `unknown` (a query: the chain worker answers it)."""
    handle = client.get_workflow_handle(REGISTRY_WORKFLOW_ID)
    return await handle.query(REGISTRATION_QUERY, agent_id, result_type=str, rpc_timeout=RPC_TIMEOUT)


async def rejected_registrations(client: Client) -> dict[str, str]:
    """The registrations the registry refused (by agent id: why), as its memo publishes them."""
    description = await unless_missing(client.get_workflow_handle(REGISTRY_WORKFLOW_ID).describe(
        rpc_timeout=RPC_TIMEOUT))
    if description is None:
        return {}
    return await description.memo_value(REGISTRY_REJECTED_MEMO_KEY, {}, type_hint=dict[str, str])


async def deregister_agent(client: Client, agent_id: str, instance: str | None = None) -> bool:
    """Remove one instance of an agent (its card goes with the last one); with no instance,
    remove the card outright. False if the agent was not registered."""
    handle = client.get_workflow_handle(REGISTRY_WORKFLOW_ID)
    request = Deregistration(agent_id=agent_id, instance=instance or "", all_instances=instance is None)
    return await handle.execute_update("deregister", request, result_type=bool, rpc_timeout=RPC_TIMEOUT)


async def registered_agents(client: Client) -> list[AgentCard]:
    """Every registered card; empty when no registry exists yet. Read from the registry's memo,
    which the server answers itself (a query would wait on a worker, and on a restarted worker's
    abandoned sticky queue)."""
    handle = client.get_workflow_handle(REGISTRY_WORKFLOW_ID)
    description = await unless_missing(handle.describe(rpc_timeout=RPC_TIMEOUT))
    if description is None:
        return []
    return await description.memo_value(REGISTRY_MEMO_KEY, [], type_hint=list[AgentCard])


async def queue_stats(client: Client, task_queue: str) -> QueueStats:
    """Pollers and backlog of an activity task queue. Exited workers' pollers linger, so
    liveness is judged by each poller's last access time."""
    resp = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
            report_stats=True,
        ),
        timeout=RPC_TIMEOUT,
    )
    now = datetime.now(timezone.utc)
    last = max(
        (p.last_access_time.ToDatetime(tzinfo=timezone.utc) for p in resp.pollers if p.HasField("last_access_time")),
        default=None,
    )
    live = last is not None and (now - last).total_seconds() <= LIVE_POLLER_WINDOW_S
    return QueueStats(
        pollers=len(resp.pollers),
        live=live,
        backlog=resp.stats.approximate_backlog_count if resp.HasField("stats") else 0,
        last_poll=last,
    )


MAX_DESCRIBES = 32
"""Task-queue descriptions sent at once: hundreds of agents do not open hundreds of RPCs."""


async def _bounded_stats(client: Client, agent_ids: list[str]) -> list[QueueStats]:
    gate = asyncio.Semaphore(MAX_DESCRIBES)

    async def one(agent_id: str) -> QueueStats:
        async with gate:
            return await queue_stats(client, agent_task_queue(agent_id))

    return await asyncio.gather(*(one(a) for a in agent_ids))


async def agent_statuses(client: Client, cards: list[AgentCard] | None = None) -> list[AgentStatus]:
    """Each card with what its task queue says now (at most `MAX_DESCRIBES` descriptions at once)."""
    cards = await registered_agents(client) if cards is None else cards
    stats = await _bounded_stats(client, [c.agent_id for c in cards])
    return [AgentStatus(card=c, stats=s) for c, s in zip(cards, stats)]


class Directory:
    """The registry as the resolve activity reads it for every capability hop, cached: the cards
    at most `cards_ttl_s` old, each agent's task-queue stats at most `stats_ttl_s` old. Stats past
    that age serve while a background refresh replaces them; only an agent never described yet is
    waited for. So a resolve costs no RPC in the steady state, however many agents are
    registered, and agents that stopped without deregistering (their queues have no pollers) are
    described in the background only, never chosen. Liveness itself allows 70 s of poller
    silence, so the seconds of cache add nothing a hop would notice."""

    def __init__(self, client: Client, *, cards_ttl_s: float = 1.0, stats_ttl_s: float = 2.0) -> None:
        self._client = client
        self._cards_ttl_s, self._stats_ttl_s = cards_ttl_s, stats_ttl_s
        self._cards: list[AgentCard] = []
        self._cards_at = float("-inf")
        self._cards_lock = asyncio.Lock()
        self._stats: dict[str, tuple[float, QueueStats]] = {}
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def cards(self, *, max_age_s: float | None = None) -> list[AgentCard]:
        """The registered cards, at most `cards_ttl_s` old (or `max_age_s`, when given)."""
        ttl = self._cards_ttl_s if max_age_s is None else max_age_s
        async with self._cards_lock:  # one read of the memo at a time, however many resolves wait
            if time.monotonic() - self._cards_at >= ttl:
                self._cards = await registered_agents(self._client)
                self._cards_at = time.monotonic()
        return self._cards

    async def statuses(self, cards: list[AgentCard]) -> list[AgentStatus]:
        now = time.monotonic()
        unknown = [c.agent_id for c in cards if c.agent_id not in self._stats]
        if unknown:
            for agent_id, stats in zip(unknown, await _bounded_stats(self._client, unknown)):
                self._stats[agent_id] = (time.monotonic(), stats)
        stale = [c.agent_id for c in cards if now - self._stats[c.agent_id][0] >= self._stats_ttl_s
                 and c.agent_id not in self._refreshing]
        if stale:
            self._refreshing.update(stale)
            task = asyncio.create_task(self._refresh(stale))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return [AgentStatus(card=c, stats=self._stats[c.agent_id][1]) for c in cards]

    async def _refresh(self, agent_ids: list[str]) -> None:
        try:
            for agent_id, stats in zip(agent_ids, await _bounded_stats(self._client, agent_ids)):
                self._stats[agent_id] = (time.monotonic(), stats)
        except Exception:  # the server is away for now: the next resolve tries again
            pass
        finally:
            self._refreshing.difference_update(agent_ids)

    async def candidates(self, capability: AgentCapability | None, *, like_agent: str | None = None,
                         exclude: list[str] = ()) -> list[Candidate]:
        """As `candidates_for`, from the cache; when the cache has no live candidate (an agent may
        have registered a moment ago), from cards read again (at most one read per 0.1 s)."""
        found = await self._candidates(await self.cards(), capability, like_agent, exclude)
        if not any(c.live for c in found):
            found = await self._candidates(await self.cards(max_age_s=0.1), capability, like_agent, exclude,
                                           fresh=True)
        return found

    async def _candidates(self, cards: list[AgentCard], capability: AgentCapability | None,
                          like_agent: str | None, exclude: list[str], *, fresh: bool = False) -> list[Candidate]:
        capability = _capability_of(cards, capability, like_agent)
        if capability is None:
            return []
        matching = [c for c in cards if capability in c.capabilities and c.agent_id not in exclude]
        if fresh:  # nothing was live: describe again what is more than 0.1 s old (an agent may be back)
            old = [c.agent_id for c in matching
                   if c.agent_id in self._stats and time.monotonic() - self._stats[c.agent_id][0] >= 0.1]
            for agent_id, stats in zip(old, await _bounded_stats(self._client, old)):
                self._stats[agent_id] = (time.monotonic(), stats)
        return rank(await self.statuses(matching))


def _capability_of(cards: list[AgentCard], capability: AgentCapability | None,
                   like_agent: str | None) -> AgentCapability | None:
    if capability is None and like_agent is not None:
        like = next((c for c in cards if c.agent_id == like_agent), None)
        return like.capabilities[0] if like is not None else None
    return capability


async def candidates_for(
    client: Client,
    capability: AgentCapability | None,
    *,
    like_agent: str | None = None,
    exclude: list[str] = (),
) -> list[Candidate]:
    """Agents that can take a hop: those with `capability` (or with the primary capability of
    `like_agent`), minus `exclude`; live ones first, least loaded first, then by id."""
    cards = await registered_agents(client)
    capability = _capability_of(cards, capability, like_agent)
    if capability is None:
        return []
    matching = [
        c for c in cards if capability in c.capabilities and c.agent_id not in exclude
    ]
    return rank(await agent_statuses(client, matching))


def rank(statuses: list[AgentStatus]) -> list[Candidate]:
    """Candidates in the order to try them: live first, then least loaded, then by id."""
    candidates = [
        Candidate(
            agent_id=s.card.agent_id,
            live=s.stats.live,
            pollers=s.stats.pollers,
            backlog=s.stats.backlog,
            max_concurrent=s.card.max_concurrent,
        )
        for s in statuses
    ]
    return sorted(candidates, key=lambda c: (not c.live, c.load, c.agent_id))

"""Client-side access to the capability registry and to the agents' task queues.

Used by agent workers (register/deregister), by the resolve activity (candidates for a
capability) and by `handoff agents`.
"""

from __future__ import annotations

import asyncio
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
    LIVE_POLLER_WINDOW_S,
    REGISTRY_MEMO_KEY,
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


async def register_agent(client: Client, agent: Agent, instance: str) -> AgentCard:
    """Register `agent` (creating the registry workflow if it does not exist yet)."""
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


async def agent_statuses(client: Client, cards: list[AgentCard] | None = None) -> list[AgentStatus]:
    cards = await registered_agents(client) if cards is None else cards
    stats = await asyncio.gather(*(queue_stats(client, agent_task_queue(c.agent_id)) for c in cards))
    return [AgentStatus(card=c, stats=s) for c, s in zip(cards, stats)]


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
    if capability is None and like_agent is not None:
        like = next((c for c in cards if c.agent_id == like_agent), None)
        if like is None:
            return []
        capability = like.capabilities[0]
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

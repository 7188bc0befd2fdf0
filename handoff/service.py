"""`PeerHandoffService`: the original in-memory design's API, on top of durable Temporal chains.

For users migrating from it. Agents registered here run as real workers in this process
(one per agent, on `agent.<id>`), alongside a chain worker; every `handoff_to_peer` is a
chain workflow, so retries, timeouts, fallback, loop limits and the audit trail apply.
Unlike the original: load is counted per hop actually running (no slot held by a parent while
its cascade runs), handler exceptions are retried and then reported with their message, and
chain records live in Temporal's history instead of growing in memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from temporalio.client import Client

from handoff.agents.agent import Agent, Handler
from handoff.client.audit import hop_contexts
from handoff.client import (
    build_request,
    checked,
    connect,
    context_limit,
    start_request,
    wait_chain,
)
from handoff.constants import MAX_CHAIN_DEPTH, STARTER_AGENT
from handoff.errors import UnknownAgent, unless_missing
from handoff.models import (
    AgentCapability,
    ChainRecord,
    ChainStatus,
    HandoffContext,
    HandoffResult,
    HopStatus,
)
from handoff.registry import Directory, queue_stats, registered_agents
from handoff.workers.agent_worker import run_agent
from handoff.workers.main import run_chain_worker


class PeerHandoffService:
    """Register agents, find them by capability, hand off to them (the original design's API;
    docs/design.md, "The facade")."""

    MAX_CHAIN_DEPTH = MAX_CHAIN_DEPTH
    HANDOFF_TIMEOUT_SECONDS = 60

    def __init__(self, client: Client | None = None, *, run_chain_worker: bool = True) -> None:
        self._client = client
        self._run_chain_worker = run_chain_worker
        self._agents: dict[str, Agent] = {}
        self._load: dict[str, int] = {}
        self._stop_agents = asyncio.Event()
        self._stop_chains = asyncio.Event()
        self._agent_tasks: list[asyncio.Task] = []
        self._chain_task: asyncio.Task | None = None
        self._started = False

    async def __aenter__(self) -> PeerHandoffService:
        if self._client is None:
            self._client = await connect()
        self._started = True
        if self._run_chain_worker:
            self._chain_task = asyncio.create_task(run_chain_worker(self._client, self._stop_chains))
        for agent in self._agents.values():
            self._start_agent(agent)
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Agents first: they deregister through the registry, which the chain worker hosts.
        self._stop_agents.set()
        await asyncio.gather(*self._agent_tasks, return_exceptions=True)
        self._stop_chains.set()
        if self._chain_task is not None:
            await asyncio.gather(self._chain_task, return_exceptions=True)
        self._agent_tasks.clear()
        self._started = False

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("use the service inside `async with PeerHandoffService(...)`")
        return self._client

    # -- registry ----------------------------------------------------------------------

    def register_agent(
        self,
        agent_id: str,
        agent_name: str,
        capabilities: Sequence[AgentCapability],
        handler: Handler,
        max_concurrent: int = 5,
    ) -> None:
        """Register an agent and start its worker; visible to this service as soon as this returns."""
        load = self._load

        async def counted(context: HandoffContext) -> HandoffResult:
            load[agent_id] = load.get(agent_id, 0) + 1
            try:
                return await handler(context)
            finally:
                load[agent_id] -= 1

        if not asyncio.iscoroutinefunction(handler):
            raise TypeError(f"agent {agent_id!r}: the handler must be an async function")
        agent = Agent(id=agent_id, name=agent_name, capabilities=list(capabilities),
                      handler=counted, max_concurrent=max_concurrent)
        if agent_id in self._agents:
            raise ValueError(f"agent {agent_id!r} is already registered on this service")
        self._agents[agent_id] = agent
        self._load.setdefault(agent_id, 0)
        if self._started:
            self._start_agent(agent)

    def _start_agent(self, agent: Agent) -> None:
        self._agent_tasks.append(asyncio.create_task(run_agent(self.client, agent, self._stop_agents)))

    async def find_agent_by_capability(
        self, capability: AgentCapability, exclude_agents: list[str] | None = None
    ) -> str | None:
        """The least loaded agent with `capability` that has room: this service's agents first,
        then live agents registered by other workers. None if there is none."""
        exclude = set(exclude_agents or ())
        local = [
            a for a in self._agents.values()
            if capability in a.capabilities and a.id not in exclude
            and self._load[a.id] < a.max_concurrent
        ]
        if local:
            return min(local, key=lambda a: (self._load[a.id] / a.max_concurrent, a.id)).id
        remote = await Directory.of(self.client).candidates(AgentCapability(capability), exclude=sorted(exclude))
        live = [c for c in remote if c.live and c.agent_id not in self._agents]
        return live[0].agent_id if live else None

    async def get_agent_stats(self, agent_id: str) -> dict[str, Any]:
        """Load and capacity of an agent; {} if it is unknown."""
        agent = self._agents.get(agent_id)
        if agent is not None:
            load, capabilities, name, limit = (
                self._load[agent_id], agent.capabilities, agent.name, agent.max_concurrent)
        else:
            card = next((c for c in await registered_agents(self.client) if c.agent_id == agent_id), None)
            if card is None:
                return {}
            stats = await queue_stats(self.client, card.task_queue)
            load, capabilities, name, limit = stats.backlog, card.capabilities, card.name, card.max_concurrent
        return {
            "agent_id": agent_id,
            "agent_name": name,
            "capabilities": [c.value for c in capabilities],
            "current_load": load,
            "max_concurrent": limit,
            "utilization": load / limit,
        }

    # -- handoffs ----------------------------------------------------------------------

    async def handoff_to_peer(self, context: HandoffContext) -> HandoffResult:
        """Run `context` and every handoff it cascades into as one durable chain.

        Raises ValueError when `context.chain_depth` is already at the limit or the target agent
        is not registered. The returned result is the first hop's, with each later hop's
        `result_data` nested under `result_data["cascaded_result"]`.
        """
        if context.chain_depth >= self.MAX_CHAIN_DEPTH:
            raise ValueError(
                f"Handoff chain too deep: {context.chain_depth} >= {self.MAX_CHAIN_DEPTH}")
        if context.to_agent:
            await self._require_registered(context.to_agent)
        request = build_request(
            task_description=context.task_description,
            to_agent=context.to_agent or None,
            capability=None if context.to_agent else context.to_capability,
            context_data=context.context_data,
            chain_id=context.chain_id,
            hop_timeout=self.HANDOFF_TIMEOUT_SECONDS,
            max_context_bytes=context_limit(self.client),
        )
        # The chain goes on from the caller's own handoff: its sender, depth, earlier results and id.
        continued = request.model_copy(update={
            "started_by": context.from_agent or STARTER_AGENT,
            "start_depth": context.chain_depth,
            "previous_results": context.previous_results,
            "first_handoff_id": context.handoff_id,
        })
        await start_request(self.client, checked(continued))
        record = await wait_chain(self.client, context.chain_id)
        return _nested_result(context, record)

    async def _require_registered(self, agent_id: str) -> None:
        if agent_id in self._agents:
            return
        if any(c.agent_id == agent_id for c in await registered_agents(self.client)):
            return
        raise UnknownAgent(agent_id, [*self._agents, *(c.agent_id for c in await registered_agents(self.client))])

    async def get_handoff_chain(self, chain_id: UUID) -> list[HandoffContext]:
        """Every handoff context of the chain, in order; [] for an unknown chain."""
        history = await unless_missing(self.client.get_workflow_handle(str(chain_id)).fetch_history())
        if history is None:
            return []
        return await hop_contexts(history, self.client.data_converter)


def _nested_result(context: HandoffContext, record: ChainRecord) -> HandoffResult:
    """The original API's result: first hop's data, each later hop's under "cascaded_result"."""
    done = [h.result_data for h in record.hops if h.status is HopStatus.COMPLETED]
    nested: dict[str, Any] | None = None
    for data in reversed(done):
        nested = {**data, "cascaded_result": nested} if nested is not None else dict(data)
    result_data = nested or {}
    if record.status is not ChainStatus.COMPLETED:
        result_data = {**result_data, "error": record.error, "chain_status": record.status.value}
    return HandoffResult(
        handoff_id=context.handoff_id,
        success=record.status is ChainStatus.COMPLETED,
        result_data=result_data,
        execution_time_seconds=(record.duration_ms or 0.0) / 1000,
        completed_at=record.completed_at or record.started_at,
    )

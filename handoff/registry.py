"""Client-side access to the capability registry and to the agents' task queues.

Used by agent workers (register/deregister), by the resolve activity (candidates for a
capability) and by `handoff agents`.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone

from pydantic import BaseModel
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy

from handoff.agents.agent import Agent
from handoff.constants import (
    CHAIN_TASK_QUEUE,
    DEREGISTER_SIGNAL,
    DEREGISTER_UPDATE,
    LIVE_POLLER_WINDOW_S,
    REGISTER_SIGNAL,
    REGISTER_UPDATE,
    REGISTRATION_QUERY,
    REGISTRY_MEMO_KEY,
    REGISTRY_WORKFLOW,
    REGISTRY_WORKFLOW_ID,
    agent_task_queue,
)
from handoff.errors import unless_missing
from handoff.models import AgentCapability, AgentCard, Candidate, Deregistration, load
from handoff.models.wire import LEASE_S

RPC_TIMEOUT = timedelta(seconds=5)
REGISTRY_START = {"lease_s": LEASE_S}
"""The input of a registry this client creates: its `RegistryState` (in `handoff.workflows`, a
floor above), as JSON. A registry started with a lease holds cards to their leases and bounds."""


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
        return load(self.stats.backlog, self.card.max_concurrent)


async def register_agent(client: Client, agent: Agent, instance: str) -> None:
    """Register `agent` (creating the registry workflow if it does not exist yet): one
    signal-with-start, which the registry applies however many arrive at once. Whether it took the
    registration or refused it, and why: `registration_of`. A running worker sends it again every
    `LEASE_REFRESH_S`: the registry drops a card `LEASE_S` after its last registration."""
    await client.start_workflow(
        REGISTRY_WORKFLOW,
        REGISTRY_START,
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
        REGISTRY_START,
        id=REGISTRY_WORKFLOW_ID,
        task_queue=CHAIN_TASK_QUEUE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        static_summary="handoff capability registry",
    )
    return await client.execute_update_with_start_workflow(
        REGISTER_UPDATE, agent.registration(instance), start_workflow_operation=start, result_type=AgentCard
    )


async def leave_registry(client: Client, agent_id: str, instance: str) -> None:
    """Deregister one instance of an agent by signal (a worker stopping gracefully)."""
    handle = client.get_workflow_handle(REGISTRY_WORKFLOW_ID)
    await handle.signal(DEREGISTER_SIGNAL, [Deregistration(agent_id=agent_id, instance=instance)],
                        rpc_timeout=RPC_TIMEOUT)


async def forget_agents(client: Client, agent_ids: list[str]) -> None:
    """Remove agents' cards outright, whatever instances they have (an operator clearing agents
    that were killed): one signal for them all."""
    handle = client.get_workflow_handle(REGISTRY_WORKFLOW_ID)
    await handle.signal(DEREGISTER_SIGNAL, [Deregistration(agent_id=a, all_instances=True) for a in agent_ids],
                        rpc_timeout=RPC_TIMEOUT)


async def registration_of(client: Client, agent_id: str) -> str:
    """What became of an agent's registration, as the registry says: `registered <version>`,
    `rejected: <why>` or `unknown` (a query: the chain worker answers it)."""
    handle = client.get_workflow_handle(REGISTRY_WORKFLOW_ID)
    return await handle.query(REGISTRATION_QUERY, agent_id, result_type=str, rpc_timeout=RPC_TIMEOUT)


async def deregister_agent(client: Client, agent_id: str, instance: str | None = None) -> bool:
    """Remove one instance of an agent (its card goes with the last one); with no instance,
    remove the card outright. False if the agent was not registered."""
    handle = client.get_workflow_handle(REGISTRY_WORKFLOW_ID)
    request = Deregistration(agent_id=agent_id, instance=instance or "", all_instances=instance is None)
    return await handle.execute_update(DEREGISTER_UPDATE, request, result_type=bool, rpc_timeout=RPC_TIMEOUT)


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
SPREAD = 8
"""Equally loaded live agents of a capability that take turns as a lookup's first candidate."""
MAX_CANDIDATES = 32
"""A lookup returns the best ranked this many: a hop's record lists them, and a capability with
hundreds of agents needs only its live, least loaded few."""


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
    """The registry as a process reads it for every capability hop (the resolve activity), every
    LLM agent's hop and the A2A server's cards: one per client (`Directory.of`), cached.

    Cards are at most `cards_ttl_s` old. The stats of a lookup's first candidate (where the hop
    goes) are refreshed once `live_ttl_s` old (`down_ttl_s` for a down agent), the other returned
    candidates' once `sweep_ttl_s` old, by a background refresh of at most `rate_per_s`
    descriptions a second while the old ones serve; the first is never judged on stats older than
    `sweep_ttl_s` (described at once). Agents ranked below the best `MAX_CANDIDATES` are not
    described again until they rise among them, and agents never described are described only
    while fewer than `MAX_CANDIDATES` known ones are live and idle (see `_known`). Among the first
    `SPREAD` equally loaded live agents the least recently returned comes first, so hops take
    turns over a few agents instead of piling onto one whose backlog the cache does not show yet.
    So a lookup costs no RPC in the steady state however many agents are registered, a fleet of
    hundreds costs the server nothing while idle, and a stale registration (no pollers) is never
    first. Liveness itself allows 70 s of poller silence: the seconds of cache add nothing a hop
    would notice."""

    _by_client: weakref.WeakKeyDictionary[Client, Directory] = weakref.WeakKeyDictionary()

    def __init__(self, client: Client, *, cards_ttl_s: float = 1.0, live_ttl_s: float = 2.0,
                 down_ttl_s: float = 30.0, sweep_ttl_s: float = 30.0, sample: int = 8,
                 rate_per_s: float = 20.0) -> None:
        self._client = client
        self._cards_ttl_s, self._live_ttl_s = cards_ttl_s, live_ttl_s
        self._down_ttl_s, self._sweep_ttl_s = down_ttl_s, sweep_ttl_s
        self._sample, self._interval_s = sample, 1.0 / rate_per_s
        self._cards: list[AgentCard] = []
        self._cards_at = float("-inf")
        self._cards_lock = asyncio.Lock()
        self._stats: dict[str, tuple[float, QueueStats]] = {}
        self._returned: dict[str, float] = {}  # when a lookup last put the agent first
        self._queued: dict[str, None] = {}  # agents the background refresh will describe, in order
        self._refresher: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, client: Client) -> Directory:
        """The process's directory for `client`."""
        directory = cls._by_client.get(client)
        if directory is None:
            directory = cls._by_client[client] = cls(client)
        return directory

    async def cards(self, *, max_age_s: float | None = None) -> list[AgentCard]:
        """The registered cards, at most `cards_ttl_s` old (or `max_age_s`, when given)."""
        ttl = self._cards_ttl_s if max_age_s is None else max_age_s
        async with self._cards_lock:  # one read of the memo at a time, however many lookups wait
            if time.monotonic() - self._cards_at >= ttl:
                self._cards = await registered_agents(self._client)
                self._cards_at = time.monotonic()
        return self._cards

    async def forget_stats(self, agent_ids: list[str]) -> None:
        """Drop what is known of these agents' queues: the next lookup describes them again."""
        for agent_id in agent_ids:
            self._stats.pop(agent_id, None)

    def _age(self, agent_id: str, now: float) -> float:
        known = self._stats.get(agent_id)
        return float("inf") if known is None else now - known[0]

    def _ttl(self, agent_id: str, hot: bool) -> float:
        if not hot:
            return self._sweep_ttl_s
        return self._live_ttl_s if self._stats[agent_id][1].live else self._down_ttl_s

    async def _describe(self, agent_ids: list[str]) -> None:
        for agent_id, stats in zip(agent_ids, await _bounded_stats(self._client, agent_ids)):
            self._stats[agent_id] = (time.monotonic(), stats)

    def _refresh_later(self, agent_ids: list[str], *, hot: bool) -> None:
        now = time.monotonic()
        self._queue([a for a in agent_ids if a in self._stats and self._age(a, now) >= self._ttl(a, hot)])

    async def _refresh(self) -> None:
        """Describe the queued agents, `rate_per_s` a second at most."""
        while self._queued:
            agent_id = next(iter(self._queued))
            del self._queued[agent_id]
            try:
                await self._describe([agent_id])
            except Exception:  # the server is away for now: a later lookup queues it again
                pass
            await asyncio.sleep(self._interval_s)

    async def _known(self, cards: list[AgentCard], unknown: int | None = None) -> list[tuple[AgentCard, QueueStats]]:
        """The cards whose stats are known, with them (`unknown`: describe up to that many never
        described first). Agents never described are described only while fewer than
        `MAX_CANDIDATES` known ones are live and idle: a chunk at a time, waited for while none
        is known live, in the background otherwise. So a fleet of hundreds is read once, and
        only as far as a lookup needs. When none is known live and none is left undescribed, up
        to `sample` are described again (an agent may be back)."""
        never = [c.agent_id for c in cards if c.agent_id not in self._stats]
        if never and unknown:
            await self._describe(never[:unknown])
            never = never[unknown:]
        while never and self._idle_live(cards) < MAX_CANDIDATES:
            chunk, never = never[:MAX_DESCRIBES], never[MAX_DESCRIBES:]
            if any(self._live(c.agent_id) for c in cards):
                self._queue(chunk)
                break
            await self._describe(chunk)
        if not never and not any(self._live(c.agent_id) for c in cards):
            now = time.monotonic()
            await self._describe([c.agent_id for c in cards if self._age(c.agent_id, now) >= 0.1][: self._sample])
        return [(c, self._stats[c.agent_id][1]) for c in cards if c.agent_id in self._stats]

    def _live(self, agent_id: str) -> bool:
        known = self._stats.get(agent_id)
        return known is not None and known[1].live

    def _idle_live(self, cards: list[AgentCard]) -> int:
        return sum(1 for c in cards if self._live(c.agent_id) and self._stats[c.agent_id][1].backlog == 0)

    def _queue(self, agent_ids: list[str]) -> None:
        for agent_id in agent_ids:
            self._queued.setdefault(agent_id)
        if self._queued and (self._refresher is None or self._refresher.done()):
            self._refresher = asyncio.create_task(self._refresh())

    async def statuses(self, cards: list[AgentCard], *, unknown: int | None = None) -> list[AgentStatus]:
        """Each card whose stats are known, with them (see `_known`); the stats past their age
        are queued for the background refresh."""
        known = await self._known(cards, unknown)
        self._refresh_later([c.agent_id for c, _ in known], hot=True)
        return [AgentStatus(card=c, stats=s) for c, s in known]

    async def live_cards(self) -> list[AgentCard]:
        """The cards of the agents live now (every agent never described yet is described)."""
        cards = await self.cards()
        known = await self._known(cards, unknown=len(cards))
        self._refresh_later([c.agent_id for c, _ in known], hot=False)
        return [c for c, s in known if s.live]

    async def candidates(self, capability: AgentCapability | None, *, like_agent: str | None = None,
                         exclude: list[str] = (), limit: int = MAX_CANDIDATES) -> list[Candidate]:
        """The agents that can take a hop: those with `capability` (or with the primary capability
        of `like_agent`), minus `exclude`, ranked (`rank`), from the cache, at most `limit` (the best ranked; among equally
        loaded live agents, the least recently returned first); when nothing is live, the cards
        are read again (an agent may have registered a moment ago)."""
        found = await self._candidates(await self.cards(), capability, like_agent, exclude, limit)
        if not any(c.live for c in found):
            found = await self._candidates(await self.cards(max_age_s=0.1), capability, like_agent, exclude, limit)
        if found and found[0].live:
            self._returned[found[0].agent_id] = time.monotonic()
        return found

    async def every_capability(self, *, limit: int) -> dict[AgentCapability, list[Candidate]]:
        """`candidates` of every capability a registered agent has, at most `limit` of each."""
        capabilities = {capability for card in await self.cards() for capability in card.capabilities}
        found = {capability: await self.candidates(capability, limit=limit)
                 for capability in sorted(capabilities, key=lambda c: c.value)}
        return {capability: candidates for capability, candidates in found.items() if candidates}

    async def _candidates(self, cards: list[AgentCard], capability: AgentCapability | None,
                          like_agent: str | None, exclude: list[str], limit: int) -> list[Candidate]:
        capability = _capability_of(cards, capability, like_agent)
        if capability is None:
            return []
        excluded = set(exclude)
        matching = [c for c in cards if capability in c.capabilities and c.agent_id not in excluded]
        known = [c for c, _ in await self._known(matching)]
        ranked = self._ranked(known)
        for _ in range(self._sample):  # the first, where the hop goes, is never judged on old stats
            if not ranked or self._age(ranked[0][0].agent_id, time.monotonic()) < self._sweep_ttl_s:
                break
            await self._describe([ranked[0][0].agent_id])
            ranked = self._ranked(known)
        best = ranked[:limit]
        # the first's stats are kept fresh, the others' a sweep old; those ranked below the best
        # `limit` are not described again until they rise among them: hundreds of idle agents
        # cost the server nothing
        self._refresh_later([c.agent_id for c, _ in best[:1]], hot=True)
        self._refresh_later([c.agent_id for c, _ in best[1:]], hot=False)
        return [Candidate(agent_id=c.agent_id, live=s.live, pollers=s.pollers, backlog=s.backlog,
                          max_concurrent=c.max_concurrent) for c, s in best]

    def _ranked(self, cards: list[AgentCard]) -> list[tuple[AgentCard, QueueStats]]:
        return rank([(c, self._stats[c.agent_id][1]) for c in cards], self._returned)


def rank(agents: list[tuple[AgentCard, QueueStats]], returned: Mapping[str, float]) -> list[tuple[AgentCard, QueueStats]]:
    """Agents in the order a hop tries them: live first, least loaded next, then by id; among the
    first `SPREAD` live agents as little loaded as the best, the least recently returned (by
    `returned`: when a lookup last put each first) goes first, so hops spread over a few agents
    (whose queues stay warm on the server) until their backlog shows. On plain tuples: hundreds of
    agents cost microseconds."""
    def load_of(cs: tuple[AgentCard, QueueStats]) -> float:
        return load(cs[1].backlog, cs[0].max_concurrent)

    ranked = sorted(agents, key=lambda cs: (not cs[1].live, load_of(cs), cs[0].agent_id))
    ties = [cs for cs in ranked[:SPREAD] if cs[1].live and load_of(cs) == load_of(ranked[0])]
    if len(ties) > 1:
        first = min(ties, key=lambda cs: returned.get(cs[0].agent_id, float("-inf")))
        ranked.remove(first)
        ranked.insert(0, first)
    return ranked


def _capability_of(cards: list[AgentCard], capability: AgentCapability | None,
                   like_agent: str | None) -> AgentCapability | None:
    if capability is None and like_agent is not None:
        like = next((c for c in cards if c.agent_id == like_agent), None)
        return like.capabilities[0] if like is not None else None
    return capability


async def wait_live(client: Client, agent_ids: set[str], timeout_s: float = 20.0) -> None:
    """Wait until every agent is registered and polling its queue, as this process's cached
    `Directory` sees it (the one its resolve activity and LLM agents read: it is read afresh
    here); TimeoutError naming the agents that are not, if not in time."""
    directory = Directory.of(client)
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        cards = [c for c in await directory.cards(max_age_s=0) if c.agent_id in agent_ids]
        await directory.forget_stats([c.agent_id for c in cards])
        live = {s.card.agent_id for s in await directory.statuses(cards, unknown=len(cards)) if s.stats.live}
        if agent_ids <= live:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"agents not live after {timeout_s:g}s: {sorted(agent_ids - live)}")
        await asyncio.sleep(0.1)

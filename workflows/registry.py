"""The capability registry: one long-lived workflow holding every agent's card.

Agent workers register on start and deregister on graceful stop, by signal: a fleet of hundreds
starting at once is applied in arrival order, in batches, with no limit on how many arrive
together (Updates, which the workflow answers too for operators' tools, are limited to ten in
flight per workflow and would make such a storm retry). Registrations are validated as the
Update's validator does; a refused one is published in the memo's `rejected`. Liveness and load
are not kept here: they come from each agent's task queue, read by the resolve activity. History
stays bounded through continue-as-new.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, Field, ValidationError

    from handoff.constants import (
        DEREGISTER_SIGNAL,
        DEREGISTER_UPDATE,
        MAX_DESCRIPTION_CHARS,
        REGISTER_SIGNAL,
        REGISTER_UPDATE,
        REGISTRATION_QUERY,
        REGISTRY_MEMO_KEY,
        REGISTRY_REJECTED_MEMO_KEY,
        REGISTRY_WORKFLOW,
        agent_task_queue,
    )
    from handoff.models import (
        AgentCapability,
        AgentCard,
        Deregistration,
        Registration,
        check_agent_id,
    )

MAX_HISTORY_EVENTS = 5_000
MAX_REJECTED = 100
"""The refused registrations the memo keeps (the latest)."""


class RegistryState(BaseModel):
    cards: dict[str, AgentCard] = Field(default_factory=dict)
    instances: dict[str, list[str]] = Field(default_factory=dict)
    max_history_events: int = MAX_HISTORY_EVENTS


def card_of(reg: Registration) -> AgentCard:
    """The card for a registration; raises ValueError naming what is wrong."""
    check_agent_id(reg.agent_id)
    if not reg.capabilities:
        raise ValueError(f"agent {reg.agent_id!r} registered no capability")
    known = {c.value for c in AgentCapability}
    unknown = [c for c in reg.capabilities if c not in known]
    if unknown:
        raise ValueError(f"unknown capabilities {unknown} (known: {sorted(known)})")
    try:
        return AgentCard(
            agent_id=reg.agent_id,
            name=reg.name,
            capabilities=[AgentCapability(c) for c in reg.capabilities],
            max_concurrent=reg.max_concurrent,
            task_queue=agent_task_queue(reg.agent_id),
            version=reg.version,
            description=reg.description[:MAX_DESCRIPTION_CHARS],
            registered_at=workflow.now(),
            last_seen=workflow.now(),
        )
    except ValidationError as err:
        raise ValueError(err.errors()[0]["msg"]) from None


@workflow.defn(name=REGISTRY_WORKFLOW)
class AgentRegistryWorkflow:
    @workflow.init
    def __init__(self, state: RegistryState | None = None) -> None:
        state = state or RegistryState()
        self._cards = dict(state.cards)
        self._instances = {k: list(v) for k, v in state.instances.items()}
        self._max_history = state.max_history_events
        self._rejected: dict[str, str] = {}
        self._changed = False  # by a signal since the memo was last published

    @workflow.run
    async def run(self, state: RegistryState | None = None) -> None:
        self._publish()
        # held: the event loop keeps only a weak reference to a task
        self._publisher = asyncio.create_task(self._publish_batches())
        try:
            await workflow.wait_condition(
                lambda: workflow.info().is_continue_as_new_suggested()
                or workflow.info().get_current_history_length() > self._max_history,
                timeout=timedelta(days=7),
            )
        except asyncio.TimeoutError:  # a quiet week: continue as new all the same
            pass
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(RegistryState(
            cards=self._cards, instances=self._instances, max_history_events=self._max_history))

    @workflow.update(name=REGISTER_UPDATE)
    def register(self, reg: Registration) -> AgentCard:
        card = self._apply(reg)
        self._publish()
        return card

    def _apply(self, reg: Registration) -> AgentCard:
        card = card_of(reg)
        current = self._cards.get(reg.agent_id)
        if current is not None and current.version == card.version:
            card = current.model_copy(update={"last_seen": workflow.now(), "description": card.description})
        self._cards[reg.agent_id] = card
        instances = self._instances.setdefault(reg.agent_id, [])
        if reg.instance not in instances:
            instances.append(reg.instance)
        return card

    @workflow.signal(name=REGISTER_SIGNAL)
    def register_agents(self, regs: list[Registration]) -> None:
        """Register agents (a worker sends its own, by signal-with-start): each is checked as the
        `register` Update's validator checks it; a refused one is published in `rejected`."""
        for reg in regs:
            try:
                self._check_register(reg)
                self._apply(reg)
                self._rejected.pop(reg.agent_id, None)
            except ValueError as err:
                self._rejected[reg.agent_id] = str(err)
                while len(self._rejected) > MAX_REJECTED:
                    del self._rejected[next(iter(self._rejected))]
        self._changed = True

    @workflow.signal(name=DEREGISTER_SIGNAL)
    def deregister_agents(self, reqs: list[Deregistration]) -> None:
        """Deregister agents (a worker stopping gracefully sends its own)."""
        for req in reqs:
            self._remove(req)
        self._changed = True

    async def _publish_batches(self) -> None:
        """Publish the memo once per workflow task after signals changed the cards, however many
        arrived in it."""
        while True:
            await workflow.wait_condition(lambda: self._changed)
            self._changed = False
            self._publish()

    @register.validator
    def _check_register(self, reg: Registration) -> None:
        card = card_of(reg)
        current = self._cards.get(reg.agent_id)
        if (
            current is not None
            and current.version == card.version
            and (current.capabilities != card.capabilities or current.name != card.name)
        ):
            raise ValueError(
                f"agent {reg.agent_id!r} version {card.version} is already registered with "
                f"capabilities {[c.value for c in current.capabilities]} as {current.name!r}; "
                "register a new version to change them"
            )

    @workflow.update(name=DEREGISTER_UPDATE)
    def deregister(self, req: Deregistration) -> bool:
        """Remove one instance; the card goes when its last instance has gone."""
        removed = self._remove(req)
        if removed:
            self._publish()
        return removed

    def _remove(self, req: Deregistration) -> bool:
        instances = self._instances.get(req.agent_id)
        if instances is None:
            return False
        if req.instance in instances:
            instances.remove(req.instance)
        if not instances or req.all_instances:
            del self._instances[req.agent_id]
            self._cards.pop(req.agent_id, None)
        return True

    @workflow.query(name=REGISTRATION_QUERY)
    def registration_of(self, agent_id: str) -> str:
        """What became of an agent's registration: `registered <version>`, `rejected: <why>`,
        or `unknown`."""
        if agent_id in self._cards:
            return f"registered {self._cards[agent_id].version}"
        if agent_id in self._rejected:
            return f"rejected: {self._rejected[agent_id]}"
        return "unknown"

    @workflow.query
    def agents(self) -> list[AgentCard]:
        return sorted(self._cards.values(), key=lambda c: c.agent_id)

    def _publish(self) -> None:
        """Mirror the cards into the memo, which the server returns on describe: readers get
        them without a worker round trip, also while no chain worker runs or one restarts."""
        memo: dict[str, object] = {REGISTRY_MEMO_KEY: [c.model_dump(mode="json") for c in self.agents()]}
        if self._rejected:
            memo[REGISTRY_REJECTED_MEMO_KEY] = dict(self._rejected)
        workflow.upsert_memo(memo)

"""The capability registry: one long-lived workflow holding every agent's card.

Agent workers register on start and deregister on graceful stop, by signal: a fleet of hundreds
starting at once is applied in arrival order, in batches, with no limit on how many arrive
together (Updates, which the workflow answers too for operators' tools, are limited to ten in
flight per workflow and would make such a storm retry). Registrations are validated as the
Update's validator does; a refused one is published in the memo's `rejected`. Liveness and load
are not kept here: they come from each agent's task queue, read by the resolve activity. History
stays bounded through continue-as-new.

Any client with access to the namespace can signal the registry, so what it holds is bounded
whatever arrives:

- a card's fields: the bounds of `handoff.models.wire` (`MAX_NAME_BYTES`...); a registration
  over one is refused, saying which, and a description is cut. A card is at most
  `MAX_CARD_BYTES` of JSON.
- at most `MAX_CARDS` cards: a registration of a new agent id is refused while the registry
  holds that many ("the registry is full"); a registered agent's registrations are always taken.
- at most `MAX_INSTANCES` instances per card and `MAX_REJECTED` refusals, whose reasons quote at
  most `SHOWN_CHARS` characters of any value.

So the memo stays under 1.2 MB and the state a run continues with under 1.8 MB (every card,
instance and refusal at its bound), below the server's 2 MB limits on a memo and on a payload,
and every workflow task completes. An ordinary card takes about 260 bytes of the memo.

**Leases.** A card is kept `lease_s` (`RegistryState`; `LEASE_S`, 30 minutes, by default) after
its agent last registered, and a running agent worker registers again every `LEASE_REFRESH_S`
(10 minutes, jittered). A card whose lease has passed is dropped when the registry next handles
a signal or an Update, or continues as new (no timer: `workflow.now()` decides, which replays
alike). So:

- a running agent keeps its card, a flood included; a killed agent's card stays (liveness shows
  it down) until its lease has passed and the registry next hears from anyone;
- a one-off flood of registrations of agents that do not run leaves within a lease, and an agent
  refused meanwhile because the registry was full is taken at its first refresh after that;
- a flood sustained by a client with access to the namespace keeps new agents out while it lasts
  (the namespace is the trust boundary: such a client can also terminate the registry).

A refresh that changes nothing the memo shows but `last_seen` is not published: a fleet's
refreshes cost a signal each (a billable action on Temporal Cloud) and a workflow task, not a
memo upsert of every card.

**Runs recorded before leases.** These rules change the commands a run issues (no memo upsert
after a refresh; none after a `deregister` Update of an agent whose card has left), so they are
keyed on the run's input: a run whose `RegistryState` has no `lease_s` (started without a state,
as earlier clients started the registry, or continued by earlier code) applies registrations as
such runs were recorded (the checks of the time, no leases, the memo published after every
workflow task with signals), and continues as new with `LEASE_S` (within a week), its cards held
to the bounds from then on. Clients start the registry with `lease_s`. A run without leases that
a flood wedged (its memo past the server's limit) stays wedged: terminate it, and agent workers
create it again at their next refresh. Agent workers without refreshes never register again, so
their cards leave a leased registry a lease after they registered: deploy agent workers with the
chain workers (a refresh is an ordinary registration, which a registry of any version takes).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel, Field, ValidationError
    from pydantic_core import to_json
    from temporalio.exceptions import ApplicationError

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
    from handoff.models.wire import (
        LEASE_S,
        MAX_CONCURRENT_HOPS,
        MAX_DESCRIPTION_BYTES,
        MAX_INSTANCE_BYTES,
        MAX_NAME_BYTES,
        MAX_VERSION_BYTES,
    )

MAX_HISTORY_EVENTS = 5_000
MAX_CARDS = 1_000
"""The cards a leased registry holds at most. Twice the largest fleet the benchmark starts
(`bench/registry.py` holds at most 520 cards at once: 500 stale beside 20 live), and at
`MAX_CARD_BYTES` each the cards take at most about 1.1 MB of the memo, about half the server's
2 MB limit on a memo (`rejected` takes at most about 75 KB more)."""
MAX_CARD_BYTES = 1_100
"""A card's JSON with every field at its bound (an ordinary card is about 260 bytes)."""
MAX_INSTANCES = 3
"""The instances a card keeps, the most recently registered: an agent with more replicas keeps
its card while any of them refreshes it."""
MAX_REJECTED = 100
"""The refused registrations the memo keeps (the latest)."""
SHOWN_CHARS = 64
"""The characters of a refused value that its reason, or its key in `rejected`, quotes."""
MAX_REASON_CHARS = 300
"""A refusal's reason as `rejected` keeps it, at most."""
KNOWN_CAPABILITIES = frozenset(c.value for c in AgentCapability)


class RegistryState(BaseModel):
    """What a run of the registry starts with, and carries into the next when it continues as new."""

    cards: dict[str, AgentCard] = Field(default_factory=dict)
    instances: dict[str, list[str]] = Field(default_factory=dict)
    max_history_events: int = MAX_HISTORY_EVENTS
    lease_s: float | None = Field(default=None, gt=0)
    """How long a card is kept after its agent last registered. None in runs recorded before
    leases, which apply registrations as they were recorded (see the module's docstring)."""
    rejected: dict[str, str] = Field(default_factory=dict)
    """The latest refusals, by `rejection_key` (absent from runs recorded before leases)."""


def json_bytes(text: str) -> int:
    """The bytes `text` takes as a JSON string (UTF-8, escapes included), quotes aside."""
    return len(to_json(text)) - 2


def shown(text: str) -> str:
    """`text` as a reason quotes it: its repr in ASCII, at most `SHOWN_CHARS` characters of it,
    and the text's length when that cuts it."""
    quoted = ascii(text[: SHOWN_CHARS + 1])
    if len(quoted) <= SHOWN_CHARS + 2:  # the quotes aside
        return quoted
    return f"{quoted[:SHOWN_CHARS]}... ({len(text):,} characters)"


def rejection_key(agent_id: str) -> str:
    """The key under which `rejected` keeps a refused registration of `agent_id`: the id, or
    what a reason shows of it when it is long or not printable ASCII."""
    plain = len(agent_id) <= SHOWN_CHARS and agent_id.isascii() and agent_id.isprintable()
    return agent_id if plain else shown(agent_id)


def cut_description(text: str) -> str:
    """`text` cut to `MAX_DESCRIPTION_CHARS` characters and `MAX_DESCRIPTION_BYTES` of JSON."""
    text = text[:MAX_DESCRIPTION_CHARS]
    while (excess := json_bytes(text) - MAX_DESCRIPTION_BYTES) > 0:
        text = text[: len(text) - max(1, excess // 6)]  # a character is 1 to 6 bytes of JSON
    return text


def check_id(agent_id: str) -> None:
    """Raise ValueError if `agent_id` is not a valid agent id (quoting at most `SHOWN_CHARS` of it)."""
    if len(agent_id) > SHOWN_CHARS:
        raise ValueError(f"invalid agent id {shown(agent_id)}: at most 63 characters")
    check_agent_id(agent_id)


def card_of(reg: Registration, now: datetime) -> AgentCard:
    """The card for a registration made at `now`; raises ValueError naming what is wrong. These
    are the checks every run applies; a leased run applies `check_bounds` first."""
    check_id(reg.agent_id)
    if not reg.capabilities:
        raise ValueError(f"agent {reg.agent_id!r} registered no capability")
    unknown = [c for c in reg.capabilities if c not in KNOWN_CAPABILITIES]
    if unknown:
        listed = ", ".join(map(shown, unknown[:3])) + (", ..." if len(unknown) > 3 else "")
        raise ValueError(f"unknown capabilities [{listed}] (known: {sorted(KNOWN_CAPABILITIES)})")
    try:
        return AgentCard(
            agent_id=reg.agent_id,
            name=reg.name,
            capabilities=[AgentCapability(c) for c in reg.capabilities],
            max_concurrent=reg.max_concurrent,
            task_queue=agent_task_queue(reg.agent_id),
            version=reg.version,
            description=cut_description(reg.description),
            registered_at=now,
            last_seen=now,
        )
    except ValidationError as err:
        raise ValueError(err.errors()[0]["msg"]) from None


def check_bounds(reg: Registration) -> None:
    """Raise ValueError naming the first field of `reg` over its bound (`handoff.models.wire`),
    or its agent id if that is invalid."""
    check_id(reg.agent_id)
    bounded = (("the name", reg.name, MAX_NAME_BYTES), ("the version", reg.version, MAX_VERSION_BYTES),
               ("the instance", reg.instance, MAX_INSTANCE_BYTES))
    for what, text, limit in bounded:
        # a character is at least a byte: a longer text is over its bound before it is encoded
        if len(text) > limit or json_bytes(text) > limit:
            raise ValueError(f"{what} is {json_bytes(text):,} bytes of JSON (at most {limit})")
    if len(reg.capabilities) > len(KNOWN_CAPABILITIES):
        raise ValueError(f"{len(reg.capabilities):,} capabilities (at most {len(KNOWN_CAPABILITIES)}, each once)")
    repeated = sorted({c for c in reg.capabilities if reg.capabilities.count(c) > 1})
    if repeated:
        raise ValueError(f"capabilities repeated: {', '.join(shown(c) for c in repeated)}")
    if not 1 <= reg.max_concurrent <= MAX_CONCURRENT_HOPS:
        raise ValueError(f"max_concurrent must be 1 to {MAX_CONCURRENT_HOPS:,}")


def within_bounds(cards: dict[str, AgentCard]) -> dict[str, AgentCard]:
    """The cards a leased run holds of those it started with: each within the bounds (its
    description cut), at most `MAX_CARDS`, the most recently seen."""
    kept = {}
    for agent_id, card in cards.items():
        try:
            check_bounds(Registration(agent_id=agent_id, name=card.name, version=card.version,
                                      capabilities=[c.value for c in card.capabilities],
                                      max_concurrent=card.max_concurrent))
        except ValueError:
            continue
        kept[agent_id] = card.model_copy(update={"description": cut_description(card.description)})
    latest = sorted(kept, key=lambda a: kept[a].last_seen, reverse=True)[:MAX_CARDS]
    return {a: kept[a] for a in sorted(latest)}


def bounded_instances(instances: list[str]) -> list[str]:
    """The instances a leased run keeps of a card's: the latest `MAX_INSTANCES` within the bound."""
    within = [i for i in instances if len(i) <= MAX_INSTANCE_BYTES and json_bytes(i) <= MAX_INSTANCE_BYTES]
    return within[-MAX_INSTANCES:]


def shown_fields(card: AgentCard) -> dict[str, object]:
    """What the memo shows of a card that a refresh changes: all but `last_seen`."""
    return card.model_dump(exclude={"last_seen"})


@workflow.defn(name=REGISTRY_WORKFLOW)
class AgentRegistryWorkflow:
    @workflow.init
    def __init__(self, state: RegistryState | None = None) -> None:
        state = state or RegistryState()
        self._lease = None if state.lease_s is None else timedelta(seconds=state.lease_s)
        if self._lease is None:
            self._cards = dict(state.cards)
            self._instances = {a: list(v) for a, v in state.instances.items()}
        else:
            self._cards = within_bounds(state.cards)
            self._instances = {a: bounded_instances(state.instances.get(a, [])) for a in self._cards}
        self._max_history = state.max_history_events
        self._rejected = dict(list(state.rejected.items())[-MAX_REJECTED:])
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
        self._expire()
        lease_s = LEASE_S if self._lease is None else self._lease.total_seconds()
        workflow.continue_as_new(RegistryState(cards=self._cards, instances=self._instances, rejected=self._rejected,
                                               max_history_events=self._max_history, lease_s=lease_s))

    @workflow.update(name=REGISTER_UPDATE)
    def register(self, reg: Registration) -> AgentCard:
        """Register one agent and answer its card (an operator's tool); the validator refuses
        what the signal would."""
        self._expire()
        try:
            card = self._admissible(reg, held=len(self._cards))
        except ValueError as err:  # the validator refused it first; should they differ, fail the Update, not the task
            raise ApplicationError(str(err), type="RegistrationRefused", non_retryable=True) from None
        self._apply(reg, card)
        self._publish()
        return self._cards[reg.agent_id]

    @register.validator
    def _check_register(self, reg: Registration) -> None:
        held = sum(1 for c in self._cards.values() if self._leased(c))
        self._admissible(reg, held=held)

    @workflow.signal(name=REGISTER_SIGNAL)
    def register_agents(self, regs: list[Registration]) -> None:
        """Register agents (a worker sends its own, by signal-with-start, on start and at every
        refresh): each is checked as the `register` Update's validator checks it; a refused one
        is published in `rejected`. Cards whose lease has passed are dropped first."""
        changed = self._expire()
        for reg in regs:
            changed = self._register_one(reg) or changed
        self._publish_later(changed)

    @workflow.signal(name=DEREGISTER_SIGNAL)
    def deregister_agents(self, reqs: list[Deregistration]) -> None:
        """Deregister agents (a worker stopping gracefully sends its own)."""
        changed = self._expire()
        for req in reqs:
            held = req.agent_id in self._cards
            self._remove(req)
            changed = changed or (held and req.agent_id not in self._cards)
        self._publish_later(changed)

    @workflow.update(name=DEREGISTER_UPDATE)
    def deregister(self, req: Deregistration) -> bool:
        """Remove one instance; the card goes when its last instance has gone."""
        expired = self._expire()
        removed = self._remove(req)
        if removed or expired:
            self._publish()
        return removed

    @workflow.query(name=REGISTRATION_QUERY)
    def registration_of(self, agent_id: str) -> str:
        """What became of an agent's registration: `registered <version>`, `rejected: <why>`
        (the registry is full, or what is wrong with it), or `unknown`."""
        if agent_id in self._cards:
            return f"registered {self._cards[agent_id].version}"
        key = rejection_key(agent_id)
        if key in self._rejected:
            return f"rejected: {self._rejected[key]}"
        return "unknown"

    @workflow.query
    def agents(self) -> list[AgentCard]:
        return sorted(self._cards.values(), key=lambda c: c.agent_id)

    def _leased(self, card: AgentCard) -> bool:
        """Whether `card` is within its lease (every card is, in a run recorded before leases)."""
        return self._lease is None or card.last_seen >= workflow.now() - self._lease

    def _expire(self) -> bool:
        """Drop the cards whose lease has passed; whether any was."""
        if self._lease is None:
            return False
        since = workflow.now() - self._lease
        gone = [a for a, card in self._cards.items() if card.last_seen < since]
        for agent_id in gone:
            del self._cards[agent_id]
            self._instances.pop(agent_id, None)
        return bool(gone)

    def _admissible(self, reg: Registration, held: int) -> AgentCard:
        """The card `reg` gets while the registry holds `held` cards within their lease; raises
        ValueError saying why it is refused."""
        current = self._cards.get(reg.agent_id)
        if current is not None and not self._leased(current):
            current = None
        if self._lease is not None:
            if current is None and held >= MAX_CARDS:
                raise ValueError(self._full())
            check_bounds(reg)
        card = card_of(reg, workflow.now())
        if (
            current is not None
            and current.version == card.version
            and (current.capabilities != card.capabilities or current.name != card.name)
        ):
            raise ValueError(
                f"agent {reg.agent_id!r} version {card.version} is already registered with "
                f"capabilities {[c.value for c in current.capabilities]} as {shown(current.name)}; "
                "register a new version to change them"
            )
        return card

    def _full(self) -> str:
        lease_s = self._lease.total_seconds()
        lease = f"{lease_s / 60:g} min" if lease_s >= 60 else f"{lease_s:g} s"
        return (f"the registry is full ({MAX_CARDS:,} agents); a card leaves {lease} after its agent last "
                "registered, and this agent is taken at its first registration once one has left")

    def _register_one(self, reg: Registration) -> bool:
        """Apply one registration, or note why it is refused; whether the memo shows a change."""
        key = rejection_key(reg.agent_id)
        try:
            card = self._admissible(reg, held=len(self._cards))
        except ValueError as err:
            return self._refuse(key, str(err))
        changed = self._apply(reg, card)
        withdrawn = self._rejected.pop(key, None) is not None
        return changed or withdrawn

    def _apply(self, reg: Registration, card: AgentCard) -> bool:
        """Take a registration `_admissible` allowed: the same version keeps its card (seen again,
        its description as given), a new one replaces it. Whether the memo shows a change (a
        refresh shows none)."""
        current = self._cards.get(reg.agent_id)
        if current is not None and current.version == card.version:
            card = current.model_copy(update={"last_seen": workflow.now(), "description": card.description})
        self._cards[reg.agent_id] = card
        instances = self._instances.setdefault(reg.agent_id, [])
        if self._lease is None:
            if reg.instance not in instances:
                instances.append(reg.instance)
            return True
        if reg.instance in instances:
            instances.remove(reg.instance)
        instances.append(reg.instance)
        del instances[:-MAX_INSTANCES]
        return current is None or shown_fields(current) != shown_fields(card)

    def _refuse(self, key: str, reason: str) -> bool:
        """Keep why a registration was refused (the latest `MAX_REJECTED`); whether that changed."""
        reason = reason[:MAX_REASON_CHARS]
        changed = self._rejected.pop(key, None) != reason
        self._rejected[key] = reason
        while len(self._rejected) > MAX_REJECTED:
            del self._rejected[next(iter(self._rejected))]
        return changed

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

    def _publish_later(self, changed: bool) -> None:
        """Have the memo published at the end of this workflow task: after a change it shows, or
        after any signal in a run recorded before leases (as such runs were recorded)."""
        self._changed = self._changed or changed or self._lease is None

    async def _publish_batches(self) -> None:
        """Publish the memo once per workflow task after signals changed the cards, however many
        arrived in it."""
        while True:
            await workflow.wait_condition(lambda: self._changed)
            self._changed = False
            self._publish()

    def _publish(self) -> None:
        """Mirror the cards into the memo, which the server returns on describe: readers get
        them without a worker round trip, also while no chain worker runs or one restarts."""
        workflow.upsert_memo({
            REGISTRY_MEMO_KEY: [c.model_dump(mode="json") for c in self.agents()],
            REGISTRY_REJECTED_MEMO_KEY: dict(self._rejected),
        })

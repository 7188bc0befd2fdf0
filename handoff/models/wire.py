"""What travels between the chain workflow, the hop activity and the registry: the hop's input
and output, registrations, cards and the candidates a capability lookup returns."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, Field, field_validator
from pydantic_core import to_json
from temporalio.api.common.v1 import Payload
from temporalio.common import RawValue

from handoff.constants import MAX_CONTEXT_BYTES
from handoff.models.checks import check_agent_id, utc_now
from handoff.models.context import HandoffContext
from handoff.models.directives import HandoffResult
from handoff.models.statuses import AgentCapability


def load(backlog: int, max_concurrent: int) -> float:
    """An agent's load: the hops waiting on its queue per hop it runs at once."""
    return backlog / max(max_concurrent, 1)


class HopInput(BaseModel):
    """The hop activity's input. `hop` and `fallback_for` let the audit be rebuilt from history."""

    hop: int
    context: HandoffContext
    heartbeat_interval_s: float
    fallback_for: str | None = None
    max_result_bytes: int = MAX_CONTEXT_BYTES
    withheld_context_keys: list[str] = Field(default_factory=list)
    previous_results_shown: int | None = None
    result_refs: list[UUID | None] = Field(default_factory=list)
    """For each of `context.previous_results`, the handoff id of the hop whose activity result in
    the chain's history holds it, when it is carried there instead of here (its place in
    `previous_results` is then empty); empty when every result is carried here. The hop's worker
    puts them back before the handler runs."""


class HopOutput(BaseModel):
    """The hop activity's result: the handler's result plus what the worker observed."""

    result: HandoffResult
    attempt: int
    agent_id: str
    build_id: str | None = None
    """The version (build id) of the worker that ran the hop: `Agent.version`, the Worker
    Deployment version of a versioned worker. None in histories from before it was recorded."""


def sized_payload(model: BaseModel) -> tuple[RawValue, int]:
    """`model` serialized once, exactly as the pydantic data converter would, and its size in
    bytes: a hop's input and result are size-checked without being serialized a second time."""
    data = to_json(model)
    return RawValue(Payload(metadata={"encoding": b"json/plain"}, data=data)), len(data)


MAX_NAME_BYTES = 64
MAX_VERSION_BYTES = 32
MAX_INSTANCE_BYTES = 160
"""Bounds of a registration's name, version and instance, in bytes of JSON (UTF-8, escapes
included): the registry refuses a registration over one, saying which."""
MAX_DESCRIPTION_BYTES = 500
"""A card's description is cut to `MAX_DESCRIPTION_CHARS` characters and then to this many bytes
of JSON (a description is never refused)."""
MAX_CONCURRENT_HOPS = 10_000
"""The largest `max_concurrent` a registration may give."""
LEASE_REFRESH_S = 600.0
"""How often a running agent worker sends its registration again (jittered by a fifth)."""
LEASE_S = 3 * LEASE_REFRESH_S
"""How long the registry keeps a card after its agent last registered: three refresh periods, so
a worker that misses two refreshes keeps its card."""


class Registration(BaseModel):
    """An agent worker's registration: sent in batches by the registry's `register_agents` signal
    (and one at a time by its `register` Update). Loosely typed on purpose: the registry says
    what is wrong with it. A registration is a lease: the registry keeps the card `LEASE_S` after
    the last one, and a running worker sends its own again every `LEASE_REFRESH_S`."""

    agent_id: str
    name: str
    """At most `MAX_NAME_BYTES`."""
    capabilities: list[str]
    """Known capabilities, each once."""
    max_concurrent: int = 5
    """1 to `MAX_CONCURRENT_HOPS`."""
    version: str = "1"
    """At most `MAX_VERSION_BYTES`."""
    instance: str = ""
    """The registering worker's identity; an agent with several replicas has several instances.
    At most `MAX_INSTANCE_BYTES`."""
    description: str = ""
    """What the agent does, in a sentence (language models choosing a handoff read it). Cut to
    `MAX_DESCRIPTION_CHARS` characters and `MAX_DESCRIPTION_BYTES`."""


class Deregistration(BaseModel):
    """An agent worker's deregistration (the registry's `deregister_agents` signal, or its
    `deregister` Update)."""

    agent_id: str
    instance: str = ""
    all_instances: bool = False
    """Remove the card whatever instances it has (an operator clearing an agent that was killed)."""


class AgentCard(BaseModel):
    """An agent as the registry knows it."""

    agent_id: str
    name: str
    capabilities: list[AgentCapability]
    max_concurrent: int = Field(default=5, ge=1)
    task_queue: str
    version: str = "0"
    description: str = ""
    registered_at: datetime = Field(default_factory=utc_now)
    """When this version of the agent was first registered."""
    last_seen: datetime = Field(default_factory=utc_now)
    """When the agent last registered (its lease runs from here). The registry's memo may show an
    earlier time: a registration that changes nothing else is not published."""

    _valid_id = field_validator("agent_id")(check_agent_id)


class Candidate(BaseModel):
    """An agent considered for a capability hop, with what its task queue said."""

    agent_id: str
    live: bool
    pollers: int = 0
    backlog: int = 0
    max_concurrent: int = 1

    @property
    def load(self) -> float:
        return load(self.backlog, self.max_concurrent)


class ResolveRequest(BaseModel):
    capability: AgentCapability | None = None
    like_agent: str | None = None
    """Resolve the capabilities of this agent (a fallback for a hop addressed by name)."""
    exclude: list[str] = Field(default_factory=list)


class CapabilityCandidates(BaseModel):
    """Every registered capability's best candidates, ranked, from one registry lookup."""

    candidates: dict[AgentCapability, list[Candidate]] = Field(default_factory=dict)

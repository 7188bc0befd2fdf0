"""The agent SDK: an `Agent` is an id, a set of capabilities and an async handler."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from handoff.constants import MAX_DESCRIPTION_CHARS, agent_task_queue
from handoff.models import (
    AgentCapability,
    HandoffContext,
    HandoffResult,
    Registration,
    check_agent_id,
)

Handler = Callable[[HandoffContext], Awaitable[HandoffResult]]


@dataclass(frozen=True)
class Agent:
    """A specialist agent. Its worker polls `agent.<id>` and runs at most `max_concurrent` hops.

    The handler receives the `HandoffContext` of one hop and returns a `HandoffResult`, best
    built with `ctx.complete(...)` or `ctx.handoff(...)`. An ordinary exception is retried
    (bounded by the chain's policy); `handoff.PermanentError` fails the hop at once.
    """

    id: str
    name: str
    capabilities: Sequence[AgentCapability]
    handler: Handler
    max_concurrent: int = 5
    version: str = "1"
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        check_agent_id(self.id)
        if not self.capabilities:
            raise ValueError(f"agent {self.id!r} needs at least one capability")
        object.__setattr__(
            self, "capabilities", tuple(AgentCapability(c) for c in self.capabilities)
        )
        if not inspect.iscoroutinefunction(self.handler):
            raise TypeError(f"agent {self.id!r}: the handler must be an async function")
        if self.max_concurrent < 1:
            raise ValueError(f"agent {self.id!r}: max_concurrent must be at least 1")

    @property
    def task_queue(self) -> str:
        return agent_task_queue(self.id)

    def registration(self, instance: str) -> Registration:
        """What this agent's worker `instance` sends the registry."""
        return Registration(
            agent_id=self.id,
            name=self.name,
            capabilities=[c.value for c in self.capabilities],
            max_concurrent=self.max_concurrent,
            version=self.version,
            instance=instance,
            description=self.description[:MAX_DESCRIPTION_CHARS],
        )

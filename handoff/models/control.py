"""What a person tells a running chain: a steering message for its next hop, maybe redirecting its
next handoff (`Steering`, the `steer` Update), or to stop once its running hops end (`StopRequest`,
the `stop_after_hop` Update). Validated at the edge, and again by the workflow's validators."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from handoff.constants import MAX_COMMENT_CHARS, MAX_IDENTITY_CHARS
from handoff.models.checks import aware_utc, check_agent_id, task_problem
from handoff.models.statuses import AgentCapability

MAX_STEERING_CHARS = 4000
MAX_STEERING_MESSAGES = 20
"""Most messages waiting for the next hop at once; more are refused until one is delivered."""


class Steering(BaseModel):
    """A message for the chain's next hop (`handoff steer`). `redirect`: an agent id or a
    capability name its next handoff goes to instead of where its agent points, under the same
    rules."""

    model_config = ConfigDict(str_strip_whitespace=True)

    message: str = Field(min_length=1, max_length=MAX_STEERING_CHARS)
    by: str = Field(min_length=1, max_length=MAX_IDENTITY_CHARS)
    redirect: str | None = None

    @field_validator("redirect")
    @classmethod
    def _valid_redirect(cls, value: str | None) -> str | None:
        if value is None or value in {c.value for c in AgentCapability}:
            return value
        return check_agent_id(value)

    def problem(self) -> str | None:
        if task_problem(self.message) or task_problem(self.by):
            return "the message and the identity must be valid UTF-8 text"
        return None

    @property
    def capability(self) -> AgentCapability | None:
        """The capability the redirect names, if it names one."""
        return AgentCapability(self.redirect) if self.redirect in {c.value for c in AgentCapability} else None


class SteeringMessage(BaseModel):
    """A steering message as the hop that received it sees it (`ctx.steering`) and its entry holds."""

    message: str
    by: str
    at: datetime
    redirect: str | None = None

    _aware = field_validator("at")(aware_utc)


class StopRequest(BaseModel):
    """Stop a chain once its running hops end (`handoff cancel --after-hop`): their results are
    kept, no new hop starts, and the chain ends `cancelled`."""

    model_config = ConfigDict(str_strip_whitespace=True)

    by: str = Field(min_length=1, max_length=MAX_IDENTITY_CHARS)
    reason: str = Field(default="", max_length=MAX_COMMENT_CHARS)

    def problem(self) -> str | None:
        if task_problem(self.by) or task_problem(self.reason or "-"):
            return "the identity and the reason must be valid UTF-8 text"
        return None

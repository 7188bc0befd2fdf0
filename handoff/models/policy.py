"""A chain's bounds (`ChainPolicy`), the chain workflow's input (`ChainRequest`), and a person's
decision on a hop that waits (`ApprovalDecision`). Validated at the edge."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from handoff.constants import (
    DEFAULT_APPROVAL_TIMEOUT_S,
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    DEFAULT_HOP_TIMEOUT_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_BRANCHES,
    DEFAULT_MAX_TOTAL_HOPS,
    DEFAULT_MAX_VISITS_PER_AGENT,
    DEFAULT_PROGRESS_AFTER_S,
    DEFAULT_RETRY_INITIAL_S,
    DEFAULT_SCHEDULE_TO_START_S,
    MAX_APPROVAL_TIMEOUT_S,
    MAX_BRANCHES,
    MAX_CHAIN_DEPTH,
    MAX_COMMENT_CHARS,
    MAX_CONTEXT_BYTES,
    MAX_EXTERNAL_CONTEXT_BYTES,
    MAX_IDENTITY_CHARS,
    MAX_NESTING,
    MAX_TOTAL_HOPS,
    STARTER_AGENT,
)
from handoff.models.checks import address_problem, check_agent_id, nesting_problem, task_problem
from handoff.models.statuses import AgentCapability
from handoff.models.usage import Budget


class ChainPolicy(BaseModel):
    """The bounds of one chain: timeouts, retries, depth, loops, fallback. Validated at the edge."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    hop_timeout_s: float = Field(default=DEFAULT_HOP_TIMEOUT_S, gt=0, le=24 * 3600)
    schedule_to_start_s: float = Field(default=DEFAULT_SCHEDULE_TO_START_S, gt=0, le=3600)
    heartbeat_timeout_s: float = Field(default=DEFAULT_HEARTBEAT_TIMEOUT_S, gt=0, le=10)
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1, le=20)
    retry_initial_s: float = Field(default=DEFAULT_RETRY_INITIAL_S, gt=0, le=600)
    max_depth: int = Field(default=MAX_CHAIN_DEPTH, ge=1, le=MAX_CHAIN_DEPTH)
    max_visits_per_agent: int = Field(default=DEFAULT_MAX_VISITS_PER_AGENT, ge=1, le=MAX_CHAIN_DEPTH)
    fallback_agent: str | None = None
    progress_after_s: float = Field(default=DEFAULT_PROGRESS_AFTER_S, ge=0, le=3600)
    """After how long the chain's search attributes (current agent, depth, agents visited) follow
    every hop; a chain that ends sooner writes them once, at its end. 0: from the first hop."""

    max_context_bytes: int = Field(default=MAX_CONTEXT_BYTES, gt=0, le=MAX_EXTERNAL_CONTEXT_BYTES)
    """Largest hop input (and hop result) the chain accepts. Over Temporal's 2 MB payload limit
    only with external storage (`handoff.payloads.storage`), which the client API then sets."""
    allowed_handoffs: dict[str, list[str]] | None = None
    """Handoff policy: who may hand off to whom. Keys are agent ids (the starter included) or
    "*"; values list agent ids, capability names or "*". None allows every handoff."""
    max_branches: int = Field(default=DEFAULT_MAX_BRANCHES, ge=1, le=MAX_BRANCHES)
    """Most branches one fan-out may have; a fan-out with more is refused."""
    max_total_hops: int = Field(default=DEFAULT_MAX_TOTAL_HOPS, ge=1, le=MAX_TOTAL_HOPS)
    """The chain's hop budget: hops scheduled in all, every branch and fallback included."""
    approval_required: list[str] | None = None
    """Hops a person must approve before they run: to these agent ids, to agents reached through
    these capability names, or "*" for every hop."""
    approval_timeout_s: float = Field(default=DEFAULT_APPROVAL_TIMEOUT_S, gt=0, le=MAX_APPROVAL_TIMEOUT_S)
    """How long a hop waits for a decision; then the chain (or its branch) ends `rejected`."""
    budget: Budget | None = None
    """What the chain may spend in tokens, cost, model calls and time, every branch included."""

    @field_validator("approval_required")
    @classmethod
    def _valid_approvals(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            capabilities = {c.value for c in AgentCapability}
            for target in value:
                if target != "*" and target not in capabilities:
                    check_agent_id(target)
        return value

    @field_validator("fallback_agent")
    @classmethod
    def _valid_fallback(cls, value: str | None) -> str | None:
        return check_agent_id(value) if value else None

    @field_validator("allowed_handoffs")
    @classmethod
    def _valid_policy(cls, value: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        if value is None:
            return None
        capabilities = {c.value for c in AgentCapability}
        for source, targets in value.items():
            if source != "*":
                check_agent_id(source)
            for target in targets:
                if target != "*" and target not in capabilities:
                    check_agent_id(target)
        return value

    def permits(self, from_agent: str, to_agent: str, capability: AgentCapability | None) -> bool:
        """Whether the handoff policy lets `from_agent` hand off to `to_agent` (or its capability)."""
        if self.allowed_handoffs is None:
            return True
        rules = self.allowed_handoffs.get(from_agent, self.allowed_handoffs.get("*", []))
        return "*" in rules or to_agent in rules or (capability is not None and capability.value in rules)

    def requires_approval(self, to_agent: str, capability: AgentCapability | None) -> bool:
        """Whether a hop to `to_agent` (reached through `capability`) waits for a person."""
        listed = self.approval_required or []
        return "*" in listed or to_agent in listed or (capability is not None and capability.value in listed)


class RerunOf(BaseModel):
    """Where a re-run came from: the original chain, and the hop it re-runs from."""

    chain_id: UUID
    hop: int = Field(ge=0, lt=MAX_CHAIN_DEPTH)


class ChainRequest(BaseModel):
    """The chain workflow's input: the first handoff and the chain's policy."""

    chain_id: UUID
    to_agent: str = ""
    capability: AgentCapability | None = None
    task_description: str
    context_data: dict[str, Any] = Field(default_factory=dict)
    policy: ChainPolicy = Field(default_factory=ChainPolicy)
    started_by: str = STARTER_AGENT
    start_depth: int = Field(default=0, ge=0, lt=MAX_CHAIN_DEPTH)
    """Depth of the first hop: a chain continued from an earlier handoff starts deeper."""
    previous_results: list[dict[str, Any]] = Field(default_factory=list)
    """Results from before this chain started, passed on to every hop before this chain's own."""
    first_handoff_id: UUID | None = None
    """Use this id for the first hop (the facade keeps the caller's handoff id)."""
    protocol: int = 1
    """Which chain behaviour the starter asked for (`handoff.constants.CHAIN_PROTOCOL`); requests
    recorded before the field existed decode as 1, so their histories replay as they ran."""
    rerun_of: RerunOf | None = None
    """Set when this chain re-runs another from one of its hops (`rerun_chain`)."""
    carried_hops: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_TOTAL_HOPS)
    """For a re-run: the original's hop entries before the re-run hop, as recorded (`HopRecord`s):
    the new record starts with them; their agents are not called again."""

    def problem(self) -> str | None:
        """Why the chain must be refused before its first hop; None when it may start. Checked
        by the client before it starts anything, and by the workflow for requests that did not
        come through the client."""
        return (address_problem(self.to_agent, self.capability) or task_problem(self.task_description)
                or nesting_problem(self.context_data, "context_data")
                or nesting_problem(self.previous_results, "previous_results")
                or nesting_problem(self.carried_hops, "carried_hops", MAX_NESTING + 4))


class ApprovalDecision(BaseModel):
    """A person's decision on a hop that waits for approval (the chain's `decide_approval` Update)."""

    model_config = ConfigDict(str_strip_whitespace=True)

    approved: bool
    by: str = Field(min_length=1, max_length=MAX_IDENTITY_CHARS)
    """Who decided: an identity the caller passes (a user name, an email, a service account)."""
    comment: str = Field(default="", max_length=MAX_COMMENT_CHARS)
    """Why; required when rejecting."""
    handoff_id: UUID | None = None
    """Which waiting hop, when several branches wait at once (None: the only one waiting)."""

    def problem(self) -> str | None:
        """Why the decision cannot be taken; None when it can."""
        if not self.approved and not self.comment:
            return "a rejection needs a reason"
        if task_problem(self.by) or task_problem(self.comment or "-"):
            return "the identity and the comment must be valid UTF-8 text"
        return None

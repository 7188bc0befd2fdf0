"""The audit record of a chain: one `HopRecord` per hop (a tree: a hop that fanned out holds its
branches, each with its own hops), approvals, and the `ChainRecord` the workflow returns."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, Field

from handoff.models.context import BranchOutcome
from handoff.models.control import SteeringMessage
from handoff.models.directives import AgentDecision
from handoff.models.policy import ApprovalDecision, RerunOf
from handoff.models.statuses import AgentCapability, ChainStatus, HopKind, HopStatus
from handoff.models.usage import Usage


IN_HISTORY = "$in_history"
"""The one key of a hop's `result_data` in the record a chain workflow returns, when the result
is carried once, in the hop's activity result in the chain's history (its value says how big it
is); the client reading the record puts the result back (`handoff.payloads.history`)."""


class ApprovalRecord(BaseModel):
    """A hop's approval: who asked for it, and the decision."""

    asked_by: str
    """"policy" (the chain's `approval_required`), or the agent whose handoff asked for it."""
    requested_at: datetime
    decided_at: datetime | None = None
    decision: Literal["approved", "rejected", "timed_out"] | None = None
    by: str | None = None
    comment: str | None = None

    def decide(self, decision: ApprovalDecision, when: datetime) -> None:
        self.decision = "approved" if decision.approved else "rejected"
        self.by = decision.by
        self.comment = decision.comment or None
        self.decided_at = when


class HopRecord(BaseModel):
    """One hop in the audit trail."""

    hop: int
    """The hop's depth in the chain (`chain_depth`: 0 for the first hop): a fallback keeps its
    hop's depth, and a branch's first hop is one deeper than the hop that fanned out."""
    handoff_id: UUID | None = None
    from_agent: str
    to_agent: str
    capability: AgentCapability | None = None
    task_description: str
    status: HopStatus
    attempts: int = 0
    started_at: datetime | None = None
    completed_at: datetime | None = None
    duration_ms: float | None = None
    result_data: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    fallback_for: str | None = None
    candidates: list[str] = Field(default_factory=list)
    """For a capability hop or a fallback: the agents considered, in the order tried."""
    withheld_context_keys: list[str] = Field(default_factory=list)
    """Keys of the chain's context this hop's agent was not shown (the sender's filter)."""
    previous_results_shown: int | None = None
    """How many earlier results this hop's agent was shown, when the sender limited them."""
    context_added: list[str] = Field(default_factory=list)
    """Keys this hop's agent added to (or changed in) the chain's context for the hops after it:
    the `context_data` of its handoff, merged by the workflow (the values are in the history)."""
    kind: HopKind = HopKind.HANDOFF
    approval: ApprovalRecord | None = None
    """Set when the hop waited for a person: who asked, who decided what, and when."""
    fan_out: FanOutRecord | None = None
    """Set when this hop's agent fanned out (or delegated): its branches, each with its own hops."""
    decision: AgentDecision | None = None
    """Set when a language model chose this hop's outcome: the model, the tools offered, the one
    it called with its arguments and reason, token usage and model calls."""
    build_id: str | None = None
    """The version (build id) of the agent's worker that completed the hop (after `handoff
    rollout`, which version ran it)."""
    usage: Usage | None = None
    """What the hop spent (its model calls, what its handler reported), priced by the chain's
    budget; None when it reported nothing."""
    steering: list[SteeringMessage] = Field(default_factory=list)
    """The steering messages this hop received (`ctx.steering`)."""
    carried_from: UUID | None = None
    """Set on a re-run's first entries: the chain whose record they are carried from (their
    agents were not called again)."""

    @property
    def result_in_history(self) -> bool:
        """Whether this entry names its result instead of holding it (`IN_HISTORY`)."""
        return len(self.result_data) == 1 and IN_HISTORY in self.result_data

    def close(self, status: HopStatus, error: str | None, when: datetime, *,
              attempts: int | None = None, result_data: dict[str, Any] | None = None) -> None:
        """The hop ended at `when` with `status`."""
        self.status = status
        self.error = error
        if attempts is not None:
            self.attempts = attempts
        if result_data is not None:
            self.result_data = result_data
        self.completed_at = when
        if self.started_at is not None:
            self.duration_ms = (when - self.started_at).total_seconds() * 1000


class BranchRecord(BranchOutcome):
    """One branch of a fan-out in the audit trail: its outcome and its own hops."""

    hops: list[HopRecord] = Field(default_factory=list)
    started_at: datetime | None = None
    completed_at: datetime | None = None
    duration_ms: float | None = None

    def outcome(self) -> BranchOutcome:
        """What the join sees of this branch."""
        return BranchOutcome.model_validate(self.model_dump(exclude={"hops", "started_at", "completed_at",
                                                                     "duration_ms"}))

    def end(self, status: ChainStatus, error: str | None, when: datetime) -> None:
        self.status = status
        self.error = error
        self.completed_at = when
        if self.started_at is not None:
            self.duration_ms = (when - self.started_at).total_seconds() * 1000
        self.final_result = _last_completed(self.hops)
        self.agents = [h.to_agent for h in self.hops if h.to_agent and h.status is not HopStatus.REFUSED]


class FanOutRecord(BaseModel):
    """A fan-out in the audit trail: how its join waited, and every branch."""

    wait_for: int | None = None
    deadline_s: float | None = None
    branches: list[BranchRecord] = Field(default_factory=list)


def _last_completed(hops: list[HopRecord]) -> dict[str, Any]:
    return next((h.result_data for h in reversed(hops) if h.status is HopStatus.COMPLETED), {})


def walk_hops(hops: list[HopRecord]) -> Iterator[HopRecord]:
    """Every hop entry of a tree of hops, branches included, each before its branches' hops."""
    stack = list(reversed(hops))
    while stack:
        hop = stack.pop()
        yield hop
        if hop.fan_out is not None:
            for branch in reversed(hop.fan_out.branches):
                stack.extend(reversed(branch.hops))


def walk_branches(hops: list[HopRecord]) -> Iterator[BranchRecord]:
    """Every branch record of a tree of hops, nested ones included."""
    for hop in walk_hops(hops):
        if hop.fan_out is not None:
            yield from hop.fan_out.branches


class ChainRecord(BaseModel):
    """The audit record of one chain: the chain workflow's result and its `chain_state` query.
    `hops` is a tree: a hop that fanned out holds its branches, each with its own hops."""

    chain_id: UUID
    status: ChainStatus
    task_description: str
    started_at: datetime
    completed_at: datetime | None = None
    duration_ms: float | None = None
    hops: list[HopRecord] = Field(default_factory=list)
    final_result: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    usage: Usage | None = None
    """What the chain spent in all, every hop's usage added up (None: no hop reported any)."""
    usage_by_agent: dict[str, Usage] = Field(default_factory=dict)
    """The same, by the agent whose hops spent it."""
    currency: str | None = None
    """The currency of every cost in the record: its budget's (None: the chain had no budget)."""
    rerun_of: RerunOf | None = None
    """Set when the chain re-runs another from one of its hops."""

    def spend(self, agent: str, usage: Usage) -> None:
        """Add one hop's `usage` (by `agent`) to the chain's totals."""
        self.usage = usage if self.usage is None else self.usage.plus(usage)
        earlier = self.usage_by_agent.get(agent)
        self.usage_by_agent[agent] = usage if earlier is None else earlier.plus(usage)

    def end(self, status: ChainStatus, error: str | None, when: datetime) -> None:
        """The chain ended at `when` with `status`; its final result is the last completed hop's."""
        self.status = status
        self.error = error
        self.completed_at = when
        self.duration_ms = (when - self.started_at).total_seconds() * 1000
        self.final_result = _last_completed(self.hops)

    def all_hops(self) -> Iterator[HopRecord]:
        """Every hop entry, branches included (`walk_hops`)."""
        return walk_hops(self.hops)

    def close_running(self, status: HopStatus, error: str, when: datetime) -> list[HopRecord]:
        """Close every hop still open, and every branch still running, in the whole tree (the
        chain was cancelled, terminated, ...); the hops closed."""
        running = [hop for hop in self.all_hops() if hop.status.open]
        for hop in running:
            hop.close(status, error, when)
        branch_status = ChainStatus.CANCELLED if status is HopStatus.CANCELLED else ChainStatus.FAILED
        for branch in walk_branches(self.hops):
            if not branch.status.ended:
                branch.end(branch_status, error, when)
        return running


HopRecord.model_rebuild()


BranchRecord.model_rebuild()

"""What a hop's agent receives: the `HandoffContext`, with where it stands in a fan-out and what
the chain's rules leave it for its next step. Its methods build the agent's result."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Literal
from uuid import UUID, uuid4

from pydantic import BaseModel, Field, PrivateAttr, field_validator

from handoff.constants import MAX_CHAIN_DEPTH
from handoff.errors import InvalidRequest
from handoff.models.checks import address_problem, aware_utc, check_agent_id, utc_now
from handoff.models.directives import Branch, FanOut, HandoffDirective, HandoffResult, Join
from handoff.models.control import SteeringMessage
from handoff.models.statuses import AgentCapability, ChainStatus
from handoff.models.usage import BudgetLeft, Usage, model_usage


class BranchPosition(BaseModel):
    """Where a hop stands when it runs inside a branch of a fan-out."""

    hop: int
    """The depth of the hop that fanned out."""
    index: int
    of: int


class BranchOutcome(BaseModel):
    """How one branch of a fan-out ended, as its join (or its delegating agent) sees it."""

    index: int
    to_agent: str = ""
    """The agent the branch was addressed to (empty when it was addressed by capability)."""
    capability: AgentCapability | None = None
    task_description: str
    status: ChainStatus = ChainStatus.RUNNING
    final_result: dict[str, Any] = Field(default_factory=dict)
    """The result of the branch's last completed hop ({} when none completed)."""
    error: str | None = None
    cut: Literal["late", "not_needed"] | None = None
    """Why the join stopped it while it ran: past the join's deadline, or the join had its first k."""
    agents: list[str] = Field(default_factory=list)
    """The agents that ran its hops, in order (fallbacks included)."""


class HopLimits(BaseModel):
    """What the chain's rules leave an agent for its next step, set by the workflow, so an agent
    that chooses its own handoff (`handoff.agents.llm`) offers only what the chain would follow."""

    can_hand_off: bool = True
    """False when the depth limit or the hop budget leaves no room for another hop."""
    allowed_targets: list[str] | None = None
    """What the handoff policy lets this agent address: agent ids, capability names, "*" (None:
    anything)."""
    excluded_agents: list[str] = Field(default_factory=list)
    """Agents the visit rule excludes on this path once this hop has run."""
    asked: list[tuple[str, str]] = Field(default_factory=list)
    """(agent, task) pairs already asked on this path, this hop's included: asking again is a
    loop (tasks over 1,000 characters are left out: no agent writes one as its next task)."""
    budget: BudgetLeft | None = None
    """What the chain's budget leaves, when it has one (`ChainPolicy.budget`), as this hop starts."""

    def permits(self, target: str) -> bool:
        """Whether the policy lets this agent address `target` (an agent id or a capability name)."""
        return self.allowed_targets is None or "*" in self.allowed_targets or target in self.allowed_targets


class HandoffContext(BaseModel):
    """One hop's input: what the receiving agent is asked to do, and everything the chain knows.

    The chain workflow builds every context: `from_agent`, `chain_id`, `chain_depth`,
    `handoff_id` and `previous_results` are set by the workflow, never taken from an agent.
    `to_capability` is the capability the hop was addressed by, when it was.
    """

    handoff_id: UUID = Field(default_factory=uuid4)
    chain_id: UUID = Field(default_factory=uuid4)
    from_agent: str = ""
    to_agent: str = ""
    to_capability: AgentCapability | None = None
    task_description: str
    context_data: dict[str, Any] = Field(default_factory=dict)
    previous_results: list[dict[str, Any]] = Field(default_factory=list)
    chain_depth: int = Field(default=0, ge=0, le=MAX_CHAIN_DEPTH)
    created_at: datetime = Field(default_factory=utc_now)
    branch: BranchPosition | None = None
    """Set when this hop runs inside a branch of a fan-out: a branch's last agent completes it
    (`ctx.complete(...)`) to give the join its result."""
    branches: list[BranchOutcome] = Field(default_factory=list)
    """For a join (or a return): how every branch ended, in branch order."""
    returning: bool = False
    """The chain came back to this agent after its delegation (or its own fan-out) ended; the
    outcome is in `branches` and the delegate's results in `previous_results`."""
    limits: HopLimits | None = None
    """What the chain's rules leave this agent for its next step (None in histories from before)."""
    steering: list[SteeringMessage] = Field(default_factory=list)
    """What people told the chain for this hop since the last hop started (`handoff steer`), in order."""

    _aware = field_validator("created_at")(aware_utc)

    @field_validator("to_agent")
    @classmethod
    def _valid_to_agent(cls, value: str) -> str:
        return check_agent_id(value) if value else value

    _reported: Usage | None = PrivateAttr(default=None)

    def report_usage(self, *, model: str = "", prompt_tokens: int = 0, completion_tokens: int = 0,
                     model_calls: int = 0, cost: float = 0.0) -> None:
        """Add what this hop spent (a model this handler called itself, or any cost in the
        budget's currency) to the hop's usage: the chain's budget counts it when the hop ends."""
        spent = model_usage(model, prompt_tokens, completion_tokens, model_calls) if model else Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, model_calls=model_calls)
        spent = spent.model_copy(update={"cost": Usage(cost=cost).cost})
        self._reported = spent if self._reported is None else self._reported.plus(spent)

    @property
    def reported_usage(self) -> Usage | None:
        """What `report_usage` added up, if it was called."""
        return self._reported

    _progress: Callable[[str, dict[str, Any] | None], Awaitable[None]] | None = PrivateAttr(default=None)

    async def progress(self, message: str, data: dict[str, Any] | None = None) -> None:
        """Say what this hop is doing now: a `hop.progress` event for the chain's watchers
        (`handoff follow`). Best-effort and bounded: notes reach the chain at most once a second
        and at most `PROGRESS_PER_HOP` times per attempt (in between, the latest is kept and sent
        next); a message is cut at 300 characters and `data` over 4 KiB is left out. Never
        blocks or fails the hop; outside a worker it does nothing."""
        if self._progress is not None:
            await self._progress(message, data)

    def complete(self, result_data: dict[str, Any] | None = None) -> HandoffResult:
        """This hop's successful result; the chain ends here."""
        return HandoffResult(handoff_id=self.handoff_id, success=True, result_data=result_data or {})

    def fail(self, error: str, result_data: dict[str, Any] | None = None) -> HandoffResult:
        """A deliberate failure of this hop (not retried; the chain falls back to another agent)."""
        data = {**(result_data or {}), "error": error}
        return HandoffResult(handoff_id=self.handoff_id, success=False, result_data=data)

    def handoff(
        self,
        *,
        task_description: str,
        to_agent: str | None = None,
        capability: AgentCapability | str | None = None,
        context_data: dict[str, Any] | None = None,
        result_data: dict[str, Any] | None = None,
        visible_context_keys: list[str] | None = None,
        visible_previous_results: int | None = None,
        require_approval: bool = False,
    ) -> HandoffResult:
        """This hop's successful result, handing the chain on to an agent or a capability.

        `context_data` is merged into the chain's context for every later hop; `result_data`
        is this hop's own result, which later hops see in `previous_results`. The next agent
        alone may be shown less: only `visible_context_keys` of the context and only the latest
        `visible_previous_results` results; what it was not shown is recorded in its hop entry.
        `require_approval`: a person approves the next hop before it runs.
        Raises `InvalidRequest` unless exactly one of `to_agent` and `capability` is given.
        """
        problem = address_problem(to_agent, capability)
        if problem:
            raise InvalidRequest(f"handoff(): {problem}")
        directive = HandoffDirective(
            to_agent=to_agent or "",
            to_capability=AgentCapability(capability) if capability is not None else None,
            task_description=task_description,
            context_data=context_data or {},
            visible_context_keys=visible_context_keys,
            visible_previous_results=visible_previous_results,
            require_approval=require_approval,
        )
        return HandoffResult(
            handoff_id=self.handoff_id,
            success=True,
            result_data=result_data or {},
            next_handoff=directive,
        )

    def fan_out(
        self,
        branches: Sequence[Branch | dict[str, Any]],
        *,
        join: Join | dict[str, Any],
        result_data: dict[str, Any] | None = None,
        context_data: dict[str, Any] | None = None,
    ) -> HandoffResult:
        """This hop's successful result, handing the chain to several agents at once.

        Each branch runs concurrently on its own agent's queue, under the chain's rules, and
        may hand off further; when they have ended (or the join's `wait_for` / `deadline_s`
        says), the join agent receives every branch's outcome in `ctx.branches` and their
        results in `previous_results`, and the chain goes on from it. `context_data` is merged
        into the chain's context. Raises `InvalidRequest` for a branch or join that names no
        target, or both an agent and a capability.
        """
        try:
            fan = FanOut(branches=[b if isinstance(b, Branch) else Branch.model_validate(b) for b in branches],
                         join=join if isinstance(join, Join) else Join.model_validate(join),
                         context_data=context_data or {})
        except ValueError as err:
            raise InvalidRequest(f"fan_out(): {err}") from None
        problem = fan.problem()
        if problem:
            raise InvalidRequest(f"fan_out(): {problem}")
        return HandoffResult(handoff_id=self.handoff_id, success=True, result_data=result_data or {}, fan_out=fan)

    def delegate(
        self,
        *,
        task_description: str,
        to_agent: str | None = None,
        capability: AgentCapability | str | None = None,
        then: str | None = None,
        context_data: dict[str, Any] | None = None,
        result_data: dict[str, Any] | None = None,
        visible_context_keys: list[str] | None = None,
        visible_previous_results: int | None = None,
        require_approval: bool = False,
    ) -> HandoffResult:
        """Hand work to an agent (or a capability) and have the chain come back to this agent
        when that work, with any handoffs it makes, has ended: a new hop of this agent, with
        `ctx.returning` set, the outcome in `ctx.branches[0]` and the delegate's results in
        `previous_results`. `then`: the task of that hop (default: this hop's task)."""
        problem = address_problem(to_agent, capability)
        if problem:
            raise InvalidRequest(f"delegate(): {problem}")
        branch = Branch(to_agent=to_agent or "",
                        to_capability=AgentCapability(capability) if capability is not None else None,
                        task_description=task_description, visible_context_keys=visible_context_keys,
                        visible_previous_results=visible_previous_results, require_approval=require_approval)
        join = Join(to_agent=self.to_agent, task_description=then or self.task_description)
        return self.fan_out([branch], join=join, result_data=result_data, context_data=context_data)

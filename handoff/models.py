"""The data model: what travels between agents, and the audit record of a chain.

Every model round-trips through Temporal with `pydantic_data_converter`, so the same classes
are the workflow's input and result, the hop activity's input and result, and the CLI's JSON.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from enum import Enum
from collections.abc import Iterator, Sequence
from typing import Any, Literal
from uuid import UUID, uuid4

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic_core import to_json
from temporalio.api.common.v1 import Payload
from temporalio.common import RawValue

from handoff.constants import (
    DEFAULT_APPROVAL_TIMEOUT_S,
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    DEFAULT_MAX_BRANCHES,
    DEFAULT_MAX_TOTAL_HOPS,
    DEFAULT_HOP_TIMEOUT_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_VISITS_PER_AGENT,
    DEFAULT_PROGRESS_AFTER_S,
    DEFAULT_RETRY_INITIAL_S,
    DEFAULT_SCHEDULE_TO_START_S,
    MAX_APPROVAL_TIMEOUT_S,
    MAX_BRANCHES,
    MAX_CHAIN_DEPTH,
    MAX_COMMENT_CHARS,
    MAX_CONTEXT_BYTES,
    MAX_IDENTITY_CHARS,
    MAX_TOTAL_HOPS,
    MAX_EXTERNAL_CONTEXT_BYTES,
    MAX_NESTING,
)
from handoff.errors import InvalidRequest

AGENT_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


def utc_now() -> datetime:
    """The current time, timezone-aware UTC (never the naive `datetime.utcnow()`)."""
    return datetime.now(timezone.utc)


def check_agent_id(value: str) -> str:
    """Return `value` if it is a valid agent id, else raise `InvalidRequest` saying what is wrong
    (a `ValueError`, so pydantic validators report it as theirs)."""
    if not isinstance(value, str) or not AGENT_ID_RE.match(value):
        raise InvalidRequest(
            f"invalid agent id {value!r}: use a lowercase letter, then up to 62 of a-z 0-9 _ -"
        )
    return value


def address_problem(to_agent: str | None, capability: object | None) -> str | None:
    """What is wrong with where a chain or a handoff is addressed: it names exactly one agent
    or one capability. None when nothing is."""
    if bool(to_agent) == (capability is not None):
        return "give exactly one of an agent (to_agent) or a capability"
    if to_agent and not AGENT_ID_RE.match(to_agent):
        return f"invalid agent id {to_agent!r}"
    return None


def task_problem(task: str) -> str | None:
    """What is wrong with a task description: it says something, in text that can be stored
    (valid UTF-8). None when nothing is."""
    if not task.strip():
        return "the task description is empty"
    try:
        task.encode("utf-8")
    except UnicodeEncodeError:
        return "the task description is not valid UTF-8 text"
    return None


def nesting_problem(value: Any, what: str, limit: int = MAX_NESTING) -> str | None:
    """What is wrong with a JSON-like value: it nests lists and objects at most `limit` deep
    (deeper input would exhaust a decoder's recursion on the way through Temporal). None when
    nothing is. Walks iteratively, so any depth is measured without recursion."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        if depth >= limit:
            return f"{what} nests more than {limit} levels deep"
        stack.extend((child, depth + 1) for child in children)
    return None


def _aware_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("datetime must be timezone-aware (UTC)")
    return value.astimezone(timezone.utc)


class AgentCapability(str, Enum):
    """What an agent can do. Each value equals its name; the CLI takes the same spelling."""

    CODE_ANALYSIS = "CODE_ANALYSIS"
    SECURITY_AUDIT = "SECURITY_AUDIT"
    PERFORMANCE_OPTIMIZATION = "PERFORMANCE_OPTIMIZATION"
    DATABASE_OPERATIONS = "DATABASE_OPERATIONS"
    API_INTEGRATION = "API_INTEGRATION"
    TESTING = "TESTING"
    DEPLOYMENT = "DEPLOYMENT"


class ChainStatus(str, Enum):
    RUNNING = "running"
    AWAITING_APPROVAL = "awaiting_approval"
    """Running, and a hop waits for a person's decision (`handoff approve` / `handoff reject`)."""
    COMPLETED = "completed"
    FAILED = "failed"
    DEPTH_EXCEEDED = "depth_exceeded"
    BUDGET_EXCEEDED = "budget_exceeded"
    """The chain's hop budget (`ChainPolicy.max_total_hops`, over every branch) was used up."""
    LOOP_DETECTED = "loop_detected"
    CANCELLED = "cancelled"
    REJECTED = "rejected"

    @property
    def ended(self) -> bool:
        return self not in (ChainStatus.RUNNING, ChainStatus.AWAITING_APPROVAL)


class HopStatus(str, Enum):
    AWAITING_APPROVAL = "awaiting_approval"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    UNREACHABLE = "unreachable"
    REFUSED = "refused"
    CANCELLED = "cancelled"

    @property
    def open(self) -> bool:
        """Not ended yet: running, or waiting for approval."""
        return self in (HopStatus.RUNNING, HopStatus.AWAITING_APPROVAL)


class HopKind(str, Enum):
    """Why a hop runs: a handoff, the join of a fan-out, or the chain coming back to the agent
    that delegated (or fanned out and joins its own branches)."""

    HANDOFF = "handoff"
    JOIN = "join"
    RETURN = "return"


_CAPABILITY = {"validation_alias": AliasChoices("to_capability", "capability")}
"""`capability=` is accepted for `to_capability`, as `ctx.handoff(capability=...)` spells it."""


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
    that chooses its own handoff (`handoff.llm`) offers only what the chain would follow."""

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

    def permits(self, target: str) -> bool:
        """Whether the policy lets this agent address `target` (an agent id or a capability name)."""
        return self.allowed_targets is None or "*" in self.allowed_targets or target in self.allowed_targets


class AgentDecision(BaseModel):
    """How an agent that asks a language model chose its step (`handoff.llm`): recorded in its
    hop's entry, so the audit says why the chain went where it went."""

    model: str
    tools_offered: list[str] = Field(default_factory=list)
    tool: str | None = None
    """The tool the model called to decide (a transfer, or finish); None for a plain answer."""
    arguments: dict[str, Any] = Field(default_factory=dict)
    reason: str = ""
    """The model's short reason, as it gave it."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model_calls: int = 0
    model_ms: float = 0.0
    """Time spent waiting for the model, over all its calls."""
    tool_calls: list[str] = Field(default_factory=list)
    """The agent's own tools the model called before deciding, in order."""
    trimmed: list[str] = Field(default_factory=list)
    """What of the task, context and earlier results was left out to fit the token budget."""

    @property
    def summary(self) -> str:
        """One line: what the model chose and why."""
        choice = self.tool or "answered"
        return f"{self.model} chose {choice}" + (f": {self.reason}" if self.reason else "")


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

    _aware = field_validator("created_at")(_aware_utc)

    @field_validator("to_agent")
    @classmethod
    def _valid_to_agent(cls, value: str) -> str:
        return check_agent_id(value) if value else value

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


class Addressed(BaseModel):
    """Where a handoff goes and what the receiving agent is asked and shown: exactly one agent
    (`to_agent`) or capability (`to_capability`; `capability=` is accepted) and a task."""

    model_config = ConfigDict(populate_by_name=True, allow_inf_nan=False)

    to_agent: str = ""
    to_capability: AgentCapability | None = Field(default=None, **_CAPABILITY)
    task_description: str
    visible_context_keys: list[str] | None = None
    """The keys of the chain's context the receiving agent sees (None: all)."""
    visible_previous_results: int | None = Field(default=None, ge=0)
    """How many of the latest earlier results the receiving agent sees (None: all)."""
    require_approval: bool = False
    """A person approves the hop before it runs (see `ChainPolicy.approval_required`)."""

    def problem(self) -> str | None:
        """Why the chain must refuse to go there; None when it may."""
        return address_problem(self.to_agent, self.to_capability) or task_problem(self.task_description)


class HandoffDirective(Addressed):
    """What an agent returns to hand the chain on: where to, what to do, what to add to the
    chain's context and what the next agent may see of it. Best built by `ctx.handoff(...)`.

    The workflow judges it before anything runs: it must name exactly one agent or capability
    and a task, and the chain's depth, loop and handoff-policy rules apply to what it names.
    A fully built `HandoffContext` returned as `next_handoff` (the original API's style) is read
    as a directive; its other fields are ignored, as they are in histories recorded before
    directives had a model of their own.
    """

    context_data: dict[str, Any] = Field(default_factory=dict)
    """Merged into the chain's context for every later hop."""

    def problem(self) -> str | None:
        return super().problem() or nesting_problem(self.context_data, "the handoff's context_data")


class Branch(HandoffDirective):
    """One branch of a fan-out: where it goes first and what it is asked. It may hand off further
    (a sub-chain) under the chain's rules. Its `context_data` is merged into this branch's own
    context only (the chain's context, as filtered, plus this): it stays in the branch."""


class Join(Addressed):
    """Where a fan-out's branches come together: the agent (or capability) that receives every
    branch's outcome, and when. The chain goes on from the join's hop."""

    wait_for: int | None = Field(default=None, ge=1)
    """None: wait for every branch to end. k: join as soon as k branches have completed (or every
    branch has ended); the branches still running are cut (`not_needed`)."""
    deadline_s: float | None = Field(default=None, gt=0, le=MAX_APPROVAL_TIMEOUT_S)
    """Join after this many seconds at most; the branches still running are cut (`late`)."""


class FanOut(BaseModel):
    """What an agent returns to hand the chain to several agents at once, and where their work
    joins. Best built by `ctx.fan_out(...)` or `ctx.delegate(...)`."""

    branches: list[Branch]
    join: Join
    context_data: dict[str, Any] = Field(default_factory=dict)
    """Merged into the chain's context: every branch and the join see it."""

    def problem(self) -> str | None:
        """Why the chain must refuse this fan-out whatever its policy; None when it may follow it."""
        if not self.branches:
            return "a fan-out needs at least one branch"
        for index, branch in enumerate(self.branches):
            problem = branch.problem()
            if problem:
                return f"branch {index}: {problem}"
        problem = self.join.problem()
        if problem:
            return f"the join: {problem}"
        if self.join.wait_for is not None and self.join.wait_for > len(self.branches):
            return f"the join waits for {self.join.wait_for} of only {len(self.branches)} branches"
        return nesting_problem(self.context_data, "the fan-out's context_data")


class HandoffResult(BaseModel):
    """What an agent's handler returns for one hop."""

    handoff_id: UUID
    success: bool
    result_data: dict[str, Any] = Field(default_factory=dict)
    execution_time_seconds: float = 0.0
    next_handoff: HandoffDirective | None = None
    fan_out: FanOut | None = None
    """Hand the chain to several agents at once (`ctx.fan_out`, `ctx.delegate`); a result carries
    a `next_handoff` or a `fan_out`, never both."""
    decision: AgentDecision | None = None
    """How the agent chose this step, when a language model chose it (recorded in the hop entry)."""
    completed_at: datetime = Field(default_factory=utc_now)

    _aware = field_validator("completed_at")(_aware_utc)

    @field_validator("next_handoff", mode="before")
    @classmethod
    def _context_as_directive(cls, value: Any) -> Any:
        if isinstance(value, HandoffContext):
            return value.model_dump()
        return value


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
    only with external storage (`handoff.storage`), which the client API then sets."""
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


class ChainRequest(BaseModel):
    """The chain workflow's input: the first handoff and the chain's policy."""

    chain_id: UUID
    to_agent: str = ""
    capability: AgentCapability | None = None
    task_description: str
    context_data: dict[str, Any] = Field(default_factory=dict)
    policy: ChainPolicy = Field(default_factory=ChainPolicy)
    started_by: str = "starter"
    start_depth: int = Field(default=0, ge=0, lt=MAX_CHAIN_DEPTH)
    """Depth of the first hop: a chain continued from an earlier handoff starts deeper."""
    previous_results: list[dict[str, Any]] = Field(default_factory=list)
    """Results from before this chain started, passed on to every hop before this chain's own."""
    first_handoff_id: UUID | None = None
    """Use this id for the first hop (the facade keeps the caller's handoff id)."""
    protocol: int = 1
    """Which chain behaviour the starter asked for (`handoff.constants.CHAIN_PROTOCOL`); requests
    recorded before the field existed decode as 1, so their histories replay as they ran."""

    def problem(self) -> str | None:
        """Why the chain must be refused before its first hop; None when it may start. Checked
        by the client before it starts anything, and by the workflow for requests that did not
        come through the client."""
        return (address_problem(self.to_agent, self.capability) or task_problem(self.task_description)
                or nesting_problem(self.context_data, "context_data")
                or nesting_problem(self.previous_results, "previous_results"))


class HopInput(BaseModel):
    """The hop activity's input. `hop` and `fallback_for` let the audit be rebuilt from history."""

    hop: int
    context: HandoffContext
    heartbeat_interval_s: float
    fallback_for: str | None = None
    max_result_bytes: int = MAX_CONTEXT_BYTES
    withheld_context_keys: list[str] = Field(default_factory=list)
    previous_results_shown: int | None = None


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


class Registration(BaseModel):
    """An agent worker's registration (the registry's `register` Update). Loosely typed on
    purpose: the registry's validator explains what is wrong with it."""

    agent_id: str
    name: str
    capabilities: list[str]
    max_concurrent: int = 5
    version: str = "1"
    instance: str = ""
    """The registering worker's identity; an agent with several replicas has several instances."""
    description: str = ""
    """What the agent does, in a sentence (language models choosing a handoff read it)."""


class Deregistration(BaseModel):
    """The registry's `deregister` Update."""

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
    last_seen: datetime = Field(default_factory=utc_now)

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
        return self.backlog / max(self.max_concurrent, 1)


class ResolveRequest(BaseModel):
    capability: AgentCapability | None = None
    like_agent: str | None = None
    """Resolve the capabilities of this agent (a fallback for a hop addressed by name)."""
    exclude: list[str] = Field(default_factory=list)


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

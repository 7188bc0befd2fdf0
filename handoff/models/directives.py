"""What an agent returns for its hop: a result, and where the chain goes next (a handoff, a
fan-out and its join), with how a language model chose it."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from handoff.constants import MAX_APPROVAL_TIMEOUT_S
from handoff.models.checks import address_problem, aware_utc, nesting_problem, task_problem, utc_now
from handoff.models.statuses import AgentCapability
from handoff.models.usage import Usage


_CAPABILITY = {"validation_alias": AliasChoices("to_capability", "capability")}
"""`capability=` is accepted for `to_capability`, as `ctx.handoff(capability=...)` spells it."""


class McpCall(BaseModel):
    """One call an LLM agent's hop made to an MCP server's tool (`handoff.agents.mcp_tools`)."""

    server: str
    tool: str
    """The tool's name on its server (`tools/list` for a listing that failed)."""
    arguments_digest: str = ""
    """A digest of the arguments' canonical JSON: the record never holds the arguments themselves."""
    duration_ms: float = 0.0
    error: str = ""
    """Why the call failed ("" when it succeeded): what the model was told."""
    result_chars: int = 0
    truncated: bool = False
    """The result was cut to the server's `max_result_chars`."""


class AgentDecision(BaseModel):
    """How an agent that asks a language model chose its step (`handoff.agents.llm`): recorded in its
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
    """The agent's own tools (and MCP tools, by their offered names) the model called before
    deciding, in order."""
    mcp_calls: list[McpCall] = Field(default_factory=list)
    """Each MCP tool call of the hop, in order, and each MCP listing that failed."""
    trimmed: list[str] = Field(default_factory=list)
    """What of the task, context and earlier results was left out to fit the token budget."""

    @property
    def summary(self) -> str:
        """One line: what the model chose and why."""
        choice = self.tool or "answered"
        return f"{self.model} chose {choice}" + (f": {self.reason}" if self.reason else "")


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
    usage: Usage | None = None
    """What the hop spent besides its model calls in `decision` (which count by themselves):
    what the handler reported (`ctx.report_usage`), or set here."""
    completed_at: datetime = Field(default_factory=utc_now)

    _aware = field_validator("completed_at")(aware_utc)

    @field_validator("next_handoff", mode="before")
    @classmethod
    def _context_as_directive(cls, value: Any) -> Any:
        """A `HandoffContext` (or any other model) returned as `next_handoff` is read for its
        directive fields alone."""
        if isinstance(value, BaseModel) and not isinstance(value, HandoffDirective):
            return value.model_dump()
        return value

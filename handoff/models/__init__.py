"""The data model: what travels between agents, and the audit record of a chain.

Every model round-trips through Temporal with the pydantic data converter, so the same classes
are the workflow's input and result, the hop activity's input and result, and the CLI's JSON.
One module per kind of thing; this package re-exports them all.
"""

from handoff.models.checks import (
    AGENT_ID_RE,
    address_problem,
    aware_utc,
    check_agent_id,
    nesting_problem,
    task_problem,
    utc_now,
)
from handoff.models.statuses import (
    AgentCapability,
    ChainStatus,
    HopKind,
    HopStatus,
)
from handoff.models.directives import (
    Addressed,
    AgentDecision,
    Branch,
    FanOut,
    HandoffDirective,
    HandoffResult,
    Join,
)
from handoff.models.context import (
    BranchOutcome,
    BranchPosition,
    HandoffContext,
    HopLimits,
)
from handoff.models.policy import (
    ApprovalDecision,
    ChainPolicy,
    ChainRequest,
    RerunOf,
)
from handoff.models.control import Steering, SteeringMessage, StopRequest
from handoff.models.usage import Budget, BudgetLeft, ModelUsage, Price, Usage
from handoff.models.events import ChainEvent, EventKind, ProgressNote
from handoff.models.wire import (
    AgentCard,
    Candidate,
    CapabilityCandidates,
    Deregistration,
    HopInput,
    HopOutput,
    Registration,
    ResolveRequest,
    load,
    sized_payload,
)
from handoff.models.record import (
    ApprovalRecord,
    BranchRecord,
    ChainRecord,
    FanOutRecord,
    IN_HISTORY,
    HopRecord,
    walk_branches,
    walk_hops,
)

__all__ = [
    "AGENT_ID_RE",
    "Addressed",
    "AgentCapability",
    "AgentCard",
    "AgentDecision",
    "ApprovalDecision",
    "ApprovalRecord",
    "Branch",
    "BranchOutcome",
    "BranchPosition",
    "BranchRecord",
    "Budget",
    "BudgetLeft",
    "Candidate",
    "CapabilityCandidates",
    "ChainPolicy",
    "ChainEvent",
    "ChainRecord",
    "ChainRequest",
    "ChainStatus",
    "Deregistration",
    "EventKind",
    "FanOut",
    "FanOutRecord",
    "HandoffContext",
    "HandoffDirective",
    "HandoffResult",
    "HopInput",
    "HopKind",
    "HopLimits",
    "HopOutput",
    "HopRecord",
    "IN_HISTORY",
    "HopStatus",
    "Join",
    "ModelUsage",
    "Price",
    "ProgressNote",
    "Registration",
    "RerunOf",
    "ResolveRequest",
    "Steering",
    "SteeringMessage",
    "StopRequest",
    "Usage",
    "address_problem",
    "aware_utc",
    "check_agent_id",
    "load",
    "nesting_problem",
    "sized_payload",
    "task_problem",
    "utc_now",
    "walk_branches",
    "walk_hops",
]

"""What an agent can do, and where a chain, a branch and a hop stand."""

from __future__ import annotations

from enum import Enum


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

"""handoff: peer-to-peer agent handoff chains, each a durable Temporal workflow.

The front door: the public API of every floor (docs/design.md, "Layout and floors").
"""

from handoff.agents.agent import Agent, Handler
from handoff.client import (
    approve_chain,
    cancel_chain,
    connect,
    get_chain,
    reject_chain,
    run_chain,
    start_chain,
    steer_chain,
    stop_chain,
    wait_chain,
)
from handoff.errors import (
    ChainNotFound,
    ContextTooLarge,
    HandoffError,
    InvalidRequest,
    PermanentError,
    ServerUnreachable,
    UnknownAgent,
)
from handoff.models import (
    AgentCapability,
    AgentCard,
    ApprovalDecision,
    Branch,
    BranchOutcome,
    ChainPolicy,
    ChainRecord,
    ChainStatus,
    HandoffContext,
    HandoffDirective,
    HandoffResult,
    HopKind,
    HopRecord,
    HopStatus,
    Join,
)
from handoff.service import PeerHandoffService

__all__ = [
    "Agent",
    "AgentCapability",
    "AgentCard",
    "ApprovalDecision",
    "Branch",
    "BranchOutcome",
    "ChainNotFound",
    "ChainPolicy",
    "ChainRecord",
    "ChainStatus",
    "ContextTooLarge",
    "HandoffContext",
    "HandoffDirective",
    "HandoffError",
    "HandoffResult",
    "Handler",
    "HopKind",
    "HopRecord",
    "HopStatus",
    "InvalidRequest",
    "Join",
    "PeerHandoffService",
    "PermanentError",
    "ServerUnreachable",
    "UnknownAgent",
    "approve_chain",
    "cancel_chain",
    "connect",
    "get_chain",
    "reject_chain",
    "run_chain",
    "start_chain",
    "steer_chain",
    "stop_chain",
    "wait_chain",
]

"""handoff: peer-to-peer agent handoff chains, each a durable Temporal workflow.

The front door: the public API of every floor (docs/design.md, "Layout and floors").
"""

from handoff.agent import Agent, Handler
from handoff.client import (
    cancel_chain,
    connect,
    get_chain,
    run_chain,
    start_chain,
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
    ChainPolicy,
    ChainRecord,
    ChainStatus,
    HandoffContext,
    HandoffDirective,
    HandoffResult,
    HopRecord,
    HopStatus,
)
from handoff.service import PeerHandoffService

__all__ = [
    "Agent",
    "AgentCapability",
    "AgentCard",
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
    "HopRecord",
    "HopStatus",
    "InvalidRequest",
    "PeerHandoffService",
    "PermanentError",
    "ServerUnreachable",
    "UnknownAgent",
    "cancel_chain",
    "connect",
    "get_chain",
    "run_chain",
    "start_chain",
    "wait_chain",
]

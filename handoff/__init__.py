"""handoff: peer-to-peer agent handoff chains, each a durable Temporal workflow."""

from handoff.agent import Agent, Handler
from handoff.client import cancel_chain, connect, get_chain, run_chain, start_chain, wait_chain
from handoff.errors import (
    ChainNotFound,
    ContextTooLarge,
    HandoffError,
    InvalidRequest,
    PermanentError,
    UnknownAgent,
)
from handoff.models import (
    AgentCapability,
    AgentCard,
    ChainPolicy,
    ChainRecord,
    ChainStatus,
    HandoffContext,
    HandoffResult,
    HopRecord,
    HopStatus,
)



def __getattr__(name: str):
    # Imported on first use: the facade pulls in the workers, which plain API users do not need.
    if name == "PeerHandoffService":
        from handoff.service import PeerHandoffService

        return PeerHandoffService
    raise AttributeError(f"module 'handoff' has no attribute {name!r}")


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
    "HandoffError",
    "HandoffResult",
    "Handler",
    "HopRecord",
    "HopStatus",
    "InvalidRequest",
    "PeerHandoffService",
    "PermanentError",
    "UnknownAgent",
    "cancel_chain",
    "connect",
    "get_chain",
    "run_chain",
    "start_chain",
    "wait_chain",
]

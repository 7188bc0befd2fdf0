"""The client API: connect, start a chain, follow it, read its record, decide its approvals, find
chains and roll out agent versions. What the CLI, the A2A server and programs call."""

from handoff.client.chains import (
    ChainArguments,
    approve_chain,
    cancel_chain,
    decide_approval,
    get_chain,
    reject_chain,
    run_chain,
    start_chain,
    start_request,
    steer_chain,
    stop_chain,
    wait_chain,
)
from handoff.client.connect import connect, context_limit, env_context_limit
from handoff.client.follow import current_record, follow_chain
from handoff.client.requests import build_request, capability_of, chain_uuid, checked
from handoff.client.rerun import rerun_chain
from handoff.client.watch import ChainWatch, watch_chain

__all__ = [
    "ChainArguments",
    "ChainWatch",
    "approve_chain",
    "build_request",
    "cancel_chain",
    "capability_of",
    "chain_uuid",
    "checked",
    "connect",
    "context_limit",
    "current_record",
    "decide_approval",
    "env_context_limit",
    "follow_chain",
    "get_chain",
    "reject_chain",
    "rerun_chain",
    "run_chain",
    "start_chain",
    "start_request",
    "steer_chain",
    "stop_chain",
    "wait_chain",
    "watch_chain",
]

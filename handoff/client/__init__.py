"""The client API: connect, start a chain, wait for it, read its record, decide its approvals,
find chains and roll out agent versions. What the CLI, the A2A server and programs call."""

from handoff.client.chains import (
    approve_chain,
    build_request,
    cancel_chain,
    connect,
    decide_approval,
    get_chain,
    reject_chain,
    run_chain,
    start_chain,
    start_request,
    wait_chain,
)

__all__ = [
    "approve_chain",
    "build_request",
    "cancel_chain",
    "connect",
    "decide_approval",
    "get_chain",
    "reject_chain",
    "run_chain",
    "start_chain",
    "start_request",
    "wait_chain",
]

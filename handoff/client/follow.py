"""Following a chain to its end: what `handoff start --wait`, `handoff dev`'s approval prompt and the
A2A server's task updates are built on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from uuid import UUID

from temporalio.client import Client, WorkflowExecutionStatus, WorkflowQueryFailedError
from temporalio.service import RPCError

from handoff.client.chains import get_chain, wait_chain
from handoff.constants import CHAIN_STATE_QUERY
from handoff.models import ChainRecord

QUERY_TIMEOUT = timedelta(seconds=5)
"""How long a read of the running chain waits for a chain worker to answer before it reads the
record from history instead (no worker is running, or the chain just closed)."""


async def current_record(client: Client, chain_id: UUID | str) -> ChainRecord:
    """The chain's record as it stands: the chain worker's answer to its query while a worker runs
    it, else rebuilt from its history (`get_chain`): once it has closed, before any worker took it
    up (the server's description says which, at no cost), or when no worker answers in time."""
    handle = client.get_workflow_handle(str(chain_id))
    description = await handle.describe()
    info = description.raw_description.workflow_execution_info
    if description.status is WorkflowExecutionStatus.RUNNING and info.history_length > 3:
        try:
            return await handle.query(CHAIN_STATE_QUERY, result_type=ChainRecord, rpc_timeout=QUERY_TIMEOUT)
        except (RPCError, WorkflowQueryFailedError):  # no worker answers now, or the chain just closed
            pass
    return await get_chain(client, chain_id)


async def follow_chain(client: Client, chain_id: UUID | str, *, every_s: float) -> AsyncIterator[ChainRecord]:
    """The chain's record now, then every `every_s` while it runs, and last its final record (as
    `wait_chain` returns it) as soon as it ends. Each read of a running chain is a query (an action
    on Temporal Cloud): follow no more often than the reader needs. Close the iterator (or use
    `contextlib.aclosing`) to stop following early."""
    ended = asyncio.ensure_future(wait_chain(client, chain_id))
    try:
        while True:
            record = await current_record(client, chain_id)
            if ended.done():
                break
            yield record
            await asyncio.wait({ended}, timeout=every_s)
            if ended.done():
                break
        yield ended.result()
    finally:
        ended.cancel()

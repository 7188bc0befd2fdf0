"""Chains through the client API: start, wait, read back, cancel, and decide their approvals."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Required, TypedDict
from uuid import UUID

from pydantic import ValidationError
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode
from typing_extensions import Unpack

from handoff.payloads.history import hop_results, needs_results, put_back
from handoff.client.audit import record_from_history, record_in_failure
from handoff.client.connect import context_limit
from handoff.client.requests import build_request, chain_uuid, one_line
from handoff.constants import (
    APPROVAL_UPDATE,
    CHAIN_TASK_QUEUE,
    CHAIN_WORKFLOW,
    SA_AGENTS,
    SA_COST,
    SA_CURRENT_AGENT,
    SA_DEPTH,
    SA_RERUN_OF,
    SA_STATUS,
    STEER_UPDATE,
    STOP_UPDATE,
)
from handoff.errors import (
    ChainNotFound,
    InvalidRequest,
    unless_missing,
)
from handoff.models import (
    AgentCapability,
    ApprovalDecision,
    ChainPolicy,
    ChainRecord,
    ChainRequest,
    HopRecord,
    Steering,
    SteeringMessage,
    StopRequest,
)


async def start_request(
    client: Client, request: ChainRequest, *, search_attributes: bool = True, reuse_id: bool = False,
    memo: Mapping[str, Any] | None = None,
) -> WorkflowHandle:
    """Start the chain workflow for a validated request. A chain id already used, by a running
    chain or one that ended, is refused (its audit trail stays the one `get_chain` reads) unless
    `reuse_id` starts a new run under the id of a chain that has ended. `memo`: what the starter
    keeps with the chain, set in the same call that starts it (the A2A server keeps the request's
    A2A message and its caller there, the MCP server its caller)."""
    first = request.to_agent or (request.capability.value if request.capability else "")
    attributes = (
        TypedSearchAttributes([
            SearchAttributePair(SA_STATUS, "running"),
            SearchAttributePair(SA_AGENTS, [request.to_agent] if request.to_agent else []),
            SearchAttributePair(SA_CURRENT_AGENT, first),
            SearchAttributePair(SA_DEPTH, request.start_depth),
            *([SearchAttributePair(SA_RERUN_OF, str(request.rerun_of.chain_id))] if request.rerun_of else []),
            *([SearchAttributePair(SA_COST, 0.0)] if request.policy.budget is not None else []),
        ])
        if search_attributes
        else None
    )
    try:
        return await client.start_workflow(
            CHAIN_WORKFLOW,
            request,
            id=str(request.chain_id),
            task_queue=CHAIN_TASK_QUEUE,
            result_type=ChainRecord,
            search_attributes=attributes,
            id_reuse_policy=(WorkflowIDReusePolicy.ALLOW_DUPLICATE if reuse_id
                             else WorkflowIDReusePolicy.REJECT_DUPLICATE),
            static_summary=f"{request.task_description[:200]}",
            static_details=f"first hop: **{first}**, started by {request.started_by}",
            memo=dict(memo) if memo else None,
        )
    except WorkflowAlreadyStartedError:
        raise InvalidRequest(f"a chain with id {request.chain_id} already exists") from None
    except RPCError as err:
        if err.status == RPCStatusCode.INVALID_ARGUMENT and "search attribute" in err.message.lower():
            raise InvalidRequest(
                f"{err.message}: register the handoff search attributes "
                "(`handoff server` does; on a cluster see README, 'Search attributes')"
            ) from None
        if err.status == RPCStatusCode.INVALID_ARGUMENT:
            raise InvalidRequest(err.message) from None
        raise


class ChainArguments(TypedDict, total=False):
    """What `start_chain` and `run_chain` take besides the client (see `build_request`)."""

    task_description: Required[str]
    to_agent: str | None
    capability: AgentCapability | str | None
    context_data: dict[str, Any] | None
    chain_id: UUID | str | None
    hop_timeout: float | None
    max_depth: int | None
    policy: ChainPolicy | Mapping[str, Any] | None
    search_attributes: bool
    """False on a server without handoff's search attributes registered."""
    reuse_id: bool
    """Start a new run under the id of a chain that has ended (see `start_request`)."""
    memo: Mapping[str, Any] | None
    """What the starter keeps with the chain, set as it starts (see `start_request`)."""


async def _start(client: Client, arguments: ChainArguments) -> WorkflowHandle:
    options = dict(arguments)
    search_attributes = options.pop("search_attributes", True)
    reuse_id = options.pop("reuse_id", False)
    memo = options.pop("memo", None)
    request = build_request(**options, max_context_bytes=context_limit(client))
    return await start_request(client, request, search_attributes=search_attributes, reuse_id=reuse_id, memo=memo)


async def start_chain(client: Client, **arguments: Unpack[ChainArguments]) -> UUID:
    """Start a chain and return its id (also its workflow id)."""
    return UUID((await _start(client, arguments)).id)


async def run_chain(client: Client, **arguments: Unpack[ChainArguments]) -> ChainRecord:
    """Start a chain as `start_chain` does, wait for it to end, and return its record."""
    return await _ended(client, await _start(client, arguments))


async def wait_chain(client: Client, chain_id: UUID | str) -> ChainRecord:
    """Wait for a chain to end; its record, also when it was cancelled or terminated."""
    return await _ended(client, client.get_workflow_handle(str(chain_id), result_type=ChainRecord))


async def _ended(client: Client, handle: WorkflowHandle) -> ChainRecord:
    try:
        record = await handle.result()
    except WorkflowFailureError as err:
        record = record_in_failure(err.cause)
        if record is None:  # cancelled, terminated, ...: read back
            return await get_chain(client, handle.id)
    wanted = needs_results(record)  # the ended chain's results carried once, in its history
    if wanted:
        put_back(record, await hop_results((await handle.fetch_history()).events, client.data_converter, wanted))
    return record


async def get_chain(client: Client, chain_id: UUID | str) -> ChainRecord:
    """The chain's record, read back from its workflow history: in any state, with no worker
    (`handoff.client.audit`)."""
    history = await unless_missing(client.get_workflow_handle(str(chain_uuid(chain_id))).fetch_history())
    if history is None:
        raise ChainNotFound(str(chain_id))
    return await record_from_history(history, client.data_converter)


async def cancel_chain(client: Client, chain_id: UUID | str) -> None:
    """Ask a running chain to cancel; its current hop is cancelled and the chain ends `cancelled`."""
    handle = client.get_workflow_handle(str(chain_uuid(chain_id)))
    description = await unless_missing(handle.describe())
    if description is None:
        raise ChainNotFound(str(chain_id))
    if description.status != WorkflowExecutionStatus.RUNNING:
        raise InvalidRequest(f"chain {chain_id} is not running ({description.status.name.lower()})")
    await handle.cancel()


async def approve_chain(client: Client, chain_id: UUID | str, *, by: str, comment: str = "",
                        handoff_id: UUID | str | None = None) -> HopRecord:
    """Approve the hop a chain waits on (`handoff approve`); `by` is who decides. Returns the hop's
    entry as decided; the hop starts at once. `handoff_id` names the hop when several branches
    wait. Raises `InvalidRequest` when the chain is not waiting (or was already decided)."""
    return await decide_approval(client, chain_id, approved=True, by=by, comment=comment, handoff_id=handoff_id)


async def reject_chain(client: Client, chain_id: UUID | str, *, by: str, reason: str,
                       handoff_id: UUID | str | None = None) -> HopRecord:
    """Reject the hop a chain waits on (`handoff reject`): the hop is refused and the chain (or
    the branch it waits in) ends `rejected` with `reason`."""
    return await decide_approval(client, chain_id, approved=False, by=by, comment=reason, handoff_id=handoff_id)


async def decide_approval(client: Client, chain_id: UUID | str, *, approved: bool, by: str, comment: str = "",
                          handoff_id: UUID | str | None = None) -> HopRecord:
    """Send a person's decision to a chain waiting for approval (its `decide_approval` Update,
    whose validator accepts only a hop that waits, once)."""
    try:
        decision = ApprovalDecision(approved=approved, by=by, comment=comment,
                                    handoff_id=None if handoff_id is None else chain_uuid(handoff_id))
    except ValidationError as err:
        raise InvalidRequest(one_line(err)) from None
    problem = decision.problem()
    if problem:
        raise InvalidRequest(problem)
    return await _update(client, chain_id, APPROVAL_UPDATE, decision, HopRecord, "nothing awaits approval")


async def steer_chain(client: Client, chain_id: UUID | str, *, message: str, by: str,
                      redirect: str | None = None) -> SteeringMessage:
    """Give a running chain's next hop a person's `message` (`handoff steer`): the hop's handler
    sees it in `ctx.steering`, an LLM agent in its prompt, and its entry records it. `redirect`
    (an agent id or a capability name): the chain's next handoff goes there instead, under the
    same rules; a redirect the policy forbids is refused. `InvalidRequest` when the chain cannot
    take it (it has ended, say)."""
    try:
        steering = Steering(message=message, by=by, redirect=redirect)
    except ValidationError as err:
        raise InvalidRequest(one_line(err)) from None
    problem = steering.problem()
    if problem:
        raise InvalidRequest(problem)
    return await _update(client, chain_id, STEER_UPDATE, steering, SteeringMessage, "nothing to steer")


async def stop_chain(client: Client, chain_id: UUID | str, *, by: str, reason: str = "") -> None:
    """Stop a running chain once its running hops end (`handoff cancel --after-hop`): their
    results are kept, no new hop starts (a hop awaiting approval stops waiting), and the chain
    ends `cancelled` with everything it did."""
    try:
        request = StopRequest(by=by, reason=reason)
    except ValidationError as err:
        raise InvalidRequest(one_line(err)) from None
    problem = request.problem()
    if problem:
        raise InvalidRequest(problem)
    await _update(client, chain_id, STOP_UPDATE, request, None, "nothing to stop")


async def _update(client: Client, chain_id: UUID | str, name: str, argument: Any, result_type: Any,
                  when_ended: str) -> Any:
    """One of the chain's Updates, its validator's refusal as `InvalidRequest` (`when_ended`:
    what to say of a chain that has ended)."""
    handle = client.get_workflow_handle(str(chain_uuid(chain_id)))
    for retry_in in (*NOT_READY_RETRIES_S, None):
        try:
            return await handle.execute_update(name, argument, result_type=result_type)
        except WorkflowUpdateFailedError as err:
            cause = err.cause
            raise InvalidRequest(getattr(cause, "message", None) or str(cause or err)) from None
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                if await unless_missing(handle.describe()) is None:
                    raise ChainNotFound(str(chain_id)) from None
                raise InvalidRequest(f"chain {chain_id} is not running: {when_ended}") from None
            if retry_in is None or not _not_ready(err):
                raise
        await asyncio.sleep(retry_in)
    raise AssertionError("unreachable: the last try returns or raises")


NOT_READY_RETRIES_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
"""Pauses between tries of an approval the server aborted because the workflow task that carried
it failed (`WorkflowNotReady`): it did not reach the workflow, so it is sent again."""


def _not_ready(err: RPCError) -> bool:
    """Whether the server aborted an Update because its workflow task failed: it happens when an
    event (say, a cut branch's hop reporting its cancellation) arrives while the task that carries
    the Update completes (an `UnhandledCommand` task failure). Nothing was applied; try again."""
    return err.status == RPCStatusCode.FAILED_PRECONDITION and any(
        "WorkflowNotReadyFailure" in detail.type_url for detail in err.grpc_status.details)

"""The client API used by the CLI, the starter and the facade: connect, start, wait, inspect."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, Required, TypedDict
from uuid import UUID, uuid4

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.converter import PayloadCodec
from temporalio.envconfig import ClientConfig
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode
from typing_extensions import Unpack

from handoff.client.audit import record_from_history, record_in_failure
from handoff.payloads.codec import data_converter
from handoff.constants import (
    APPROVAL_UPDATE,
    CHAIN_PROTOCOL,
    CHAIN_TASK_QUEUE,
    CHAIN_WORKFLOW,
    MAX_CONTEXT_BYTES,
    MAX_EXTERNAL_CONTEXT_BYTES,
    SA_AGENTS,
    SA_CURRENT_AGENT,
    SA_DEPTH,
    SA_STATUS,
)
from handoff.errors import (
    ChainNotFound,
    ContextTooLarge,
    InvalidRequest,
    ServerUnreachable,
    unless_missing,
)
from handoff.models import (
    AgentCapability,
    ApprovalDecision,
    ChainPolicy,
    ChainRecord,
    ChainRequest,
    HopRecord,
)
from handoff.payloads.storage import storage_configured, storage_from_env
from handoff.observability.telemetry import tracing_interceptor

DEFAULT_ADDRESS = "localhost:7233"


async def connect(
    profile: str | None = None,
    *,
    address: str | None = None,
    namespace: str | None = None,
    runtime: Runtime | None = None,
    tracing: bool = False,
    codec: PayloadCodec | None | Literal["env"] = "env",
) -> Client:
    """A client configured from Temporal's environment configuration (TEMPORAL_ADDRESS,
    TEMPORAL_NAMESPACE, TLS, API key, profiles), defaulting to localhost:7233, with the
    pydantic data converter every part of handoff uses.

    `runtime`: e.g. `handoff.observability.telemetry.metrics_runtime(port)`, so this client and the workers
    built from it report metrics there. `tracing`: attach OpenTelemetry tracing to the client
    and its workers (needs the `otel` extra; raises `TelemetryUnavailable` without it).
    `codec`: the payload codec (compression, encryption) of the client and its workers; by
    default the one the `HANDOFF_*` variables describe (`handoff.payloads.codec`; bad settings raise
    `CodecConfigError`), None for none.
    """
    converter = data_converter(codec)
    config = _connect_config(profile, address)
    storage = await storage_from_env(config["target_host"])
    if storage is not None:
        converter = dataclasses.replace(converter, external_storage=storage)
    if namespace:
        config["namespace"] = namespace
    interceptors = [tracing_interceptor()] if tracing else []
    try:
        return await Client.connect(
            **config, data_converter=converter, runtime=runtime, interceptors=interceptors
        )
    except RuntimeError as err:  # the core reports a failed connection as a plain runtime error
        raise ServerUnreachable(f"cannot reach the Temporal server at {config['target_host']}: {err}") from None


def _connect_config(profile: str | None = None, address: str | None = None) -> dict[str, Any]:
    """Temporal's environment configuration, defaulting to localhost:7233."""
    config = ClientConfig.load_client_connect_config(profile=profile)
    config.setdefault("target_host", DEFAULT_ADDRESS)
    if address:
        config["target_host"] = address
    return config


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "input"
    return f"{where}: {first['msg']}"


def build_request(
    *,
    task_description: str,
    to_agent: str | None = None,
    capability: AgentCapability | str | None = None,
    context_data: dict[str, Any] | None = None,
    chain_id: UUID | str | None = None,
    hop_timeout: float | None = None,
    max_depth: int | None = None,
    policy: ChainPolicy | Mapping[str, Any] | None = None,
    max_context_bytes: int | None = None,
) -> ChainRequest:
    """Validate a chain request at the edge; raises `InvalidRequest` with one readable line.

    The chain's bounds are its `policy` (a `ChainPolicy`, or a mapping of its fields);
    `hop_timeout` and `max_depth` are shorthands for its `hop_timeout_s` and `max_depth`, to
    give one way or the other. `max_context_bytes`: the context limit, by default what this
    environment's payload storage allows.
    """
    if capability is not None:
        capability = _capability(capability)
    fields = policy.model_dump(exclude_unset=True) if isinstance(policy, ChainPolicy) else dict(policy or {})
    for name, value in (("hop_timeout_s", hop_timeout), ("max_depth", max_depth)):
        if value is not None:
            if name in fields:
                raise InvalidRequest(f"{name} is given twice: as an argument and in the policy")
            fields[name] = value
    fields.setdefault("max_context_bytes", max_context_bytes or env_context_limit())
    try:
        request = ChainRequest(
            protocol=CHAIN_PROTOCOL,
            chain_id=uuid4() if chain_id is None else _uuid(chain_id),
            to_agent=to_agent or "",
            capability=capability,
            task_description=task_description,
            context_data=context_data or {},
            policy=ChainPolicy(**fields),
        )
    except ValidationError as err:
        raise InvalidRequest(_one_line(err)) from None
    return checked(request)


def checked(request: ChainRequest) -> ChainRequest:
    """`request`, if the chain may start; else `InvalidRequest` (`ContextTooLarge`) saying why."""
    problem = request.problem()
    if problem:
        raise InvalidRequest(problem)
    try:
        size = len(request.model_dump_json())
    except PydanticSerializationError as err:  # e.g. text that is not valid UTF-8
        raise InvalidRequest(f"the request cannot be stored as JSON: {err}") from None
    if size > request.policy.max_context_bytes:
        raise ContextTooLarge(size, request.policy.max_context_bytes)
    return request


def env_context_limit() -> int:
    """The context limit for clients that `connect()` builds from this environment."""
    external = storage_configured(_connect_config()["target_host"])
    return MAX_EXTERNAL_CONTEXT_BYTES if external else MAX_CONTEXT_BYTES


def context_limit(client: Client) -> int:
    """How large a context chains started by `client` may carry: over Temporal's payload limit
    only when its converter stores large payloads externally."""
    external = client.data_converter.external_storage is not None
    return MAX_EXTERNAL_CONTEXT_BYTES if external else MAX_CONTEXT_BYTES


def _capability(value: AgentCapability | str) -> AgentCapability:
    try:
        return AgentCapability(value)
    except ValueError:
        known = ", ".join(c.value for c in AgentCapability)
        raise InvalidRequest(f"unknown capability {value!r} (known: {known})") from None


def _uuid(value: UUID | str) -> UUID:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value))
    except ValueError:
        raise InvalidRequest(f"chain id must be a UUID, got {value!r}") from None


async def start_request(
    client: Client, request: ChainRequest, *, search_attributes: bool = True, reuse_id: bool = False,
    memo: Mapping[str, Any] | None = None,
) -> WorkflowHandle:
    """Start the chain workflow for a validated request. A chain id already used, by a running
    chain or one that ended, is refused (its audit trail stays the one `get_chain` reads) unless
    `reuse_id` starts a new run under the id of a chain that has ended. `memo`: what the starter
    keeps with the chain (the A2A server keeps the request's A2A message there)."""
    first = request.to_agent or (request.capability.value if request.capability else "")
    attributes = (
        TypedSearchAttributes([
            SearchAttributePair(SA_STATUS, "running"),
            SearchAttributePair(SA_AGENTS, [request.to_agent] if request.to_agent else []),
            SearchAttributePair(SA_CURRENT_AGENT, first),
            SearchAttributePair(SA_DEPTH, 0),
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


async def _start(client: Client, arguments: ChainArguments) -> WorkflowHandle:
    options = dict(arguments)
    search_attributes = options.pop("search_attributes", True)
    reuse_id = options.pop("reuse_id", False)
    request = build_request(**options, max_context_bytes=context_limit(client))
    return await start_request(client, request, search_attributes=search_attributes, reuse_id=reuse_id)


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
        return await handle.result()
    except WorkflowFailureError as err:
        record = record_in_failure(err.cause)
        if record is not None:  # the chain ended unsuccessfully
            return record
        return await get_chain(client, handle.id)  # cancelled, terminated, ...: read back


async def get_chain(client: Client, chain_id: UUID | str) -> ChainRecord:
    """The chain's record, read back from its workflow history: in any state, with no worker
    (`handoff.client.audit`)."""
    history = await unless_missing(client.get_workflow_handle(str(_uuid(chain_id))).fetch_history())
    if history is None:
        raise ChainNotFound(str(chain_id))
    return await record_from_history(history, client.data_converter)


async def cancel_chain(client: Client, chain_id: UUID | str) -> None:
    """Ask a running chain to cancel; its current hop is cancelled and the chain ends `cancelled`."""
    handle = client.get_workflow_handle(str(_uuid(chain_id)))
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
                                    handoff_id=None if handoff_id is None else _uuid(handoff_id))
    except ValidationError as err:
        raise InvalidRequest(_one_line(err)) from None
    problem = decision.problem()
    if problem:
        raise InvalidRequest(problem)
    handle = client.get_workflow_handle(str(_uuid(chain_id)))
    for retry_in in (*NOT_READY_RETRIES_S, None):
        try:
            return await handle.execute_update(APPROVAL_UPDATE, decision, result_type=HopRecord)
        except WorkflowUpdateFailedError as err:
            cause = err.cause
            raise InvalidRequest(getattr(cause, "message", None) or str(cause or err)) from None
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                if await unless_missing(handle.describe()) is None:
                    raise ChainNotFound(str(chain_id)) from None
                raise InvalidRequest(f"chain {chain_id} is not running: nothing awaits approval") from None
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

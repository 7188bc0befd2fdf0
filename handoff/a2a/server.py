"""handoff as an A2A server (`handoff a2a-server`, and `handoff dev`): the Agent2Agent protocol
(`a2a-sdk`, protocol 1.0, JSON-RPC) in front of the registry and the chains.

- **Agent cards.** `/.well-known/agent-card.json` is handoff's own card: its skills are the
  capabilities live agents serve now. `/agents/<id>/.well-known/agent-card.json` is each registered
  agent's card (skills from its capabilities and description, its version, its endpoint), and
  `/agents` lists them. Cards are built from the registry when asked (at most a second old): an
  agent that deregisters is gone from them.
- **Chains as tasks.** A message to `/` (with the agent or the capability in its metadata) or to
  `/agents/<id>` starts a chain whose id is the A2A task id; its text is the task, its data parts
  the context, `metadata.policy` the chain's policy. Streaming and `message:send` follow the chain
  hop by hop (a status update per hop, an artifact per completed hop's result); `GetTask` reads
  the chain from Temporal, so it answers for any chain, after a restart too; `CancelTask` cancels
  the chain. A chain waiting for approval is `INPUT_REQUIRED`: a follow-up message on the task
  saying `approve` (or `reject: <reason>`) decides, in the name of the caller.
- **Authentication** as the SDK reads it (Starlette's authentication, the caller in the request's
  user): bearer tokens (`HANDOFF_A2A_TOKENS`) or JWTs from a JWKS. Without them the server listens
  on loopback only; with them every request but the cards needs a valid credential.

Chain statuses map onto A2A task states one for one: `running` WORKING (SUBMITTED before any hop),
`awaiting_approval` INPUT_REQUIRED, `completed` COMPLETED, `cancelled` CANCELED, `rejected` REJECTED,
and `failed`, `depth_exceeded`, `budget_exceeded`, `loop_detected` FAILED (the status itself in the
task's metadata, `handoff_status`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from a2a.helpers.proto_helpers import get_data_parts, get_text_parts
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.routes.common import DefaultServerCallContextBuilder
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Artifact,
    CancelTaskRequest,
    GetTaskRequest,
    HTTPAuthSecurityScheme,
    Message,
    Part,
    Role,
    SecurityRequirement,
    SecurityScheme,
    Task,
    TaskState,
    TaskStatus,
)
from a2a.utils import TransportProtocol
from a2a.utils.errors import TaskNotCancelableError, TaskNotFoundError
from google.protobuf import json_format, struct_pb2
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.client import Client

from handoff.client.chains import approve_chain, build_request, cancel_chain, get_chain, reject_chain, start_request
from handoff.constants import MAX_NESTING
from handoff.errors import ChainNotFound, InvalidRequest
from handoff.servers.http import BearerAuth, BearerVerifier
from handoff.models import AgentCapability, ChainRecord, ChainStatus, HopStatus, nesting_problem
from handoff.models import AgentCard as HandoffCard
from handoff.registry import Directory

DEFAULT_PORT = 8090
PROTOCOL_VERSION = "1.0"
ENV_TOKENS = "HANDOFF_A2A_TOKENS"
"""Bearer tokens the A2A server accepts, comma separated (kept out of the command line)."""
MEMO_KEY = "a2a"
"""The chain's memo key for what A2A knows of it: the context id and the request's message."""
POLL_S = 0.25
CANCEL_WAIT_S = 5.0
CARD_PATH = "/.well-known/agent-card.json"

STATE_OF: dict[ChainStatus, int] = {
    ChainStatus.RUNNING: TaskState.TASK_STATE_WORKING,
    ChainStatus.AWAITING_APPROVAL: TaskState.TASK_STATE_INPUT_REQUIRED,
    ChainStatus.COMPLETED: TaskState.TASK_STATE_COMPLETED,
    ChainStatus.CANCELLED: TaskState.TASK_STATE_CANCELED,
    ChainStatus.REJECTED: TaskState.TASK_STATE_REJECTED,
    ChainStatus.FAILED: TaskState.TASK_STATE_FAILED,
    ChainStatus.DEPTH_EXCEEDED: TaskState.TASK_STATE_FAILED,
    ChainStatus.BUDGET_EXCEEDED: TaskState.TASK_STATE_FAILED,
    ChainStatus.LOOP_DETECTED: TaskState.TASK_STATE_FAILED,
}
"""Every chain status's A2A task state."""


# -- cards ---------------------------------------------------------------------------------


def skill_of(capability: AgentCapability, description: str = "") -> AgentSkill:
    words = capability.value.lower().replace("_", " ")
    return AgentSkill(id=capability.value, name=words, description=description or f"{words}, by handoff's agents",
                      tags=[capability.value, "handoff"])


def _secured(card: AgentCard, auth: BearerAuth) -> AgentCard:
    if auth.configured:
        card.security_schemes["bearer"].CopyFrom(
            SecurityScheme(http_auth_security_scheme=HTTPAuthSecurityScheme(scheme="bearer")))
        requirement = SecurityRequirement()
        requirement.schemes["bearer"].SetInParent()
        card.security_requirements.append(requirement)
    return card


def agent_card_of(card: HandoffCard, base_url: str, auth: BearerAuth) -> AgentCard:
    """The A2A card of a registered agent: a message to its endpoint starts a chain at it."""
    return _secured(AgentCard(
        name=card.name, description=card.description or f"{card.name}, a handoff agent",
        version=card.version, capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain", "application/json"], default_output_modes=["application/json"],
        skills=[skill_of(c, card.description) for c in card.capabilities],
        supported_interfaces=[AgentInterface(protocol_binding=TransportProtocol.JSONRPC,
                                             url=f"{base_url}/agents/{card.agent_id}",
                                             protocol_version=PROTOCOL_VERSION)],
    ), auth)


def handoff_card(cards: Sequence[HandoffCard], base_url: str, auth: BearerAuth, version: str) -> AgentCard:
    """handoff's own card: its skills are the capabilities the live agents serve now."""
    served = sorted({c for card in cards for c in card.capabilities}, key=lambda c: c.value)
    return _secured(AgentCard(
        name="handoff",
        description=("Durable peer-to-peer agent handoff on Temporal: a message starts a chain at the agent or "
                     "capability its metadata names (metadata.agent, metadata.capability)"),
        version=version, capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain", "application/json"], default_output_modes=["application/json"],
        skills=[skill_of(c) for c in served] or [AgentSkill(
            id="handoff", name="handoff chain", tags=["handoff"],
            description="Start a durable chain of handoff agents (none is live right now)")],
        supported_interfaces=[AgentInterface(protocol_binding=TransportProtocol.JSONRPC, url=f"{base_url}/",
                                             protocol_version=PROTOCOL_VERSION)],
    ), auth)


class LiveCards:
    """The registry's cards, and the live ones, from the process's cached `Directory`."""

    def __init__(self, client: Client) -> None:
        self._directory = Directory.of(client)

    async def registered(self) -> list[HandoffCard]:
        return list(await self._directory.cards())

    async def live(self) -> list[HandoffCard]:
        return await self._directory.live_cards()


# -- chains as tasks -----------------------------------------------------------------------


def _text(text: str, data: dict[str, Any] | None = None) -> Message:
    parts = [Part(text=text)]
    if data:
        value = struct_pb2.Value()
        value.struct_value.update(data)
        parts.append(Part(data=value))
    return Message(role=Role.ROLE_AGENT, message_id=f"handoff-{time.time_ns()}", parts=parts)


def _struct(data: dict[str, Any]) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.struct_value.update(json.loads(json.dumps(data, default=str)))
    return value


def artifact_of(hop) -> Artifact:
    """A completed hop's result as an A2A artifact (its id the hop's handoff id)."""
    artifact = Artifact(artifact_id=str(hop.handoff_id), name=f"hop {hop.hop}: {hop.from_agent} -> {hop.to_agent}",
                        description=hop.task_description[:500], parts=[Part(data=_struct(hop.result_data))])
    artifact.metadata.update({"hop": hop.hop, "agent": hop.to_agent, "kind": hop.kind.value})
    return artifact


def completed_hops(record: ChainRecord) -> list:
    return [h for h in record.all_hops() if h.status is HopStatus.COMPLETED and h.handoff_id is not None]


def status_line(record: ChainRecord) -> str:
    """What the chain is doing, in a line: its open hops, or how it ended."""
    if record.status.ended:
        if record.status is ChainStatus.COMPLETED:
            summary = record.final_result.get("summary") or "completed"
            return f"completed: {summary}"
        return f"{record.status.value}: {record.error or ''}"
    open_hops = [h for h in record.all_hops() if h.status.open]
    if not open_hops:
        return "waiting for the chain worker"
    return "; ".join(f"hop {h.hop}: {h.from_agent} -> {h.to_agent} {h.status.value.replace('_', ' ')}"
                     for h in open_hops)


def task_of(record: ChainRecord, a2a: dict[str, Any] | None) -> Task:
    """The chain as an A2A task: its state, its completed hops' results as artifacts, and the
    message that started it (from the chain's memo, or its task text) as history."""
    a2a = a2a or {}
    state = STATE_OF[record.status] if record.hops or record.status.ended else TaskState.TASK_STATE_SUBMITTED
    data = record.final_result if record.status is ChainStatus.COMPLETED else None
    task = Task(id=str(record.chain_id), context_id=a2a.get("context_id") or str(record.chain_id),
                status=TaskStatus(state=state, message=_text(status_line(record), data)),
                artifacts=[artifact_of(h) for h in completed_hops(record)])
    task.metadata.update({"handoff_status": record.status.value})
    if a2a.get("message"):
        task.history.append(json_format.ParseDict(a2a["message"], Message(), ignore_unknown_fields=True))
    else:
        task.history.append(Message(role=Role.ROLE_USER, message_id=f"chain-{record.chain_id}",
                                    task_id=str(record.chain_id), parts=[Part(text=record.task_description)]))
    return task


async def chain_task(client: Client, task_id: str) -> Task | None:
    """The A2A task of chain `task_id`, read from Temporal; None when there is no such chain."""
    try:
        UUID(task_id)
    except ValueError:
        return None
    try:
        record = await get_chain(client, task_id)
    except ChainNotFound:
        return None
    description = await client.get_workflow_handle(task_id).describe()
    return task_of(record, await description.memo_value(MEMO_KEY, None))


class ChainTaskStore(InMemoryTaskStore):
    """The SDK's store for tasks this process follows, and Temporal for the others (after a
    restart, or chains started elsewhere)."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client

    async def get(self, task_id: str, context: ServerCallContext | None = None) -> Task | None:
        return await super().get(task_id, context) or await chain_task(self._client, task_id)


@dataclass(frozen=True)
class Started:
    """What a message asks for: the chain's request, as the client API validates it."""

    request: Any
    memo: dict[str, Any]


def _request_of(context: RequestContext, agent_from_path: str | None) -> Started:
    """The chain a message starts; `InvalidRequest` saying what is wrong with it."""
    message = context.message
    if message is None:
        raise InvalidRequest("no message")
    task = "\n".join(t for t in get_text_parts(message.parts) if t.strip()).strip()
    data: dict[str, Any] = {}
    for part in get_data_parts(message.parts):
        if not isinstance(part, dict):
            raise InvalidRequest("a data part must be a JSON object")
        data.update(part)
    # the request's metadata and the message's (which wins)
    metadata = {**context.metadata, **json_format.MessageToDict(message.metadata)}
    agent = agent_from_path or metadata.get("agent")
    capability = metadata.get("capability")
    policy = metadata.get("policy") or {}
    problem = nesting_problem(data, "the message's data", MAX_NESTING) or nesting_problem(policy, "metadata.policy")
    if problem:
        raise InvalidRequest(problem)
    if not isinstance(policy, dict):
        raise InvalidRequest("metadata.policy must be an object of the chain's policy fields")
    try:
        request = build_request(task_description=task, to_agent=agent, capability=capability, context_data=data,
                                chain_id=context.task_id, policy=policy)
    except InvalidRequest:
        raise
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    memo = {"context_id": context.context_id,
            "message": json_format.MessageToDict(message, preserving_proto_field_name=False)}
    return Started(request, memo)


def _decision(context: RequestContext) -> tuple[bool, str]:
    """A follow-up message's decision on the hop that waits: approve, or reject with a reason."""
    text = " ".join(get_text_parts(context.message.parts) if context.message else []).strip()
    for part in get_data_parts(context.message.parts if context.message else []):
        if isinstance(part, dict) and isinstance(part.get("approved"), bool):
            return part["approved"], str(part.get("comment") or part.get("reason") or text)
    word, _, rest = text.partition(":")
    if word.strip().lower() in ("approve", "approved", "yes", "ok"):
        return True, rest.strip()
    if word.strip().lower() in ("reject", "rejected", "no"):
        return False, rest.strip() or "rejected through A2A"
    raise InvalidRequest("answer `approve` (optionally `approve: comment`) or `reject: reason`")


class ChainExecutor(AgentExecutor):
    """Starts a chain per message (the task id is the chain id) and follows it hop by hop."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        current = context.current_task
        updater = TaskUpdater(event_queue, context.task_id, current.context_id if current else context.context_id)
        if current is not None:  # a follow-up: the person's decision on the hop the chain waits on
            await self._decide(context, updater)
            await self._follow(UUID(context.task_id), updater, {a.artifact_id for a in current.artifacts})
            return
        agent = context.call_context.state.get("agent_id") if context.call_context else None
        task = Task(id=context.task_id, context_id=context.context_id,
                    status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED), history=[context.message])
        await event_queue.enqueue_event(task)
        try:
            started = _request_of(context, agent)
            await start_request(self._client, started.request, memo={MEMO_KEY: started.memo})
        except (InvalidRequest, ValueError) as err:
            await updater.reject(_text(f"refused: {err}"))
            return
        await self._follow(UUID(context.task_id), updater, set())

    async def _decide(self, context: RequestContext, updater: TaskUpdater) -> None:
        user = context.call_context.user if context.call_context else None
        by = f"a2a:{user.user_name}" if user is not None and user.is_authenticated else "a2a:loopback"
        try:
            approved, comment = _decision(context)
            if approved:
                await approve_chain(self._client, context.task_id, by=by, comment=comment)
            else:
                await reject_chain(self._client, context.task_id, by=by, reason=comment)
        except InvalidRequest as err:
            await updater.requires_input(_text(f"{err}"))

    async def _follow(self, chain_id: UUID, updater: TaskUpdater, shown: set[str]) -> None:
        """Emit the chain's progress until it ends or waits for a person: a status update when
        what it does changes, an artifact per completed hop."""
        handle = self._client.get_workflow_handle(str(chain_id))
        last = ""
        while True:
            try:
                record = await handle.query("chain_state", result_type=ChainRecord)
            except Exception:  # no worker answers (yet), or the chain closed meanwhile: read history
                record = await get_chain(self._client, chain_id)
            for hop in completed_hops(record):
                if str(hop.handoff_id) not in shown:
                    shown.add(str(hop.handoff_id))
                    artifact = artifact_of(hop)
                    await updater.add_artifact(list(artifact.parts), artifact_id=artifact.artifact_id,
                                               name=artifact.name, metadata=dict(artifact.metadata))
            line = status_line(record)
            if record.status.ended:
                data = record.final_result if record.status is ChainStatus.COMPLETED else None
                final = {ChainStatus.COMPLETED: updater.complete, ChainStatus.CANCELLED: updater.cancel,
                         ChainStatus.REJECTED: updater.reject}.get(record.status, updater.failed)
                await final(_text(line, data))
                return
            if record.status is ChainStatus.AWAITING_APPROVAL:
                await updater.requires_input(_text(
                    f"{line}: answer `approve` (or `approve: comment`) or `reject: reason`"))
                return
            if line != last:
                last = line
                await updater.start_work(_text(line))
            await asyncio.sleep(POLL_S)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        try:
            await cancel_chain(self._client, context.task_id)
        except (InvalidRequest, ChainNotFound):
            pass


class ChainRequestHandler(DefaultRequestHandler):
    """The SDK's handler, with `GetTask` and `CancelTask` answered from Temporal: the chain is the
    task, wherever and whenever it was started."""

    def __init__(self, client: Client, card: AgentCard) -> None:
        super().__init__(agent_executor=ChainExecutor(client), task_store=ChainTaskStore(client), agent_card=card)
        self._client = client

    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task | None:
        task = await chain_task(self._client, params.id)
        if task is None:
            return await super().on_get_task(params, context)
        if params.HasField("history_length"):
            del task.history[: max(0, len(task.history) - params.history_length)]
        return task

    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext) -> Task | None:
        try:
            await cancel_chain(self._client, params.id)
        except ChainNotFound:
            raise TaskNotFoundError from None
        except InvalidRequest as err:
            raise TaskNotCancelableError(str(err)) from None
        deadline = time.monotonic() + CANCEL_WAIT_S
        while True:
            task = await chain_task(self._client, params.id)
            if task is None or task.status.state == TaskState.TASK_STATE_CANCELED or time.monotonic() > deadline:
                return task
            await asyncio.sleep(0.1)


# -- the HTTP server -------------------------------------------------------------------------


class _Bearer(AuthenticationBackend):
    def __init__(self, auth: BearerAuth) -> None:
        self._verifier = BearerVerifier(auth)

    async def authenticate(self, conn: HTTPConnection):
        who = await self._verifier.identity(conn.headers.get("Authorization"))
        return None if who is None else (AuthCredentials(["authenticated"]), SimpleUser(who))


class _AgentContextBuilder(DefaultServerCallContextBuilder):
    """The SDK's call context, plus the agent a per-agent endpoint names."""

    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        if "agent_id" in request.path_params:
            context.state["agent_id"] = request.path_params["agent_id"]
        return context


def a2a_app(client: Client, base_url: str, *, auth: BearerAuth = BearerAuth(), version: str = "1") -> Starlette:
    """The A2A application: cards, the JSON-RPC endpoints, and `/agents`."""
    cards = LiveCards(client)
    base_url = base_url.rstrip("/")
    card = handoff_card([], base_url, auth, version)
    handler = ChainRequestHandler(client, card)

    async def current_card(_: AgentCard) -> AgentCard:
        return handoff_card(await cards.live(), base_url, auth, version)

    async def agent_card(request: Request) -> Response:
        agent_id = request.path_params["agent_id"]
        found = next((c for c in await cards.registered() if c.agent_id == agent_id), None)
        if found is None:
            return JSONResponse({"error": f"no agent {agent_id!r} is registered"}, status_code=404)
        return JSONResponse(agent_card_to_dict(agent_card_of(found, base_url, auth)))

    async def agents(request: Request) -> Response:
        live = {c.agent_id for c in await cards.live()}
        return JSONResponse([{"agent_id": c.agent_id, "name": c.name, "live": c.agent_id in live,
                              "capabilities": [x.value for x in c.capabilities],
                              "card": f"{base_url}/agents/{c.agent_id}{CARD_PATH}"}
                             for c in await cards.registered()])

    builder = _AgentContextBuilder()
    routes = [
        *create_agent_card_routes(card, card_modifier=current_card, card_url=CARD_PATH),
        Route("/agents/{agent_id}" + CARD_PATH, agent_card, methods=["GET"]),
        Route("/agents", agents, methods=["GET"]),
        *create_jsonrpc_routes(handler, rpc_url="/", context_builder=builder),
        *create_jsonrpc_routes(handler, rpc_url="/agents/{agent_id}", context_builder=builder),
    ]
    middleware = []
    if auth.configured:
        middleware = [Middleware(AuthenticationMiddleware, backend=_Bearer(auth)),
                      Middleware(_RequireAuth)]
    return Starlette(routes=routes, middleware=middleware)


class _RequireAuth:
    """With authentication configured, every request but the cards' needs a valid credential."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not scope["path"].endswith(CARD_PATH):
            user = scope.get("user")
            if user is None or not user.is_authenticated:
                await JSONResponse({"error": "a valid bearer credential is required"}, status_code=401,
                                   headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class A2AServer:
    """The A2A application served by uvicorn in this process's event loop, until `stop()`."""

    def __init__(self, client: Client, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 auth: BearerAuth = BearerAuth(), public_url: str | None = None) -> None:
        auth.require_on(host, "the A2A server starts chains for its callers", f"{ENV_TOKENS}, or --jwks-url")
        import uvicorn

        self.url = (public_url or f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}").rstrip("/")
        app = a2a_app(client, self.url, auth=auth)
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     lifespan="off", access_log=False))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> A2AServer:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()  # the port: in use, or not ours to bind
                raise OSError("the A2A server stopped before it started")
            await asyncio.sleep(0.05)
        return self

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task

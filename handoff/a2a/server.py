"""handoff as an A2A server (`handoff a2a-server`, and `handoff dev`): the Agent2Agent protocol
(`a2a-sdk`, protocol 1.0, over JSON-RPC, HTTP+JSON and, with a gRPC port, gRPC:
`handoff.a2a.grpc_binding`) in front of the registry and the chains, all three on one request
handler. Push notifications: `handoff.a2a.push`.

- **Agent cards.** `/.well-known/agent-card.json` is handoff's own card: its skills are the
  capabilities live agents serve now. `/agents/<id>/.well-known/agent-card.json` is each registered
  agent's card (skills from its capabilities and description, its version, its endpoint), and
  `/agents` lists them. Cards are built from the registry when asked (at most a second old): an
  agent that deregisters is gone from them.
- **Chains as tasks.** A message to `/` (with the agent or the capability in its metadata) or to
  `/agents/<id>` starts a chain whose id is the A2A task id; its text is the task, its data parts
  the context, `metadata.policy` the chain's policy. Streaming and `message:send` follow the chain
  hop by hop while the caller listens (a status update per hop, an artifact per completed hop's
  result); `GetTask` reads the chain from Temporal, so it answers for any chain, after a restart
  too; `CancelTask` cancels the chain. A chain waiting for approval is `INPUT_REQUIRED`: a
  follow-up message on the task saying `approve` (or `reject: <reason>`) decides, in the name of
  the caller.
- **Who may do what.** A task belongs to the caller that started it; to anyone else it does not
  exist (TaskNotFound), unless the caller is an operator (a token in `HANDOFF_A2A_OPERATOR_TOKENS`,
  or a JWT with the `handoff:operator` scope), who sees and decides every chain, those started
  through the client API included. Without authentication the server listens on loopback only
  and its one caller, `local`, is an operator.
- **What every request passes first** (`handoff.servers.http.HttpGuard`): its Host and Origin, its
  credential (with authentication on, every path but the public card `/.well-known/agent-card.json`
  needs one), the body bound, and the caller's requests in flight.

Chain statuses map onto A2A task states one for one: `running` WORKING (SUBMITTED before any hop),
`awaiting_approval` INPUT_REQUIRED, `completed` COMPLETED, `cancelled` CANCELED, `rejected` REJECTED,
and `failed`, `depth_exceeded`, `budget_exceeded`, `loop_detected` FAILED (the status itself in the
task's metadata, `handoffStatus`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence

from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.routes import create_jsonrpc_routes, create_rest_routes
from a2a.server.routes.common import DefaultServerCallContextBuilder
from a2a.types import (
    AgentCard,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.client import Client

from handoff.client import context_limit
from handoff.servers.events import chain_events_route
from handoff.servers.http import MAX_IN_FLIGHT, AsgiServer, BearerAuth, HttpGuard, Principal, host_of_url
from handoff.servers.http import allowed_hosts as hosts_for
from handoff.settings import Settings
from handoff.a2a.cards import CARD_PATH, REST_PATH, LiveCards, Served, agent_card_of, extended_card, handoff_card
from handoff.a2a.executor import ChainRequestHandler
from handoff.a2a.grpc_binding import GrpcBinding
from handoff.a2a.push import PushNotifier, PushPolicy
from handoff.a2a.tasks import visible_memo

DEFAULT_PORT = 8090
ENV_TOKENS = Settings.env_name("a2a_tokens")


class _AgentContextBuilder(DefaultServerCallContextBuilder):
    """The SDK's call context, plus the agent a per-agent endpoint names."""

    def build(self, request: Request) -> ServerCallContext:
        context = super().build(request)
        if "agent_id" in request.path_params:
            context.state["agent_id"] = request.path_params["agent_id"]
        return context


EVENTS_PATH = "/chains/{chain_id}/events"
"""A chain's events as Server-Sent Events (`handoff.servers.events`), for pages and programs that
watch what they started."""


def chain_handler(client: Client, served: Served, cards: LiveCards, *, version: str = "1",
                  push: PushNotifier | None = None) -> ChainRequestHandler:
    """The one request handler every binding (JSON-RPC, REST, gRPC) serves: chains as tasks,
    push configs when `push` is given, and the extended card."""

    async def extended(context: ServerCallContext) -> AgentCard:
        return extended_card(await cards.registered(), await cards.live(), served, version)

    return ChainRequestHandler(client, handoff_card([], served, version), extended_card=extended,
                               push_configs=push.configs if push is not None else None)


def a2a_app(handler: ChainRequestHandler, cards: LiveCards, served: Served, version: str = "1") -> Starlette:
    """The A2A application: cards, the JSON-RPC and REST endpoints, and `/agents` (without the
    checks of `HttpGuard`, which `A2AServer` puts in front of it)."""
    base_url = served.base_url

    async def root_card(request: Request) -> Response:
        return card_response(request, handoff_card(await cards.live(), served, version))

    async def agent_card(request: Request) -> Response:
        agent_id = request.path_params["agent_id"]
        found = next((c for c in await cards.registered() if c.agent_id == agent_id), None)
        if found is None:
            return JSONResponse({"error": f"no agent {agent_id!r} is registered"}, status_code=404)
        return card_response(request, agent_card_of(found, served))

    async def agents(request: Request) -> Response:
        live = {c.agent_id for c in await cards.live()}
        return JSONResponse([{"agent_id": c.agent_id, "name": c.name, "live": c.agent_id in live,
                              "capabilities": [x.value for x in c.capabilities],
                              "card": f"{base_url}/agents/{c.agent_id}{CARD_PATH}"}
                             for c in await cards.registered()])

    builder = _AgentContextBuilder()

    async def may_watch(request: Request, chain_id: str) -> bool:
        """The caller `HttpGuard` named may watch the chains it may see as tasks."""
        user, auth = request.scope.get("user"), request.scope.get("auth")
        caller = Principal(getattr(user, "username", ""), operator="operator" in getattr(auth, "scopes", ()))
        return await visible_memo(handler.client, chain_id, caller) is not None

    routes = [
        Route(CARD_PATH, root_card, methods=["GET"]),
        chain_events_route(EVENTS_PATH, handler.client, may_watch),
        Route("/agents/{agent_id}" + CARD_PATH, agent_card, methods=["GET"]),
        Route("/agents", agents, methods=["GET"]),
        # JSON-RPC of A2A 1.0, and of 0.3 (`message/send`, ...) for clients that speak it
        *create_jsonrpc_routes(handler, rpc_url="/", context_builder=builder, enable_v0_3_compat=True),
        *create_jsonrpc_routes(handler, rpc_url="/agents/{agent_id}", context_builder=builder,
                               enable_v0_3_compat=True),
        # the card's URL with a trailing slash, as many HTTP clients write it: served, not redirected
        *create_jsonrpc_routes(handler, rpc_url="/agents/{agent_id}/", context_builder=builder,
                               enable_v0_3_compat=True),
        # the HTTP+JSON (REST) binding: the same handler, the same checks in front
        *_rest_routes(handler, builder, REST_PATH),
        *_rest_routes(handler, builder, "/agents/{agent_id}" + REST_PATH),
    ]
    return Starlette(routes=routes)


def _rest_routes(handler: ChainRequestHandler, builder: _AgentContextBuilder, prefix: str) -> list[Route]:
    """The SDK's HTTP+JSON routes below `prefix`, without its catch-all `/{tenant}` mount (there
    are no tenants here, and it would take every other path)."""
    return [r for r in create_rest_routes(handler, context_builder=builder, path_prefix=prefix) if isinstance(r, Route)]


CARD_CACHE_CONTROL = "no-cache"
"""Cards follow the registry (at most a second old): a client keeps one and asks again with its
ETag, and is answered 304 while it has not changed."""


def card_response(request: Request, card: AgentCard) -> Response:
    """`card` as JSON with an ETag (a digest of its body) and `Cache-Control`; 304 Not Modified
    when the request's `If-None-Match` names that ETag."""
    body = json.dumps(agent_card_to_dict(card), separators=(",", ":"), sort_keys=True).encode()
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = {"ETag": etag, "Cache-Control": CARD_CACHE_CONTROL}
    asked = {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}
    if etag in asked or "*" in asked:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


MESSAGE_OVERHEAD_BYTES = 64 * 1024
"""What a request may hold besides a context: the JSON-RPC envelope, the task text, metadata."""


class A2AServer:
    """The A2A application served by uvicorn in this process's event loop, until `stop()`, behind
    `HttpGuard`: Host (its loopback names, `public_url`'s host and `allowed_hosts`), Origin
    (`allowed_origins`, none by default: no browser page may call it), the caller (with
    authentication configured, every path but the public card needs a credential; without it,
    loopback only), bodies up to the largest context this deployment carries plus the envelope
    (`max_body_bytes`), and requests in flight per caller (`max_in_flight`). With `grpc_port` (0: one the system
    chooses), the gRPC binding too, on `host` at that port, behind the same credentials, bound
    and in-flight count (`handoff.a2a.grpc_binding`), declared in every card at `grpc_url`. With
    `push` enabled, push notifications (`handoff.a2a.push`)."""

    def __init__(self, client: Client, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 auth: BearerAuth = BearerAuth(), public_url: str | None = None,
                 allowed_hosts: Sequence[str] = (), allowed_origins: Sequence[str] = (),
                 max_body_bytes: int | None = None, grpc_port: int | None = None,
                 grpc_public_url: str | None = None, push: PushPolicy = PushPolicy(),
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        auth.require_on(host, "the A2A server starts chains for its callers", f"{ENV_TOKENS}, or --jwks-url")
        self.url = (public_url or f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}").rstrip("/")
        hosts = hosts_for(host, port, [host_of_url(self.url), *(h.lower() for h in allowed_hosts)])
        max_body = max_body_bytes or context_limit(client) + MESSAGE_OVERHEAD_BYTES
        in_flight: Counter[str] = Counter()
        self._grpc = None if grpc_port is None else GrpcBinding(host=host, port=grpc_port, auth=auth,
                                                                max_message_bytes=max_body, in_flight=in_flight,
                                                                max_in_flight=max_in_flight)
        self.grpc_url = None if self._grpc is None else (grpc_public_url or grpc_target(self.url, self._grpc.port))
        self._push = PushNotifier(client, push) if push.enabled else None
        served = Served(self.url, auth, grpc_url=self.grpc_url, push=self._push is not None)
        cards = LiveCards(client)
        self.handler = chain_handler(client, served, cards, push=self._push)
        app = HttpGuard(a2a_app(self.handler, cards, served), hosts=hosts, origins=allowed_origins, auth=auth,
                        max_body_bytes=max_body, public=[CARD_PATH], in_flight=in_flight,
                        max_in_flight=max_in_flight)
        self._served = AsgiServer(app, host, port, what="the A2A server")

    async def start(self) -> A2AServer:
        """Serve; an `OSError` when a port is in use or not ours to bind."""
        await self._served.start()
        if self._grpc is not None:
            try:
                await self._grpc.start(self.handler)
            except BaseException:  # its port: nothing is left serving
                await self._served.stop()
                raise
        return self

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop()
        await self._served.stop()
        if self._push is not None:
            await self._push.aclose()


def grpc_target(url: str, port: int) -> str:
    """The gRPC target (`host:port`) beside the HTTP server at `url`: its host, the gRPC port."""
    from urllib.parse import urlsplit

    name = urlsplit(url).hostname or "127.0.0.1"
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"

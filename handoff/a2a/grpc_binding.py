"""The gRPC binding of A2A (the SDK's `GrpcHandler` over `a2a.proto`'s `A2AService`), on its own
port beside the HTTP server, in front of the same request handler the JSON-RPC and REST bindings
use: the same chains, tasks, owners and errors.

What every call passes first, as `handoff.servers.http.HttpGuard` does for HTTP: its credential
(metadata `authorization: Bearer ...`, checked by the same `BearerVerifier`; UNAUTHENTICATED
without a valid one when authentication is configured; without authentication the binding
listens on loopback only and its one caller is `local`), the caller's requests in flight (shared
with the HTTP bindings; RESOURCE_EXHAUSTED past the bound), and the message bound (a request over
the HTTP body bound is RESOURCE_EXHAUSTED, refused by gRPC before it is decoded). A request's
`tenant` names the agent it starts a chain at, as the per-agent card's gRPC interface declares.
There is no Host or Origin check: no browser speaks gRPC.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from a2a.auth.user import User
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers import RequestHandler
from a2a.server.request_handlers.grpc_handler import DefaultGrpcServerCallContextBuilder, GrpcHandler
from a2a.types import a2a_pb2_grpc
from starlette.authentication import AuthCredentials

from handoff.servers.http import LOCAL, MAX_IN_FLIGHT, BearerAuth, BearerVerifier, Principal


class _Caller(User):
    def __init__(self, name: str) -> None:
        self._name = name

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def user_name(self) -> str:
        return self._name


class _CallerContextBuilder(DefaultGrpcServerCallContextBuilder):
    """The SDK's call context, with the caller the guard admitted (as the HTTP guard names it:
    a user, and `operator` among its scopes for an operator)."""

    def __init__(self, callers: dict[int, Principal]) -> None:
        self._callers = callers

    def build(self, context: grpc.aio.ServicerContext) -> ServerCallContext:
        call = super().build(context)
        principal = self._callers.get(id(context))
        if principal is not None:
            call.state["auth"] = AuthCredentials(["authenticated", *(["operator"] if principal.operator else [])])
        return call

    def build_user(self, context: grpc.aio.ServicerContext) -> User:
        principal = self._callers.get(id(context))
        return _Caller(principal.name) if principal is not None else super().build_user(context)


class _Guard(grpc.aio.ServerInterceptor):
    """Admits each call (credential, requests in flight) before the SDK's handler sees it."""

    def __init__(self, auth: BearerAuth, in_flight: Counter[str], max_in_flight: int,
                 callers: dict[int, Principal]) -> None:
        self._verifier = BearerVerifier(auth) if auth.configured else None
        self._in_flight, self._max_in_flight, self._callers = in_flight, max_in_flight, callers

    async def _admit(self, context: grpc.aio.ServicerContext) -> Principal:
        if self._verifier is None:
            principal: Principal | None = Principal(LOCAL, operator=True)
        else:
            header = next((v for k, v in context.invocation_metadata() or () if k.lower() == "authorization"), None)
            principal = await self._verifier.principal(header if isinstance(header, str) else None)
        if principal is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer credential is required")
        if self._in_flight[principal.name] >= self._max_in_flight:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"more than {self._max_in_flight} requests in flight")
        self._in_flight[principal.name] += 1
        self._callers[id(context)] = principal
        return principal

    def _release(self, principal: Principal, context: grpc.aio.ServicerContext) -> None:
        self._callers.pop(id(context), None)
        self._in_flight[principal.name] -= 1
        if self._in_flight[principal.name] <= 0:
            del self._in_flight[principal.name]

    def _unary(self, behavior: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            principal = await self._admit(context)
            try:
                return await behavior(request, context)
            finally:
                self._release(principal, context)
        return admitted

    def _stream(self, behavior: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[[Any, Any], AsyncIterator[Any]]:
        async def admitted(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            principal = await self._admit(context)
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                self._release(principal, context)
        return admitted

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary),
                                                       request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream),
                                                        request_deserializer=handler.request_deserializer,
                                                        response_serializer=handler.response_serializer)
        return handler  # A2AService has no client-streaming methods


class GrpcBinding:
    """A2A over gRPC on host:port (port 0: one the system chooses; `port` says which), behind the
    checks above, bound at once and serving from `start(handler)`. `in_flight`: the counter of
    requests in flight per caller, shared with the HTTP guard."""

    def __init__(self, *, host: str, port: int, auth: BearerAuth, max_message_bytes: int,
                 in_flight: Counter[str] | None = None, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        auth.require_on(host, "the A2A gRPC binding starts chains for its callers", "HANDOFF_A2A_TOKENS, or --jwks-url")
        self._callers: dict[int, Principal] = {}
        guard = _Guard(auth, in_flight if in_flight is not None else Counter(), max_in_flight, self._callers)
        self._server = grpc.aio.server(interceptors=[guard], options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ])
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self._server.add_insecure_port(target)
        except RuntimeError as err:  # grpc's way of saying the port is in use, or not ours to bind
            raise OSError(f"cannot serve gRPC on {target}: {err}") from None

    async def start(self, handler: RequestHandler) -> GrpcBinding:
        a2a_pb2_grpc.add_A2AServiceServicer_to_server(
            GrpcHandler(handler, context_builder=_CallerContextBuilder(self._callers)), self._server)
        await self._server.start()
        return self

    async def stop(self, grace_s: float = 1.0) -> None:
        await self._server.stop(grace_s)

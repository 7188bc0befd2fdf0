"""The MCP server over streamable HTTP (`handoff mcp --http`), served by uvicorn in this process's
event loop behind `HttpGuard`: the `Host` must be one it answers to (its loopback names, its own
address, `allowed_hosts`), no browser `Origin` unless `allowed_origins`, a bearer credential when
`auth` takes any (tokens from `HANDOFF_MCP_TOKENS` and `HANDOFF_MCP_OPERATOR_TOKENS`, JWTs; loopback
only without), bodies up to the deployment's context limit plus an envelope, and at most so many
requests in flight per caller. Each caller sees its own chains, an operator every chain
(`handoff.mcp.tools`). The SDK's own
Host and Origin checks are left off: the guard's are the ones every handoff server makes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from mcp.server.transport_security import TransportSecuritySettings
from temporalio.client import Client

from handoff.client import context_limit
from handoff.mcp.tools import handoff_mcp
from handoff.servers.http import AsgiServer, BearerAuth, HttpGuard
from handoff.servers.http import allowed_hosts as hosts_for
from handoff.settings import Settings

DEFAULT_PORT = 8400
PATH = "/mcp"
ENV_TOKENS = Settings.env_name("mcp_tokens")
ENV_OPERATOR_TOKENS = Settings.env_name("mcp_operator_tokens")
MESSAGE_OVERHEAD_BYTES = 64 * 1024
"""What a request may hold besides a chain's context: the JSON-RPC envelope, the task, the policy."""


def finishing_answered(app: Any) -> Any:
    """ASGI middleware: a request whose response has been sent in full runs to its end even when
    `HttpGuard` sees the connection close (uvicorn reports a disconnect once a response is
    complete). The SDK records a session as opened only after its opening request returns, so
    cancelling it there would forget the session it just named; a request still answering is
    cancelled as before."""

    async def finishing(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        answered = False

        async def sending(message: dict) -> None:
            nonlocal answered
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered = True

        task = asyncio.ensure_future(app(scope, receive, sending))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not answered:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise

    return finishing


class McpHttpServer:
    """handoff's MCP tools and resources at `http://HOST:PORT/mcp`, until `stop()`."""

    def __init__(self, client: Client, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 auth: BearerAuth = BearerAuth(), allowed_hosts: Sequence[str] = (),
                 allowed_origins: Sequence[str] = (), max_body_bytes: int | None = None) -> None:
        auth.require_on(host, "the MCP server starts and decides chains for its callers",
                        f"{ENV_TOKENS}, {ENV_OPERATOR_TOKENS}, or --jwks-url")
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}{PATH}"
        bound = max_body_bytes or context_limit(client) + MESSAGE_OVERHEAD_BYTES
        app = handoff_mcp(client).streamable_http_app(
            streamable_http_path=PATH, max_request_body_size=bound, host=host,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))
        guarded = HttpGuard(finishing_answered(app), hosts=hosts_for(host, port, [h.lower() for h in allowed_hosts]),
                            origins=allowed_origins, auth=auth, max_body_bytes=bound)
        self._served = AsgiServer(guarded, host, port, what="the MCP server", lifespan="on")

    async def start(self) -> McpHttpServer:
        """Serve; an `OSError` when the port is in use or not ours to bind."""
        await self._served.start()
        return self

    async def stop(self) -> None:
        await self._served.stop()

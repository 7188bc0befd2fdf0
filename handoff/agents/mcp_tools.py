"""MCP servers' tools for LLM agents (`llm_agent(..., mcp_servers=[...])`).

At each hop the servers' tools are listed (a listing is kept per process for `list_ttl_s`; a
failed one for `FAILED_LISTING_TTL_S`) and offered to the model as `mcp__<server>__<tool>`, which
no transfer, `finish` or own tool may be named. What one server offers is bounded (`max_tools`, and
a tool whose input schema is over `MAX_SCHEMA_CHARS` is left out, named in the decision's
`trimmed`), and so is the whole offer (`MAX_MCP_TOOLS`).

A hop opens at most one session per server, when it first needs that server (to list or to call),
and closes it when the hop ends, cancelled or not. Each session is held by a task of its own, so a
server that dies, hangs or answers nonsense fails the calls to it, never the hop: each call is
bounded in time (`call_timeout_s`, opening the session included) and its result in size
(`max_result_chars`), and a failure is put back to the model as the call's result, with the reason.
Every call is recorded in the hop's decision (`AgentDecision.mcp_calls`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr

from handoff.models.directives import McpCall

TOOL_PREFIX = "mcp__"
MAX_TOOL_NAME = 64  # OpenAI's limit on a function's name
MAX_SCHEMA_CHARS = 4000
"""The largest input schema (as JSON) a tool may have to be offered."""
MAX_DESCRIPTION_CHARS = 1000
MAX_MCP_TOOLS = 64
"""The most MCP tools one hop offers, over all its servers."""
MAX_ERROR_CHARS = 300
FAILED_LISTING_TTL_S = 5.0
"""How long a listing that failed is kept before a hop asks the server again: a server that is
down costs one timeout per few seconds, not one per hop."""
LIST = "tools/list"
"""The `tool` of a recorded listing that failed."""

ServerName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,24}$")]


class _Server(BaseModel):
    name: ServerName
    """Names the server's tools (`mcp__<name>__<tool>`) and its calls in the record."""
    call_timeout_s: float = Field(default=10.0, gt=0)
    list_ttl_s: float = Field(default=30.0, ge=0)
    max_tools: int = Field(default=32, ge=0)
    max_result_chars: int = Field(default=4000, gt=0)


class McpStdioServer(_Server):
    """An MCP server the hop starts as a subprocess and talks to over its stdin and stdout."""

    transport: Literal["stdio"] = "stdio"
    command: str
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] | None = None
    """Set in the server's environment, over the few variables the MCP SDK passes on (PATH, HOME...)."""
    cwd: str | None = None

    def key(self) -> str:
        return json.dumps(["stdio", self.name, self.command, self.args, self.cwd])


class McpHttpServer(_Server):
    """An MCP server reached over streamable HTTP."""

    transport: Literal["http"] = "http"
    url: str
    bearer_token: SecretStr | None = None

    def key(self) -> str:
        return json.dumps(["http", self.name, self.url])


McpServer = Annotated[McpStdioServer | McpHttpServer, Field(discriminator="transport")]


@dataclass(frozen=True)
class McpTool:
    """One server tool as the model is offered it."""

    name: str
    server: str
    tool: str
    schema: dict[str, Any]


@dataclass
class _Listing:
    tools: list[McpTool]
    left_out: list[str]
    error: str
    at: float


_listings: dict[str, _Listing] = {}
"""Each server's latest listing, by `server.key()`, for every agent of the process."""


def tool_name(server: str, tool: str) -> str:
    """`mcp__<server>__<tool>`, within the model's name rules; a name too long is cut and made
    unique again with a digest of the whole."""
    full = re.sub(r"[^A-Za-z0-9_-]", "_", f"{TOOL_PREFIX}{server}__{tool}")
    if len(full) <= MAX_TOOL_NAME:
        return full
    return f"{full[:MAX_TOOL_NAME - 9]}_{hashlib.sha256(full.encode()).hexdigest()[:8]}"


def digest(arguments: dict[str, Any]) -> str:
    """What the record keeps of a call's arguments: a digest of their canonical JSON."""
    text = json.dumps(arguments, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reason(err: BaseException) -> str:
    """One line a model (and a person) can read: the innermost error of a task group's."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    if isinstance(err, TimeoutError):
        return "no answer in time"
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:MAX_ERROR_CHARS]


def result_text(result: Any, limit: int) -> tuple[str, bool]:
    """A `CallToolResult` as text for the model (its text parts; its structured content when it
    has none), cut to `limit`, and whether it was cut."""
    parts = [getattr(c, "text", None) or f"[{getattr(c, 'type', 'content')}]" for c in result.content or []]
    text = "\n".join(parts)
    if not text and result.structured_content is not None:
        text = json.dumps(result.structured_content, default=str, ensure_ascii=False)
    return text[:limit], len(text) > limit


def _client(server: McpStdioServer | McpHttpServer, stack: AsyncExitStack) -> Any:
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    if isinstance(server, McpStdioServer):
        return Client(StdioServerParameters(command=server.command, args=server.args, env=server.env,
                                            cwd=server.cwd))
    if server.bearer_token is None:
        return Client(server.url)
    headers = {"Authorization": f"Bearer {server.bearer_token.get_secret_value()}"}
    http = create_mcp_http_client(headers=headers)
    stack.push_async_callback(http.aclose)
    return Client(streamable_http_client(server.url, http_client=http))


class _Session:
    """One server's session for one hop, held by a task of its own: a transport that breaks ends
    that task, not the hop, and the hop's end (or a call's timeout) can close it in any state."""

    def __init__(self, server: McpStdioServer | McpHttpServer) -> None:
        self.server = server
        self._ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._close = asyncio.Event()
        self.broken = ""
        self._task = asyncio.create_task(self._hold(), name=f"mcp-session-{server.name}")

    async def _hold(self) -> None:
        try:
            async with AsyncExitStack() as stack:
                client = await stack.enter_async_context(_client(self.server, stack))
                self._ready.set_result(client)
                await self._close.wait()
        except Exception as err:  # the server could not start, or its transport broke
            self.broken = reason(err)
            if not self._ready.done():
                self._ready.set_exception(err)

    async def client(self) -> Any:
        if self.broken:
            raise ConnectionError(self.broken)
        return await asyncio.shield(self._ready)

    async def close(self) -> None:
        self._close.set()
        try:
            await asyncio.wait_for(self._task, 2.0)
        except (TimeoutError, asyncio.CancelledError):
            pass  # wait_for has cancelled it
        if self._ready.done() and not self._ready.cancelled():
            self._ready.exception()  # retrieved: a failed start is reported by the calls, not by asyncio


@dataclass
class McpHop:
    """The MCP servers of one hop: what they offer, and their calls. Use as `async with`: the
    sessions it opened close when the block ends."""

    servers: list[McpStdioServer | McpHttpServer]
    tools: dict[str, McpTool] = field(default_factory=dict)
    failures: list[McpCall] = field(default_factory=list)
    """The listings that failed this hop (`tool` is `tools/list`); their servers offer nothing."""
    left_out: list[str] = field(default_factory=list)
    _sessions: dict[str, _Session] = field(default_factory=dict)

    async def __aenter__(self) -> McpHop:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(s.close() for s in self._sessions.values()))

    def _session(self, server: McpStdioServer | McpHttpServer) -> _Session:
        if server.name not in self._sessions:
            self._sessions[server.name] = _Session(server)
        return self._sessions[server.name]

    async def list(self) -> None:
        """The servers' tools, from each one's cached listing or listed now, at once."""
        listings = await asyncio.gather(*(self._listing(s) for s in self.servers))
        for server, listing in zip(self.servers, listings):
            if listing.error:
                self.failures.append(McpCall(server=server.name, tool=LIST, error=listing.error))
            self.left_out += listing.left_out
            for tool in listing.tools:
                if len(self.tools) < MAX_MCP_TOOLS:
                    self.tools.setdefault(tool.name, tool)
                else:
                    self.left_out.append(f"mcp tool {tool.name} (over {MAX_MCP_TOOLS} MCP tools)")

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema for t in self.tools.values()]

    async def _listing(self, server: McpStdioServer | McpHttpServer) -> _Listing:
        cached = _listings.get(server.key())
        ttl = FAILED_LISTING_TTL_S if cached and cached.error else server.list_ttl_s
        if cached and time.monotonic() - cached.at < ttl:
            return cached
        try:
            async with asyncio.timeout(server.call_timeout_s):
                client = await self._session(server).client()
                listed = await client.list_tools()
            listing = _listing_of(server, listed.tools)
        except Exception as err:
            listing = _Listing([], [], f"cannot list its tools: {reason(err)}", time.monotonic())
        _listings[server.key()] = listing
        return listing

    async def call(self, name: str, arguments: dict[str, Any]) -> tuple[str, McpCall]:
        """Call an offered tool: what the model is given back, and the record of the call."""
        tool = self.tools[name]
        server = next(s for s in self.servers if s.name == tool.server)
        record = McpCall(server=server.name, tool=tool.tool, arguments_digest=digest(arguments))
        started = time.perf_counter()
        try:
            async with asyncio.timeout(server.call_timeout_s):
                client = await self._session(server).client()
                result = await client.call_tool(tool.tool, arguments)
            text, record.truncated = result_text(result, server.max_result_chars)
            record.result_chars = len(text)
            if result.is_error:
                record.error = f"the tool failed: {text}"[:MAX_ERROR_CHARS]
        except Exception as err:  # the server is down, slow or broke: the model is told and goes on
            why = f"no answer in {server.call_timeout_s:g} s" if isinstance(err, TimeoutError) else reason(err)
            record.error = f"the MCP server {server.name!r} failed: {why}"[:MAX_ERROR_CHARS]
            text = f"error: {record.error}"
        finally:
            record.duration_ms = (time.perf_counter() - started) * 1000
        return text, record


def _listing_of(server: McpStdioServer | McpHttpServer, tools: list[Any]) -> _Listing:
    offered: list[McpTool] = []
    left_out: list[str] = []
    for tool in tools:
        name = tool_name(server.name, tool.name)
        parameters = tool.input_schema or {"type": "object", "properties": {}}
        if len(offered) >= server.max_tools:
            left_out.append(f"mcp tool {name} (over the server's {server.max_tools})")
        elif len(json.dumps(parameters, default=str)) > MAX_SCHEMA_CHARS:
            left_out.append(f"mcp tool {name} (schema over {MAX_SCHEMA_CHARS:,} characters)")
        else:
            description = f"[MCP server {server.name}] {tool.description or tool.name}"[:MAX_DESCRIPTION_CHARS]
            offered.append(McpTool(name, server.name, tool.name, {"type": "function", "function": {
                "name": name, "description": description, "parameters": parameters}}))
    return _Listing(offered, left_out, "", time.monotonic())

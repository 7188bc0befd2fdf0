"""handoff as an MCP server, through the SDK's own client against the real dev server: over stdio
(`handoff mcp` started as a client starts it) the tools, a chain started and waited for, read back
as a resource, approved by the caller, and bad input refused as one tool error; over streamable
HTTP the same start and wait, and the doors every handoff HTTP server keeps (a bearer token when
tokens are set, no foreign Origin)."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import httpx
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from handoff.mcp import McpHttpServer
from handoff.servers.embedded import free_port
from handoff.servers.http import AuthRefused, BearerAuth
from tests.support import HANDOFF, make_agent, running

pytestmark = pytest.mark.usefixtures("chains")

TOOLS = {"start_chain", "get_chain", "list_chains", "list_agents", "approve", "reject", "cancel", "steer", "rerun"}


async def completing(ctx):
    return ctx.complete({"done_by": ctx.to_agent, "task": ctx.task_description})


@asynccontextmanager
async def over_stdio(cli_env):
    params = StdioServerParameters(command=HANDOFF, args=["mcp"], env=cli_env)
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def test_over_stdio_a_client_lists_the_tools_runs_a_chain_and_reads_it_back(client, uid, cli_env):
    agent = make_agent(f"mcp-{uid}", completing)
    async with running(client, agent), over_stdio(cli_env) as session:
        tools = {t.name for t in (await session.list_tools()).tools}
        assert TOOLS <= tools

        result = await session.call_tool("start_chain", {"to_agent": agent.id, "task": "say hello",
                                                         "context": {"n": 1}, "wait_s": 30})
        assert not result.is_error, result.content
        record = result.structured_content
        assert record["status"] == "completed"
        assert record["final_result"] == {"done_by": agent.id, "task": "say hello"}
        assert result.content[0].text.startswith(f"chain {record['chain_id']} completed (1 hop)")

        read = await session.read_resource(f"handoff://chains/{record['chain_id']}")
        assert json.loads(read.contents[0].text)["hops"][0]["to_agent"] == agent.id

        again = await session.call_tool("get_chain", {"chain_id": record["chain_id"]})
        assert again.structured_content["status"] == "completed"

        listed = await session.call_tool("list_chains", {"agent": agent.id, "limit": 5})
        assert record["chain_id"] in {c["chain_id"] for c in listed.structured_content["chains"]}


async def test_over_stdio_the_caller_approves_a_waiting_hop_in_its_own_name(client, uid, cli_env):
    agent = make_agent(f"mcp-gated-{uid}", completing)
    async with running(client, agent), over_stdio(cli_env) as session:
        started = await session.call_tool("start_chain", {
            "to_agent": agent.id, "task": "release", "policy": {"approval_required": [agent.id]}, "wait_s": 3})
        assert started.structured_content["status"] == "awaiting_approval", started.content
        assert "awaits approval" in started.content[0].text
        chain_id = started.structured_content["chain_id"]

        approved = await session.call_tool("approve", {"chain_id": chain_id, "comment": "looks fine"})
        assert not approved.is_error, approved.content
        assert approved.structured_content["approval"]["by"] == "mcp:local"

        ended = await session.call_tool("get_chain", {"chain_id": chain_id, "wait_s": 30})
        assert ended.structured_content["status"] == "completed"

        twice = await session.call_tool("approve", {"chain_id": chain_id})
        assert twice.is_error


@pytest.mark.parametrize("arguments, says", [
    ({"task": "x", "to_agent": "a", "capability": "TESTING"}, "exactly one"),
    ({"task": "x", "capability": "NO_SUCH_THING"}, "capability"),
    ({"task": "x", "to_agent": "a", "wait_s": 10_000}, "wait_s"),
    ({"task": "x", "to_agent": "a", "policy": {"max_depth": 99}}, "max_depth"),
    ({"to_agent": "a"}, "task"),
])
async def test_over_stdio_bad_input_is_one_tool_error_and_starts_nothing(client, cli_env, arguments, says):
    async with over_stdio(cli_env) as session:
        result = await session.call_tool("start_chain", arguments)
        assert result.is_error
        [text] = [c.text for c in result.content]
        assert says in text and "\n" not in text and not text.startswith("Error executing"), text
        bad_id = await session.call_tool("get_chain", {"chain_id": "not-a-uuid"})
        assert bad_id.is_error and "UUID" in bad_id.content[0].text


@asynccontextmanager
async def over_http(client, *, tokens: tuple[str, ...] = ()):
    server = await McpHttpServer(client, port=free_port(), auth=BearerAuth(tokens=tokens)).start()
    try:
        yield server
    finally:
        await server.stop()


async def test_over_http_a_client_starts_a_chain_and_waits_for_it(client, uid):
    agent = make_agent(f"mcp-http-{uid}", completing)
    async with running(client, agent), over_http(client, tokens=("secret",)) as server:
        http = httpx2.AsyncClient(headers={"Authorization": "Bearer secret"}, timeout=60)
        async with http, streamable_http_client(server.url, http_client=http) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool("start_chain", {"to_agent": agent.id, "task": "over http",
                                                             "wait_s": 30})
            assert result.structured_content["status"] == "completed", result.content
            agents = await session.call_tool("list_agents", {})
            assert not agents.is_error

            gated = await session.call_tool("start_chain", {
                "to_agent": agent.id, "task": "gated", "policy": {"approval_required": [agent.id]}, "wait_s": 3})
            approved = await session.call_tool("approve", {"chain_id": gated.structured_content["chain_id"]})
            assert approved.structured_content["approval"]["by"] == "mcp:token-1", approved.content


INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "probe", "version": "1"}}}
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def test_over_http_a_caller_without_the_token_or_from_a_foreign_origin_is_refused(client):
    async with over_http(client, tokens=("secret",)) as server, httpx.AsyncClient(timeout=30) as http:
        anonymous = await http.post(server.url, json=INITIALIZE, headers=HEADERS)
        assert anonymous.status_code == 401
        wrong = await http.post(server.url, json=INITIALIZE, headers={**HEADERS, "Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        foreign = await http.post(server.url, json=INITIALIZE, headers={
            **HEADERS, "Authorization": "Bearer secret", "Origin": "https://evil.example"})
        assert foreign.status_code == 403
        rebound = await http.post(server.url, json=INITIALIZE, headers={
            **HEADERS, "Authorization": "Bearer secret", "Host": "evil.example:80"})
        assert rebound.status_code == 403
        allowed = await http.post(server.url, json=INITIALIZE, headers={**HEADERS, "Authorization": "Bearer secret"})
        assert allowed.status_code == 200, allowed.text


async def test_over_http_it_will_not_listen_beyond_loopback_without_tokens(client):
    with pytest.raises(AuthRefused, match="HANDOFF_MCP_TOKENS"):
        McpHttpServer(client, host="0.0.0.0", port=free_port())


async def test_over_http_a_body_over_the_bound_is_refused(client):
    server = await McpHttpServer(client, port=free_port(), max_body_bytes=1024).start()
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            big = await http.post(server.url, content=b"x" * 4096, headers=HEADERS)
        assert big.status_code == 413
    finally:
        await server.stop()

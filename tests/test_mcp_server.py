"""handoff as an MCP server, through the SDK's own client against the real dev server: over stdio
(`handoff mcp` started as a client starts it) the tools, a chain started and waited for, read back
as a resource, approved by the caller, and bad input refused as one tool error; over streamable
HTTP the same start and wait, the doors every handoff HTTP server keeps (a bearer token when
tokens are set, no foreign Origin), and each caller's chains kept apart from the others': a chain
answers a caller who did not start it as a chain that does not exist, unless the caller is an
operator (an operator token, a JWT with the operator scope)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from contextlib import asynccontextmanager
from uuid import uuid4

import httpx
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from handoff.client import start_chain
from handoff.mcp import McpHttpServer
from handoff.servers.embedded import free_port, port_open
from handoff.servers.http import OPERATOR_SCOPE, AuthRefused, BearerAuth
from tests.support import HANDOFF, assert_usage_error, make_agent, running
from tests.test_codec_server import AUDIENCE, ISSUER, jwks, token  # noqa: F401 (jwks: a fixture)

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


async def test_over_stdio_a_wait_reports_progress_as_each_hop_completes(client, uid, cli_env):
    last = make_agent(f"mcp-last-{uid}", completing)

    async def handing_on(ctx):
        await asyncio.sleep(0.5)  # long enough for a read of the chain between the hops
        return ctx.handoff(to_agent=last.id, task_description="finish it", result_data={"first": True})

    first = make_agent(f"mcp-first-{uid}", handing_on)
    reported: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reported.append((progress, total, message))

    async with running(client, first, last), over_stdio(cli_env) as session:
        result = await session.call_tool("start_chain", {"to_agent": first.id, "task": "two hops", "wait_s": 30},
                                         progress_callback=on_progress)
        assert result.structured_content["status"] == "completed", result.content
        assert reported == [(1, None, f"hop 0: starter -> {first.id} completed"),
                            (2, None, f"hop 1: {first.id} -> {last.id} completed")], reported

        reported.clear()
        again = await session.call_tool("get_chain", {"chain_id": result.structured_content["chain_id"], "wait_s": 5},
                                        progress_callback=on_progress)
        assert again.structured_content["status"] == "completed"
        assert [p for p, _, _ in reported] == [1, 2], "an ended chain's hops, each once"


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
async def over_http(client, *, tokens: tuple[str, ...] = (), operator_tokens: tuple[str, ...] = ()):
    auth = BearerAuth(tokens=tokens, operator_tokens=operator_tokens)
    server = await McpHttpServer(client, port=free_port(), auth=auth).start()
    try:
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def http_session(url: str, credential: str):
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {credential}"}, timeout=60)
    async with http, streamable_http_client(url, http_client=http) as (read, write), \
            ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def test_over_http_a_client_starts_a_chain_and_waits_for_it(client, uid):
    agent = make_agent(f"mcp-http-{uid}", completing)
    async with running(client, agent), over_http(client, tokens=("secret",)) as server:
        async with http_session(server.url, "secret") as session:
            result = await session.call_tool("start_chain", {"to_agent": agent.id, "task": "over http",
                                                             "wait_s": 30})
            assert result.structured_content["status"] == "completed", result.content
            agents = await session.call_tool("list_agents", {})
            assert not agents.is_error

            gated = await session.call_tool("start_chain", {
                "to_agent": agent.id, "task": "gated", "policy": {"approval_required": [agent.id]}, "wait_s": 3})
            approved = await session.call_tool("approve", {"chain_id": gated.structured_content["chain_id"]})
            assert approved.structured_content["approval"]["by"] == "mcp:token-1", approved.content


def refusal(result) -> str:
    assert result.is_error, result.content
    [text] = [c.text for c in result.content]
    return text


async def read_refusal(session: ClientSession, uri: str) -> str:
    with pytest.raises(MCPError) as refused:
        await session.read_resource(uri)
    return str(refused.value)


DECISIONS = [("approve", {}), ("reject", {"reason": "not mine to say"}), ("cancel", {}),
             ("cancel", {"after_hop": True}), ("steer", {"message": "go elsewhere"}), ("rerun", {"from_hop": 0})]
"""Every tool that decides a chain, with the arguments it needs besides the chain's id."""


async def listed(session: ClientSession, *, including: set[str] = frozenset()) -> set[str]:
    """The newest chains `list_chains` shows the session, once they include `including`
    (Temporal's visibility lags a chain's start by a second or so)."""
    for _ in range(50):
        found = await session.call_tool("list_chains", {"limit": 200})
        chains = {c["chain_id"] for c in found.structured_content["chains"]}
        if including <= chains:
            return chains
        await asyncio.sleep(0.2)
    raise AssertionError(f"list_chains shows {sorted(chains)}, without {sorted(including - chains)}")


async def test_over_http_a_caller_sees_and_decides_only_its_own_chains_and_an_operator_every_chain(client, uid):
    agent = make_agent(f"mcp-own-{uid}", completing)
    unknown = str(uuid4())
    async with running(client, agent), over_http(client, tokens=("ada-token", "bob-token"),
                                                 operator_tokens=("ops-token",)) as server, \
            http_session(server.url, "ada-token") as ada, http_session(server.url, "bob-token") as bob, \
            http_session(server.url, "ops-token") as ops:
        started = await ada.call_tool("start_chain", {
            "to_agent": agent.id, "task": "ada's release", "policy": {"approval_required": [agent.id]}, "wait_s": 3})
        assert started.structured_content["status"] == "awaiting_approval", started.content
        chain_id = started.structured_content["chain_id"]
        by_cli = str(await start_chain(client, to_agent=agent.id, task_description="started by the client API"))

        for tool, arguments in [("get_chain", {}), *DECISIONS]:
            theirs = refusal(await bob.call_tool(tool, {"chain_id": chain_id, **arguments}))
            nobodys = refusal(await bob.call_tool(tool, {"chain_id": unknown, **arguments}))
            assert theirs == f"no chain with id {chain_id}", (tool, theirs)
            assert theirs == nobodys.replace(unknown, chain_id), (tool, "answered as a chain that does not exist")
        assert await read_refusal(bob, f"handoff://chains/{chain_id}") == (
            (await read_refusal(bob, f"handoff://chains/{unknown}")).replace(unknown, chain_id))
        assert refusal(await ada.call_tool("get_chain", {"chain_id": by_cli})) == f"no chain with id {by_cli}", (
            "a chain started otherwise has no MCP owner: operators alone see it")

        still = await ada.call_tool("get_chain", {"chain_id": chain_id})
        assert still.structured_content["status"] == "awaiting_approval", "bob's tries changed nothing"
        assert still.structured_content["hops"][0].get("steering") in (None, []), still.structured_content
        read = await ada.read_resource(f"handoff://chains/{chain_id}")
        assert json.loads(read.contents[0].text)["chain_id"] == chain_id
        await listed(ops, including={chain_id, by_cli})
        assert by_cli not in await listed(ada, including={chain_id})
        assert not await listed(bob) & {chain_id, by_cli}

        seen = await ops.call_tool("get_chain", {"chain_id": by_cli, "wait_s": 30})
        assert seen.structured_content["status"] == "completed", seen.content
        approved = await ops.call_tool("approve", {"chain_id": chain_id, "comment": "operator's call"})
        assert approved.structured_content["approval"]["by"] == "mcp:operator-1", approved.content
        ended = await ada.call_tool("get_chain", {"chain_id": chain_id, "wait_s": 30})
        assert ended.structured_content["status"] == "completed", ended.content

        again = await ada.call_tool("rerun", {"chain_id": chain_id, "from_hop": 0})
        rerun_id = again.structured_content["chain_id"]
        assert again.structured_content["rerun_of"]["chain_id"] == chain_id, again.content
        assert refusal(await bob.call_tool("get_chain", {"chain_id": rerun_id})) == f"no chain with id {rerun_id}", (
            "a re-run belongs to the caller that started it")
        cancelled = await ada.call_tool("cancel", {"chain_id": rerun_id})
        assert not cancelled.is_error, cancelled.content


async def test_over_http_a_jwt_names_the_owner_and_its_operator_scope_sees_every_chain(client, uid, cli_env, jwks):
    """`handoff mcp --http --jwks-url ...`: the caller a JWT names (its subject) owns what it starts;
    another subject is told the chain does not exist; a JWT with the operator scope decides it."""
    key, url = jwks
    agent = make_agent(f"mcp-jwt-{uid}", completing)
    port = free_port()
    refused = subprocess.run([HANDOFF, "mcp", "--http", "--port", str(port), "--jwks-url", url],
                             env=cli_env, capture_output=True, text=True, timeout=60)
    assert_usage_error(refused, "issuer and audience")
    serving = subprocess.Popen([HANDOFF, "mcp", "--http", "--port", str(port), "--jwks-url", url,
                                "--jwt-issuer", ISSUER, "--jwt-audience", AUDIENCE],
                               env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):
            if port_open(port) or serving.poll() is not None:
                break
            await asyncio.sleep(0.1)
        assert serving.poll() is None, serving.communicate()
        mcp_url = f"http://127.0.0.1:{port}/mcp"
        async with running(client, agent), http_session(mcp_url, token(key, sub="ada")) as ada, \
                http_session(mcp_url, token(key, sub="bob")) as bob, \
                http_session(mcp_url, token(key, sub="ops", scope=f"openid {OPERATOR_SCOPE}")) as ops:
            started = await ada.call_tool("start_chain", {
                "to_agent": agent.id, "task": "gated", "policy": {"approval_required": [agent.id]}, "wait_s": 3})
            chain_id = started.structured_content["chain_id"]
            assert refusal(await bob.call_tool("approve", {"chain_id": chain_id})) == f"no chain with id {chain_id}"
            approved = await ops.call_tool("approve", {"chain_id": chain_id})
            assert approved.structured_content["approval"]["by"] == "mcp:jwt:ops", approved.content
            ended = await ada.call_tool("get_chain", {"chain_id": chain_id, "wait_s": 30})
            assert ended.structured_content["status"] == "completed", ended.content
    finally:
        serving.terminate()
        serving.wait(timeout=30)


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


async def test_over_http_a_port_in_use_is_an_os_error_before_it_serves(client):
    async with over_http(client) as serving:
        taken = McpHttpServer(client, port=int(serving.url.rsplit(":", 1)[1].split("/")[0]))
        with pytest.raises(OSError, match="in use"):
            await taken.start()


async def test_over_http_a_body_over_the_bound_is_refused(client):
    server = await McpHttpServer(client, port=free_port(), max_body_bytes=1024).start()
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            big = await http.post(server.url, content=b"x" * 4096, headers=HEADERS)
        assert big.status_code == 413
    finally:
        await server.stop()

"""MCP tools for LLM agents (`llm_agent(..., mcp_servers=[...])`, `handoff.agents.mcp_tools`) against
a real MCP server (tests/mcp_tool_server.py, over stdio and over streamable HTTP) and the scripted
model: the model calls a server's tool, hands off with what it returned, and the hop's decision
records the call; a server that is missing, exits, is killed or is slow fails only its calls, with a
reason the model reads, and the chain goes on."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import pytest

from handoff import AgentCapability, ChainStatus, run_chain
from handoff.agents.llm import llm_agent
from handoff.agents.mcp_tools import LIST, McpHttpServer, McpStdioServer, digest
from handoff.servers.embedded import free_port, port_open
from handoff.testing import ScriptedModel, call, offered
from tests.mcp_tool_server import lookup_owner
from tests.support import ROOT, running

pytestmark = pytest.mark.usefixtures("chains")

SERVER = str(ROOT / "tests" / "mcp_tool_server.py")


def stdio(name: str, **options) -> McpStdioServer:
    return McpStdioServer(name=name, command=sys.executable, args=[SERVER], **options)


def agent(agent_id: str, url: str, servers=(), **options):
    return llm_agent(id=agent_id, name=agent_id.title(), capabilities=[AgentCapability.CODE_ANALYSIS],
                     instructions="Find the owner, then hand the review to them.", model="scripted",
                     base_url=url, api_key="test", mcp_servers=list(servers), **options)


def last_tool_result(request: dict) -> str:
    return next(m["content"] for m in reversed(request["messages"]) if m["role"] == "tool")


def finishing(request, n):
    return call("finish", answer="reviewed")


async def owner_then_handoff(client, uid: str, server) -> tuple:
    """A chain of two LLM agents: the lead asks `server` who owns a file and hands the review on
    with the answer; the reviewer finishes."""
    reviewer_id = f"reviewer-{uid}"
    lookup = f"mcp__{server.name}__lookup_owner"

    def lead_answer(request, n):
        if n == 1:
            assert lookup in offered(request) and "finish" in offered(request)
            return call(lookup, path="workflows/chain.py")
        owner = last_tool_result(request)
        return call(f"transfer_to_{reviewer_id.replace('-', '_')}", task=f"ask {owner} to review chain.py")

    async with ScriptedModel(lead_answer) as lead_model, ScriptedModel(finishing) as reviewer_model:
        lead = agent(f"lead-{uid}", lead_model.url, [server])
        reviewer = agent(reviewer_id, reviewer_model.url)
        async with running(client, lead, reviewer, register=True):
            record = await run_chain(client, to_agent=lead.id, task_description="review chain.py")
    return record, reviewer_model


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_the_model_calls_an_mcp_tool_and_hands_off_with_its_answer(client, uid, transport):
    if transport == "stdio":
        record, reviewer_model = await owner_then_handoff(client, uid, stdio(f"owners-{uid}"))
    else:
        async with http_server() as url:
            record, reviewer_model = await owner_then_handoff(
                client, uid, McpHttpServer(name=f"web-{uid}", url=url, bearer_token="secret"))
    assert record.status is ChainStatus.COMPLETED, record.error
    assert record.hops[1].task_description == "ask grace to review chain.py"
    assert "ask grace to review chain.py" in reviewer_model.requests[0]["messages"][1]["content"]
    decision = record.hops[0].decision
    (mcp_call,) = decision.mcp_calls
    assert (mcp_call.tool, mcp_call.error, mcp_call.result_chars) == ("lookup_owner", "", len("grace"))
    assert mcp_call.server.endswith(uid) and mcp_call.duration_ms > 0
    assert mcp_call.arguments_digest == digest({"path": "workflows/chain.py"})
    assert decision.tool_calls == [f"mcp__{mcp_call.server}__lookup_owner"] and decision.model_calls == 2
    assert "secret" not in record.model_dump_json()


async def test_a_published_mcp_server_from_pypi_answers_an_llm_agent(client, uid):
    """The MCP project's own time server (`mcp-server-time`, from PyPI), over stdio: the model
    asks it the time in a zone and finishes with its answer."""
    server = McpStdioServer(name=f"time-{uid}", command=sys.executable,
                            args=["-m", "mcp_server_time", "--local-timezone", "UTC"])
    tool = f"mcp__{server.name}__get_current_time"

    def answer(request, n):
        if n == 1:
            assert tool in offered(request)
            return call(tool, timezone="Asia/Tokyo")
        return call("finish", answer=last_tool_result(request))

    async with ScriptedModel(answer) as model:
        lead = agent(f"clock-{uid}", model.url, [server])
        async with running(client, lead):
            record = await run_chain(client, to_agent=lead.id, task_description="what time is it in Tokyo?")
    assert record.status is ChainStatus.COMPLETED, record.error
    said = record.final_result["answer"]
    assert '"timezone": "Asia/Tokyo"' in said and "+09:00" in said
    (mcp_call,) = record.hops[0].decision.mcp_calls
    assert (mcp_call.tool, mcp_call.error) == ("get_current_time", "")


async def test_a_killed_http_server_fails_its_call_with_a_reason_and_the_chain_completes(client, uid):
    server_name = f"web-{uid}"
    lookup = f"mcp__{server_name}__lookup_owner"

    def answer(request, n):
        if lookup in offered(request) and request["messages"][-1]["role"] != "tool":
            return call(lookup, path="handoff/agents/llm.py")
        return call("finish", answer=last_tool_result(request))

    async with ScriptedModel(answer) as model:
        async with http_server() as url:
            lead = agent(f"lead-{uid}", model.url, [McpHttpServer(name=server_name, url=url, call_timeout_s=3)])
            async with running(client, lead):
                alive = await run_chain(client, to_agent=lead.id, task_description="who owns llm.py?")
        # the server is gone; its listing, 30 s old at most, still offers the tool
        async with running(client, lead):
            killed = await run_chain(client, to_agent=lead.id, task_description="who owns llm.py?")
    assert alive.final_result == {"answer": "ada"}
    assert killed.status is ChainStatus.COMPLETED, killed.error
    told = killed.final_result["answer"]
    assert told.startswith(f"error: the MCP server '{server_name}' failed:"), told
    (failed,) = killed.hops[0].decision.mcp_calls
    assert failed.tool == "lookup_owner" and failed.error and f"error: {failed.error}" == told


async def test_a_missing_exiting_or_slow_server_fails_only_its_calls(client, uid):
    good, gone = f"owners-{uid}", f"gone-{uid}"

    def answer(request, n):
        if n == 1:
            system = request["messages"][0]["content"]
            assert f"unavailable now: {gone} (cannot list its tools: FileNotFoundError" in system
            assert not any(gone in t for t in offered(request))
            return call(f"mcp__{good}__wait", seconds=30)
        if n == 2:
            assert last_tool_result(request) == f"error: the MCP server '{good}' failed: no answer in 1 s"
            return call(f"mcp__{good}__exit_now")
        if n == 3:
            assert last_tool_result(request).startswith(f"error: the MCP server '{good}' failed: ")
            return call(f"mcp__{good}__lookup_owner", path="workflows/chain.py")
        return call("finish", answer=last_tool_result(request))

    async with ScriptedModel(answer) as model:
        lead = agent(f"lead-{uid}", model.url, [stdio(good, call_timeout_s=1),
                                                McpStdioServer(name=gone, command=f"/nonexistent/{uid}")])
        async with running(client, lead):
            started = time.monotonic()
            record = await run_chain(client, to_agent=lead.id, task_description="t")
    assert record.status is ChainStatus.COMPLETED, record.error
    assert time.monotonic() - started < 20
    calls = record.hops[0].decision.mcp_calls
    assert [(c.server, c.tool) for c in calls] == [(gone, LIST), (good, "wait"), (good, "exit_now"),
                                                   (good, "lookup_owner")]
    assert all(c.error for c in calls[:3])
    # the session broke when the server exited: the hop says so at once, it does not start another
    assert record.final_result["answer"].startswith(f"error: the MCP server '{good}' failed")


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_the_cost_of_an_mcp_call_in_a_hop(client, uid, transport):
    """Not a timed assertion: the figures are printed (pytest -s)."""
    async with http_server() as url:
        server = stdio(f"cost-{uid}") if transport == "stdio" else McpHttpServer(name=f"cost-{uid}", url=url)
        lookup = f"mcp__{server.name}__lookup_owner"

        def answer(request, n):
            calls = sum(1 for m in request["messages"] if m["role"] == "tool")
            return call(lookup, path="workflows/chain.py") if calls < 2 else call("finish", answer="ok")

        async with ScriptedModel(answer) as model:
            lead = agent(f"lead-{uid}", model.url, [server])
            async with running(client, lead):
                records = [await run_chain(client, to_agent=lead.id, task_description=f"t{i}") for i in range(4)]
    direct = []
    for _ in range(200):
        started = time.perf_counter()
        lookup_owner("workflows/chain.py")
        direct.append((time.perf_counter() - started) * 1e6)
    # the first hop also lists the tools (cached afterwards): its calls are left out
    first = [r.hops[0].decision.mcp_calls[0].duration_ms for r in records[1:]]
    second = [r.hops[0].decision.mcp_calls[1].duration_ms for r in records[1:]]
    print(f"\nMCP over {transport}: first call in a hop (opens the session): {[round(x, 1) for x in first]} ms; "
          f"second call (same session): {[round(x, 1) for x in second]} ms; "
          f"the function called directly: {statistics.median(direct):.2f} us")
    assert all(r.status is ChainStatus.COMPLETED for r in records)


class http_server:
    """tests/mcp_tool_server.py over streamable HTTP on a free port, for the block; its URL."""

    async def __aenter__(self) -> str:
        self.port = free_port()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, SERVER, "http", str(self.port),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not port_open(self.port):
            assert self.process.returncode is None and time.monotonic() < deadline, "the MCP server did not start"
            await asyncio.sleep(0.1)
        return f"http://127.0.0.1:{self.port}/mcp"

    async def __aexit__(self, *exc: object) -> None:
        self.process.kill()
        await self.process.wait()

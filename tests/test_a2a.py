"""handoff speaks A2A: the A2A SDK's own client against handoff's A2A server (chains as tasks,
cards from the registry, approvals as input, authentication), and handoff's remote-agent hop
against an A2A server built with the SDK's own server classes (`tests/a2a_peer.py`). All on
loopback, all real: the Temporal dev server, the chain worker, agents' workers, HTTP servers."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from uuid import UUID, uuid4

import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.client.card_resolver import parse_agent_card
from a2a.types import CancelTaskRequest, GetTaskRequest, Message, Part, Role, SendMessageRequest, TaskState
from google.protobuf import struct_pb2

from handoff import AgentCapability, ChainStatus, get_chain
from handoff.a2a_server import A2AServer
from handoff.http_auth import AuthRefused, BearerAuth
from handoff.server import free_port
from tests.support import cli, make_agent, running

pytestmark = pytest.mark.usefixtures("chains")


def message(text: str, data: dict | None = None, task_id: str = "", **metadata) -> Message:
    parts = [Part(text=text)]
    if data is not None:
        value = struct_pb2.Value()
        value.struct_value.update(data)
        parts.append(Part(data=value))
    msg = Message(role=Role.ROLE_USER, message_id=str(uuid4()), parts=parts, task_id=task_id)
    msg.metadata.update(metadata)
    return msg


async def a2a_client(url: str, *, streaming: bool = True, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await create_client(url, ClientConfig(streaming=streaming,
                                                 httpx_client=httpx.AsyncClient(timeout=30, headers=headers)))


async def events_of(client, msg: Message) -> list:
    return [event async for event in client.send_message(request=SendMessageRequest(message=msg))]


def state_events(events: list) -> list[int]:
    states = []
    for event in events:
        if event.HasField("task"):
            states.append(event.task.status.state)
        elif event.HasField("status_update"):
            states.append(event.status_update.status.state)
    return states


def get_json(url: str) -> tuple[int, dict | list]:
    """GET a URL (off the event loop: the server under test runs on it)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, {}


@pytest.fixture
async def a2a(client):
    server = await A2AServer(client, port=free_port()).start()
    try:
        yield server
    finally:
        await server.stop()


def relay(next_agent: str | None):
    async def handle(ctx):
        if next_agent:
            return ctx.handoff(to_agent=next_agent, task_description="go on", result_data={"by": ctx.to_agent})
        return ctx.complete({"by": ctx.to_agent, "summary": f"{ctx.to_agent} is done",
                             "seen": ctx.context_data.get("repo")})
    return handle


async def test_a_chain_started_from_the_a2a_client_is_the_task(client, uid, a2a, cli_env):
    first, second = f"a2a-first-{uid}", f"a2a-second-{uid}"
    async with running(client, make_agent(first, relay(second)), make_agent(second, relay(None)), register=True):
        peer = await a2a_client(a2a.url)
        events = await events_of(peer, message("review PR 9", {"repo": "r9"}, agent=first))
    task_id = next(e.task.id for e in events if e.HasField("task"))
    states = state_events(events)
    assert states[-1] != TaskState.TASK_STATE_REJECTED, events[-1]
    assert states[0] == TaskState.TASK_STATE_SUBMITTED and states[-1] == TaskState.TASK_STATE_COMPLETED
    assert TaskState.TASK_STATE_WORKING in states
    artifacts = [e.artifact_update.artifact for e in events if e.HasField("artifact_update")]
    assert [a.name for a in artifacts] == [f"hop 0: starter -> {first}", f"hop 1: {first} -> {second}"]
    # the A2A task id is the chain id: handoff show and the client API read the same chain
    record = await get_chain(client, task_id)
    assert record.chain_id == UUID(task_id) and record.status is ChainStatus.COMPLETED
    assert record.final_result["seen"] == "r9", "the data part became the chain's context"
    assert [str(h.handoff_id) for h in record.hops] == [a.artifact_id for a in artifacts]
    shown = await cli(cli_env, "show", task_id, "--json")
    assert json.loads(shown.stdout)["chain_id"] == task_id
    # GetTask reads the chain from Temporal: state, results as artifacts, the message as history
    task = await peer.get_task(request=GetTaskRequest(id=task_id))
    assert task.status.state == TaskState.TASK_STATE_COMPLETED and task.metadata["handoff_status"] == "completed"
    assert [a.artifact_id for a in task.artifacts] == [a.artifact_id for a in artifacts]
    assert task.history[0].parts[0].text == "review PR 9"


async def test_cancel_through_a2a_cancels_the_chain_and_its_hop(client, uid, a2a):
    slow = f"a2a-slow-{uid}"
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work(ctx):
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return ctx.complete({})

    async with running(client, make_agent(slow, work)):
        peer = await a2a_client(a2a.url, streaming=False)
        request = SendMessageRequest(message=message("take your time", agent=slow))
        request.configuration.return_immediately = True
        [reply] = [event async for event in peer.send_message(request=request)]
        task_id = reply.task.id
        await asyncio.wait_for(started.wait(), 15)
        task = await peer.cancel_task(request=CancelTaskRequest(id=task_id))
        await asyncio.wait_for(cancelled.wait(), 15)
    assert task.status.state == TaskState.TASK_STATE_CANCELED
    record = await get_chain(client, task_id)
    assert record.status is ChainStatus.CANCELLED and record.hops[0].status.value == "cancelled"


async def test_cards_follow_the_registry(client, uid, a2a):
    audit = make_agent(f"a2a-audit-{uid}", relay(None), [AgentCapability.SECURITY_AUDIT])

    async def fetch(path: str) -> tuple[int, dict | list]:
        return await asyncio.to_thread(get_json, f"{a2a.url}{path}")

    async def eventually(path: str, status: int, timeout: float = 10) -> None:
        for _ in range(int(timeout / 0.2)):
            if (await fetch(path))[0] == status:
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"{path} did not answer {status} within {timeout:g}s")

    card_path = f"/agents/{audit.id}/.well-known/agent-card.json"
    async with running(client, audit, register=True):
        await eventually(card_path, 200)
        card = parse_agent_card((await fetch(card_path))[1])  # the SDK's own model of a card
        assert card.name == audit.name and [s.id for s in card.skills] == ["SECURITY_AUDIT"]
        assert card.supported_interfaces[0].url == f"{a2a.url}/agents/{audit.id}"
        own = parse_agent_card((await fetch("/.well-known/agent-card.json"))[1])
        assert "SECURITY_AUDIT" in [s.id for s in own.skills]
        assert any(a["agent_id"] == audit.id and a["live"] for a in (await fetch("/agents"))[1])
        # a message to the agent's own endpoint starts a chain there, no metadata needed
        peer = await create_client(card)
        events = await events_of(peer, message("audit this"))
        assert state_events(events)[-1] == TaskState.TASK_STATE_COMPLETED
    # deregistered on the way out: its card is gone within seconds
    await eventually(card_path, 404)


async def test_a_chain_waiting_for_approval_is_input_required_and_a_message_approves_it(client, uid, a2a):
    first, gate = f"a2a-first-{uid}", f"a2a-gate-{uid}"
    async with running(client, make_agent(first, relay(gate)), make_agent(gate, relay(None))):
        peer = await a2a_client(a2a.url)
        events = await events_of(peer, message("ship it", agent=first, policy={"approval_required": [gate]}))
        assert state_events(events)[-1] == TaskState.TASK_STATE_INPUT_REQUIRED
        task_id = next(e.task.id for e in events if e.HasField("task"))
        wrong = await events_of(peer, message("maybe", task_id=task_id))
        assert state_events(wrong)[-1] == TaskState.TASK_STATE_INPUT_REQUIRED, "an unclear answer is asked again"
        answered = await events_of(peer, message("approve: looks fine", task_id=task_id))
    assert state_events(answered)[-1] == TaskState.TASK_STATE_COMPLETED
    record = await get_chain(client, task_id)
    approval = record.hops[1].approval
    assert (approval.decision, approval.by, approval.comment) == ("approved", "a2a:loopback", "looks fine")


async def test_a_message_the_chain_cannot_take_is_rejected_with_the_reason(client, a2a):
    peer = await a2a_client(a2a.url)
    events = await events_of(peer, message("no target given"))
    final = events[-1].status_update.status
    assert final.state == TaskState.TASK_STATE_REJECTED
    assert "exactly one of an agent" in final.message.parts[0].text
    bad = await events_of(peer, message("t", agent="x", policy={"max_depth": 99}))
    assert state_events(bad)[-1] == TaskState.TASK_STATE_REJECTED


async def test_with_tokens_everything_but_the_cards_needs_one(client, uid):
    token = f"secret-{uid}"
    server = await A2AServer(client, port=free_port(), auth=BearerAuth(tokens=(token,))).start()
    try:
        card = parse_agent_card((await asyncio.to_thread(get_json, f"{server.url}/.well-known/agent-card.json"))[1])
        assert "bearer" in card.security_schemes
        request = urllib.request.Request(f"{server.url}/", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(urllib.request.urlopen, request)
        assert refused.value.code == 401
        with pytest.raises(Exception):
            await events_of(await a2a_client(server.url, token="wrong"), message("t", agent="a"))
        peer = await a2a_client(server.url, token=token)
        events = await events_of(peer, message("no target"))
        assert state_events(events)[-1] == TaskState.TASK_STATE_REJECTED, "authenticated: the request got in"
    finally:
        await server.stop()
    with pytest.raises(AuthRefused, match="beyond loopback"):
        A2AServer(client, host="0.0.0.0", port=free_port())

"""handoff speaks A2A: the A2A SDK's own client against handoff's A2A server (chains as tasks,
cards from the registry, approvals as input, authentication), and handoff's remote-agent hop
against an A2A server built with the SDK's own server classes (`tests/a2a_peer.py`). All on
loopback, all real: the Temporal dev server, the chain worker, agents' workers, HTTP servers."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from uuid import UUID, uuid4

import httpx
import pytest
from a2a.client import ClientConfig, create_client
from a2a.client.card_resolver import parse_agent_card
from a2a.types import CancelTaskRequest, GetTaskRequest, Message, Part, Role, SendMessageRequest, TaskState
from google.protobuf import struct_pb2

from handoff import AgentCapability, ChainStatus, HopStatus, get_chain, run_chain, start_chain, wait_chain
from handoff.agents.remote import remote_agent
from handoff.a2a.server import A2AServer
from handoff.servers.http import AuthRefused, BearerAuth
from handoff.servers.embedded import free_port
from tests.support import HANDOFF, ROOT, assert_usage_error, cli, make_agent, running, wait_live

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
    assert (approval.decision, approval.by, approval.comment) == ("approved", "a2a:local", "looks fine")


async def test_a_follow_up_message_on_a_running_task_steers_its_next_hop(client, uid, a2a):
    """A follow-up while the chain runs, and while a stream still follows the task: its text
    reaches the chain's next hop as steering at once."""
    first, second = f"a2a-held-{uid}", f"a2a-next-{uid}"
    started, release = asyncio.Event(), asyncio.Event()
    chains: list[str] = []
    heard: list = []

    async def held(ctx):
        chains.append(str(ctx.chain_id))
        started.set()
        await release.wait()
        return ctx.handoff(to_agent=second, task_description="go on")

    async def last(ctx):
        heard.extend(ctx.steering)
        return ctx.complete({"by": ctx.to_agent})

    async with running(client, make_agent(first, held), make_agent(second, last)):
        run = asyncio.create_task(events_of(await a2a_client(a2a.url), message("deploy it", agent=first)))
        await asyncio.wait_for(started.wait(), 20)
        answer = await asyncio.wait_for(events_of(await a2a_client(a2a.url), message("use staging", task_id=chains[0])), 10)
        assert _steered(await client.get_workflow_handle(chains[0]).fetch_history())
        release.set()
        events = await asyncio.wait_for(run, 30)
    assert answer[0].task.id == chains[0] and answer[0].task.status.state == TaskState.TASK_STATE_WORKING
    assert state_events(events)[-1] == TaskState.TASK_STATE_COMPLETED
    assert [(s.message, s.by) for s in heard] == [("use staging", "a2a:local")]
    record = await get_chain(client, chains[0])
    assert record.hops[1].steering[0].message == "use staging"


def _steered(history) -> bool:
    """Whether the chain's history holds an accepted steer Update."""
    return any(e.HasField("workflow_execution_update_accepted_event_attributes")
               and e.workflow_execution_update_accepted_event_attributes.accepted_request.input.name == "steer"
               for e in history.events)


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


# -- remote A2A agents as hops ---------------------------------------------------------------


@pytest.fixture
def peer(tmp_path):
    """Start `tests/a2a_peer.py` servers (A2A agents built with the SDK, not handoff); all are
    killed at the end. Returns (process, url) once the peer serves its card."""
    processes: list[subprocess.Popen] = []

    async def start(*args: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "tests.a2a_peer", "--port", str(port),
                                    "--marks", str(tmp_path), *args], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        for _ in range(150):
            if (await asyncio.to_thread(get_card_status, url)) == 200:
                return process, url
            assert process.poll() is None, "the A2A peer exited"
            await asyncio.sleep(0.1)
        raise AssertionError("the A2A peer did not start")

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def get_card_status(url: str) -> int:
    try:
        return get_json(f"{url}/.well-known/agent-card.json")[0]
    except OSError:
        return 0


def analysis(next_agent: str):
    async def handle(ctx):
        return ctx.handoff(to_agent=next_agent, task_description="plan the tests for the parser",
                           result_data={"findings": 2}, context_data={"file": "parser.py"})
    return handle


async def test_a_chain_goes_through_a_remote_a2a_agent_and_on(client, uid, peer):
    _, url = await peer()
    ana, tst = f"ana-{uid}", f"tst-{uid}"
    remote = remote_agent(url, id=f"planner-{uid}", capabilities=[AgentCapability.TESTING], then=tst)
    seen: list = []

    async def test_it(ctx):
        seen.append(ctx)
        return ctx.complete({"tested": True})

    async with running(client, make_agent(ana, analysis(remote.id)), remote, make_agent(tst, test_it)):
        record = await run_chain(client, to_agent=ana, task_description="review the parser")
    assert record.status is ChainStatus.COMPLETED, record.error
    assert [h.to_agent for h in record.hops] == [ana, remote.id, tst]
    result = record.hops[1].result_data
    assert result["data"]["by"] == "a2a-peer" and result["data"]["context_keys"] == ["file"]
    assert result["data"]["earlier_results"] == 1 and result["artifacts"] == ["test plan"]
    assert "planned: plan the tests for the parser" in result["text"]
    assert seen[0].previous_results[-1] == result, "the remote agent's result goes on down the chain"


async def test_a_remote_agents_reported_usage_counts_in_the_chains_budget(client, uid, peer):
    usage = {"model": "remote-model", "prompt_tokens": 40, "completion_tokens": 2, "model_calls": 1, "cost": 0.25}
    _, url = await peer("--usage", json.dumps(usage))
    remote = remote_agent(url, id=f"spender-{uid}", capabilities=[AgentCapability.TESTING])
    async with running(client, remote):
        record = await run_chain(client, to_agent=remote.id, task_description="plan",
                                 policy={"budget": {"max_tokens": 1000}})
    assert record.status is ChainStatus.COMPLETED, record.error
    spent = record.hops[0].usage
    assert (spent.prompt_tokens, spent.completion_tokens, spent.model_calls, spent.cost) == (40, 2, 1, 0.25)
    assert record.usage.by_model["remote-model"].prompt_tokens == 40


@pytest.mark.parametrize("args, reason", [(("--fail", "no budget left"), "ended failed: no budget left"),
                                          (("--ask", "which branch?"), "asks for input")])
async def test_a_remote_failure_or_question_fails_the_hop_deliberately(client, uid, peer, args, reason):
    _, url = await peer(*args)
    remote = remote_agent(url, id=f"planner-{uid}", capabilities=[AgentCapability.TESTING])
    async with running(client, remote):
        record = await run_chain(client, to_agent=remote.id, task_description="plan")
    assert record.status is ChainStatus.FAILED
    assert record.hops[0].attempts == 1 and reason in record.hops[0].error


async def test_killing_the_remote_agent_mid_hop_falls_back_to_another_agent(client, uid, peer, tmp_path):
    process, url = await peer("--delay", "5")
    ana, tst, backup = f"ana-{uid}", f"tst-{uid}", f"backup-{uid}"
    remote = remote_agent(url, id=f"planner-{uid}", capabilities=[AgentCapability.TESTING], then=tst, poll_s=0.2)

    async def plan_locally(ctx):
        return ctx.handoff(to_agent=tst, task_description="test it", result_data={"planned_by": ctx.to_agent})

    async def test_it(ctx):
        return ctx.complete({"tested": True})

    # the remote agent and the backup plan tests (TESTING); the others do something else
    agents = [make_agent(ana, analysis(remote.id), [AgentCapability.CODE_ANALYSIS]), remote,
              make_agent(tst, test_it, [AgentCapability.DEPLOYMENT]), make_agent(backup, plan_locally)]
    async with running(client, *agents, register=True):
        chain_id = await start_chain(client, to_agent=ana, task_description="review the parser",
                                     policy={"retry_initial_s": 0.2, "max_attempts": 2})
        for _ in range(100):  # the remote agent has the task: kill it mid-hop
            if list(tmp_path.glob("peer-started-*")):
                break
            await asyncio.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        record = await asyncio.wait_for(wait_chain(client, chain_id), 60)
    assert record.status is ChainStatus.COMPLETED, record.error
    assert [(h.to_agent, h.status, h.fallback_for) for h in record.hops] == [
        (ana, HopStatus.COMPLETED, None), (remote.id, HopStatus.FAILED, None),
        (backup, HopStatus.COMPLETED, remote.id), (tst, HopStatus.COMPLETED, None)]
    assert record.hops[1].attempts == 2 and "unavailable" in record.hops[1].error


# -- the command line ---------------------------------------------------------------------------


async def test_handoff_a2a_server_serves_and_refuses_to_listen_wide_open(cli_env):
    refused = await cli(cli_env, "a2a-server", "--host", "0.0.0.0", "--port", str(free_port()))
    assert_usage_error(refused, "beyond loopback")
    port, grpc_port = free_port(), free_port()
    server = subprocess.Popen([HANDOFF, "a2a-server", "--port", str(port), "--grpc-port", str(grpc_port)], env=cli_env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for _ in range(100):
            if (await asyncio.to_thread(get_card_status, f"http://127.0.0.1:{port}")) == 200:
                break
            await asyncio.sleep(0.1)
        status, card = await asyncio.to_thread(get_json, f"http://127.0.0.1:{port}/.well-known/agent-card.json")
        assert status == 200 and parse_agent_card(card).name == "handoff"
        grpc = next(i for i in card["supportedInterfaces"] if i["protocolBinding"] == "GRPC")
        assert grpc["url"] == f"127.0.0.1:{grpc_port}"
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=15)
    assert server.returncode == 0 and f"A2A server on http://127.0.0.1:{port}" in output
    assert f"gRPC on 127.0.0.1:{grpc_port}" in output


async def test_handoff_worker_serves_a_remote_a2a_agent(client, uid, cli_env, peer):
    _, url = await peer()
    agent_id = f"remote-{uid}"
    worker = subprocess.Popen([HANDOFF, "worker", "--a2a", url, "--a2a-id", agent_id, "--capability", "TESTING"],
                              env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await wait_live(client, {agent_id}, timeout_s=30)
        record = await run_chain(client, capability="TESTING", task_description="plan the release tests",
                                 policy={"allowed_handoffs": {"starter": [agent_id]}})
    finally:
        worker.terminate()
        worker.wait(timeout=15)
    assert record.status is ChainStatus.COMPLETED and record.hops[0].to_agent == agent_id
    assert record.final_result["data"]["by"] == "a2a-peer"


@pytest.mark.parametrize("args, fragment", [
    (["--a2a", "ftp://example", "--a2a-id", "x", "--capability", "TESTING"], "http(s) URL"),
    (["--a2a", "http://127.0.0.1:1", "--capability", "TESTING"], "--a2a-id"),
    (["--a2a", "http://127.0.0.1:1", "--a2a-id", "Bad Id", "--capability", "TESTING"], "invalid agent id"),
    (["--a2a", "http://127.0.0.1:1", "--a2a-id", "x", "--capability", "WIZARDRY"], "unknown capability"),
    (["--chains", "--capability", "TESTING"], "go with --a2a"),
])
async def test_handoff_worker_a2a_refuses_bad_input_in_one_line(cli_env, args, fragment):
    assert_usage_error(await cli(cli_env, "worker", *args), fragment)


async def test_cards_carry_an_etag_and_cache_control_and_answer_304_when_unchanged(client, uid, a2a):
    agent = f"cached-{uid}"
    async with running(client, make_agent(agent, relay(None)), register=True):
        await wait_live(client, {agent})
        async with httpx.AsyncClient(timeout=10) as http:
            for path in ("/.well-known/agent-card.json", f"/agents/{agent}/.well-known/agent-card.json"):
                first = await http.get(f"{a2a.url}{path}")
                assert first.status_code == 200 and first.headers["cache-control"] == "no-cache", path
                etag = first.headers["etag"]
                again = await http.get(f"{a2a.url}{path}", headers={"If-None-Match": etag})
                assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag, path
                other = await http.get(f"{a2a.url}{path}", headers={"If-None-Match": '"stale"'})
                assert other.status_code == 200 and parse_agent_card(other.json()).name, path


async def test_raw_json_rpc_gets_the_specs_codes_and_a_trailing_slash_is_served(client, uid, a2a):
    """A client built from the spec: TaskNotFound (-32001) for an id that names no chain, a
    UUID or not, in GetTask and CancelTask; the per-agent endpoint with a trailing slash works."""
    agent = f"slash-{uid}"
    headers = {"Content-Type": "application/json", "A2A-Version": "1.0"}

    def rpc(method: str, params: dict) -> dict:
        return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}

    async with running(client, make_agent(agent, relay(None)), register=True), httpx.AsyncClient(timeout=30) as http:
        for method in ("GetTask", "CancelTask"):
            for task_id in ("not-a-uuid", str(uuid4())):
                answer = (await http.post(f"{a2a.url}/", json=rpc(method, {"id": task_id}), headers=headers)).json()
                assert answer["error"]["code"] == -32001, (method, task_id, answer)
        send = rpc("SendMessage", {"message": {"messageId": str(uuid4()), "role": "ROLE_USER",
                                               "parts": [{"text": "through the slash"}]}})
        reply = await http.post(f"{a2a.url}/agents/{agent}/", json=send, headers=headers)
        assert reply.status_code == 200, (reply.status_code, reply.text)
        assert "task" in reply.json()["result"], reply.json()


async def test_the_rest_binding_runs_the_same_chain_as_json_rpc(client, uid, a2a):
    """The HTTP+JSON binding, declared on every card beside JSON-RPC, by raw requests: send a
    message to an agent's endpoint, read the task, and find the same chain `handoff show` reads."""
    first, second = f"rest-a-{uid}", f"rest-b-{uid}"
    headers = {"Content-Type": "application/json", "A2A-Version": "1.0"}
    async with running(client, make_agent(first, relay(second)), make_agent(second, relay(None)), register=True):
        await wait_live(client, {first, second})
        async with httpx.AsyncClient(timeout=30) as http:
            card = (await http.get(f"{a2a.url}/agents/{first}/.well-known/agent-card.json")).json()
            rest = next(i["url"] for i in card["supportedInterfaces"] if i["protocolBinding"] == "HTTP+JSON")
            assert rest == f"{a2a.url}/agents/{first}/rest"
            sent = await http.post(f"{rest}/message:send", headers=headers, json={"message": {
                "messageId": str(uuid4()), "role": "ROLE_USER", "parts": [{"text": "over rest"}]}})
            assert sent.status_code == 200, sent.text
            task_id = sent.json()["task"]["id"]
            record = await wait_chain(client, task_id)
            got = await http.get(f"{a2a.url}/rest/tasks/{task_id}", headers=headers)
            missing = await http.get(f"{a2a.url}/rest/tasks/{uuid4()}", headers=headers)
    assert record.status is ChainStatus.COMPLETED and [h.to_agent for h in record.hops] == [first, second]
    assert got.status_code == 200 and got.json()["status"]["state"] == "TASK_STATE_COMPLETED", got.text
    assert len(got.json()["artifacts"]) == 2
    assert missing.status_code == 404


async def test_list_tasks_shows_a_caller_its_own_tasks_filtered_and_in_pages(client, uid):
    """ListTasks from Temporal's visibility: each caller its own tasks (an operator every chain),
    by state and context, a page at a time; over JSON-RPC and REST alike."""
    agent = f"listed-{uid}"
    tokens = {"ann": f"ann-{uid}", "bob": f"bob-{uid}"}
    server = await A2AServer(client, port=free_port(), auth=BearerAuth(tokens=tuple(tokens.values()))).start()
    try:
        async with running(client, make_agent(agent, relay(None))):
            started: dict[str, list[str]] = {"ann": [], "bob": []}
            for who, count in (("ann", 3), ("bob", 1)):
                peer = await a2a_client(server.url, token=tokens[who], streaming=False)
                for n in range(count):
                    msg = message(f"task {n}", agent=agent)
                    msg.context_id = f"ctx-{who}-{n % 2}"
                    [reply] = [e async for e in peer.send_message(request=SendMessageRequest(message=msg))]
                    started[who].append(reply.task.id)
            for chain in started["ann"] + started["bob"]:
                await wait_chain(client, chain)

            async def listed(who: str, **params) -> dict:
                headers = {"Authorization": f"Bearer {tokens[who]}", "A2A-Version": "1.0"}
                async with httpx.AsyncClient(timeout=30) as http:
                    for _ in range(50):  # visibility is eventually consistent
                        body = (await http.post(f"{server.url}/", headers=headers, json={
                            "jsonrpc": "2.0", "id": 1, "method": "ListTasks", "params": params})).json()["result"]
                        if params or len(body.get("tasks", [])) >= len(started[who]):
                            return body
                        await asyncio.sleep(0.1)
                return body

            mine = await listed("ann")
            assert sorted(t["id"] for t in mine["tasks"]) == sorted(started["ann"]), "ann's, not bob's"
            assert all(t["status"]["state"] == "TASK_STATE_COMPLETED" for t in mine["tasks"])
            by_context = await listed("ann", contextId="ctx-ann-0")
            assert len(by_context["tasks"]) == 2
            first = await listed("ann", pageSize=2)
            second = await listed("ann", pageSize=2, pageToken=first["nextPageToken"])
            assert len(first["tasks"]) == 2 and len(second["tasks"]) == 1 and not second.get("nextPageToken")
            assert {t["id"] for t in first["tasks"] + second["tasks"]} == set(started["ann"])
            assert (await listed("ann", status="TASK_STATE_WORKING")).get("tasks", []) == []
            with_artifacts = await listed("ann", includeArtifacts=True, pageSize=1)
            assert with_artifacts["tasks"][0]["artifacts"]
            async with httpx.AsyncClient(timeout=30) as http:
                rest = (await http.get(f"{server.url}/rest/tasks", headers={
                    "Authorization": f"Bearer {tokens['bob']}", "A2A-Version": "1.0"})).json()
            assert [t["id"] for t in rest["tasks"]] == started["bob"]
    finally:
        await server.stop()


async def test_a_client_of_a2a_0_3_is_served_beside_1_0(client, uid, a2a):
    """A 0.3 client (its method names, no A2A-Version header) runs the same chain."""
    agent = f"old-client-{uid}"
    async with running(client, make_agent(agent, relay(None))), httpx.AsyncClient(timeout=30) as http:
        reply = await http.post(f"{a2a.url}/agents/{agent}", headers={"Content-Type": "application/json"}, json={
            "jsonrpc": "2.0", "id": 7, "method": "message/send",
            "params": {"message": {"kind": "message", "messageId": str(uuid4()), "role": "user",
                                   "parts": [{"kind": "text", "text": "from an older client"}]}}})
        assert reply.status_code == 200, reply.text
        result = reply.json()["result"]
        assert result.get("kind") == "task" or "id" in result, result
        record = await wait_chain(client, result["id"])
    assert record.status is ChainStatus.COMPLETED and record.hops[0].to_agent == agent

"""The doors hold against attack, each finding of a review as a test against the real servers:
the A2A server (Host and Origin, who may see and decide whose chains, body and in-flight bounds,
following only while someone listens, cards behind authentication), remote A2A agents (a reply
too large, a card naming another endpoint, no chain id handed out), an LLM's tool arguments, and
policies no deployment can carry. The payload store's, the registry's and the test bed's are in
tests/test_storage.py, tests/test_registry.py and tests/test_hosts.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from uuid import uuid4

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from temporalio.client import Client, Interceptor, OutboundInterceptor, QueryWorkflowInput, WorkflowHistory

from handoff import AgentCapability, ChainStatus, HopStatus, InvalidRequest, get_chain, run_chain, start_chain, wait_chain
from handoff.a2a.server import A2AServer
from handoff.a2a.tasks import STATE_OF, chain_task
from handoff.agents.remote import MAX_REPLY_BYTES, _message, remote_agent
from handoff.client.audit import record_from_history
from handoff.client.search import find_chains
from handoff.constants import CHAIN_WORKFLOW, MAX_CONTEXT_BYTES, MAX_EXTERNAL_CONTEXT_BYTES
from handoff.models import HandoffContext
from handoff.servers.embedded import free_port
from handoff.servers.http import BearerAuth, Principal
from handoff.testing import ScriptedModel, call
from handoff.agents.llm import llm_agent
from tests.support import HANDOFF, make_agent, running
from tests import test_a2a

pytestmark = pytest.mark.usefixtures("chains")
peer = test_a2a.peer  # the fixture starting A2A agents built with the SDK's own server (tests/a2a_peer.py)

OPERATOR = Principal("operator", operator=True)


def rpc(method: str, params: dict) -> dict:
    return {"jsonrpc": "2.0", "id": str(uuid4()), "method": method, "params": params}


def send_params(text: str, **metadata) -> dict:
    return {"message": {"messageId": str(uuid4()), "role": "ROLE_USER", "parts": [{"text": text}],
                        "metadata": metadata}, "configuration": {"returnImmediately": True}}


async def post(url: str, body: dict | bytes, *, token: str | None = None, **headers: str) -> httpx.Response:
    headers = {"Content-Type": "application/json", "A2A-Version": "1.0", **headers}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx.AsyncClient(timeout=60) as http:
        return await http.post(url, content=content, headers=headers)


def completing(ctx_seen: list | None = None):
    async def handle(ctx):
        if ctx_seen is not None:
            ctx_seen.append(ctx)
        return ctx.complete({"by": ctx.to_agent})
    return handle


def waiting_for(event: asyncio.Event):
    async def handle(ctx):
        await event.wait()
        return ctx.complete({"by": ctx.to_agent})
    return handle


# -- the A2A server's doors ------------------------------------------------------------------


async def test_a_page_reached_by_dns_rebinding_is_refused_before_anything_runs(client, uid):
    agent = make_agent(f"rebind-{uid}", completing())
    server = await A2AServer(client, port=free_port()).start()
    try:
        async with running(client, agent, register=True):
            foreign = {"Host": "attacker.example:80", "Origin": "http://attacker.example"}
            refused = await post(f"{server.url}/", rpc("SendMessage", send_params("t", agent=agent.id)), **foreign)
            card = await asyncio.to_thread(httpx.get, f"{server.url}/.well-known/agent-card.json", headers=foreign)
            origin_only = await post(f"{server.url}/", rpc("SendMessage", send_params("t", agent=agent.id)),
                                     Origin="http://attacker.example")
            assert (refused.status_code, card.status_code, origin_only.status_code) == (403, 403, 403)
            assert "access-control-allow-origin" not in refused.headers
            found = [r async for r in client.list_workflows(f"WorkflowType = '{CHAIN_WORKFLOW}' AND "
                                                            f"HandoffAgents = '{agent.id}'")]
            assert found == [], "nothing was started"
            # the server's own name, and no browser origin: served
            served = await post(f"{server.url}/", rpc("SendMessage", send_params("t", agent=agent.id)))
            assert served.status_code == 200 and "result" in served.json(), served.text
    finally:
        await server.stop()


async def test_a_caller_sees_and_decides_only_its_own_chains_and_an_operator_every_one(client, uid):
    release = asyncio.Event()
    slow, gated = f"own-slow-{uid}", f"own-gated-{uid}"
    tokens = (f"alice-{uid}", f"bob-{uid}")
    server = await A2AServer(client, port=free_port(), auth=BearerAuth(
        tokens=tokens, operator_tokens=(f"ops-{uid}",))).start()
    alice, bob, ops = tokens[0], tokens[1], f"ops-{uid}"
    try:
        async with running(client, make_agent(slow, waiting_for(release)), make_agent(gated, completing()),
                           register=True):
            started = await post(f"{server.url}/", rpc("SendMessage", send_params("t", agent=slow)), token=alice)
            task_id = started.json()["result"]["task"]["id"]
            policy = {"approval_required": [gated]}
            waiting = await post(f"{server.url}/", rpc("SendMessage", send_params("t", agent=gated, policy=policy)),
                                 token=alice)
            waiting_id = waiting.json()["result"]["task"]["id"]
            by_api = await start_chain(client, to_agent=slow, task_description="started by the client API")

            async def get(task: str, token: str) -> dict:
                return (await post(f"{server.url}/", rpc("GetTask", {"id": task}), token=token)).json()

            assert (await get(task_id, alice))["result"]["id"] == task_id
            for task in (task_id, str(by_api)):  # bob: the task does not exist for him
                assert (await get(task, bob))["error"]["code"] == -32001
            assert (await get(str(by_api), alice))["error"]["code"] == -32001, "the client API's chain"
            cancel = await post(f"{server.url}/", rpc("CancelTask", {"id": task_id}), token=bob)
            assert cancel.json()["error"]["code"] == -32001
            for _ in range(50):  # the gated chain waits for a person before bob tries to approve it
                if (await get_chain(client, waiting_id)).status is ChainStatus.AWAITING_APPROVAL:
                    break
                await asyncio.sleep(0.1)
            follow_up = send_params("approve")
            follow_up["message"]["taskId"] = waiting_id
            approved = await post(f"{server.url}/", rpc("SendMessage", follow_up), token=bob)
            assert "error" in approved.json(), approved.text
            assert (await get_chain(client, waiting_id)).status is ChainStatus.AWAITING_APPROVAL
            assert (await get_chain(client, task_id)).status is ChainStatus.RUNNING, "bob cancelled nothing"
            # the operator sees every chain, the client API's too, and may decide them
            assert (await get(str(by_api), ops))["result"]["id"] == str(by_api)
            assert (await get(task_id, ops))["result"]["id"] == task_id
            by_ops = await post(f"{server.url}/", rpc("SendMessage", follow_up), token=ops)
            assert "error" not in by_ops.json(), by_ops.text
            record = await asyncio.wait_for(wait_chain(client, waiting_id), 30)
            assert record.status is ChainStatus.COMPLETED and record.hops[0].approval.by == "a2a:operator-1"
            release.set()
            await asyncio.wait_for(wait_chain(client, by_api), 30)
    finally:
        release.set()
        await server.stop()


async def test_remote_agents_are_not_handed_the_chain_id():
    ctx = HandoffContext(chain_id=uuid4(), to_agent="planner", task_description="plan")
    metadata = dict(_message(ctx).metadata)
    assert str(ctx.chain_id) not in json.dumps(metadata) and metadata["handoffId"] == str(ctx.handoff_id)


async def test_with_tokens_on_no_agent_card_but_the_public_one_answers_without_a_token(client, uid):
    agent = make_agent(f"carded-{uid}", completing())
    token = f"t-{uid}"
    server = await A2AServer(client, port=free_port(), auth=BearerAuth(tokens=(token,))).start()
    try:
        async with running(client, agent, register=True):
            def get(path: str, **headers) -> int:
                return httpx.get(f"{server.url}{path}", headers=headers).status_code

            card = "/.well-known/agent-card.json"
            statuses = await asyncio.gather(*(asyncio.to_thread(get, p) for p in (
                f"/agents/{agent.id}{card}", f"/agents/nobody-{uid}{card}", "/agents", card)))
            assert statuses == [401, 401, 401, 200], "registered or not: the same answer without a token"
            with_token = await asyncio.to_thread(get, f"/agents/{agent.id}{card}", Authorization=f"Bearer {token}")
            assert with_token == 200
    finally:
        await server.stop()


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (await asyncio.to_thread(httpx.get, url, timeout=2)).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


async def test_the_a2a_server_bounds_a_body_and_keeps_nothing_of_what_it_refused(cli_env):
    port = free_port()
    # no external payload storage: a body may hold a context of 1.9 MB (and its envelope)
    server = subprocess.Popen([HANDOFF, "a2a-server", "--port", str(port)], env={**cli_env, "HANDOFF_PAYLOAD_DIR": "off"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"{url}/.well-known/agent-card.json")
        await post(f"{url}/", rpc("SendMessage", send_params("warm up", agent="a")))  # a message's own cost
        before = peak_rss_kb(server.pid)
        big = json.dumps(rpc("SendMessage", send_params("x" * (36 * 1024 * 1024), agent="a"))).encode()
        answers = [await post(f"{url}/", big) for _ in range(6)]

        async def chunks():  # no Content-Length: counted as it arrives
            for _ in range(36):
                yield b"x" * (1024 * 1024)

        async with httpx.AsyncClient(timeout=60) as http:
            streamed = await http.post(f"{url}/", content=chunks(), headers={"Content-Type": "application/json"})
        grown_mb = (peak_rss_kb(server.pid) - before) / 1024
    finally:
        server.terminate()
        server.wait(timeout=15)
    assert [a.status_code for a in answers] == [413] * 6 and streamed.status_code == 413
    assert "over" in answers[0].json()["error"]
    print(f"a2a server peak RSS grew {grown_mb:.1f} MB over six refused 36 MB messages and one streamed")
    assert grown_mb < 16, f"the server kept what it refused ({grown_mb:.0f} MB)"


class CountedQueries(Interceptor):
    """Counts the chain queries a client sends (an interceptor of the SDK's, on a real client)."""

    def __init__(self) -> None:
        self.queries = 0

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        counter = self

        class Counting(OutboundInterceptor):
            async def query_workflow(self, input: QueryWorkflowInput):
                counter.queries += 1
                return await super().query_workflow(input)

        return Counting(next)


async def test_nobody_listening_stops_the_following_and_each_caller_has_a_bound_in_flight(client, uid):
    release = asyncio.Event()
    slow = make_agent(f"abandoned-{uid}", waiting_for(release))
    counted = CountedQueries()
    watched = Client(client.service_client, namespace=client.namespace, data_converter=client.data_converter,
                     interceptors=[counted])
    server = await A2AServer(watched, port=free_port()).start()
    try:
        async with running(client, slow, register=True):
            blocking = {**send_params("wait for it", agent=slow.id), "configuration": {"returnImmediately": False}}

            async def abandon() -> None:
                async with httpx.AsyncClient(timeout=1.5) as http:
                    with pytest.raises(httpx.ReadTimeout):  # the caller gives up and disconnects
                        await http.post(f"{server.url}/", json=rpc("SendMessage", blocking),
                                        headers={"A2A-Version": "1.0"})

            await asyncio.gather(*(abandon() for _ in range(10)))
            await asyncio.sleep(2)  # the followers notice nobody listens
            quiet_from = counted.queries
            await asyncio.sleep(3)
            after = counted.queries - quiet_from
            # one caller, more requests at once than it may have in flight
            async with httpx.AsyncClient(timeout=30) as http:
                answers = await asyncio.gather(*(http.post(f"{server.url}/", json=rpc("SendMessage", blocking),
                                                           headers={"A2A-Version": "1.0"}, timeout=3)
                                                 for _ in range(24)), return_exceptions=True)
            statuses = [a.status_code for a in answers if isinstance(a, httpx.Response)]
    finally:
        release.set()
        await server.stop()
    print(f"queries in 3 s after 10 callers disconnected: {after}")
    assert after <= 3, f"{after} queries in 3 s with nobody listening"
    assert statuses.count(429) >= 24 - 16, statuses


# -- remote A2A agents ------------------------------------------------------------------------


async def test_a_remote_agents_reply_too_large_fails_its_hop_unretried_with_bounded_memory(client, uid, peer, cli_env):
    _, url = await peer("--reply-mb", "60")
    agent_id = f"big-{uid}"
    worker = subprocess.Popen([HANDOFF, "worker", "--a2a", url, "--a2a-id", agent_id, "--capability", "TESTING"],
                              env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from tests.support import wait_live

        await wait_live(client, {agent_id}, timeout_s=30)
        before = peak_rss_kb(worker.pid)
        record = await asyncio.wait_for(run_chain(client, to_agent=agent_id, task_description="plan",
                                                  policy={"retry_initial_s": 0.1}), 120)
        grown_mb = (peak_rss_kb(worker.pid) - before) / 1024
    finally:
        worker.terminate()
        worker.wait(timeout=20)
    assert record.status is ChainStatus.FAILED
    [hop] = record.hops
    assert hop.status is HopStatus.FAILED and hop.attempts == 1, "not retried"
    assert f"over {MAX_REPLY_BYTES:,} bytes" in hop.error, hop.error
    print(f"agent worker peak RSS grew {grown_mb:.1f} MB on a 60 MB reply")
    assert grown_mb < 60, f"the worker read the reply whole ({grown_mb:.0f} MB)"


async def test_a_remote_card_naming_an_endpoint_elsewhere_gets_no_context_and_no_token(client, uid, peer,
                                                                                      monkeypatch):
    seen: list[bytes] = []

    async def elsewhere(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.read(65536))
        writer.close()

    trap = await asyncio.start_server(elsewhere, "127.0.0.1", 0)
    trap_port = trap.sockets[0].getsockname()[1]
    monkeypatch.setenv(f"PEER_TOKEN_{uid}", "do-not-leak")
    _, url = await peer("--card-endpoint", f"http://127.0.0.1:{trap_port}/")
    remote = remote_agent(url, id=f"pinned-{uid}", capabilities=[AgentCapability.TESTING],
                          token_env=f"PEER_TOKEN_{uid}")
    try:
        async with running(client, remote):
            record = await run_chain(client, to_agent=remote.id, task_description="plan",
                                     context_data={"secret": "context"})
    finally:
        trap.close()
    assert record.status is ChainStatus.FAILED and record.hops[0].attempts == 1
    assert "other origins only" in record.hops[0].error, record.hops[0].error
    assert seen == [], "nothing reached the other endpoint"


# -- an LLM's tool arguments ----------------------------------------------------------------


async def test_tool_arguments_over_the_bounds_go_back_to_the_model_and_never_into_the_record(client, uid):
    done = make_agent(f"done-{uid}", completing())
    target = f"transfer_to_{done.id.replace('-', '_')}"
    deep: object = "x"
    for _ in range(220):
        deep = [deep]
    replies = [call(target, task="t", reason=deep), call(target, task="t", reason="y" * 1_500_000),
               call(target, task="audit it", reason="fine")]

    async with ScriptedModel(lambda request, n: replies[min(n, 3) - 1]) as model:
        lead = llm_agent(id=f"lead-{uid}", name="Lead", capabilities=[AgentCapability.CODE_ANALYSIS],
                         instructions="route", model="scripted", base_url=model.url, api_key="t")
        async with running(client, lead, done, register=True):
            first = await run_chain(client, to_agent=lead.id, task_description="route it")
    # two misses in one hop fail it deliberately (the model was told each time); nothing huge kept
    assert first.status is ChainStatus.FAILED, first.error
    hop = first.hops[0]
    assert "nests more than 64 levels deep" in model.requests[1]["messages"][-1]["content"]
    assert "characters, over the" in hop.error, hop.error
    assert len(first.model_dump_json()) < 100_000, "the oversized arguments are not in the record"


# -- policies no deployment can carry ----------------------------------------------------------


async def test_a_policy_cannot_raise_the_context_limit_past_what_the_deployment_carries(client):
    assert client.data_converter.external_storage is None  # this client stores nothing externally
    with pytest.raises(InvalidRequest, match="this deployment can carry"):
        await start_chain(client, to_agent="a", task_description="t",
                          policy={"max_context_bytes": MAX_EXTERNAL_CONTEXT_BYTES})


async def test_a_chain_whose_end_is_not_recorded_reads_as_running(client, uid):
    """A chain whose last workflow task, the one that ends it, has not completed (it failed, say
    on a result the server refused, or it runs now) is running as far as Temporal is concerned:
    its record, rebuilt from that history, says so, and why; it never claims an end that `handoff
    list` and A2A's GetTask, which read the server's status, would contradict."""
    agents = [make_agent(f"ends{i}-{uid}", completing_with(10)) for i in range(2)]
    async with running(client, *agents):
        record = await run_chain(client, to_agent=agents[0].id, task_description="end",
                                 context_data={"next": [agents[1].id]})
    assert record.status is ChainStatus.COMPLETED
    history = await client.get_workflow_handle(str(record.chain_id)).fetch_history()
    last_task = max(i for i, e in enumerate(history.events) if e.HasField("workflow_task_started_event_attributes"))
    unfinished = WorkflowHistory(history.workflow_id, history.events[: last_task + 1])
    shown = await record_from_history(unfinished, client.data_converter)
    assert shown.status is ChainStatus.RUNNING and shown.completed_at is None
    assert "its end (completed) is not recorded" in shown.error
    assert [h.status for h in shown.hops] == [HopStatus.COMPLETED, HopStatus.COMPLETED]


def completing_with(size: int):
    async def handle(ctx):
        later = ctx.context_data.get("next", [])
        if ctx.chain_depth < len(later):
            return ctx.handoff(to_agent=later[ctx.chain_depth], task_description=f"again {ctx.chain_depth}",
                               result_data={"blob": "x" * size})
        return ctx.complete({"blob": "y" * size})
    return handle


STATUSES_BY_TASK_STATE = {state: {s for s, t in STATE_OF.items() if t == state} for state in STATE_OF.values()}


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
          phases=[Phase.explicit, Phase.generate])  # each example is a real chain: no shrinking
@given(limit=st.sampled_from([None, 2_000, 600_000, MAX_CONTEXT_BYTES, MAX_EXTERNAL_CONTEXT_BYTES]),
       context_kb=st.sampled_from([0, 1, 500, 1_700, 2_500]),
       result_kb=st.sampled_from([0, 1, 900, 1_800, 2_600]),
       hops=st.integers(1, 3), max_depth=st.integers(1, 5), hop_timeout=st.sampled_from([None, 5.0]))
async def test_random_policies_and_inputs_end_every_chain_with_a_status_that_show_list_and_a2a_agree_on(
        client, uid, limit, context_kb, result_kb, hops, max_depth, hop_timeout):
    agents = [make_agent(f"rand{i}-{uid}", relay_for(i)) for i in range(3)]
    policy = {"max_depth": max_depth, "retry_initial_s": 0.05, "max_attempts": 2}
    if limit is not None:
        policy["max_context_bytes"] = limit
    if hop_timeout is not None:
        policy["hop_timeout_s"] = hop_timeout
    context = {"hops": hops, "result_kb": result_kb, "pad": "c" * (context_kb * 1024),
               "names": [a.id for a in agents]}
    async with running(client, *agents):
        try:
            chain_id = await start_chain(client, to_agent=agents[0].id, task_description="random", policy=policy,
                                         context_data=context)
        except InvalidRequest:  # refused at the edge: nothing was started
            return
        record = await asyncio.wait_for(wait_chain(client, chain_id), 60)
    assert record.status.ended, record
    shown = await get_chain(client, chain_id)
    assert shown.status is record.status
    task = await chain_task(client, str(chain_id), OPERATOR)
    assert record.status in STATUSES_BY_TASK_STATE[task.status.state]
    for _ in range(100):  # visibility follows within moments
        rows = await find_chains(client, f"WorkflowId = '{chain_id}'")
        if rows and rows[0]["status"] == record.status.value:
            break
        await asyncio.sleep(0.1)
    assert rows and rows[0]["status"] == record.status.value, (rows, record.status)


def relay_for(index: int):
    async def handle(ctx):
        data = ctx.context_data
        result = {"by": ctx.to_agent, "blob": "r" * (data.get("result_kb", 0) * 1024)}
        if ctx.chain_depth + 1 < data.get("hops", 1):
            return ctx.handoff(to_agent=data["names"][(index + 1) % 3], task_description=f"step {ctx.chain_depth + 1}",
                               result_data=result)
        return ctx.complete(result)
    return handle

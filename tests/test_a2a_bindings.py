"""The three A2A bindings run the same chains: JSON-RPC and HTTP+JSON (REST) by raw HTTP requests
built from the spec, gRPC by the SDK's generated stub over a raw channel. Each scenario (stream,
send, get, list, cancel, approve by a follow-up message) runs over each binding, and what a
client sees (task states, artifacts, the chain's record) is the same over all three. The same
credentials and bounds hold over gRPC as over HTTP; the authenticated extended card is served
to authenticated callers alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import grpc
import grpc.aio
import httpx
import pytest
from a2a.types import a2a_pb2, a2a_pb2_grpc
from google.protobuf import json_format

from handoff import ChainStatus, get_chain, wait_chain
from handoff.a2a.server import A2AServer
from handoff.servers.embedded import free_port
from handoff.servers.http import BearerAuth
from tests.support import make_agent, running, wait_live

pytestmark = pytest.mark.usefixtures("chains")

HEADERS = {"Content-Type": "application/json", "A2A-Version": "1.0"}


def message(text: str, task_id: str = "", **metadata: Any) -> dict:
    msg: dict[str, Any] = {"messageId": str(uuid4()), "role": "ROLE_USER", "parts": [{"text": text}]}
    if task_id:
        msg["taskId"] = task_id
    if metadata:
        msg["metadata"] = metadata
    return msg


class JsonRpc:
    """A2A 1.0 over JSON-RPC, as a client built from the spec sends it."""

    name = "JSONRPC"

    def __init__(self, http: httpx.AsyncClient, base: str, token: str) -> None:
        self._http, self._base = http, base
        self._headers = {**HEADERS, "Authorization": f"Bearer {token}"}

    async def _call(self, method: str, params: dict, url: str | None = None) -> dict:
        answer = await self._http.post(url or f"{self._base}/", headers=self._headers, json={
            "jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert "result" in body, body
        return body["result"]

    async def send(self, agent: str | None, msg: dict, **configuration: Any) -> dict:
        url = f"{self._base}/agents/{agent}" if agent else None
        return (await self._call("SendMessage", {"message": msg, "configuration": configuration}, url))["task"]

    async def stream(self, agent: str, msg: dict) -> list[dict]:
        events = []
        async with self._http.stream("POST", f"{self._base}/agents/{agent}", headers=self._headers, json={
                "jsonrpc": "2.0", "id": 1, "method": "SendStreamingMessage", "params": {"message": msg}}) as answer:
            async for line in answer.aiter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:])["result"])
        return events

    async def get(self, task_id: str) -> dict:
        return await self._call("GetTask", {"id": task_id})

    async def list(self) -> dict:
        return await self._call("ListTasks", {})

    async def cancel(self, task_id: str) -> dict:
        return await self._call("CancelTask", {"id": task_id})


class Rest:
    """A2A 1.0 over HTTP+JSON (REST), by raw requests."""

    name = "HTTP+JSON"

    def __init__(self, http: httpx.AsyncClient, base: str, token: str) -> None:
        self._http, self._base = http, base
        self._headers = {**HEADERS, "Authorization": f"Bearer {token}"}

    def _at(self, agent: str | None) -> str:
        return f"{self._base}/agents/{agent}/rest" if agent else f"{self._base}/rest"

    async def _answer(self, request) -> dict:
        answer = await request
        assert answer.status_code == 200, answer.text
        return answer.json()

    async def send(self, agent: str | None, msg: dict, **configuration: Any) -> dict:
        return (await self._answer(self._http.post(f"{self._at(agent)}/message:send", headers=self._headers,
                                                   json={"message": msg, "configuration": configuration})))["task"]

    async def stream(self, agent: str, msg: dict) -> list[dict]:
        events = []
        async with self._http.stream("POST", f"{self._at(agent)}/message:stream", headers=self._headers,
                                     json={"message": msg}) as answer:
            async for line in answer.aiter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        return events

    async def get(self, task_id: str) -> dict:
        return await self._answer(self._http.get(f"{self._base}/rest/tasks/{task_id}", headers=self._headers))

    async def list(self) -> dict:
        return await self._answer(self._http.get(f"{self._base}/rest/tasks", headers=self._headers))

    async def cancel(self, task_id: str) -> dict:
        return await self._answer(self._http.post(f"{self._base}/rest/tasks/{task_id}:cancel", headers=self._headers,
                                                  json={}))


def as_json(proto) -> dict:
    return json_format.MessageToDict(proto)


class Grpc:
    """A2A 1.0 over gRPC: the SDK's generated stub on a raw channel, the credential in the call's
    metadata, the agent in the request's `tenant`."""

    name = "GRPC"

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self._stub = a2a_pb2_grpc.A2AServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {token}"), ("a2a-version", "1.0"))

    @staticmethod
    def _request(agent: str | None, msg: dict, configuration: dict | None = None) -> a2a_pb2.SendMessageRequest:
        return json_format.ParseDict({"tenant": agent or "", "message": msg, "configuration": configuration or {}},
                                     a2a_pb2.SendMessageRequest())

    async def send(self, agent: str | None, msg: dict, **configuration: Any) -> dict:
        reply = await self._stub.SendMessage(self._request(agent, msg, configuration), metadata=self._metadata)
        return as_json(reply.task)

    async def stream(self, agent: str, msg: dict) -> list[dict]:
        return [as_json(e) async for e in self._stub.SendStreamingMessage(self._request(agent, msg),
                                                                          metadata=self._metadata)]

    async def get(self, task_id: str) -> dict:
        return as_json(await self._stub.GetTask(a2a_pb2.GetTaskRequest(id=task_id), metadata=self._metadata))

    async def list(self) -> dict:
        return as_json(await self._stub.ListTasks(a2a_pb2.ListTasksRequest(), metadata=self._metadata))

    async def cancel(self, task_id: str) -> dict:
        return as_json(await self._stub.CancelTask(a2a_pb2.CancelTaskRequest(id=task_id), metadata=self._metadata))


def states_of(events: list[dict]) -> list[str]:
    """The task states a stream went through, each once, in order."""
    states: list[str] = []
    for event in events:
        state = (event.get("task") or event.get("statusUpdate") or {}).get("status", {}).get("state")
        if state and (not states or states[-1] != state):
            states.append(state)
    return states


def artifact_names(events: list[dict]) -> list[str]:
    return [e["artifactUpdate"]["artifact"]["name"] for e in events if "artifactUpdate" in e]


def relay(next_agent: str | None):
    async def handle(ctx):
        if next_agent:
            return ctx.handoff(to_agent=next_agent, task_description="go on", result_data={"by": ctx.to_agent})
        return ctx.complete({"by": ctx.to_agent, "summary": f"{ctx.to_agent} is done"})
    return handle


@pytest.fixture
async def bound(client, uid) -> AsyncIterator[tuple[A2AServer, str]]:
    """An A2A server with a token, over JSON-RPC, REST and gRPC (on a port the system chooses)."""
    token = f"caller-{uid}"
    server = await A2AServer(client, port=free_port(), auth=BearerAuth(tokens=(token,)), grpc_port=0).start()
    try:
        yield server, token
    finally:
        await server.stop()


async def scenarios(binding, client, first: str, gate: str, slow: str, started: asyncio.Event) -> dict:
    """Every scenario over one binding, as a client sees it (ids left out: they differ)."""
    seen: dict[str, Any] = {}
    events = await binding.stream(first, message("stream it"))
    seen["stream"] = (states_of(events), artifact_names(events))
    streamed = next(e["task"]["id"] for e in events if "task" in e)
    sent = await binding.send(first, message("send it"))
    seen["send"] = (sent["status"]["state"], [a["name"] for a in sent.get("artifacts", [])])
    got = await binding.get(streamed)
    seen["get"] = (got["status"]["state"], [a["name"] for a in got.get("artifacts", [])],
                   got["metadata"]["handoffStatus"], got["history"][0]["parts"][0]["text"])
    record = await get_chain(client, streamed)
    seen["record"] = (record.status, [h.to_agent for h in record.hops])
    assert [a["artifactId"] for a in got["artifacts"]] == [str(h.handoff_id) for h in record.hops]
    for _ in range(50):  # visibility is eventually consistent
        listed = {t["id"] for t in (await binding.list()).get("tasks", [])}
        if {streamed, sent["id"]} <= listed:
            break
        await asyncio.sleep(0.1)
    seen["list"] = {streamed, sent["id"]} <= listed
    waiting = await binding.send(None, message("ship it", agent=first, policy={"approval_required": [gate]}))
    seen["awaiting"] = waiting["status"]["state"]
    approved = await binding.send(None, message("approve: looks fine", task_id=waiting["id"]))
    record = await wait_chain(client, waiting["id"])
    seen["approved"] = (approved["status"]["state"], record.status, record.hops[-1].approval.decision,
                        record.hops[-1].approval.by)
    started.clear()
    held = await binding.send(slow, message("take your time"), returnImmediately=True)
    await asyncio.wait_for(started.wait(), 15)
    cancelled = await binding.cancel(held["id"])
    seen["cancel"] = (cancelled["status"]["state"], (await get_chain(client, held["id"])).status)
    return seen


async def test_every_binding_runs_the_same_scenarios_with_the_same_results(client, uid, bound):
    server, token = bound
    first, second, slow = (f"bind-{n}-{uid}" for n in ("first", "second", "slow"))
    started = asyncio.Event()

    async def hold(ctx):
        started.set()
        await asyncio.sleep(60)
        return ctx.complete({})

    agents = [make_agent(first, relay(second)), make_agent(second, relay(None)), make_agent(slow, hold)]
    async with running(client, *agents, register=True), httpx.AsyncClient(timeout=30) as http, \
            grpc.aio.insecure_channel(server.grpc_url) as channel:
        await wait_live(client, {first, slow})
        bindings = [JsonRpc(http, server.url, token), Rest(http, server.url, token), Grpc(channel, token)]
        # every card declares all three, gRPC at the server's gRPC target with the agent as tenant
        card = (await http.get(f"{server.url}/agents/{first}/.well-known/agent-card.json",
                               headers={"Authorization": f"Bearer {token}"})).json()
        declared = {i["protocolBinding"]: i for i in card["supportedInterfaces"]}
        assert set(declared) == {b.name for b in bindings}
        assert declared["GRPC"]["url"] == server.grpc_url and declared["GRPC"]["tenant"] == first
        results = {b.name: await scenarios(b, client, first, second, slow, started) for b in bindings}
    expected = {
        "stream": (["TASK_STATE_SUBMITTED", "TASK_STATE_WORKING", "TASK_STATE_COMPLETED"],
                   [f"hop 0: starter -> {first}", f"hop 1: {first} -> {second}"]),
        "send": ("TASK_STATE_COMPLETED", [f"hop 0: starter -> {first}", f"hop 1: {first} -> {second}"]),
        "get": ("TASK_STATE_COMPLETED", [f"hop 0: starter -> {first}", f"hop 1: {first} -> {second}"],
                "completed", "stream it"),
        "record": (ChainStatus.COMPLETED, [first, second]),
        "list": True,
        "awaiting": "TASK_STATE_INPUT_REQUIRED",
        "approved": ("TASK_STATE_COMPLETED", ChainStatus.COMPLETED, "approved", "a2a:token-1"),
        "cancel": ("TASK_STATE_CANCELED", ChainStatus.CANCELLED),
    }
    for name, seen in results.items():
        assert seen == expected, name
    assert results["JSONRPC"] == results["HTTP+JSON"] == results["GRPC"]


async def test_a_json_rpc_requests_tenant_names_its_agent_as_over_grpc(client, uid, bound):
    server, token = bound
    agent = f"tenant-{uid}"
    async with running(client, make_agent(agent, relay(None))), httpx.AsyncClient(timeout=30) as http:
        answer = await http.post(f"{server.url}/", headers={**HEADERS, "Authorization": f"Bearer {token}"}, json={
            "jsonrpc": "2.0", "id": 1, "method": "SendMessage",
            "params": {"tenant": agent, "message": message("by tenant")}})
        task = answer.json()["result"]["task"]
        record = await wait_chain(client, task["id"])
    assert record.status is ChainStatus.COMPLETED and record.hops[0].to_agent == agent


async def test_grpc_holds_the_same_credentials_bounds_and_errors(client, uid):
    token = f"grpc-{uid}"
    server = await A2AServer(client, port=free_port(), auth=BearerAuth(tokens=(token,)), grpc_port=0,
                             max_body_bytes=70_000).start()
    try:
        async with grpc.aio.insecure_channel(server.grpc_url) as channel:
            stub = a2a_pb2_grpc.A2AServiceStub(channel)
            for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", token),)):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.GetTask(a2a_pb2.GetTaskRequest(id=str(uuid4())), metadata=metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                async for _ in stub.SendStreamingMessage(Grpc._request("x", message("t"))):
                    pass
            assert streamed.value.code() == grpc.StatusCode.UNAUTHENTICATED
            authorized = (("authorization", f"Bearer {token}"),)
            for task_id in ("not-a-uuid", str(uuid4())):  # TaskNotFound, as over HTTP
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await stub.GetTask(a2a_pb2.GetTaskRequest(id=task_id), metadata=authorized)
                assert missing.value.code() == grpc.StatusCode.NOT_FOUND, task_id
            # the HTTP body bound is the gRPC message bound
            big = Grpc._request("x", message("x" * 100_000))
            with pytest.raises(grpc.aio.AioRpcError) as too_big:
                await stub.SendMessage(big, metadata=authorized)
            assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        async with httpx.AsyncClient(timeout=30) as http:
            over = await http.post(f"{server.url}/", headers={**HEADERS, "Authorization": f"Bearer {token}"},
                                   content=json.dumps({"message": message("x" * 100_000)}))
        assert over.status_code == 413
    finally:
        await server.stop()
    with pytest.raises(Exception, match="beyond loopback"):
        A2AServer(client, host="0.0.0.0", port=free_port(), grpc_port=0)


async def test_the_extended_card_lists_every_agent_to_authenticated_callers_only(client, uid):
    token = f"ext-{uid}"
    agent = f"ext-agent-{uid}"
    server = await A2AServer(client, port=free_port(), auth=BearerAuth(tokens=(token,)), grpc_port=0).start()
    try:
        async with running(client, make_agent(agent, relay(None)), register=True), \
                httpx.AsyncClient(timeout=30) as http, grpc.aio.insecure_channel(server.grpc_url) as channel:
            await wait_live(client, {agent})
            public = (await http.get(f"{server.url}/.well-known/agent-card.json")).json()
            assert public["capabilities"]["extendedAgentCard"] is True
            assert not public["capabilities"].get("pushNotifications"), "push notifications are off"
            rpc = {"jsonrpc": "2.0", "id": 1, "method": "GetExtendedAgentCard", "params": {}}
            assert (await http.post(f"{server.url}/", headers=HEADERS, json=rpc)).status_code == 401
            assert (await http.get(f"{server.url}/rest/extendedAgentCard", headers=HEADERS)).status_code == 401
            authorized = {**HEADERS, "Authorization": f"Bearer {token}"}
            extended = (await http.post(f"{server.url}/", headers=authorized, json=rpc)).json()["result"]
            assert f"agent:{agent}" in [s["id"] for s in extended["skills"]]
            skill = next(s for s in extended["skills"] if s["id"] == f"agent:{agent}")
            assert "live" in skill["tags"] and f"{server.url}/agents/{agent}" in skill["description"]
            over_rest = (await http.get(f"{server.url}/rest/extendedAgentCard", headers=authorized)).json()
            assert over_rest["skills"] == extended["skills"]
            stub = a2a_pb2_grpc.A2AServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.GetExtendedAgentCard(a2a_pb2.GetExtendedAgentCardRequest())
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            over_grpc = await stub.GetExtendedAgentCard(a2a_pb2.GetExtendedAgentCardRequest(),
                                                        metadata=(("authorization", f"Bearer {token}"),))
            assert as_json(over_grpc)["skills"] == extended["skills"]
    finally:
        await server.stop()


async def test_requests_in_flight_are_counted_across_the_bindings(client, uid):
    """A caller's requests in flight are one count over HTTP and gRPC: with a bound of one, a
    blocking send over JSON-RPC leaves no room for a gRPC call, and a gRPC stream none for HTTP."""
    held = f"held-{uid}"
    started, release = asyncio.Event(), asyncio.Event()

    async def hold(ctx):
        started.set()
        await release.wait()
        return ctx.complete({})

    server = await A2AServer(client, port=free_port(), grpc_port=0, max_in_flight=1).start()
    try:
        async with running(client, make_agent(held, hold)), httpx.AsyncClient(timeout=30) as http, \
                grpc.aio.insecure_channel(server.grpc_url) as channel:
            stub = a2a_pb2_grpc.A2AServiceStub(channel)
            sending = asyncio.create_task(http.post(f"{server.url}/agents/{held}", headers=HEADERS, json={
                "jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": message("wait")}}))
            await asyncio.wait_for(started.wait(), 15)
            with pytest.raises(grpc.aio.AioRpcError) as busy:
                await stub.GetTask(a2a_pb2.GetTaskRequest(id=str(uuid4())))
            assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            assert (await sending).status_code == 200
            with pytest.raises(grpc.aio.AioRpcError) as room:
                await stub.GetTask(a2a_pb2.GetTaskRequest(id=str(uuid4())))
            assert room.value.code() == grpc.StatusCode.NOT_FOUND, "the count went down with the request"
            started.clear()
            release.clear()
            stream = stub.SendStreamingMessage(Grpc._request(held, message("wait again")))
            streaming = asyncio.create_task(_drain(stream))
            await asyncio.wait_for(started.wait(), 15)
            assert (await http.get(f"{server.url}/agents")).status_code == 429
            release.set()
            await asyncio.wait_for(streaming, 30)
            assert (await http.get(f"{server.url}/agents")).status_code == 200
    finally:
        release.set()
        await server.stop()


async def _drain(stream) -> list:
    return [event async for event in stream]


async def _sse_results(answer: httpx.Response, *, until: str | None = None) -> list[dict]:
    """The JSON-RPC results (or errors) of an SSE answer, to its end or the first event with key `until`."""
    found = []
    async for line in answer.aiter_lines():
        if line.startswith("data:"):
            body = json.loads(line[5:])
            found.append(body.get("result", body))
            if until is not None and until in found[-1]:
                break
    return found


async def test_a_client_that_lost_its_stream_resubscribes_and_gets_what_it_missed(client, uid, bound):
    server, token = bound
    ids = [f"rs{i}-{uid}" for i in range(3)]
    gates = {ids[1]: asyncio.Event(), ids[2]: asyncio.Event()}

    async def relay_after_gate(ctx):
        if ctx.to_agent in gates:
            await gates[ctx.to_agent].wait()
        i = ids.index(ctx.to_agent)
        if i + 1 < len(ids):
            return ctx.handoff(to_agent=ids[i + 1], task_description="go on", result_data={"by": ctx.to_agent})
        return ctx.complete({"by": ctx.to_agent})

    headers = {**HEADERS, "Authorization": f"Bearer {token}"}

    def rpc(method: str, params: dict) -> dict:
        return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}

    async with running(client, *[make_agent(i, relay_after_gate) for i in ids], register=True), \
            httpx.AsyncClient(timeout=30) as http:
        async with http.stream("POST", f"{server.url}/agents/{ids[0]}", headers=headers,
                               json=rpc("SendStreamingMessage", {"message": message("relay it")})) as answer:
            before = await _sse_results(answer, until="artifactUpdate")  # then the connection drops
        task_id = next(e["task"]["id"] for e in before if "task" in e)
        gates[ids[1]].set()  # a hop completes while nobody listens
        for _ in range(100):
            if sum(h.status.value == "completed" for h in (await get_chain(client, task_id)).hops) == 2:
                break
            await asyncio.sleep(0.05)
        async with http.stream("POST", f"{server.url}/", headers=headers,
                               json=rpc("SubscribeToTask", {"id": task_id})) as answer:
            first, after = None, []
            async for line in answer.aiter_lines():
                if not line.startswith("data:"):
                    continue
                result = json.loads(line[5:])["result"]
                if first is None:
                    first = result
                    gates[ids[2]].set()  # the last hop may go on once the task is read
                else:
                    after.append(result)
        ended = await http.post(f"{server.url}/", headers=headers, json=rpc("SubscribeToTask", {"id": task_id}))
        unknown = await http.post(f"{server.url}/", headers=headers, json=rpc("SubscribeToTask", {"id": str(uuid4())}))
        record = await wait_chain(client, task_id)
    assert artifact_names(before) and len(artifact_names(before)) == 1
    missed = first["task"]
    assert missed["id"] == task_id and missed["status"]["state"] == "TASK_STATE_WORKING"
    assert len(missed["artifacts"]) == 2, "the task comes first, with every hop's artifact so far"
    assert len(artifact_names(after)) == 1, "then the hop that completes after the resubscription, once"
    assert states_of(after)[-1] == "TASK_STATE_COMPLETED"
    assert record.status is ChainStatus.COMPLETED
    assert "UnsupportedOperation" in ended.text or "-32004" in ended.text
    assert "-32001" in unknown.text

"""A2A push notifications against a real webhook receiver (aiohttp, on loopback, which these
tests allow): every change of the chain arrives once, in order, with the config's token; a
receiver that is down slows nothing; configs are their owner's; and a webhook on a host or an
address the operator did not allow is refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import uuid4

import httpx
import pytest
from aiohttp import web

from handoff import ChainStatus, wait_chain
from handoff.a2a.push import TOKEN_HEADER, PushPolicy, webhook_refusal
from handoff.a2a.server import A2AServer
from handoff.servers.embedded import free_port
from handoff.servers.http import BearerAuth
from tests.support import make_agent, running, wait_live

pytestmark = pytest.mark.usefixtures("chains")

LOOPBACK = PushPolicy(hosts=("127.0.0.1",), allow_http=True, allow_private=True, retry_s=30)
"""What the tests configure: webhooks on loopback over plain http."""


@asynccontextmanager
async def receiver(failing: int = 0, seen: list | None = None) -> AsyncIterator[tuple[str, list]]:
    """A webhook on loopback; yields its URL and what it received (token header, body). It
    answers its first `failing` POSTs 503 (keeping nothing of them); `seen` gets every POST's
    headers."""
    got: list[tuple[str | None, dict]] = []
    answered = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal answered
        answered += 1
        if seen is not None:
            seen.append(dict(request.headers))
        if answered <= failing:
            return web.Response(status=503)
        got.append((request.headers.get(TOKEN_HEADER), await request.json()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/hook", got
    finally:
        await runner.cleanup()


def rpc(method: str, params: dict) -> dict:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


def message(text: str, task_id: str = "", **metadata: Any) -> dict:
    msg: dict[str, Any] = {"messageId": str(uuid4()), "role": "ROLE_USER", "parts": [{"text": text}],
                           "metadata": metadata}
    if task_id:
        msg["taskId"] = task_id
    return msg


class Caller:
    def __init__(self, http: httpx.AsyncClient, url: str, token: str) -> None:
        self._http, self._url = http, url
        self.headers = {"Content-Type": "application/json", "A2A-Version": "1.0", "Authorization": f"Bearer {token}"}

    async def call(self, method: str, params: dict) -> dict:
        return (await self._http.post(f"{self._url}/", headers=self.headers, json=rpc(method, params))).json()


def relay(next_agent: str | None, pause_s: float = 0.0):
    async def handle(ctx):
        await asyncio.sleep(pause_s)
        if next_agent:
            return ctx.handoff(to_agent=next_agent, task_description="go on", result_data={"by": ctx.to_agent})
        return ctx.complete({"by": ctx.to_agent, "summary": "done"})
    return handle


def changes(got: list[tuple[str | None, dict]]) -> list[tuple[str, str]]:
    """What a webhook received, as (kind, state or artifact name)."""
    seen = []
    for _, body in got:
        if "statusUpdate" in body:
            seen.append(("status", body["statusUpdate"]["status"]["state"]))
        elif "artifactUpdate" in body:
            seen.append(("artifact", body["artifactUpdate"]["artifact"]["name"]))
    return seen


async def until(condition, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.05)


async def test_every_change_of_the_chain_reaches_the_webhook_once_in_order_with_its_token(client, uid):
    first, second = f"push-a-{uid}", f"push-b-{uid}"
    token = f"t-{uid}"
    server = await A2AServer(client, port=free_port(), auth=BearerAuth(tokens=(token,)), push=LOOPBACK).start()
    try:
        async with receiver() as (url, got), httpx.AsyncClient(timeout=30) as http, \
                running(client, make_agent(first, relay(second, pause_s=0.6)), make_agent(second, relay(None, 0.6))):
            card = (await http.get(f"{server.url}/.well-known/agent-card.json")).json()
            assert card["capabilities"]["pushNotifications"] is True
            caller = Caller(http, server.url, token)
            waiting = (await caller.call("SendMessage", {
                "message": message("ship it", agent=first, policy={"approval_required": [second]}),
                "configuration": {"taskPushNotificationConfig": {"url": url, "token": "hook-secret"}}}))["result"]
            task_id = waiting["task"]["id"]
            assert waiting["task"]["status"]["state"] == "TASK_STATE_INPUT_REQUIRED"
            await until(lambda: ("status", "TASK_STATE_INPUT_REQUIRED") in changes(got))
            await caller.call("SendMessage", {"message": message("approve", task_id=task_id)})
            record = await wait_chain(client, task_id)
            await until(lambda: ("status", "TASK_STATE_COMPLETED") in changes(got))
            await asyncio.sleep(0.5)  # nothing more comes
    finally:
        await server.stop()
    assert record.status is ChainStatus.COMPLETED
    assert {t for t, _ in got} == {"hook-secret"}, "every POST carries the config's token"
    assert all(b.get("statusUpdate", b.get("artifactUpdate", {})).get("taskId") == task_id for _, b in got)
    seen = changes(got)
    assert len(seen) == len(got), "each POST is one StreamResponse: a status or an artifact update"
    hop0, hop1 = f"hop 0: starter -> {first}", f"hop 1: {first} -> {second}"
    assert [k for k in seen if k[0] == "artifact"] == [("artifact", hop0), ("artifact", hop1)]
    states = [s for kind, s in seen if kind == "status"]
    assert states[0] == "TASK_STATE_WORKING" and states[-1] == "TASK_STATE_COMPLETED"
    assert states.count("TASK_STATE_INPUT_REQUIRED") == 1 and states.count("TASK_STATE_COMPLETED") == 1
    # in the chain's order: hop 0 runs, completes, waits for approval; hop 1 runs, completes; the end
    order = [seen.index(("status", "TASK_STATE_WORKING")), seen.index(("artifact", hop0)),
             seen.index(("status", "TASK_STATE_INPUT_REQUIRED")), seen.index(("artifact", hop1)),
             seen.index(("status", "TASK_STATE_COMPLETED"))]
    assert order == sorted(order), seen
    assert ("status", "TASK_STATE_WORKING") in seen[order[2]:order[3]], "hop 1 started after the approval"
    assert all(a != b for a, b in zip(seen, seen[1:])), "no change is sent twice"


async def test_a_failing_webhook_is_retried_until_it_answers_in_order_with_its_credentials(client, uid):
    agent = f"retried-{uid}"
    server = await A2AServer(client, port=free_port(), push=LOOPBACK).start()
    headers: list[dict] = []
    try:
        async with receiver(failing=3, seen=headers) as (url, got), httpx.AsyncClient(timeout=30) as http, \
                running(client, make_agent(agent, relay(None, 0.3))):
            config = {"url": url, "token": "tok", "authentication": {"scheme": "Bearer", "credentials": "hook-key"}}
            answer = await Caller(http, server.url, "none").call("SendMessage", {
                "message": message("t", agent=agent), "configuration": {"taskPushNotificationConfig": config}})
            await wait_chain(client, answer["result"]["task"]["id"])
            await until(lambda: ("status", "TASK_STATE_COMPLETED") in changes(got))
    finally:
        await server.stop()
    assert len(headers) >= 3 + len(got), "the failed POSTs were tried again"
    assert all(h.get("Authorization") == "Bearer hook-key" and h.get(TOKEN_HEADER) == "tok" for h in headers)
    seen = changes(got)
    assert seen[0] == ("status", "TASK_STATE_WORKING") and seen[-1] == ("status", "TASK_STATE_COMPLETED")
    assert ("artifact", f"hop 0: starter -> {agent}") in seen


async def test_a_webhook_that_is_down_does_not_slow_the_chain(client, uid):
    agents = [f"down-{n}-{uid}" for n in range(3)]
    server = await A2AServer(client, port=free_port(), push=LOOPBACK).start()
    dead = f"http://127.0.0.1:{free_port()}/nobody-listens"
    try:
        async with httpx.AsyncClient(timeout=60) as http, running(
                client, *(make_agent(a, relay(n)) for a, n in zip(agents, [*agents[1:], None])), register=True):
            await wait_live(client, set(agents))
            caller = Caller(http, server.url, "none")

            async def run(configuration: dict) -> float:
                began = time.monotonic()
                answer = await caller.call("SendMessage", {"message": message("go", agent=agents[0]),
                                                           "configuration": configuration})
                assert answer["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED", answer
                return time.monotonic() - began

            await run({})  # warm
            plain = min([await run({}) for _ in range(2)])
            pushed = min([await run({"taskPushNotificationConfig": {"url": dead, "token": "x"}}) for _ in range(2)])
    finally:
        began = time.monotonic()
        await server.stop()
    print(f"3-hop chain over A2A: {plain:.3f}s without a webhook, {pushed:.3f}s with one that is down")
    assert pushed < plain * 1.5 + 0.5, (plain, pushed)
    assert time.monotonic() - began < 5, "stopping does not wait for the retries"


async def test_push_configs_are_their_owners_and_follow_the_crud_methods(client, uid):
    agent = f"crud-{uid}"
    tokens = (f"ann-{uid}", f"bob-{uid}")
    server = await A2AServer(client, port=free_port(), auth=BearerAuth(tokens=tokens), push=LOOPBACK).start()
    try:
        async with receiver() as (url, _), httpx.AsyncClient(timeout=30) as http, \
                running(client, make_agent(agent, relay(None))):
            ann, bob = Caller(http, server.url, tokens[0]), Caller(http, server.url, tokens[1])
            task_id = (await ann.call("SendMessage", {"message": message("t", agent=agent)}))["result"]["task"]["id"]
            made = (await ann.call("CreateTaskPushNotificationConfig",
                                   {"taskId": task_id, "id": "mine", "url": url, "token": "s"}))["result"]
            assert (made["id"], made["taskId"], made["url"]) == ("mine", task_id, url)
            got = await ann.call("GetTaskPushNotificationConfig", {"taskId": task_id, "id": "mine"})
            assert got["result"]["url"] == url
            listed = await ann.call("ListTaskPushNotificationConfigs", {"taskId": task_id})
            assert [c["id"] for c in listed["result"]["configs"]] == ["mine"]
            for method, params in (("GetTaskPushNotificationConfig", {"taskId": task_id, "id": "mine"}),
                                   ("ListTaskPushNotificationConfigs", {"taskId": task_id}),
                                   ("DeleteTaskPushNotificationConfig", {"taskId": task_id, "id": "mine"}),
                                   ("CreateTaskPushNotificationConfig", {"taskId": task_id, "url": url})):
                assert (await bob.call(method, params))["error"]["code"] == -32001, method  # not bob's task
            rest = await http.get(f"{server.url}/rest/tasks/{task_id}/pushNotificationConfigs", headers=ann.headers)
            assert [c["id"] for c in rest.json()["configs"]] == ["mine"]
            await ann.call("DeleteTaskPushNotificationConfig", {"taskId": task_id, "id": "mine"})
            after = await ann.call("ListTaskPushNotificationConfigs", {"taskId": task_id})
            assert after["result"].get("configs", []) == []
    finally:
        await server.stop()


async def test_a_webhook_on_loopback_or_a_host_not_allowed_is_refused(client, uid):
    agent = f"ssrf-{uid}"
    policy = PushPolicy(hosts=("127.0.0.1", "hooks.example.com"), allow_http=True)
    server = await A2AServer(client, port=free_port(), push=policy).start()
    off = await A2AServer(client, port=free_port()).start()
    try:
        async with httpx.AsyncClient(timeout=30) as http, running(client, make_agent(agent, relay(None))):
            caller = Caller(http, server.url, "none")
            for url in ("http://127.0.0.1:9/hook", "http://10.0.0.8/hook", "http://elsewhere.example.org/hook",
                        "ftp://127.0.0.1/hook"):
                answer = await caller.call("SendMessage", {"message": message("t", agent=agent), "configuration": {
                    "taskPushNotificationConfig": {"url": url}}})
                assert answer["error"]["code"] == -32602, (url, answer)
                assert "push notification URL refused" in answer["error"]["message"]
            # with push notifications off, the card does not offer them and the methods say so
            card = (await http.get(f"{off.url}/.well-known/agent-card.json")).json()
            assert not card["capabilities"].get("pushNotifications")
            task_id = (await Caller(http, off.url, "none").call(
                "SendMessage", {"message": message("t", agent=agent)}))["result"]["task"]["id"]
            refused = await Caller(http, off.url, "none").call(
                "CreateTaskPushNotificationConfig", {"taskId": task_id, "url": "https://hooks.example.com/h"})
            assert refused["error"]["code"] == -32003
    finally:
        await server.stop()
        await off.stop()


@pytest.mark.parametrize("url, policy, fragment", [
    ("http://hooks.example.com/h", PushPolicy(hosts=("hooks.example.com",)), "must be https"),
    ("https://other.example.com/h", PushPolicy(hosts=("hooks.example.com",)), "not allowed"),
    ("https://user:pw@hooks.example.com/h", PushPolicy(hosts=("hooks.example.com",)), "no credentials"),
    ("https://169.254.169.254/latest", PushPolicy(hosts=("*",)), "link-local"),
    ("https://127.0.0.1/h", PushPolicy(hosts=("*",)), "loopback"),
    ("https://[::1]/h", PushPolicy(hosts=("*",)), "loopback"),
    ("https://[::ffff:10.1.2.3]/h", PushPolicy(hosts=("*",)), "private"),
    ("https://100.64.0.1/h", PushPolicy(hosts=("*",)), "reserved"),
    ("https://0.0.0.0/h", PushPolicy(hosts=("*",), allow_private=True), "not a host's address"),
    ("https://224.0.0.1/h", PushPolicy(hosts=("*",), allow_private=True), "not a host's address"),
])
async def test_webhook_urls_are_checked_address_by_address(url, policy, fragment):
    refusal = await webhook_refusal(url, policy)
    assert refusal is not None and fragment in refusal, refusal


async def test_a_public_address_on_an_allowed_host_is_accepted():
    assert await webhook_refusal("https://8.8.8.8/hook", PushPolicy(hosts=("8.8.8.8",))) is None
    assert await webhook_refusal("http://127.0.0.1:8/h", LOOPBACK) is None

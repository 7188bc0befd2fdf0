"""A chain's events as Server-Sent Events from the A2A server (`/chains/<id>/events`): behind the
same checks as every handoff server, resumed with `Last-Event-ID`, each event once."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from handoff import approve_chain, start_chain
from handoff.a2a.server import A2AServer
from handoff.client.watch import watch_chain
from handoff.models import ChainEvent, EventKind
from handoff.servers.embedded import free_port
from handoff.servers.http import BearerAuth
from tests.support import make_agent, running

pytestmark = pytest.mark.usefixtures("chains")

USER, OPERATOR = "user-token-1", "operator-token-1"


async def _read(stream: httpx.Response, until: EventKind | None = None) -> list[tuple[str, ChainEvent]]:
    """(SSE id, event) of each message, to the stream's end or the first event of kind `until`."""
    found, fields = [], {}
    async for line in stream.aiter_lines():
        if line.startswith(":"):
            continue  # a ping
        if line:
            name, _, value = line.partition(":")
            fields[name] = value.lstrip()
            continue
        if "data" in fields:
            event = ChainEvent.model_validate(json.loads(fields["data"]))
            assert fields["event"] == event.kind.value
            found.append((fields["id"], event))
            if event.kind is until:
                break
        fields = {}
    return found


async def test_sse_resumes_with_last_event_id_and_refuses_who_may_not_watch(client, uid):
    gate = f"sse-gate-{uid}"
    server = await A2AServer(client, port=free_port(),
                             auth=BearerAuth(tokens=(USER,), operator_tokens=(OPERATOR,))).start()
    url = f"{server.url}/chains/{{}}/events"
    try:
        async with running(client, make_agent(gate, _done)), httpx.AsyncClient(timeout=30) as http:
            chain_id = await start_chain(client, to_agent=gate, task_description="release",
                                         policy={"approval_required": [gate]}, search_attributes=False)
            where = url.format(chain_id)
            operator = {"Authorization": f"Bearer {OPERATOR}"}
            async with http.stream("GET", where, headers=operator) as stream:
                assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
                first = await _read(stream, until=EventKind.APPROVAL_AWAITED)
            last_id = first[-1][0]
            await approve_chain(client, chain_id, by="on-call")
            async with http.stream("GET", where, headers={**operator, "Last-Event-ID": last_id}) as stream:
                rest = await asyncio.wait_for(_read(stream), 30)  # the server ends the stream after chain.ended
            async with http.stream("GET", where + "?after=2", headers=operator) as stream:
                from_two = await asyncio.wait_for(_read(stream), 30)
            whole = [e async for e in watch_chain(client, chain_id)]

            refused = {
                "no credential": await http.get(where),
                "not its chain": await http.get(where, headers={"Authorization": f"Bearer {USER}"}),
                "a bad cursor": await http.get(where, headers={**operator, "Last-Event-ID": "x1"}),
                "not a chain id": await http.get(url.format("nope"), headers=operator),
                "a foreign page": await http.get(where, headers={**operator, "Origin": "https://evil.example"}),
            }
    finally:
        await server.stop()
    assert [int(i) for i, _ in first + rest] == list(range(1, len(whole) + 1))
    assert [e.model_dump() for _, e in first + rest] == [e.model_dump() for e in whole]
    assert [e.model_dump() for _, e in from_two] == [e.model_dump() for e in whole[2:]]
    assert rest[-1][1].kind is EventKind.CHAIN_ENDED
    assert {why: r.status_code for why, r in refused.items()} == {
        "no credential": 401, "not its chain": 404, "a bad cursor": 400, "not a chain id": 404, "a foreign page": 403}


async def _done(ctx):
    return ctx.complete({"shipped": True})

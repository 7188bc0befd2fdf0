"""A chain's events as Server-Sent Events (`GET .../chains/<id>/events`), for pages: the stream
`watch_chain` reads, one SSE message per event (`id:` its cursor, `event:` its kind, `data:` the
`ChainEvent` as JSON), closed after `chain.ended`. A browser's `EventSource` that loses the
connection reconnects with `Last-Event-ID` and gets every later event once; `?after=CURSOR` does
the same for a first request. Mounted by a server that has checked the caller (`HttpGuard`); the
route asks the server whether this caller may watch this chain, and a chain it may not see
answers as an unknown one does (404)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from uuid import UUID

from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.client import Client

from handoff.client.watch import watch_chain
from handoff.errors import HandoffError

PING_S = 15
"""A comment line this often keeps idle connections (and the proxies between) open."""
MAX_CURSOR = 10**9

MayWatch = Callable[[Request, str], Awaitable[bool]]
"""Whether the request's caller may watch the chain (False: the chain does not exist for it)."""


def _cursor(request: Request) -> int | None:
    text = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
    if not text.isdigit() or int(text) > MAX_CURSOR:
        return None
    return int(text)


def chain_events_route(path: str, client: Client, may_watch: MayWatch) -> Route:
    """The SSE route at `path` (with a `{chain_id}` parameter)."""

    async def events(request: Request) -> Response:
        chain_id = request.path_params["chain_id"]
        after = _cursor(request)
        if after is None:
            return JSONResponse({"error": "a cursor (Last-Event-ID or ?after=) is a whole number from 0"}, 400)
        try:
            UUID(chain_id)
        except ValueError:
            return JSONResponse({"error": f"no chain with id {chain_id[:64]}"}, 404)
        if not await may_watch(request, chain_id):
            return JSONResponse({"error": f"no chain with id {chain_id}"}, 404)

        async def messages() -> AsyncIterator[dict[str, str]]:
            try:
                async for event in watch_chain(client, chain_id, after=after):
                    yield {"id": str(event.cursor), "event": event.kind.value, "data": event.model_dump_json()}
            except HandoffError as err:  # the server went away for good, or the chain did
                yield {"event": "error", "data": str(err)}

        return EventSourceResponse(messages(), ping=PING_S, headers={"Cache-Control": "no-store"})

    return Route(path, events, methods=["GET"])

"""Remote A2A agents as hops: an `Agent` whose handler hands its hop to an agent built with another
framework (Google ADK, CrewAI, Strands, LangGraph, ...) that speaks A2A, through the A2A SDK's own
client.

The proxy runs on a handoff worker like any agent (`handoff worker --a2a URL --a2a-id ID
--capability CAP`, or `handoff worker --agent module:obj` with `remote_agent(...)`), registers in
the registry, and so takes hops by name or capability, with retries, fallback and audit as for any
hop. For each hop it sends one A2A message (the task as text; the context and the earlier results
as a data part; the chain's ids in the metadata), then waits for the remote task to end, polling
`GetTask` while the hop activity heartbeats, within the hop's timeout (a cancelled hop cancels the
remote task). The remote task's end maps onto the hop:

| remote task | hop |
|---|---|
| `COMPLETED` | completed: its text (`text`), its data parts merged (`data`), its artifacts (`artifacts`); then the proxy's `then` target, if any, gets the chain |
| `FAILED`, `REJECTED` | a deliberate failure with the remote reason: the chain falls back |
| `CANCELED` | a deliberate failure: "the remote agent cancelled its task" |
| `INPUT_REQUIRED`, `AUTH_REQUIRED` | a deliberate failure with the remote agent's question (a hop cannot answer it) |
| unreachable, 5xx | an ordinary error: retried by the hop's retry policy, then fallback |
| other 4xx | `PermanentError`: not retried |
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import httpx
from pydantic import Field

from handoff.agents.agent import Agent
from handoff.constants import retried_status
from handoff.errors import PermanentError, Unavailable
from handoff.models import AgentCapability, HandoffContext, HandoffResult, ModelUsage, nesting_problem

TERMINAL = {"TASK_STATE_COMPLETED", "TASK_STATE_FAILED", "TASK_STATE_CANCELED", "TASK_STATE_REJECTED",
            "TASK_STATE_INPUT_REQUIRED", "TASK_STATE_AUTH_REQUIRED"}
"""Remote task states a hop ends on (interrupted ones included: a hop cannot answer them)."""
MAX_TEXT_CHARS = 100_000
POLL_S = 0.5
MAX_REPLY_BYTES = 8 * 1024 * 1024
"""The most a remote agent's reply (one HTTP response: its card, a task, an artifact) may hold:
read as it arrives and refused past this, before it is kept whole."""


class RemoteUnavailable(Unavailable):
    """The remote agent cannot be reached or answered 5xx: retried by the hop's retry policy."""


class ReplyTooLarge(PermanentError):
    """A remote agent's reply is larger than the hop takes (not retried: it would be again)."""


def remote_agent(
    url: str,
    *,
    id: str,
    capabilities: Sequence[AgentCapability | str],
    name: str | None = None,
    description: str = "",
    then: str | None = None,
    then_task: str | None = None,
    token_env: str | None = None,
    poll_s: float = POLL_S,
    max_concurrent: int = 5,
    version: str = "1",
    max_reply_bytes: int = MAX_REPLY_BYTES,
    follow_card_endpoints: bool = False,
) -> Agent:
    """A handoff agent that is an A2A agent elsewhere (`url`: its base URL, where its card is).

    `then`: an agent id or capability name the chain goes to after the remote agent completed
    (`then_task`: its task, default the hop's own); without it the chain ends there. `token_env`:
    the environment variable holding a bearer token for the remote agent, sent only to `url`'s
    origin: the hops go to the endpoints the card names on that origin, and a card naming only
    endpoints elsewhere is refused, unless `follow_card_endpoints`. Each reply is read up to
    `max_reply_bytes`; a larger one fails the hop, unretried, saying so."""
    target = _then(then)
    clients: dict[asyncio.AbstractEventLoop, Any] = {}

    async def client():
        loop = asyncio.get_running_loop()
        if loop not in clients:
            clients[loop] = await _connect(url, token_env, max_reply_bytes, follow_card_endpoints)
        return clients[loop]

    async def handle(ctx: HandoffContext) -> HandoffResult:
        result = await _run_remote(await client(), ctx, poll_s)
        if result.success and target is not None:
            to_agent, capability = target
            return ctx.handoff(to_agent=to_agent, capability=capability,
                               task_description=then_task or ctx.task_description, result_data=result.result_data)
        return result

    return Agent(id=id, name=name or id, capabilities=list(capabilities), handler=handle,
                 max_concurrent=max_concurrent, version=version,
                 description=description or f"the A2A agent at {url}")


def _then(then: str | None) -> tuple[str | None, AgentCapability | None] | None:
    if not then:
        return None
    try:
        return None, AgentCapability(then)
    except ValueError:
        return then, None


async def _connect(url: str, token_env: str | None, max_reply_bytes: int, follow_card_endpoints: bool):
    from a2a.client import A2ACardResolver, ClientConfig, create_client

    headers = {}
    if token_env:
        token = os.environ.get(token_env)
        if not token:
            raise PermanentError(f"{token_env} holds no token for the A2A agent at {url}")
        headers["Authorization"] = f"Bearer {token}"
    http = httpx.AsyncClient(timeout=30, headers=headers,
                             transport=BoundedTransport(httpx.AsyncHTTPTransport(), max_reply_bytes))
    try:
        card = await A2ACardResolver(http, url).get_agent_card()
    except Exception as err:  # its card cannot be read: maybe down for now
        _raise_for(err, f"cannot read the A2A agent card at {url}")
    if not follow_card_endpoints:
        _pin_to_origin(card, url)
    return await create_client(card, ClientConfig(streaming=False, polling=True, httpx_client=http))


def _origin(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def _pin_to_origin(card: Any, url: str) -> None:
    """Keep only the card's endpoints on `url`'s origin (scheme, host and port): the hop's context
    and the token go nowhere else. `PermanentError` when none is left."""
    pinned = [i for i in card.supported_interfaces if _origin(i.url) == _origin(url)]
    if not pinned:
        named = ", ".join(i.url for i in card.supported_interfaces) or "none"
        raise PermanentError(f"the A2A agent card at {url} names endpoints on other origins only ({named}): "
                             "refused (remote_agent(..., follow_card_endpoints=True) follows them)")
    del card.supported_interfaces[:]
    card.supported_interfaces.extend(pinned)


class BoundedTransport(httpx.AsyncBaseTransport):
    """An httpx transport whose responses are read at most `limit` bytes: a larger one raises
    `ReplyTooLarge` as soon as it passes the limit (its declared length, or its bytes as they
    arrive), so it is never held whole."""

    def __init__(self, inner: Any, limit: int) -> None:
        self._inner, self._limit = inner, limit

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._limit:
            await response.aclose()
            raise self._too_large(int(declared))
        return httpx.Response(status_code=response.status_code, headers=response.headers,
                              stream=_CappedStream(response.stream, self._limit, self._too_large),
                              extensions=response.extensions, request=request)

    def _too_large(self, size: int) -> ReplyTooLarge:
        return ReplyTooLarge(f"the A2A agent's reply is over {self._limit:,} bytes (at least {size:,}): refused")

    async def aclose(self) -> None:
        await self._inner.aclose()


class _CappedStream(httpx.AsyncByteStream):
    def __init__(self, stream: Any, limit: int, too_large: Any) -> None:
        self._stream, self._limit, self._too_large = stream, limit, too_large

    async def __aiter__(self):
        read = 0
        async for chunk in self._stream:
            read += len(chunk)
            if read > self._limit:
                await self.aclose()
                raise self._too_large(read)
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


def _message(ctx: HandoffContext):
    from a2a.types import Message, Part, Role
    from google.protobuf import struct_pb2

    data = struct_pb2.Value()
    data.struct_value.update(json.loads(json.dumps(
        {"context": ctx.context_data, "previous_results": ctx.previous_results}, default=str)))
    message = Message(role=Role.ROLE_USER, message_id=f"{ctx.handoff_id}-{time.time_ns()}",
                      parts=[Part(text=ctx.task_description), Part(data=data)])
    # The hop's own id, never the chain's: the chain id names an A2A task on handoff's server, and
    # a remote agent holding a token there is shown only what its hop shows.
    # (the snake_case keys are the earlier spelling, kept for remote agents that read them)
    message.metadata.update({"handoffId": str(ctx.handoff_id), "fromAgent": ctx.from_agent, "hop": ctx.chain_depth,
                             "handoff_id": str(ctx.handoff_id), "from_agent": ctx.from_agent})
    return message


async def _run_remote(client: Any, ctx: HandoffContext, poll_s: float) -> HandoffResult:
    from a2a.types import CancelTaskRequest, GetTaskRequest, SendMessageRequest, TaskState

    request = SendMessageRequest(message=_message(ctx))
    request.configuration.return_immediately = True
    task = None
    try:
        async for event in _call(client.send_message(request=request)):
            if event.HasField("task"):
                task = event.task
            elif event.HasField("message"):  # an immediate answer, no task
                return _completed(ctx, [event.message], [])
        if task is None:
            raise RemoteUnavailable("the A2A agent answered with neither a task nor a message")
        while TaskState.Name(task.status.state) not in TERMINAL:
            await asyncio.sleep(poll_s)
            task = await _call_one(client.get_task(request=GetTaskRequest(id=task.id)))
    except asyncio.CancelledError:  # the hop was cancelled or timed out: so is the remote task
        if task is not None:
            try:
                await asyncio.wait_for(client.cancel_task(request=CancelTaskRequest(id=task.id)), 2)
            except Exception:  # best effort: the remote agent may be gone
                pass
        raise
    return _ended(ctx, task)


async def _call(stream):
    try:
        async for event in stream:
            yield event
    except Exception as err:
        _raise_for(err)


async def _call_one(awaitable):
    try:
        return await awaitable
    except Exception as err:
        _raise_for(err)


def _raise_for(err: BaseException, what: str = "the A2A call failed"):
    """An A2A client error as the hop's retry policy should see it (`what`: what was being done)."""
    for cause in _causes(err):
        if isinstance(cause, PermanentError):
            raise cause from None
    status = getattr(getattr(err, "response", None), "status_code", None) or getattr(err, "status_code", None)
    if isinstance(status, int) and 400 <= status < 500 and not retried_status(status):
        raise PermanentError(f"the A2A agent refused the request ({status}): {err}") from None
    if isinstance(err, (httpx.HTTPError, OSError)) or isinstance(status, int) or "connect" in str(err).lower():
        raise RemoteUnavailable(f"{what}: the A2A agent is unavailable: {type(err).__name__}: {err}") from None
    raise RemoteUnavailable(f"{what}: {type(err).__name__}: {err}") from None


def _causes(err: BaseException):
    """`err` and what it was raised from, innermost last (a wrapped error keeps its cause)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


class RemoteUsage(ModelUsage):
    """A remote agent's report of what its task spent."""

    model: str = Field(default="", max_length=128)
    cost: float = Field(default=0.0, ge=0, le=10**12)


def _reported_usage(ctx: HandoffContext, task: Any) -> None:
    """What the remote agent says its task spent (`usage` in the task's metadata: `model`,
    `prompt_tokens`, `completion_tokens`, `model_calls`, `cost`), added to the hop's usage; a
    malformed report is left out (the hop's result does not depend on it)."""
    from google.protobuf import json_format

    if not task.HasField("metadata"):
        return
    usage = json_format.MessageToDict(task.metadata).get("usage")
    if not isinstance(usage, dict):
        return
    try:
        spent = RemoteUsage.model_validate(usage)
    except ValueError:
        return
    ctx.report_usage(model=spent.model, prompt_tokens=spent.prompt_tokens, completion_tokens=spent.completion_tokens,
                     model_calls=spent.model_calls, cost=spent.cost)


def _ended(ctx: HandoffContext, task: Any) -> HandoffResult:
    from a2a.types import Role, TaskState

    _reported_usage(ctx, task)
    state = TaskState.Name(task.status.state)
    said = _text_of([task.status.message]) if task.status.HasField("message") else ""
    if state == "TASK_STATE_COMPLETED":
        messages = [m for m in task.history if m.role == Role.ROLE_AGENT] + ([task.status.message] if said else [])
        return _completed(ctx, messages, list(task.artifacts), task.id)
    reason = {
        "TASK_STATE_CANCELED": "the remote agent cancelled its task",
        "TASK_STATE_INPUT_REQUIRED": "the remote agent asks for input a hop cannot give",
        "TASK_STATE_AUTH_REQUIRED": "the remote agent asks for authentication a hop cannot give",
    }.get(state, f"the remote agent's task ended {state.removeprefix('TASK_STATE_').lower()}")
    return ctx.fail(f"{reason}" + (f": {said[:500]}" if said else ""), {"remote_task": task.id})


def _text_of(messages: Sequence[Any]) -> str:
    from a2a.helpers.proto_helpers import get_text_parts

    return "\n".join(t for m in messages for t in get_text_parts(m.parts))


def _completed(ctx: HandoffContext, messages: Sequence[Any], artifacts: Sequence[Any],
               remote_task: str = "") -> HandoffResult:
    from a2a.helpers.proto_helpers import get_data_parts, get_text_parts

    data: dict[str, Any] = {}
    for part in [p for m in messages for p in get_data_parts(m.parts)] + [
            p for a in artifacts for p in get_data_parts(a.parts)]:
        if isinstance(part, dict):
            data.update(part)
    texts = [t for m in messages for t in get_text_parts(m.parts)] + [
        t for a in artifacts for t in get_text_parts(a.parts)]
    result: dict[str, Any] = {"text": "\n".join(texts)[:MAX_TEXT_CHARS], "data": data,
                              "artifacts": [a.name or a.artifact_id for a in artifacts]}
    if remote_task:
        result["remote_task"] = remote_task
    problem = nesting_problem(data, "the remote agent's data")
    if problem:
        raise PermanentError(problem)
    return ctx.complete(result)

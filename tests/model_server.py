"""A deterministic OpenAI-compatible chat-completions server on loopback, for the routing logic of
`handoff.llm` (the real model, SmolLM2 on llama.cpp's server, is tested in tests/test_llm_model.py).

Each request is answered by the test's `answer(request, n)`: a `Reply` (a tool call, a text, an
HTTP error), after `delay_s` if it says so. Every request is kept, for the test to read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from handoff.server import free_port


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

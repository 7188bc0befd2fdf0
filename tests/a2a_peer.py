"""An A2A agent built with the A2A SDK's own server classes, not handoff's: the independent peer
handoff's remote-agent hop is tested against (tests/test_a2a.py).

    python -m tests.a2a_peer --port PORT [--delay S] [--marks DIR] [--fail REASON] [--ask QUESTION]
                             [--reply-mb N] [--card-endpoint URL]

A "planner": it reads the message's text and data part and completes with an artifact holding a
plan (or fails, or asks for input). It leaves a mark file when a task starts, so a test can kill it
mid-task. `--reply-mb`: its artifact carries that many megabytes of text (a reply too large);
`--card-endpoint`: its card names that endpoint (another origin) instead of its own."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

import uvicorn
from a2a.helpers.proto_helpers import get_data_parts, get_text_parts
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    Message,
    Part,
    Task,
    TaskState,
    TaskStatus,
)
from a2a.utils import TransportProtocol
from google.protobuf import struct_pb2
from starlette.applications import Starlette


class Planner(AgentExecutor):
    def __init__(self, delay_s: float, marks: Path | None, fail: str | None, ask: str | None,
                 reply_mb: float = 0.0, usage: dict | None = None) -> None:
        self.delay_s, self.marks, self.fail, self.ask, self.reply_mb = delay_s, marks, fail, ask, reply_mb
        self.usage = usage

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        await event_queue.enqueue_event(Task(id=context.task_id, context_id=context.context_id,
                                             status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED),
                                             history=[context.message]))
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        await updater.start_work()
        if self.marks is not None:
            (self.marks / f"peer-started-{os.getpid()}").write_text(context.task_id)
        await asyncio.sleep(self.delay_s)
        text = " ".join(get_text_parts(context.message.parts))
        data = next((d for d in get_data_parts(context.message.parts) if isinstance(d, dict)), {})

        def say(words: str) -> Message:
            return updater.new_agent_message([Part(text=words)])

        if self.fail:
            await updater.failed(say(self.fail))
            return
        if self.ask:
            await updater.requires_input(say(self.ask))
            return
        plan = struct_pb2.Value()
        plan.struct_value.update({"plan": [f"understand: {text}", "write the tests", "run them"],
                                  "context_keys": sorted(data.get("context", {})),
                                  "earlier_results": len(data.get("previous_results", [])),
                                  "by": "a2a-peer"})
        if self.reply_mb:
            plan.struct_value.update({"padding": "x" * int(self.reply_mb * 1024 * 1024)})
        await updater.add_artifact([Part(data=plan)], name="test plan")
        await updater.update_status(TaskState.TASK_STATE_COMPLETED, message=say(f"planned: {text}"),
                                    metadata={"usage": self.usage} if self.usage else None)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--marks", type=Path)
    parser.add_argument("--fail")
    parser.add_argument("--ask")
    parser.add_argument("--reply-mb", type=float, default=0.0)
    parser.add_argument("--card-endpoint")
    parser.add_argument("--usage", type=json.loads, help="what the task reports it spent (JSON), in its metadata")
    args = parser.parse_args()
    url = args.card_endpoint or f"http://127.0.0.1:{args.port}/"
    card = AgentCard(
        name="Peer Planner", description="Plans tests (an A2A agent built without handoff)", version="1.0.0",
        capabilities=AgentCapabilities(streaming=True), default_input_modes=["text/plain"],
        default_output_modes=["application/json"],
        skills=[AgentSkill(id="plan", name="plan tests", description="plans tests", tags=["testing"])],
        supported_interfaces=[AgentInterface(protocol_binding=TransportProtocol.JSONRPC, url=url,
                                             protocol_version="1.0")])
    handler = DefaultRequestHandler(agent_executor=Planner(args.delay, args.marks, args.fail, args.ask, args.reply_mb, args.usage),
                                    task_store=InMemoryTaskStore(), agent_card=card)
    app = Starlette(routes=[*create_agent_card_routes(card), *create_jsonrpc_routes(handler, rpc_url="/")])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

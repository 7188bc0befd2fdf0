"""What an A2A message does: it starts a chain (the task id is the chain id) and follows it hop by
hop; a follow-up message on a task that waits for approval decides it; GetTask and CancelTask are
answered from Temporal."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass
import time
from typing import Any
from uuid import UUID

from a2a.helpers.proto_helpers import get_data_parts, get_text_parts
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.tasks import TaskUpdater
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    Task,
    TaskState,
    TaskStatus,
)
from a2a.utils.errors import TaskNotCancelableError, TaskNotFoundError
from google.protobuf import json_format
from temporalio.client import Client

from handoff.client import approve_chain, build_request, cancel_chain, follow_chain, reject_chain, start_request
from handoff.constants import MAX_NESTING
from handoff.errors import ChainNotFound, InvalidRequest
from handoff.models import ChainStatus, nesting_problem
from handoff.a2a.tasks import (
    MEMO_KEY,
    ChainTaskStore,
    agent_message,
    artifact_of,
    chain_task,
    completed_hops,
    status_line,
)

POLL_S = 0.25
CANCEL_WAIT_S = 5.0


@dataclass(frozen=True)
class Started:
    """What a message asks for: the chain's request, as the client API validates it."""

    request: Any
    memo: dict[str, Any]


def _request_of(context: RequestContext, agent_from_path: str | None) -> Started:
    """The chain a message starts; `InvalidRequest` saying what is wrong with it."""
    message = context.message
    if message is None:
        raise InvalidRequest("no message")
    task = "\n".join(t for t in get_text_parts(message.parts) if t.strip()).strip()
    data: dict[str, Any] = {}
    for part in get_data_parts(message.parts):
        if not isinstance(part, dict):
            raise InvalidRequest("a data part must be a JSON object")
        data.update(part)
    # the request's metadata and the message's (which wins)
    metadata = {**context.metadata, **json_format.MessageToDict(message.metadata)}
    agent = agent_from_path or metadata.get("agent")
    capability = metadata.get("capability")
    policy = metadata.get("policy") or {}
    problem = nesting_problem(data, "the message's data", MAX_NESTING) or nesting_problem(policy, "metadata.policy")
    if problem:
        raise InvalidRequest(problem)
    if not isinstance(policy, dict):
        raise InvalidRequest("metadata.policy must be an object of the chain's policy fields")
    try:
        request = build_request(task_description=task, to_agent=agent, capability=capability, context_data=data,
                                chain_id=context.task_id, policy=policy)
    except InvalidRequest:
        raise
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    memo = {"context_id": context.context_id,
            "message": json_format.MessageToDict(message, preserving_proto_field_name=False)}
    return Started(request, memo)


def _decision(context: RequestContext) -> tuple[bool, str]:
    """A follow-up message's decision on the hop that waits: approve, or reject with a reason."""
    text = " ".join(get_text_parts(context.message.parts) if context.message else []).strip()
    for part in get_data_parts(context.message.parts if context.message else []):
        if isinstance(part, dict) and isinstance(part.get("approved"), bool):
            return part["approved"], str(part.get("comment") or part.get("reason") or text)
    word, _, rest = text.partition(":")
    if word.strip().lower() in ("approve", "approved", "yes", "ok"):
        return True, rest.strip()
    if word.strip().lower() in ("reject", "rejected", "no"):
        return False, rest.strip() or "rejected through A2A"
    raise InvalidRequest("answer `approve` (optionally `approve: comment`) or `reject: reason`")


class ChainExecutor(AgentExecutor):
    """Starts a chain per message (the task id is the chain id) and follows it hop by hop."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        current = context.current_task
        updater = TaskUpdater(event_queue, context.task_id, current.context_id if current else context.context_id)
        if current is not None:  # a follow-up: the person's decision on the hop the chain waits on
            await self._decide(context, updater)
            await self._follow(UUID(context.task_id), updater, {a.artifact_id for a in current.artifacts})
            return
        agent = context.call_context.state.get("agent_id") if context.call_context else None
        task = Task(id=context.task_id, context_id=context.context_id,
                    status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED), history=[context.message])
        await event_queue.enqueue_event(task)
        try:
            started = _request_of(context, agent)
            await start_request(self._client, started.request, memo={MEMO_KEY: started.memo})
        except (InvalidRequest, ValueError) as err:
            await updater.reject(agent_message(f"refused: {err}"))
            return
        await self._follow(UUID(context.task_id), updater, set())

    async def _decide(self, context: RequestContext, updater: TaskUpdater) -> None:
        user = context.call_context.user if context.call_context else None
        by = f"a2a:{user.user_name}" if user is not None and user.is_authenticated else "a2a:loopback"
        try:
            approved, comment = _decision(context)
            if approved:
                await approve_chain(self._client, context.task_id, by=by, comment=comment)
            else:
                await reject_chain(self._client, context.task_id, by=by, reason=comment)
        except InvalidRequest as err:
            await updater.requires_input(agent_message(f"{err}"))

    async def _follow(self, chain_id: UUID, updater: TaskUpdater, shown: set[str]) -> None:
        """Emit the chain's progress until it ends or waits for a person: a status update when
        what it does changes, an artifact per completed hop."""
        last = ""
        async with aclosing(follow_chain(self._client, chain_id, every_s=POLL_S)) as records:
            async for record in records:
                for hop in completed_hops(record):
                    if str(hop.handoff_id) not in shown:
                        shown.add(str(hop.handoff_id))
                        artifact = artifact_of(hop)
                        await updater.add_artifact(list(artifact.parts), artifact_id=artifact.artifact_id,
                                                   name=artifact.name, metadata=dict(artifact.metadata))
                line = status_line(record)
                if record.status.ended:
                    data = record.final_result if record.status is ChainStatus.COMPLETED else None
                    final = {ChainStatus.COMPLETED: updater.complete, ChainStatus.CANCELLED: updater.cancel,
                             ChainStatus.REJECTED: updater.reject}.get(record.status, updater.failed)
                    await final(agent_message(line, data))
                    return
                if record.status is ChainStatus.AWAITING_APPROVAL:
                    await updater.requires_input(agent_message(
                        f"{line}: answer `approve` (or `approve: comment`) or `reject: reason`"))
                    return
                if line != last:
                    last = line
                    await updater.start_work(agent_message(line))

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        try:
            await cancel_chain(self._client, context.task_id)
        except (InvalidRequest, ChainNotFound):
            pass


class ChainRequestHandler(DefaultRequestHandler):
    """The SDK's handler, with `GetTask` and `CancelTask` answered from Temporal: the chain is the
    task, wherever and whenever it was started."""

    def __init__(self, client: Client, card: AgentCard) -> None:
        super().__init__(agent_executor=ChainExecutor(client), task_store=ChainTaskStore(client), agent_card=card)
        self._client = client

    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task | None:
        task = await chain_task(self._client, params.id)
        if task is None:
            return await super().on_get_task(params, context)
        if params.HasField("history_length"):
            del task.history[: max(0, len(task.history) - params.history_length)]
        return task

    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext) -> Task | None:
        try:
            await cancel_chain(self._client, params.id)
        except ChainNotFound:
            raise TaskNotFoundError from None
        except InvalidRequest as err:
            raise TaskNotCancelableError(str(err)) from None
        deadline = time.monotonic() + CANCEL_WAIT_S
        while True:
            task = await chain_task(self._client, params.id)
            if task is None or task.status.state == TaskState.TASK_STATE_CANCELED or time.monotonic() > deadline:
                return task
            await asyncio.sleep(0.1)

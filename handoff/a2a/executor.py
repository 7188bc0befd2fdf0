"""What an A2A message does: it starts a chain (the task id is the chain id) and follows it hop by
hop while someone listens; a follow-up message on a task that waits for approval decides it, and
one on a task whose chain runs steers its next hop;
GetTask and CancelTask are answered from Temporal. A task belongs to the caller that started it:
another caller is told it does not exist, unless it is an operator (`handoff.a2a.tasks.may_see`)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
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
from a2a.server.request_handlers.default_request_handler import TERMINAL_TASK_STATES
from a2a.server.tasks import PushNotificationConfigStore, TaskUpdater
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    GetExtendedAgentCardRequest,
    GetTaskRequest,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from a2a.utils.errors import (
    ExtendedAgentCardNotConfiguredError,
    InvalidRequestError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from google.protobuf import json_format
from temporalio.client import Client

from handoff.client import (
    approve_chain,
    build_request,
    cancel_chain,
    context_limit,
    reject_chain,
    start_request,
    steer_chain,
)
from handoff.client.watch import watched_records
from handoff.constants import MAX_NESTING
from handoff.errors import ChainNotFound, InvalidRequest
from handoff.models import nesting_problem
from handoff.a2a.tasks import (
    MEMO_KEY,
    NEW_TASK,
    ChainTaskStore,
    ChainProgress,
    caller_of,
    agent_message,
    chain_task,
    task_of,
    visible_memo,
)

CANCEL_WAIT_S = 5.0
UNHEARD_POLLS = 4
"""Changes of the chain seen with nobody listening after which its task is no longer followed."""
LISTENING = "handoff_listening_to"
"""The call context's note of the task a request listens to."""


@dataclass(frozen=True)
class Started:
    """What a message asks for: the chain's request, as the client API validates it."""

    request: Any
    memo: dict[str, Any]


def _request_of(context: RequestContext, agent_from_path: str | None, carried: int) -> Started:
    """The chain a message starts; `InvalidRequest` saying what is wrong with it. `carried`: the
    largest context this deployment carries (no policy may raise it)."""
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
                                chain_id=context.task_id, policy=policy, max_context_bytes=carried)
    except InvalidRequest:
        raise
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    memo = {"context_id": context.context_id, "owner": caller_of(context.call_context).name,
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


def agent_of(call: ServerCallContext | None) -> str | None:
    """The agent a request names: its per-agent endpoint's, or its `tenant` (how a gRPC or
    JSON-RPC request names an agent: the per-agent card's gRPC interface declares it)."""
    if call is None:
        return None
    return call.state.get("agent_id") or call.tenant or None


class Listeners:
    """How many requests listen to each task (a blocking send, a stream, a resubscription): a
    chain is followed for its task only while someone does."""

    def __init__(self) -> None:
        self._count: Counter[str] = Counter()

    def add(self, task_id: str) -> None:
        self._count[task_id] += 1

    def remove(self, task_id: str) -> None:
        self._count[task_id] -= 1
        if self._count[task_id] <= 0:
            del self._count[task_id]

    def __contains__(self, task_id: str) -> bool:
        return self._count.get(task_id, 0) > 0


class ChainExecutor(AgentExecutor):
    """Starts a chain per message (the task id is the chain id) and follows it hop by hop."""

    def __init__(self, client: Client, listeners: Listeners) -> None:
        self._client = client
        self._listeners = listeners

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        current = context.current_task
        updater = TaskUpdater(event_queue, context.task_id, current.context_id if current else context.context_id)
        if current is not None:  # a follow-up: the person's decision on the hop the chain waits on
            await self._decide(context, updater)
            await self._follow(UUID(context.task_id), updater, {a.artifact_id for a in current.artifacts})
            return
        agent = agent_of(context.call_context)
        task = Task(id=context.task_id, context_id=context.context_id,
                    status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED), history=[context.message])
        await event_queue.enqueue_event(task)
        try:
            started = _request_of(context, agent, context_limit(self._client))
            await start_request(self._client, started.request, memo={MEMO_KEY: started.memo})
        except (InvalidRequest, ValueError) as err:
            await updater.reject(agent_message(f"refused: {err}"))
            return
        await self._follow(UUID(context.task_id), updater, set())

    async def _decide(self, context: RequestContext, updater: TaskUpdater) -> None:
        by = f"a2a:{caller_of(context.call_context).name}"
        try:
            approved, comment = _decision(context)
            if approved:
                await approve_chain(self._client, context.task_id, by=by, comment=comment)
            else:
                await reject_chain(self._client, context.task_id, by=by, reason=comment)
        except InvalidRequest as err:
            await updater.requires_input(agent_message(f"{err}"))

    async def _follow(self, chain_id: UUID, updater: TaskUpdater, shown: set[str]) -> None:
        """Emit the chain's progress until it ends or waits for a person, or nobody listens any
        more (the chain goes on; GetTask reads it from Temporal): a status update when what it does
        changes, an artifact per completed hop."""
        progress = ChainProgress(shown)
        unheard = 0
        async with aclosing(watched_records(self._client, chain_id)) as records:
            async for record in records:
                unheard = 0 if str(chain_id) in self._listeners else unheard + 1
                if unheard >= UNHEARD_POLLS and not record.status.ended:
                    return
                artifacts, status = progress.changes(record)
                for artifact in artifacts:
                    await updater.add_artifact(list(artifact.parts), artifact_id=artifact.artifact_id,
                                               name=artifact.name, metadata=dict(artifact.metadata))
                if status is not None:
                    await updater.update_status(status.state, status.message)
                if progress.paused:
                    return

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        try:
            await cancel_chain(self._client, context.task_id)
        except (InvalidRequest, ChainNotFound):
            pass


class ChainRequestHandler(DefaultRequestHandler):
    """The SDK's handler, with `GetTask` and `CancelTask` answered from Temporal: the chain is the
    task, wherever and whenever it was started, for the callers who may see it. It counts the
    requests listening to each task, so a chain is followed only while someone listens."""

    def __init__(self, client: Client, card: AgentCard, *, push_configs: PushNotificationConfigStore | None = None,
                 extended_card: Callable[[ServerCallContext], Awaitable[AgentCard]] | None = None) -> None:
        self._listeners = Listeners()
        self._extended_card = extended_card
        super().__init__(agent_executor=ChainExecutor(client, self._listeners), task_store=ChainTaskStore(client),
                         agent_card=card, push_config_store=push_configs)
        self._client = client

    @property
    def client(self) -> Client:
        """The Temporal client the handler reads and starts chains with."""
        return self._client

    async def _setup_active_task(self, params: SendMessageRequest, call_context: ServerCallContext):
        """The SDK's set-up of a message's task (where its task id is known), counted as a listener
        of that task until the request ends (`on_message_send`, `on_message_send_stream`). A
        message naming no task starts one whose id this server makes: no chain has it yet, so the
        task store does not ask Temporal for it (`NEW_TASK`)."""
        call_context.state[NEW_TASK] = not params.message.task_id
        active, request_context = await super()._setup_active_task(params, call_context)
        self._listeners.add(request_context.task_id)
        call_context.state[LISTENING] = request_context.task_id
        return active, request_context

    def _done_listening(self, context: ServerCallContext) -> None:
        task_id = context.state.pop(LISTENING, None)
        if task_id is not None:
            self._listeners.remove(task_id)

    async def _steered(self, params: SendMessageRequest, context: ServerCallContext) -> Task | None:
        """A follow-up on a task whose chain runs (waiting for nobody): its text steers the chain's
        next hop at once, and the task is the answer, without waiting for the request that may be
        following the task (the SDK runs one at a time per task). None: not such a follow-up."""
        task_id = params.message.task_id
        if not task_id:
            return None
        task = await self.task_store.get(task_id, context)  # None for a caller who may not see it
        if task is None or task.status.state not in (TaskState.TASK_STATE_WORKING, TaskState.TASK_STATE_SUBMITTED):
            return None
        text = " ".join(get_text_parts(params.message.parts)).strip()
        try:
            await steer_chain(self._client, task_id, message=text, by=f"a2a:{caller_of(context).name}")
        except InvalidRequest:
            return None  # it ended meanwhile, say: the SDK's handling says so
        steered = await self.task_store.get(task_id, context)
        if steered is not None and steered.status.state == TaskState.TASK_STATE_SUBMITTED:
            steered.status.state = TaskState.TASK_STATE_WORKING  # it took the steer: it runs
        return steered

    async def on_message_send(self, params: SendMessageRequest, context: ServerCallContext):
        steered = await self._steered(params, context)
        if steered is not None:
            return steered
        try:
            return await super().on_message_send(params, context)
        finally:
            self._done_listening(context)

    async def on_message_send_stream(self, params: SendMessageRequest, context: ServerCallContext):
        steered = await self._steered(params, context)
        if steered is not None:
            yield steered
            return
        try:
            async for event in super().on_message_send_stream(params, context):
                yield event
        finally:
            self._done_listening(context)

    async def on_subscribe_to_task(self, params: SubscribeToTaskRequest, context: ServerCallContext):
        """The task as it stands first, every hop's artifact so far among it (what a client that
        lost its stream missed), then its changes as they happen, until it ends or waits for a
        person: read from the chain's history (`watched_records`), so it serves any task this
        caller may see, followed by this server or not, before and after a restart of either."""
        a2a = await visible_memo(self._client, params.id, caller_of(context))
        if a2a is None:
            raise TaskNotFoundError
        progress: ChainProgress | None = None
        context_id = ""
        async with aclosing(watched_records(self._client, params.id)) as records:
            async for record in records:
                if progress is None:
                    task = task_of(record, a2a)
                    if task.status.state in TERMINAL_TASK_STATES:
                        raise UnsupportedOperationError(
                            message=f"task {task.id} has ended ({TaskState.Name(task.status.state)}): GetTask reads it")
                    yield task
                    context_id = task.context_id
                    progress = ChainProgress({a.artifact_id for a in task.artifacts})
                    progress.changes(record)
                else:
                    artifacts, status = progress.changes(record)
                    for artifact in artifacts:
                        yield TaskArtifactUpdateEvent(task_id=params.id, context_id=context_id, artifact=artifact)
                    if status is not None:
                        yield TaskStatusUpdateEvent(task_id=params.id, context_id=context_id, status=status)
                if progress.paused:
                    return

    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task | None:
        task = await chain_task(self._client, params.id, caller_of(context))
        if task is None:
            return await super().on_get_task(params, context)
        if params.HasField("history_length"):
            del task.history[: max(0, len(task.history) - params.history_length)]
        return task

    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext) -> Task | None:
        caller = caller_of(context)
        if await visible_memo(self._client, params.id, caller) is None:
            raise TaskNotFoundError
        try:
            await cancel_chain(self._client, params.id)
        except ChainNotFound:
            raise TaskNotFoundError from None
        except InvalidRequest as err:
            raise TaskNotCancelableError(str(err)) from None
        deadline = time.monotonic() + CANCEL_WAIT_S
        while True:
            task = await chain_task(self._client, params.id, caller)
            if task is None or task.status.state == TaskState.TASK_STATE_CANCELED or time.monotonic() > deadline:
                return task
            await asyncio.sleep(0.1)

    async def on_get_extended_agent_card(self, params: GetExtendedAgentCardRequest,
                                         context: ServerCallContext) -> AgentCard:
        """The extended card, to an authenticated caller only (the guards in front refuse the
        others first: 401, UNAUTHENTICATED)."""
        if self._extended_card is None:
            raise ExtendedAgentCardNotConfiguredError
        if not caller_of(context).name:
            raise InvalidRequestError(message="the extended card is for authenticated callers")
        return await self._extended_card(context)

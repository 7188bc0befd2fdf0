"""Chains as A2A tasks: a chain's status as a task state, its completed hops as artifacts, and
the task read back from Temporal for any chain, wherever and whenever it was started."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any
from uuid import UUID

from a2a.server.context import ServerCallContext
from a2a.server.tasks import TaskStore
from a2a.types import (
    Artifact,
    ListTasksRequest,
    ListTasksResponse,
    Message,
    Part,
    Role,
    Task,
    TaskState,
    TaskStatus,
)
from a2a.utils.errors import InvalidParamsError
from google.protobuf import json_format, struct_pb2
from temporalio.client import Client

from handoff.client import get_chain
from handoff.constants import CHAIN_WORKFLOW, SA_STATUS
from handoff.errors import ChainNotFound, unless_missing
from handoff.servers.http import Principal
from handoff.models import ChainRecord, ChainStatus, HopStatus

MEMO_KEY = "a2a"
"""The chain's memo key for what A2A knows of it: the context id, the request's message, and the
caller that started it (its owner)."""
STATE_OF: dict[ChainStatus, int] = {
    ChainStatus.RUNNING: TaskState.TASK_STATE_WORKING,
    ChainStatus.AWAITING_APPROVAL: TaskState.TASK_STATE_INPUT_REQUIRED,
    ChainStatus.COMPLETED: TaskState.TASK_STATE_COMPLETED,
    ChainStatus.CANCELLED: TaskState.TASK_STATE_CANCELED,
    ChainStatus.REJECTED: TaskState.TASK_STATE_REJECTED,
    ChainStatus.FAILED: TaskState.TASK_STATE_FAILED,
    ChainStatus.DEPTH_EXCEEDED: TaskState.TASK_STATE_FAILED,
    ChainStatus.BUDGET_EXCEEDED: TaskState.TASK_STATE_FAILED,
    ChainStatus.LOOP_DETECTED: TaskState.TASK_STATE_FAILED,
}
"""Every chain status's A2A task state."""


def agent_message(text: str, data: dict[str, Any] | None = None) -> Message:
    parts = [Part(text=text)]
    if data:
        value = struct_pb2.Value()
        value.struct_value.update(data)
        parts.append(Part(data=value))
    return Message(role=Role.ROLE_AGENT, message_id=f"handoff-{time.time_ns()}", parts=parts)


def _struct(data: dict[str, Any]) -> struct_pb2.Value:
    value = struct_pb2.Value()
    value.struct_value.update(json.loads(json.dumps(data, default=str)))
    return value


def artifact_of(hop) -> Artifact:
    """A completed hop's result as an A2A artifact (its id the hop's handoff id)."""
    artifact = Artifact(artifact_id=str(hop.handoff_id), name=f"hop {hop.hop}: {hop.from_agent} -> {hop.to_agent}",
                        description=hop.task_description[:500], parts=[Part(data=_struct(hop.result_data))])
    artifact.metadata.update({"hop": hop.hop, "agent": hop.to_agent, "kind": hop.kind.value})
    return artifact


def completed_hops(record: ChainRecord) -> list:
    return [h for h in record.all_hops() if h.status is HopStatus.COMPLETED and h.handoff_id is not None]


def status_line(record: ChainRecord) -> str:
    """What the chain is doing, in a line: its open hops, or how it ended."""
    if record.status.ended:
        if record.status is ChainStatus.COMPLETED:
            summary = record.final_result.get("summary") or "completed"
            return f"completed: {summary}"
        return f"{record.status.value}: {record.error or ''}"
    open_hops = [h for h in record.all_hops() if h.status.open]
    if not open_hops:
        return "waiting for the chain worker"
    return "; ".join(f"hop {h.hop}: {h.from_agent} -> {h.to_agent} {h.status.value.replace('_', ' ')}"
                     for h in open_hops)


def task_of(record: ChainRecord, a2a: dict[str, Any] | None) -> Task:
    """The chain as an A2A task: its state, its completed hops' results as artifacts, and the
    message that started it (from the chain's memo, or its task text) as history."""
    a2a = a2a or {}
    state = STATE_OF[record.status] if record.hops or record.status.ended else TaskState.TASK_STATE_SUBMITTED
    data = record.final_result if record.status is ChainStatus.COMPLETED else None
    task = Task(id=str(record.chain_id), context_id=a2a.get("context_id") or str(record.chain_id),
                status=TaskStatus(state=state, message=agent_message(status_line(record), data)),
                artifacts=[artifact_of(h) for h in completed_hops(record)])
    # camelCase as the A2A data model spells keys; the snake_case key is the earlier spelling, kept
    # for readers of it
    task.metadata.update({"handoffStatus": record.status.value, "handoff_status": record.status.value})
    if a2a.get("message"):
        task.history.append(json_format.ParseDict(a2a["message"], Message(), ignore_unknown_fields=True))
    else:
        task.history.append(Message(role=Role.ROLE_USER, message_id=f"chain-{record.chain_id}",
                                    task_id=str(record.chain_id), parts=[Part(text=record.task_description)]))
    return task


def caller_of(context: ServerCallContext | None) -> Principal:
    """Who sent an A2A request, as the server's HTTP guard named them (`handoff.servers.http`):
    a principal, an operator when its credentials say so. A request with no caller sees nothing."""
    if context is None or not context.user.is_authenticated:
        return Principal("")
    auth = context.state.get("auth")
    return Principal(context.user.user_name, operator="operator" in getattr(auth, "scopes", ()))


def may_see(caller: Principal, a2a: dict[str, Any] | None) -> bool:
    """Whether `caller` may see (and decide, follow up, cancel) a chain whose A2A memo is `a2a`:
    the caller that started it through A2A, or an operator. A chain started otherwise (the client
    API, the CLI) has no A2A owner: operators alone see it."""
    owner = (a2a or {}).get("owner")
    return caller.operator or (bool(caller.name) and owner == caller.name)


async def visible_memo(client: Client, task_id: str, caller: Principal) -> dict[str, Any] | None:
    """What A2A knows of chain `task_id` (its memo: `{}` for a chain started otherwise), from the
    server's description alone; None when there is no such chain, or `caller` may not see it (the
    same answer: a caller cannot tell another's chains exist)."""
    try:
        UUID(task_id)
    except ValueError:
        return None
    description = await unless_missing(client.get_workflow_handle(task_id).describe())
    if description is None:
        return None
    a2a = await description.memo_value(MEMO_KEY, None) or {}
    return a2a if may_see(caller, a2a) else None


async def chain_task(client: Client, task_id: str, caller: Principal) -> Task | None:
    """The A2A task of chain `task_id`, read from Temporal; None when there is no such chain, or
    `caller` may not see it (`visible_memo`)."""
    a2a = await visible_memo(client, task_id, caller)
    if a2a is None:
        return None
    try:
        record = await get_chain(client, task_id)
    except ChainNotFound:
        return None
    return task_of(record, a2a)


MAX_KEPT_TASKS = 1000
"""Tasks the A2A server keeps in memory (the ones it follows now, and the latest that ended); every
chain's task is read back from Temporal whenever it is asked for."""
ENDED = {TaskState.TASK_STATE_COMPLETED, TaskState.TASK_STATE_FAILED, TaskState.TASK_STATE_CANCELED,
         TaskState.TASK_STATE_REJECTED}


NEW_TASK = "handoff_new_task"
"""The call context's note that its message starts a new task (its id made by this server)."""


DEFAULT_PAGE, MAX_PAGE = 50, 100
"""Tasks per page of ListTasks: by default, and at most."""
MAX_LISTED = 1000
"""Chains ListTasks looks through (newest first): its pages page through these."""


def _page_start(token: str) -> int:
    """Where a page starts: the token a previous page gave (a number), or the first task."""
    if not token:
        return 0
    if not token.isdigit() or len(token) > 6:
        raise InvalidParamsError(message=f"page_token {token[:40]!r} is not one this server gave")
    return int(token)


def _listed(execution: Any, a2a: dict[str, Any]) -> Task:
    """A chain as ListTasks shows it without reading its record: its state from its search
    attribute (or how its execution ended)."""
    status = execution.typed_search_attributes.get(SA_STATUS)
    try:
        state = STATE_OF[ChainStatus(status)] if status else TaskState.TASK_STATE_SUBMITTED
    except ValueError:
        state = TaskState.TASK_STATE_UNSPECIFIED
    task = Task(id=execution.id, context_id=a2a.get("context_id") or execution.id, status=TaskStatus(state=state))
    task.metadata.update({"handoffStatus": status or "", "handoff_status": status or ""})
    return task


class ChainTaskStore(TaskStore):
    """Tasks by owner: in memory while this process follows them (at most `MAX_KEPT_TASKS`, an
    ended one without its messages), and from Temporal for every other chain the caller may see
    (after a restart, or chains started elsewhere)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._tasks: OrderedDict[tuple[str, str], Task] = OrderedDict()

    async def save(self, task: Task, context: ServerCallContext) -> None:
        kept = Task()
        kept.CopyFrom(task)
        if kept.status.state in ENDED:
            del kept.history[:]  # the chain's memo keeps the message; a refused one is kept nowhere
        key = (caller_of(context).name, task.id)
        self._tasks[key] = kept
        self._tasks.move_to_end(key)
        while len(self._tasks) > MAX_KEPT_TASKS:
            self._tasks.popitem(last=False)

    async def get(self, task_id: str, context: ServerCallContext) -> Task | None:
        kept = self._tasks.get((caller_of(context).name, task_id))
        if kept is not None:
            found = Task()
            found.CopyFrom(kept)
            return found
        if context.state.get(NEW_TASK):
            return None  # the task this request starts, not saved yet: no chain has its id
        return await chain_task(self._client, task_id, caller_of(context))

    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        """The chains the caller may see, newest first, from Temporal's visibility: every chain it
        started through A2A (every chain, for an operator), filtered by state and context, a page
        at a time (`page_token`: where the page starts). Artifacts only when asked for: the rest
        comes from the chains' search attributes and memos, without reading their records."""
        caller = caller_of(context)
        size = min(params.page_size or DEFAULT_PAGE, MAX_PAGE)
        start = _page_start(params.page_token)
        query = f"WorkflowType = '{CHAIN_WORKFLOW}'"
        if params.status:
            statuses = [s.value for s, state in STATE_OF.items() if state == params.status]
            query += " AND " + (f"{SA_STATUS.name} IN ({', '.join(repr(s) for s in statuses)})" if statuses
                                else "WorkflowId = ''")
        visible: list[Task] = []
        async for execution in self._client.list_workflows(query, limit=MAX_LISTED):
            a2a = (await execution.memo()).get(MEMO_KEY) or {}
            if not may_see(caller, a2a) or (params.context_id and a2a.get("context_id") != params.context_id):
                continue
            visible.append(_listed(execution, a2a))
        page = visible[start:start + size]
        if params.include_artifacts:
            page = [await chain_task(self._client, t.id, caller) or t for t in page]
        more = start + size < len(visible)
        return ListTasksResponse(tasks=page, page_size=size, total_size=len(visible),
                                 next_page_token=str(start + size) if more else "")

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        self._tasks.pop((caller_of(context).name, task_id), None)


APPROVAL_PROMPT = "answer `approve` (or `approve: comment`) or `reject: reason`"


class ChainProgress:
    """What changed in a chain since the last record seen, as A2A says it: an artifact per hop
    completed since, and the task's new status when what the chain does changes (WORKING with a
    new status line, INPUT_REQUIRED, or how it ended). The one reading of progress that both a
    request following its task (`handoff.a2a.executor`) and push notifications
    (`handoff.a2a.push`) use."""

    def __init__(self, shown: set[str] | None = None) -> None:
        self.shown = set(shown or ())
        self._last: tuple[int, str] | None = None
        self.paused = False
        """The last record ended the chain or left it waiting for a person."""

    def changes(self, record: ChainRecord) -> tuple[list[Artifact], TaskStatus | None]:
        artifacts = []
        for hop in completed_hops(record):
            if str(hop.handoff_id) not in self.shown:
                self.shown.add(str(hop.handoff_id))
                artifacts.append(artifact_of(hop))
        line = status_line(record)
        self.paused = record.status.ended or record.status is ChainStatus.AWAITING_APPROVAL
        state = STATE_OF[record.status] if record.status.ended or self.paused else TaskState.TASK_STATE_WORKING
        if (state, line) == self._last:
            return artifacts, None
        self._last = (state, line)
        if record.status.ended:
            data = record.final_result if record.status is ChainStatus.COMPLETED else None
            return artifacts, TaskStatus(state=state, message=agent_message(line, data))
        if self.paused:
            return artifacts, TaskStatus(state=state, message=agent_message(f"{line}: {APPROVAL_PROMPT}"))
        return artifacts, TaskStatus(state=state, message=agent_message(line))

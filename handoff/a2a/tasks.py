"""Chains as A2A tasks: a chain's status as a task state, its completed hops as artifacts, and
the task read back from Temporal for any chain, wherever and whenever it was started."""

from __future__ import annotations

import json
import time
from typing import Any
from uuid import UUID

from a2a.server.context import ServerCallContext
from a2a.server.tasks import InMemoryTaskStore
from a2a.types import (
    Artifact,
    Message,
    Part,
    Role,
    Task,
    TaskState,
    TaskStatus,
)
from google.protobuf import json_format, struct_pb2
from temporalio.client import Client

from handoff.client import get_chain
from handoff.errors import ChainNotFound
from handoff.models import ChainRecord, ChainStatus, HopStatus

MEMO_KEY = "a2a"
"""The chain's memo key for what A2A knows of it: the context id and the request's message."""
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
    task.metadata.update({"handoff_status": record.status.value})
    if a2a.get("message"):
        task.history.append(json_format.ParseDict(a2a["message"], Message(), ignore_unknown_fields=True))
    else:
        task.history.append(Message(role=Role.ROLE_USER, message_id=f"chain-{record.chain_id}",
                                    task_id=str(record.chain_id), parts=[Part(text=record.task_description)]))
    return task


async def chain_task(client: Client, task_id: str) -> Task | None:
    """The A2A task of chain `task_id`, read from Temporal; None when there is no such chain."""
    try:
        UUID(task_id)
    except ValueError:
        return None
    try:
        record = await get_chain(client, task_id)
    except ChainNotFound:
        return None
    description = await client.get_workflow_handle(task_id).describe()
    return task_of(record, await description.memo_value(MEMO_KEY, None))


class ChainTaskStore(InMemoryTaskStore):
    """The SDK's store for tasks this process follows, and Temporal for the others (after a
    restart, or chains started elsewhere)."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client

    async def get(self, task_id: str, context: ServerCallContext | None = None) -> Task | None:
        return await super().get(task_id, context) or await chain_task(self._client, task_id)

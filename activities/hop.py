"""The hop activity: runs one agent's handler for one handoff, on the agent's own task queue.

Every agent worker registers this activity under the one name `handoff.hop`; the chain
workflow routes a hop to an agent purely by task queue (`agent.<id>`).
"""

from __future__ import annotations

import asyncio
import time

import structlog
from pydantic_core import PydanticSerializationError
from temporalio import activity
from temporalio.api.enums.v1 import PendingActivityState, WorkflowExecutionStatus
from temporalio.common import RawValue
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCStatusCode

from handoff.agents.agent import Agent
from handoff.constants import (
    HOP_ACTIVITY,
    MAX_NESTING,
    INVALID_RESULT_ERROR,
    PERMANENT_ERROR,
    RESULT_TOO_LARGE_ERROR,
)
from handoff.errors import PermanentError
from handoff.settings import Settings, settings, switched_on
from handoff.models import HandoffContext, HandoffResult, HopInput, HopOutput, nesting_problem, sized_payload
from handoff.payloads.history import ResultMissing, fill_context, hop_results
from handoff.activities.progress import ProgressSender

log = structlog.get_logger("handoff.hop")

ENV_LOG_TASK_TEXT = Settings.env_name("log_task_text")


CANCEL_WITHIN_S = 1.0
"""A cancel reaches a running handler within about this much, plus a round trip: from this far
into a hop on, its worker asks the server every this often whether the hop's cancel was asked
(a read, not a billed action), and heartbeats at once when it was, so the cancel comes back."""


class _Keeper:
    """Keeps a running hop alive and cancellable: heartbeats every `interval_s`, so a hop whose
    worker died is retried within the heartbeat timeout, and from `CANCEL_WITHIN_S` on watches
    for a cancel (`_watch`). Timer callbacks start both: most hops end before either is due."""

    def __init__(self, interval_s: float, attempt: int) -> None:
        self._interval_s = interval_s
        self._details = {"attempt": attempt}
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(interval_s, self._beat)
        self._watch_timer = self._loop.call_later(CANCEL_WITHIN_S, self._start_watch)
        self._watching: asyncio.Task | None = None

    def _beat(self) -> None:
        activity.heartbeat(self._details)  # the callback runs in the activity's context
        self._timer = self._loop.call_later(self._interval_s, self._beat)

    def _start_watch(self) -> None:
        self._watching = self._loop.create_task(self._watch())

    async def _watch(self) -> None:
        """Ask the server, every `CANCEL_WITHIN_S`, whether this hop's cancel was asked (or its
        chain is gone); then heartbeat at once: the server's answer to it cancels the hop."""
        try:
            client = activity.client()
        except RuntimeError:  # run outside a worker (ActivityEnvironment): heartbeats alone
            return
        info = activity.info()
        handle = client.get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)
        while True:
            try:
                described = (await handle.describe()).raw_description
            except asyncio.CancelledError:
                raise
            except Exception as err:  # RPCError: not found (the chain is gone) or unreachable
                if getattr(err, "status", None) is not RPCStatusCode.NOT_FOUND:
                    log.debug("hop_watch_failed", error=str(err))
                    await asyncio.sleep(CANCEL_WITHIN_S)
                    continue
                described = None
            running = described is not None and (
                described.workflow_execution_info.status == WorkflowExecutionStatus.WORKFLOW_EXECUTION_STATUS_RUNNING)
            mine = next((a for a in described.pending_activities if a.activity_id == info.activity_id),
                        None) if running else None
            if mine is None or mine.state == PendingActivityState.PENDING_ACTIVITY_STATE_CANCEL_REQUESTED:
                activity.heartbeat(self._details)
                return
            await asyncio.sleep(CANCEL_WITHIN_S)

    def stop(self) -> None:
        self._timer.cancel()
        self._watch_timer.cancel()
        if self._watching is not None:
            self._watching.cancel()


async def _put_back_results(hop: HopInput, attempt: int) -> None:
    """The earlier results the hop's input names (`HopInput.result_refs`) back in its context,
    read from the chain's history: each is carried there once, in its own hop's activity result."""
    info = activity.info()
    handle = activity.client().get_workflow_handle(info.workflow_id, run_id=info.workflow_run_id)
    try:
        history = await handle.fetch_history()
        results = await hop_results(history.events, activity.client().data_converter,
                                    {ref for ref in hop.result_refs if ref is not None})
        fill_context(hop.context, hop.result_refs, results)
    except ResultMissing as err:
        raise _failure(str(err), attempt, kind=INVALID_RESULT_ERROR, permanent=True) from None
    except Exception as err:  # the server unreachable, say: the hop is retried
        raise _failure(f"the chain's earlier results could not be read: {err}", attempt,
                       kind=type(err).__name__, permanent=False) from err


def _progress_of(ctx: HandoffContext, attempt: int) -> ProgressSender:
    """What sends the handler's `ctx.progress` notes to its chain, from its first note on."""
    sender = ProgressSender(str(ctx.chain_id), ctx.handoff_id, attempt)
    ctx._progress = sender.note
    return sender


def _failure(message: str, attempt: int, *, kind: str, permanent: bool) -> ApplicationError:
    return ApplicationError(message, {"attempt": attempt}, type=kind, non_retryable=permanent)


def _outcome(result: object) -> str:
    if not isinstance(result, HandoffResult) or not result.success:
        return "failed"
    if result.fan_out is not None:
        return "fanned_out"
    return "handed_off" if result.next_handoff is not None else "completed"


def hop_activity(agent: Agent):
    """The `handoff.hop` activity implementation for `agent`."""
    task_text = switched_on(settings().log_task_text)  # off: no task text (ids, agents, errors stay)
    handler_ms = None  # created on the first hop: the activity metric meter exists only inside one

    def record_handler_duration(outcome: str, elapsed_s: float) -> None:
        """Agent-side view of a hop (one point per attempt), next to the workflow's
        `handoff_hop_duration` (scheduling to outcome, retries included). A no-op unless the
        worker's runtime exports metrics."""
        nonlocal handler_ms
        if handler_ms is None:
            handler_ms = activity.metric_meter().create_histogram_float(
                "handoff_handler_duration", "time an agent's handler took for one hop attempt, in milliseconds", "ms")
        handler_ms.record(elapsed_s * 1000, {"agent": agent.id, "outcome": outcome})

    @activity.defn(name=HOP_ACTIVITY)
    async def run_hop(hop: HopInput) -> RawValue:
        """Returns the `HopOutput`, already serialized (it was, to check its size)."""
        attempt = activity.info().attempt
        ctx = hop.context
        hop_log = log.bind(
            chain_id=str(ctx.chain_id),
            handoff_id=str(ctx.handoff_id),
            hop=hop.hop,
            from_agent=ctx.from_agent,
            to_agent=agent.id,
            attempt=attempt,
            build_id=agent.version,
        )
        hop_log.info("hop_started", **({"task": ctx.task_description[:200]} if task_text else {}))
        if any(hop.result_refs):
            await _put_back_results(hop, attempt)
        beat = _Keeper(hop.heartbeat_interval_s, attempt)
        progress = _progress_of(ctx, attempt)
        started = time.perf_counter()
        outcome = "failed"
        try:
            result = await agent.handler(ctx)
            outcome = _outcome(result)
        except PermanentError as err:
            hop_log.warning("hop_failed", error=str(err), permanent=True)
            raise _failure(str(err), attempt, kind=PERMANENT_ERROR, permanent=True) from err
        except asyncio.CancelledError:
            outcome = "cancelled"
            hop_log.warning("hop_cancelled")
            raise
        except Exception as err:
            hop_log.warning("hop_failed", error=f"{type(err).__name__}: {err}", permanent=False)
            raise _failure(
                f"{type(err).__name__}: {err}", attempt, kind=type(err).__name__, permanent=False
            ) from err
        finally:
            beat.stop()
            progress.close()
            elapsed = time.perf_counter() - started
            record_handler_duration(outcome, elapsed)
        reported = ctx.reported_usage
        if reported is not None and isinstance(result, HandoffResult):  # ctx.report_usage(...)
            result = result.model_copy(update={"usage": reported if result.usage is None else result.usage.plus(reported)})
        output, payload = _checked_output(result, hop, agent.id, attempt, elapsed, agent.version)
        hop_log.info(
            "hop_completed",
            success=output.result.success,
            duration_ms=round(elapsed * 1000, 3),
            next_agent=(output.result.next_handoff.to_agent or None) if output.result.next_handoff else None,
            next_capability=(
                output.result.next_handoff.to_capability.value
                if output.result.next_handoff and output.result.next_handoff.to_capability
                else None
            ),
            **({"branches": len(output.result.fan_out.branches)} if output.result.fan_out else {}),
        )
        return payload

    return run_hop


def _checked_output(
    result: object, hop: HopInput, agent_id: str, attempt: int, elapsed: float, build_id: str | None = None
) -> tuple[HopOutput, RawValue]:
    """Validate what the handler returned; a malformed or oversized result is not retried."""
    if not isinstance(result, HandoffResult):
        raise _failure(
            f"handler of {agent_id!r} returned {type(result).__name__}, not HandoffResult",
            attempt,
            kind=INVALID_RESULT_ERROR,
            permanent=True,
        )
    problem = nesting_problem(result.result_data, "result_data") or (
        result.next_handoff and nesting_problem(result.next_handoff.context_data, "the handoff's context_data")
    ) or (result.fan_out and nesting_problem(
        [result.fan_out.context_data, *(b.context_data for b in result.fan_out.branches)],
        "the fan-out's context_data", MAX_NESTING + 1))
    if problem:
        raise _failure(f"handler of {agent_id!r} returned a result whose {problem}", attempt,
                       kind=INVALID_RESULT_ERROR, permanent=True)
    try:  # a directive or fan-out built without validation (model_construct) must not reach the workflow
        for part in (result.next_handoff, result.fan_out):
            if part is not None:
                type(part).model_validate(part.model_dump())
    except ValueError as err:
        raise _failure(f"handler of {agent_id!r} returned an invalid handoff: {err}", attempt,
                       kind=INVALID_RESULT_ERROR, permanent=True) from None
    result = result.model_copy(
        update={"handoff_id": hop.context.handoff_id, "execution_time_seconds": elapsed}
    )
    output = HopOutput(result=result, attempt=attempt, agent_id=agent_id, build_id=build_id)
    try:
        payload, size = sized_payload(output)
    except PydanticSerializationError as err:
        raise _failure(f"handler of {agent_id!r} returned a result that is not JSON: {err}", attempt,
                       kind=INVALID_RESULT_ERROR, permanent=True) from None
    if size > hop.max_result_bytes:
        raise _failure(
            f"result of {agent_id!r} is {size:,} bytes, over the {hop.max_result_bytes:,}-byte payload limit",
            attempt,
            kind=RESULT_TOO_LARGE_ERROR,
            permanent=True,
        )
    return output, payload

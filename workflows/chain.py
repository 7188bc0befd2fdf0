"""The chain workflow: one durable execution per delegation chain (`workflow_id == chain_id`).

Per hop: resolve the target (by id, or by capability through the registry), check the
depth and loop rules, run the hop activity on the target agent's own task queue, record
the hop, then follow the agent's `next_handoff`. A hop that cannot start or fails after its
retries falls back to another live agent with the same capability, then to the configured
fallback agent. Whatever happens, the chain ends with a status and every earlier result kept.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    RetryState,
    TimeoutError,
    TimeoutType,
)

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError

    from handoff.constants import (
        CHAIN_WORKFLOW,
        HOP_ACTIVITY,
        MAX_CHAIN_DEPTH,
        NON_RETRYABLE_ERRORS,
        RESOLVE_ACTIVITY,
        SA_AGENTS,
        SA_CURRENT_AGENT,
        SA_DEPTH,
        SA_STATUS,
        agent_task_queue,
    )
    from handoff.models import (
        AGENT_ID_RE,
        AgentCapability,
        Candidate,
        ChainPolicy,
        ChainRecord,
        ChainRequest,
        ChainStatus,
        HandoffContext,
        HandoffResult,
        HopInput,
        HopOutput,
        HopRecord,
        HopStatus,
        ResolveRequest,
        sized_payload,
    )


@dataclass(frozen=True)
class Target:
    """Where the next handoff goes, as asked by the starter or by the previous agent."""

    to_agent: str
    capability: AgentCapability | None
    task: str
    from_agent: str
    visible_keys: tuple[str, ...] | None = None
    visible_previous: int | None = None


class ChainEnd(Exception):
    """Ends the chain with a deliberate status; always caught in `run`."""

    def __init__(self, status: ChainStatus, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def _attempts_in(details: Any) -> int | None:
    """The attempt number the hop activity put in its failure or heartbeat details."""
    for item in details or ():
        if isinstance(item, dict) and isinstance(item.get("attempt"), int):
            return item["attempt"]
    return None


# Bad input and bugs in this code fail the workflow rather than retry its task forever, so a
# chain never stays stuck. Non-determinism (a deploy that cannot replay running chains) is left
# out on purpose: those tasks retry, and the chains resume once the deploy is rolled back.
FAILURE_EXCEPTION_TYPES = [
    ValidationError, ValueError, TypeError, LookupError, AttributeError, ArithmeticError, AssertionError,
]


@workflow.defn(name=CHAIN_WORKFLOW, failure_exception_types=FAILURE_EXCEPTION_TYPES)
class HandoffChainWorkflow:
    @workflow.init
    def __init__(self, request: ChainRequest) -> None:
        self._record = ChainRecord(
            chain_id=request.chain_id,
            status=ChainStatus.RUNNING,
            task_description=request.task_description,
            started_at=workflow.now(),
        )
        self._policy: ChainPolicy = request.policy
        self._context_data: dict[str, Any] = dict(request.context_data)
        self._prior_results = list(request.previous_results)
        self._results: list[dict[str, Any]] = []
        self._first_handoff_id = request.first_handoff_id
        self._visits: Counter[str] = Counter()
        self._asked: set[tuple[str, str]] = set()
        self._failed: set[str] = set()
        self._agents: list[str] = []
        self._search_attributes = workflow.info().typed_search_attributes.get(SA_STATUS) is not None
        self._live_progress = True  # whether each hop upserts the progress search attributes
        self._progress: tuple[list[str], str, int] | None = None  # (agents, current agent, depth)
        self._progress_timer: asyncio.Task[None] | None = None
        # Replay-safe: the workflow metric meter records nothing while replaying history.
        meter = workflow.metric_meter()
        self._hops_metric = meter.create_counter(
            "handoff_hops", "hops by from/to agent and outcome")
        self._hop_ms_metric = meter.create_histogram_float(
            "handoff_hop_duration", "hop duration from scheduling to outcome", "ms")
        self._fallbacks_metric = meter.create_counter(
            "handoff_fallbacks", "hops retried on another agent after a failure")
        self._refusals_metric = meter.create_counter(
            "handoff_refusals", "handoffs refused by the chain's rules")
        self._chains_metric = meter.create_counter("handoff_chains", "chains by final status")

    @workflow.query(name="chain_state")
    def chain_state(self) -> ChainRecord:
        return self._record

    @workflow.run
    async def run(self, request: ChainRequest) -> ChainRecord:
        target = Target(
            to_agent=request.to_agent,
            capability=request.capability,
            task=request.task_description,
            from_agent=request.started_by,
        )
        # Versioned by the input rather than `workflow.patched` (whose marker costs one more
        # visibility write per chain): requests recorded before `progress_after_s` existed lack
        # the field, and those chains keep upserting at every hop, so their histories replay.
        if (self._search_attributes and self._policy.progress_after_s
                and "progress_after_s" in self._policy.model_fields_set):
            self._live_progress = False
            self._progress_timer = asyncio.create_task(self._progress_after(self._policy.progress_after_s))
        try:
            self._check_request(request)
            for depth in range(request.start_depth, MAX_CHAIN_DEPTH + 1):
                if depth >= self._policy.max_depth:
                    self._refuse(depth, target, ChainStatus.DEPTH_EXCEEDED,
                                 f"a handoff to depth {depth} exceeds the limit of "
                                 f"{self._policy.max_depth} hops")
                result, agent = await self._handoff(depth, target)
                self._results.append(result.result_data)
                directive = result.next_handoff
                if directive is None:
                    return self._finish(ChainStatus.COMPLETED)
                target = self._next_target(directive, agent)
        except ChainEnd as end:
            return self._finish(end.status, end.error)
        except (asyncio.CancelledError, CancelledError):
            for hop in self._record.hops:
                if hop.status is HopStatus.RUNNING:
                    self._close_hop(hop, HopStatus.CANCELLED, error="chain cancelled")
            self._finish(ChainStatus.CANCELLED, "chain cancelled")
            raise
        raise AssertionError("unreachable: the depth check ends every chain")

    # -- rules -------------------------------------------------------------------------

    def _check_request(self, request: ChainRequest) -> None:
        if not request.to_agent and request.capability is None:
            raise ChainEnd(ChainStatus.REJECTED, "the chain needs a first agent or capability")
        if request.to_agent and not AGENT_ID_RE.match(request.to_agent):
            raise ChainEnd(ChainStatus.REJECTED, f"invalid agent id {request.to_agent!r}")
        if not request.task_description.strip():
            raise ChainEnd(ChainStatus.REJECTED, "the chain needs a task description")

    def _next_target(self, directive: HandoffContext, agent: str) -> Target:
        self._record.hops[-1].context_added = sorted(directive.context_data)
        if directive.to_agent and not AGENT_ID_RE.match(directive.to_agent):
            raise ChainEnd(ChainStatus.FAILED, f"{agent!r} handed off to invalid agent id {directive.to_agent!r}")
        if not directive.to_agent and directive.to_capability is None:
            raise ChainEnd(ChainStatus.FAILED, f"{agent!r} handed off without an agent or capability")
        self._context_data.update(directive.context_data)
        return Target(
            to_agent=directive.to_agent,
            capability=directive.to_capability,
            task=directive.task_description,
            from_agent=agent,  # set here, never taken from the agent
            visible_keys=(tuple(directive.visible_context_keys)
                          if directive.visible_context_keys is not None else None),
            visible_previous=directive.visible_previous_results,
        )

    def _loop_violation(self, agent: str, task: str) -> str | None:
        if (agent, task) in self._asked:
            return f"{agent!r} was already asked to {task!r} in this chain"
        if self._visits[agent] >= self._policy.max_visits_per_agent:
            return (f"{agent!r} was already visited {self._visits[agent]} times "
                    f"(limit {self._policy.max_visits_per_agent} per chain)")
        return None

    def _refuse(self, depth: int, target: Target, status: ChainStatus, reason: str) -> None:
        self._record.hops.append(HopRecord(
            hop=depth, from_agent=target.from_agent, to_agent=target.to_agent,
            capability=target.capability, task_description=target.task,
            status=HopStatus.REFUSED, error=reason,
            started_at=workflow.now(), completed_at=workflow.now(), duration_ms=0.0,
        ))
        self._refusals_metric.add(1, {"reason": status.value})
        raise ChainEnd(status, reason)

    # -- one handoff, with fallback ----------------------------------------------------

    async def _handoff(self, depth: int, target: Target) -> tuple[HandoffResult, str]:
        """Run one handoff: the first choice, then fallbacks. Returns the result and the agent
        that produced it, or raises ChainEnd."""
        if target.to_agent:
            agent, considered = target.to_agent, [target.to_agent]
            if not self._policy.permits(target.from_agent, agent, target.capability):
                self._refuse(depth, target, ChainStatus.REJECTED,
                             f"the handoff policy does not let {target.from_agent!r} hand off to {agent!r}")
            violation = self._loop_violation(agent, target.task)
            if violation:
                self._refuse(depth, target, ChainStatus.LOOP_DETECTED, violation)
        else:
            agent, considered = await self._pick(depth, target, first=True)
        fallback_for: str | None = None
        errors: list[str] = []
        while agent is not None:
            record, result = await self._attempt(depth, target, agent, fallback_for, considered)
            if result is not None and result.success:
                return result, agent
            errors.append(f"{agent}: {record.error}")
            self._failed.add(agent)
            fallback_for = fallback_for or agent
            agent, considered = await self._pick(depth, target, first=False)
            if agent is not None:
                self._fallbacks_metric.add(1, {"failed_agent": record.to_agent, "to_agent": agent})
        raise ChainEnd(ChainStatus.FAILED, f"hop {depth} failed on every agent tried ({'; '.join(errors)})")

    async def _pick(self, depth: int, target: Target, *, first: bool) -> tuple[str | None, list[str]]:
        """The next agent to try: the least loaded live agent with the capability (or, for a
        hop addressed by name, with that agent's primary capability), else the configured
        fallback agent. Agents that failed in this chain or would loop are skipped."""
        candidates = await self._candidates(target)
        considered = [c.agent_id for c in candidates]
        permitted = [c for c in candidates
                     if self._policy.permits(target.from_agent, c.agent_id, target.capability)]
        if first and candidates and not permitted:
            self._refuse(depth, target, ChainStatus.REJECTED,
                         f"the handoff policy does not let {target.from_agent!r} hand off to "
                         f"{target.capability.value if target.capability else target.to_agent}")
        live = [c for c in permitted if c.live]
        allowed = [c for c in live if not self._loop_violation(c.agent_id, target.task)]
        if allowed:
            return allowed[0].agent_id, considered
        if first and live:
            self._refuse(depth, target, ChainStatus.LOOP_DETECTED,
                         self._loop_violation(live[0].agent_id, target.task) or "loop")
        fallback = self._policy.fallback_agent
        if (fallback and fallback not in self._failed and not self._loop_violation(fallback, target.task)
                and self._policy.permits(target.from_agent, fallback, target.capability)):
            return fallback, [*considered, fallback]
        if first:
            what = target.capability.value if target.capability else target.to_agent
            self._record.hops.append(HopRecord(
                hop=depth, from_agent=target.from_agent, to_agent="", capability=target.capability,
                task_description=target.task, status=HopStatus.UNREACHABLE, candidates=considered,
                error=f"no live agent with capability {what} (considered: {considered or 'none'})",
                started_at=workflow.now(), completed_at=workflow.now(), duration_ms=0.0,
            ))
            raise ChainEnd(ChainStatus.FAILED, self._record.hops[-1].error or "")
        return None, considered

    async def _candidates(self, target: Target) -> list[Candidate]:
        request = ResolveRequest(
            capability=target.capability,
            like_agent=None if target.capability else target.to_agent,
            exclude=sorted(self._failed),
        )
        try:
            return await workflow.execute_local_activity(
                RESOLVE_ACTIVITY,
                request,
                result_type=list[Candidate],
                start_to_close_timeout=timedelta(seconds=10),
                retry_policy=RetryPolicy(maximum_attempts=3, initial_interval=timedelta(milliseconds=200)),
                summary=f"resolve {target.capability.value if target.capability else 'like ' + target.to_agent}",
            )
        except ActivityError as err:  # registry unreachable: no candidates, the chain ends with a status
            workflow.logger.warning("resolve_failed", extra={"chain_id": str(self._record.chain_id),
                                                             "reason": str(err.cause or err)})
            return []

    async def _attempt(
        self, depth: int, target: Target, agent: str, fallback_for: str | None, considered: list[str]
    ) -> tuple[HopRecord, HandoffResult | None]:
        policy = self._policy
        now = workflow.now()
        handoff_id, self._first_handoff_id = self._first_handoff_id or workflow.uuid4(), None
        shown_context, withheld = self._context_data, []
        if target.visible_keys is not None:
            shown_context = {k: v for k, v in self._context_data.items() if k in target.visible_keys}
            withheld = sorted(k for k in self._context_data if k not in target.visible_keys)
        shown_results = [*self._prior_results, *self._results]
        if target.visible_previous is not None:
            shown_results = shown_results[-target.visible_previous:] if target.visible_previous else []
        shown_count = len(shown_results) if target.visible_previous is not None else None
        context = HandoffContext(
            handoff_id=handoff_id,
            chain_id=self._record.chain_id,
            from_agent=target.from_agent,
            to_agent=agent,
            to_capability=target.capability,
            task_description=target.task,
            context_data=shown_context,
            previous_results=shown_results,
            chain_depth=depth,
            created_at=now,
        )
        hop_input = HopInput(
            hop=depth, context=context, fallback_for=fallback_for,
            heartbeat_interval_s=policy.heartbeat_timeout_s / 4,
            max_result_bytes=policy.max_context_bytes, withheld_context_keys=withheld,
            previous_results_shown=shown_count,
        )
        record = HopRecord(
            hop=depth, handoff_id=context.handoff_id, from_agent=target.from_agent, to_agent=agent,
            capability=target.capability, task_description=target.task, status=HopStatus.RUNNING,
            started_at=now, fallback_for=fallback_for,
            candidates=considered if (target.capability or fallback_for) else [],
            withheld_context_keys=withheld,
            previous_results_shown=shown_count,
        )
        self._record.hops.append(record)
        payload, size = sized_payload(hop_input)
        if size > policy.max_context_bytes:
            self._close_hop(record, HopStatus.REFUSED,
                            error=f"hop input is {size:,} bytes, over the {policy.max_context_bytes:,}-byte limit")
            self._refusals_metric.add(1, {"reason": "context_too_large"})
            status = ChainStatus.REJECTED if not self._results else ChainStatus.FAILED
            raise ChainEnd(status, f"context too large for hop {depth}: {record.error}")
        self._visits[agent] += 1
        self._asked.add((agent, target.task))
        self._agents.append(agent)
        self._show_progress(depth, agent, target)
        summary = f"hop {depth}: {target.from_agent} -> {agent}"
        if fallback_for:
            summary += f" (fallback for {fallback_for})"
        try:
            output: HopOutput = await workflow.execute_activity(
                HOP_ACTIVITY,
                payload,  # hop_input, serialized once for its size check
                task_queue=agent_task_queue(agent),
                result_type=HopOutput,
                start_to_close_timeout=timedelta(seconds=policy.hop_timeout_s),
                schedule_to_start_timeout=timedelta(seconds=policy.schedule_to_start_s),
                heartbeat_timeout=timedelta(seconds=policy.heartbeat_timeout_s),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=policy.retry_initial_s),
                    backoff_coefficient=2.0,
                    maximum_interval=timedelta(seconds=policy.retry_initial_s * 16),
                    maximum_attempts=policy.max_attempts,
                    non_retryable_error_types=list(NON_RETRYABLE_ERRORS),
                ),
                summary=f"{summary}: {target.task[:80]}",
            )
        except ActivityError as err:
            if isinstance(err.cause, CancelledError):
                self._close_hop(record, HopStatus.CANCELLED, error="hop cancelled", attempts=1)
                raise asyncio.CancelledError("chain cancelled") from err
            status, error, attempts = self._classify(err, agent)
            self._close_hop(record, status, error=error, attempts=attempts)
            workflow.logger.warning("hop_failed", extra=self._log_fields(record))
            return record, None
        result = output.result
        self._close_hop(
            record,
            HopStatus.COMPLETED if result.success else HopStatus.FAILED,
            attempts=output.attempt,
            result_data=result.result_data,
            error=None if result.success else str(result.result_data.get("error", "agent reported failure")),
        )
        workflow.logger.info("hop_completed", extra=self._log_fields(record))
        return record, result

    def _classify(self, err: ActivityError, agent: str) -> tuple[HopStatus, str, int]:
        cause = err.cause
        exhausted = err.retry_state == RetryState.MAXIMUM_ATTEMPTS_REACHED
        if isinstance(cause, TimeoutError):
            if cause.type == TimeoutType.SCHEDULE_TO_START:
                return (HopStatus.UNREACHABLE,
                        f"no worker of {agent!r} picked up the hop within "
                        f"{self._policy.schedule_to_start_s:g}s", 0)
            attempts = self._policy.max_attempts if exhausted else (
                _attempts_in(cause.last_heartbeat_details) or 1)
            kind = cause.type.name.lower() if cause.type else "timeout"
            return HopStatus.TIMED_OUT, f"hop timed out ({kind}) after {attempts} attempt(s)", attempts
        if isinstance(cause, ApplicationError):
            attempts = self._policy.max_attempts if exhausted else (_attempts_in(cause.details) or 1)
            return HopStatus.FAILED, cause.message, attempts
        return HopStatus.FAILED, str(cause or err), 1

    # -- record keeping ----------------------------------------------------------------

    def _close_hop(self, record: HopRecord, status: HopStatus, *, error: str | None = None,
                   attempts: int | None = None, result_data: dict[str, Any] | None = None) -> None:
        record.status = status
        record.error = error
        if attempts is not None:
            record.attempts = attempts
        if result_data is not None:
            record.result_data = result_data
        record.completed_at = workflow.now()
        if record.started_at is not None:
            record.duration_ms = (record.completed_at - record.started_at).total_seconds() * 1000
        outcome = {"from_agent": record.from_agent, "to_agent": record.to_agent, "outcome": status.value}
        self._hops_metric.add(1, outcome)
        if record.duration_ms is not None:
            self._hop_ms_metric.record(record.duration_ms, outcome)

    def _finish(self, status: ChainStatus, error: str | None = None) -> ChainRecord:
        record = self._record
        record.status = status
        record.error = error
        record.completed_at = workflow.now()
        record.duration_ms = (record.completed_at - record.started_at).total_seconds() * 1000
        record.final_result = self._results[-1] if self._results else {}
        self._chains_metric.add(1, {"status": status.value})
        self._upsert_search_attributes(status)
        workflow.set_current_details(f"**{status.value}**" + (f": {error}" if error else ""))
        workflow.logger.info("chain_finished", extra={"chain_id": str(record.chain_id),
                                                      "status": status.value, "reason": error})
        return record

    async def _progress_after(self, delay_s: float) -> None:
        """From `delay_s` into the chain on, every hop upserts its progress; a chain that ends
        sooner never wakes this timer and writes its search attributes once, in `_finish`."""
        await workflow.sleep(delay_s, summary="from here on, search attributes follow every hop")
        self._live_progress = True
        self._upsert_search_attributes()

    def _upsert_search_attributes(self, status: ChainStatus | None = None) -> None:
        """Upsert the progress (and `status`) values that changed: each upsert is a visibility write."""
        if not self._search_attributes:
            return
        wanted: list[tuple[Any, Any]] = []
        if self._progress is not None:
            agents, agent, depth = self._progress
            wanted += [(SA_AGENTS, agents), (SA_CURRENT_AGENT, agent), (SA_DEPTH, depth)]
        if status is not None:
            wanted.append((SA_STATUS, status.value))
        current = workflow.info().typed_search_attributes
        changed = [key.value_set(value) for key, value in wanted if current.get(key) != value]
        if changed:
            workflow.upsert_search_attributes(changed)

    def _show_progress(self, depth: int, agent: str, target: Target) -> None:
        self._progress = (sorted(set(self._agents)), agent, depth)
        if self._live_progress:
            self._upsert_search_attributes()
        workflow.set_current_details(f"hop {depth}: {target.from_agent} -> **{agent}**: {target.task[:120]}")

    def _log_fields(self, record: HopRecord) -> dict[str, Any]:
        return {
            "chain_id": str(self._record.chain_id),
            "handoff_id": str(record.handoff_id),
            "hop": record.hop,
            "from_agent": record.from_agent,
            "to_agent": record.to_agent,
            "status": record.status.value,
            "reason": record.error,
        }

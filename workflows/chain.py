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
from typing import Any, NoReturn

from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy
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
    from pydantic_core import to_json

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
        UNSUCCESSFUL_CHAIN_ERROR,
        agent_task_queue,
    )
    from handoff.models import (
        AgentCapability,
        Candidate,
        ChainRecord,
        ChainRequest,
        ChainStatus,
        HandoffContext,
        HandoffDirective,
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

    @property
    def addressed(self) -> str:
        """What the handoff names, for messages: the agent, else the capability."""
        return self.to_agent or (self.capability.value if self.capability else "")


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

PROGRESS_TIMER_SUMMARY = ("still running: from here on, the chain's search attributes "
                          "(HandoffCurrentAgent, HandoffDepth, HandoffAgents) follow every hop")
"""The progress timer as the Web UI's timeline names it."""


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
        policy = self._policy = request.policy
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
        self._retry_policy = RetryPolicy(
            initial_interval=timedelta(seconds=policy.retry_initial_s),
            backoff_coefficient=2.0,
            maximum_interval=timedelta(seconds=policy.retry_initial_s * 16),
            maximum_attempts=policy.max_attempts,
            non_retryable_error_types=list(NON_RETRYABLE_ERRORS),
        )
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

    @property
    def record(self) -> ChainRecord:
        """The chain's record as this run holds it (what `chain_state` answers); the rebuild
        of a record from history (`handoff.audit`) replays the history and reads it here."""
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
            # held: the event loop keeps only a weak reference to a task
            self._progress_timer = asyncio.create_task(self._progress_after(self._policy.progress_after_s))
        try:
            problem = request.problem()
            if problem:
                raise ChainEnd(ChainStatus.REJECTED, problem)
            for depth in range(request.start_depth, MAX_CHAIN_DEPTH + 1):
                if depth >= self._policy.max_depth:
                    self._refuse(depth, target, ChainStatus.DEPTH_EXCEEDED,
                                 f"a handoff to depth {depth} exceeds the limit of "
                                 f"{self._policy.max_depth} hops")
                result, agent = await self._handoff(depth, target)
                self._results.append(result.result_data)
                directive = result.next_handoff
                if directive is None:
                    return self._ended(request, ChainStatus.COMPLETED)
                target = self._next_target(depth + 1, directive, agent)
        except ChainEnd as end:
            return self._ended(request, end.status, end.error)
        except (asyncio.CancelledError, CancelledError):
            for hop in self._record.close_running(HopStatus.CANCELLED, "chain cancelled", workflow.now()):
                self._count_hop(hop)
            self._finish(ChainStatus.CANCELLED, "chain cancelled")
            raise
        raise AssertionError("unreachable: the depth check ends every chain")

    def _ended(self, request: ChainRequest, status: ChainStatus, error: str | None = None) -> ChainRecord:
        """The chain's end: its record, the workflow's result. A chain that ended unsuccessfully
        fails its workflow instead (protocol 2), the record in the failure's details, so the Web
        UI lists it as Failed and its Failures filter finds it."""
        record = self._finish(status, error)
        if record.status is not ChainStatus.COMPLETED and request.protocol >= 2:
            raise ApplicationError(f"chain {record.status.value}: {record.error}", record,
                                   type=UNSUCCESSFUL_CHAIN_ERROR, non_retryable=True)
        return record

    # -- rules -------------------------------------------------------------------------

    def _next_target(self, depth: int, directive: HandoffDirective, agent: str) -> Target:
        self._record.hops[-1].context_added = sorted(directive.context_data)
        target = Target(
            to_agent=directive.to_agent,
            capability=directive.to_capability,
            task=directive.task_description,
            from_agent=agent,  # set here, never taken from the agent
            visible_keys=(tuple(directive.visible_context_keys)
                          if directive.visible_context_keys is not None else None),
            visible_previous=directive.visible_previous_results,
        )
        problem = directive.problem()
        if problem:  # judged by what it names: one agent or one capability, never both
            self._refuse(depth, target, ChainStatus.REJECTED, f"{agent!r} handed off badly: {problem}")
        self._context_data.update(directive.context_data)
        return target

    def _loop_violation(self, agent: str, task: str) -> str | None:
        if (agent, task) in self._asked:
            return f"{agent!r} was already asked to {task!r} in this chain"
        if self._visits[agent] >= self._policy.max_visits_per_agent:
            return (f"{agent!r} was already visited {self._visits[agent]} times "
                    f"(limit {self._policy.max_visits_per_agent} per chain)")
        return None

    def _permits(self, target: Target, agent: str) -> bool:
        return self._policy.permits(target.from_agent, agent, target.capability)

    def _refuse(self, depth: int, target: Target, status: ChainStatus, reason: str) -> NoReturn:
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
        agent, considered = await self._first_choice(depth, target)
        fallback_for: str | None = None
        errors: list[str] = []
        while agent is not None:
            record, result = await self._attempt(depth, target, agent, fallback_for, considered)
            if result is not None and result.success:
                return result, agent
            errors.append(f"{agent}: {record.error}")
            self._failed.add(agent)
            fallback_for = fallback_for or agent
            agent, considered = await self._fallback_choice(target)
            if agent is not None:
                self._fallbacks_metric.add(1, {"failed_agent": record.to_agent, "to_agent": agent})
        raise ChainEnd(ChainStatus.FAILED, f"hop {depth} failed on every agent tried ({'; '.join(errors)})")

    async def _first_choice(self, depth: int, target: Target) -> tuple[str, list[str]]:
        """The agent the handoff goes to first, and the agents considered; or a refusal (the
        policy or the loop rules exclude every candidate) or an unreachable hop (no candidate)."""
        if target.to_agent:
            agent = target.to_agent
            if not self._permits(target, agent):
                self._refuse(depth, target, ChainStatus.REJECTED,
                             f"the handoff policy does not let {target.from_agent!r} hand off to {agent!r}")
            violation = self._loop_violation(agent, target.task)
            if violation:
                self._refuse(depth, target, ChainStatus.LOOP_DETECTED, violation)
            return agent, [agent]
        candidates = await self._candidates(target)
        considered = [c.agent_id for c in candidates]
        permitted = [c for c in candidates if self._permits(target, c.agent_id)]
        if candidates and not permitted:
            self._refuse(depth, target, ChainStatus.REJECTED,
                         f"the handoff policy does not let {target.from_agent!r} hand off to {target.addressed}")
        live = [c for c in permitted if c.live]
        allowed = [c for c in live if not self._loop_violation(c.agent_id, target.task)]
        if allowed:
            return allowed[0].agent_id, considered
        if live:
            self._refuse(depth, target, ChainStatus.LOOP_DETECTED,
                         self._loop_violation(live[0].agent_id, target.task) or "loop")
        fallback = self._usable_fallback(target)
        if fallback:
            return fallback, [*considered, fallback]
        self._record.hops.append(HopRecord(
            hop=depth, from_agent=target.from_agent, to_agent="", capability=target.capability,
            task_description=target.task, status=HopStatus.UNREACHABLE, candidates=considered,
            error=f"no live agent with capability {target.addressed} (considered: {considered or 'none'})",
            started_at=workflow.now(), completed_at=workflow.now(), duration_ms=0.0,
        ))
        raise ChainEnd(ChainStatus.FAILED, self._record.hops[-1].error or "")

    async def _fallback_choice(self, target: Target) -> tuple[str | None, list[str]]:
        """After a failed try: the least loaded live agent with the capability (for a hop
        addressed by name, that agent's primary capability) the rules allow, else the configured
        fallback agent; None when there is neither."""
        candidates = await self._candidates(target)
        considered = [c.agent_id for c in candidates]
        allowed = [c for c in candidates if c.live and self._permits(target, c.agent_id)
                   and not self._loop_violation(c.agent_id, target.task)]
        if allowed:
            return allowed[0].agent_id, considered
        fallback = self._usable_fallback(target)
        return (fallback, [*considered, fallback]) if fallback else (None, considered)

    def _usable_fallback(self, target: Target) -> str | None:
        fallback = self._policy.fallback_agent
        if (fallback and fallback not in self._failed and not self._loop_violation(fallback, target.task)
                and self._permits(target, fallback)):
            return fallback
        return None

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

    # -- one try of a hop on one agent ---------------------------------------------------

    async def _attempt(
        self, depth: int, target: Target, agent: str, fallback_for: str | None, considered: list[str]
    ) -> tuple[HopRecord, HandoffResult | None]:
        """One try of the hop on `agent`: its record, and the agent's result (None if it failed)."""
        hop_input = self._hop_input(depth, target, agent, fallback_for)
        record = self._open_hop(hop_input, target, considered)
        payload = self._checked_payload(hop_input, record)
        self._visits[agent] += 1
        self._asked.add((agent, target.task))
        self._agents.append(agent)
        self._show_progress(depth, agent, target)
        try:
            output: HopOutput = await workflow.execute_activity(
                HOP_ACTIVITY,
                payload,  # hop_input, serialized once for its size check
                task_queue=agent_task_queue(agent),
                result_type=HopOutput,
                start_to_close_timeout=timedelta(seconds=self._policy.hop_timeout_s),
                schedule_to_start_timeout=timedelta(seconds=self._policy.schedule_to_start_s),
                heartbeat_timeout=timedelta(seconds=self._policy.heartbeat_timeout_s),
                retry_policy=self._retry_policy,
                summary=_hop_summary(hop_input, target),
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

    def _hop_input(self, depth: int, target: Target, agent: str, fallback_for: str | None) -> HopInput:
        """The hop activity's input: the chain's context and earlier results, as far as the
        sender's filter lets the agent see them."""
        shown_context, withheld = self._context_data, []
        if target.visible_keys is not None:
            shown_context = {k: v for k, v in self._context_data.items() if k in target.visible_keys}
            withheld = sorted(k for k in self._context_data if k not in target.visible_keys)
        shown_results = [*self._prior_results, *self._results]
        shown_count = None
        if target.visible_previous is not None:
            shown_results = shown_results[-target.visible_previous:] if target.visible_previous else []
            shown_count = len(shown_results)
        handoff_id, self._first_handoff_id = self._first_handoff_id or workflow.uuid4(), None
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
            created_at=workflow.now(),
        )
        return HopInput(
            hop=depth, context=context, fallback_for=fallback_for,
            heartbeat_interval_s=self._policy.heartbeat_timeout_s / 4,
            max_result_bytes=self._policy.max_context_bytes, withheld_context_keys=withheld,
            previous_results_shown=shown_count,
        )

    def _open_hop(self, hop_input: HopInput, target: Target, considered: list[str]) -> HopRecord:
        """The hop's entry in the record, running from now."""
        context = hop_input.context
        record = HopRecord(
            hop=hop_input.hop, handoff_id=context.handoff_id, from_agent=context.from_agent,
            to_agent=context.to_agent, capability=target.capability, task_description=target.task,
            status=HopStatus.RUNNING, started_at=context.created_at, fallback_for=hop_input.fallback_for,
            candidates=considered if (target.capability or hop_input.fallback_for) else [],
            withheld_context_keys=hop_input.withheld_context_keys,
            previous_results_shown=hop_input.previous_results_shown,
        )
        self._record.hops.append(record)
        return record

    def _checked_payload(self, hop_input: HopInput, record: HopRecord) -> RawValue:
        """`hop_input` serialized; a hop input over the chain's size limit is refused."""
        payload, size = sized_payload(hop_input)
        limit = self._policy.max_context_bytes
        if size > limit:
            self._close_hop(record, HopStatus.REFUSED,
                            error=f"hop input is {size:,} bytes, over the {limit:,}-byte limit")
            self._refusals_metric.add(1, {"reason": "context_too_large"})
            status = ChainStatus.REJECTED if not self._results else ChainStatus.FAILED
            raise ChainEnd(status, f"context too large for hop {hop_input.hop}: {record.error}")
        return payload

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
        record.close(status, error, workflow.now(), attempts=attempts, result_data=result_data)
        self._count_hop(record)

    def _count_hop(self, record: HopRecord) -> None:
        outcome = {"from_agent": record.from_agent, "to_agent": record.to_agent, "outcome": record.status.value}
        self._hops_metric.add(1, outcome)
        if record.duration_ms is not None:
            self._hop_ms_metric.record(record.duration_ms, outcome)

    def _finish(self, status: ChainStatus, error: str | None = None) -> ChainRecord:
        record = self._record
        record.end(status, error, workflow.now())
        oversize = self._fit_record()
        if oversize:
            status = record.status = ChainStatus.FAILED
            error = record.error = oversize
        self._chains_metric.add(1, {"status": status.value})
        self._upsert_search_attributes(status)
        workflow.set_current_details(f"**{status.value}**" + (f": {error}" if error else ""))
        workflow.logger.info("chain_finished", extra={"chain_id": str(record.chain_id),
                                                      "status": status.value, "reason": error})
        return record

    def _fit_record(self) -> str | None:
        """Keep the record (the workflow's result and query answer) within the chain's payload
        limit, or the chain could never complete: the largest hop results leave the record first
        (each stays in the hop's activity result in history). Why it had to, or None."""
        limit = self._policy.max_context_bytes
        size = len(to_json(self._record))
        if size <= limit:
            return None
        self._record.final_result = {}  # a copy of the last result: the first to go
        for hop in sorted(self._record.hops, key=lambda h: len(to_json(h.result_data)), reverse=True):
            if len(to_json(self._record)) <= limit:
                break
            hop.result_data = {"elided": f"{len(to_json(hop.result_data)):,} bytes; in the hop's "
                                         "activity result in the chain's history"}
        return (f"the chain's record is {size:,} bytes, over the {limit:,}-byte limit: its largest hop "
                "results are left out of it (each is in its hop's activity result in history)")

    async def _progress_after(self, delay_s: float) -> None:
        """From `delay_s` into the chain on, every hop upserts its progress; a chain that ends
        sooner never wakes this timer and writes its search attributes once, in `_finish`."""
        await workflow.sleep(delay_s, summary=PROGRESS_TIMER_SUMMARY)
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


def _hop_summary(hop_input: HopInput, target: Target) -> str:
    """The hop as the Web UI's timeline names it."""
    context = hop_input.context
    summary = f"hop {hop_input.hop}: {context.from_agent} -> {context.to_agent}"
    if hop_input.fallback_for:
        summary += f" (fallback for {hop_input.fallback_for})"
    return f"{summary}: {target.task[:80]}"

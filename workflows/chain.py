"""The chain workflow: one durable execution per delegation chain (`workflow_id == chain_id`).

Per hop: resolve the target (by id, or by capability through the registry), check the depth,
budget, policy and loop rules (`rules`), wait for a person's approval where the policy or the
handoff asks for it (`approvals`), run the hop activity on the target agent's own task queue,
record the hop, then follow the agent's `next_handoff` or `fan_out`. A hop that cannot start or
fails after its retries falls back to another live agent with the same capability, then to the
configured fallback agent. A fan-out runs its branches concurrently in this workflow, each a path
of hops under the same rules (`paths`), and the chain goes on from their join. What the Web UI
and search see is kept by `visibility`; which behaviour a chain runs with, by `versions`. What
each hop spends counts against the chain's budget; people may steer the chain's next hop or stop
it after its running hops (`control`); a re-run starts with the original's earlier entries.
Whatever happens, the chain ends with a status and every earlier result kept.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta
from typing import Any, NoReturn

from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, CancelledError

with workflow.unsafe.imports_passed_through():
    from pydantic import ValidationError
    from pydantic_core import to_json

    from handoff.constants import (
        APPROVAL_UPDATE,
        CHAIN_STATE_QUERY,
        CHAIN_WORKFLOW,
        HOP_ACTIVITY,
        INLINE_RESULT_BYTES,
        NON_RETRYABLE_ERRORS,
        PROGRESS_SIGNAL,
        SA_STATUS,
        STEER_UPDATE,
        STOP_UPDATE,
        UNSUCCESSFUL_CHAIN_ERROR,
        agent_task_queue,
    )
    from handoff.models.checks import one_line
    from handoff.models import (
        ApprovalDecision,
        ApprovalRecord,
        BudgetLeft,
        IN_HISTORY,
        CapabilityCandidates,
        ChainRecord,
        ChainRequest,
        ChainStatus,
        HandoffResult,
        HopInput,
        HopOutput,
        HopRecord,
        HopStatus,
        Steering,
        SteeringMessage,
        StopRequest,
        Usage,
        sized_payload,
    )

    from handoff.workflows import rules
    from handoff.workflows.approvals import Approvals, refusal
    from handoff.workflows.control import Control
    from handoff.workflows.fan_out import ChainEnd, FanOuts
    from handoff.workflows.lookups import Lookups
    from handoff.workflows.paths import Path, Target
    from handoff.workflows.versions import Behaviour
    from handoff.workflows.visibility import (
        PROGRESS_TIMER_SUMMARY,
        Metrics,
        Visibility,
        hop_summary,
        log_fields,
    )


# Bad input and bugs in this code fail the workflow rather than retry its task forever, so a
# chain never stays stuck. Non-determinism (a deploy that cannot replay running chains) is left
# out on purpose: those tasks retry, and the chains resume once the deploy is rolled back.
FAILURE_EXCEPTION_TYPES = [
    ValidationError, ValueError, TypeError, LookupError, AttributeError, ArithmeticError, AssertionError,
]

@workflow.defn(name=CHAIN_WORKFLOW, failure_exception_types=FAILURE_EXCEPTION_TYPES)
class HandoffChainWorkflow(FanOuts, Lookups):
    @workflow.init
    def __init__(self, request: ChainRequest) -> None:
        self._record = ChainRecord(chain_id=request.chain_id, status=ChainStatus.RUNNING,
                                   task_description=request.task_description, started_at=workflow.now())
        policy = self._policy = request.policy
        self._behaviour = Behaviour.of(request)
        if self._behaviour.budgets and policy.budget is not None:
            self._record.currency = policy.budget.currency
        self._root = Path(hops=self._record.hops, context=dict(request.context_data),
                          results=list(request.previous_results))
        self._problem = request.problem()
        if request.rerun_of is not None and not self._problem:  # starts with the original's entries
            self._record.rerun_of = request.rerun_of
            try:
                carried = [HopRecord.model_validate({**h, "carried_from": request.rerun_of.chain_id})
                           for h in request.carried_hops]
            except ValidationError as err:
                self._problem = f"carried_hops.{one_line(err)}"
            else:
                self._record.hops.extend(carried)
                rules.carry(self._root, carried)
        self._completed = 0  # hops completed in this chain, every branch included
        self._first_handoff_id = request.first_handoff_id
        self._hops_used = sum(1 for hop in self._record.all_hops() if hop.attempts)  # a re-run's carried ones
        self._hops_reserved = 0  # one per fan-out waiting for its branches, for its join
        self._fan_outs = 0  # fan-outs whose branches are running
        self._approvals = Approvals(request.chain_id)
        self._control = Control(self._record, policy)
        self._visibility = Visibility(
            self._record, search_attributes=workflow.info().typed_search_attributes.get(SA_STATUS) is not None,
            live=True)
        self._metrics = Metrics()
        self._in_history: dict[Any, int] = {}  # handoff id -> size of each result carried once
        self._directory: tuple[Any, CapabilityCandidates] | None = None  # (when, every capability's candidates)
        self._retry_policy = RetryPolicy(
            initial_interval=timedelta(seconds=policy.retry_initial_s),
            backoff_coefficient=2.0,
            maximum_interval=timedelta(seconds=policy.retry_initial_s * 16),
            maximum_attempts=policy.max_attempts,
            non_retryable_error_types=list(NON_RETRYABLE_ERRORS),
        )

    @workflow.query(name=CHAIN_STATE_QUERY)
    def chain_state(self) -> ChainRecord:
        return self._record

    @property
    def record(self) -> ChainRecord:
        """The chain's record as this run holds it (what `chain_state` answers); the rebuild
        of a record from history (`handoff.client.audit`) replays the history and reads it here."""
        return self._record

    @workflow.run
    async def run(self, request: ChainRequest) -> ChainRecord:
        target = Target(to_agent=request.to_agent, capability=request.capability,
                        task=request.task_description, from_agent=request.started_by)
        if self._visibility.enabled and self._policy.progress_after_s and self._behaviour.deferred_progress:
            self._visibility.live = False
            if self._behaviour.cost_floor:  # no timer: the first hop past the time turns progress on
                self._visibility.live_from = workflow.now() + timedelta(seconds=self._policy.progress_after_s)
            else:  # held: the event loop keeps only a weak reference to a task
                self._progress_timer = asyncio.create_task(self._progress_after(self._policy.progress_after_s))
        try:
            if self._problem:
                raise ChainEnd(ChainStatus.REJECTED, self._problem)
            await self._walk(self._root, request.start_depth, target)
            return self._ended(ChainStatus.COMPLETED)
        except ChainEnd as end:
            return self._ended(end.status, end.error)
        except (asyncio.CancelledError, CancelledError):
            for hop in self._record.close_running(HopStatus.CANCELLED, "chain cancelled", workflow.now()):
                self._metrics.hop(hop)
            self._finish(ChainStatus.CANCELLED, "chain cancelled")
            raise

    def _ended(self, status: ChainStatus, error: str | None = None) -> ChainRecord:
        """The chain's end: its record, the workflow's result. A chain that ended unsuccessfully
        fails its workflow instead, the record in the failure's details, so the Web UI lists it
        as Failed and its Failures filter finds it (`Behaviour.unsuccessful_fails`)."""
        returned = self._finish(status, error)
        if returned.status is not ChainStatus.COMPLETED and self._behaviour.unsuccessful_fails:
            raise ApplicationError(f"chain {returned.status.value}: {returned.error}", returned,
                                   type=UNSUCCESSFUL_CHAIN_ERROR, non_retryable=True)
        return returned

    def _returned(self, record: ChainRecord) -> ChainRecord:
        """The record as the workflow returns it: each result carried once in history named
        (`IN_HISTORY`), not repeated; the client puts them back (`handoff.payloads.history`)."""
        if not self._in_history:
            return record
        returned = record.model_copy(deep=True)
        for hop in returned.all_hops():
            size = self._in_history.get(hop.handoff_id)
            if size is not None and hop.result_data:
                hop.result_data = {IN_HISTORY: f"{size:,} bytes, in the hop's activity result"}
        return returned

    # -- a path of handoffs ------------------------------------------------------------

    async def _walk(self, path: Path, depth: int, target: Target) -> None:
        """Follow the handoffs along `path` from `target` at `depth` until a hop completes
        without handing on; raises ChainEnd when a rule or a failure ends the path first."""
        while True:
            refused = rules.depth_refusal(self._policy, depth)
            if refused:
                self._refuse(path, depth, target, ChainStatus.DEPTH_EXCEEDED, refused)
            result, agent = await self._handoff(path, depth, target)
            path.add_result(result.result_data, result.handoff_id if result.handoff_id in self._in_history else None)
            self._completed += 1
            if result.fan_out is not None and result.next_handoff is None:
                target, depth = await self._fan_out(path, depth, agent, result.fan_out)
            elif result.next_handoff is not None:
                target = self._next_target(path, depth + 1, result, agent)
                depth += 1
            else:
                return

    def _next_target(self, path: Path, depth: int, result: HandoffResult, agent: str) -> Target:
        directive = result.next_handoff
        assert directive is not None
        path.hops[-1].context_added = sorted(directive.context_data)
        target = Target.of(directive, from_agent=agent)  # set here, never taken from the agent
        if result.decision is not None:
            target = replace(target, chosen_by=result.decision.summary)
        problem = rules.next_problem(result, agent)
        if problem:  # judged by what it names: one agent or one capability, never both
            self._refuse(path, depth, target, ChainStatus.REJECTED, problem)
        path.context.update(directive.context_data)
        return self._control.redirected(target)

    # -- the rules' verdicts ---------------------------------------------------------------

    def _budget_room(self) -> int:
        return rules.budget_room(self._policy, budgeted=self._behaviour.hop_budget, used=self._hops_used,
                                 reserved=self._hops_reserved)

    def _elapsed_s(self) -> float:
        return (workflow.now() - self._record.started_at).total_seconds()

    def _budget_left(self) -> BudgetLeft | None:
        budget = self._policy.budget if self._behaviour.budgets else None
        return budget.left(self._record.usage or Usage(), self._elapsed_s()) if budget is not None else None

    def _refuse_when_spent(self, path: Path, depth: int, target: Target) -> None:
        """Refuse the hop to `target` once the chain's budget has a limit reached: the chain (or
        this branch: branches share the chain's budget) ends `budget_exceeded`."""
        budget = self._policy.budget if self._behaviour.budgets else None
        reached = budget.reached(self._record.usage or Usage(), self._elapsed_s()) if budget is not None else None
        if reached:
            self._refuse(path, depth, target, ChainStatus.BUDGET_EXCEEDED, reached)

    def _refuse(self, path: Path, depth: int, target: Target, status: ChainStatus, reason: str) -> NoReturn:
        path.hops.append(target.entry(depth, target.to_agent, HopStatus.REFUSED, workflow.now(), error=reason))
        self._metrics.refusals.add(1, {"reason": status.value})
        raise ChainEnd(status, reason)

    def _next_handoff_id(self) -> Any:
        """The next hop's handoff id: the one the starter gave the first hop, else a new one."""
        handoff_id, self._first_handoff_id = self._first_handoff_id or workflow.uuid4(), None
        return handoff_id

    # -- one handoff, with fallback ----------------------------------------------------

    async def _handoff(self, path: Path, depth: int, target: Target) -> tuple[HandoffResult, str]:
        """Run one handoff: the first choice, then fallbacks. Returns the result and the agent
        that produced it, or raises ChainEnd."""
        chosen = await self._first_choice(path, depth, target)
        agent: str | None = chosen.agent
        considered = chosen.considered
        fallback_for: str | None = None
        errors: list[str] = []
        approved = False
        while agent is not None:
            if self._budget_room() <= 0:
                self._refuse(path, depth, target, ChainStatus.BUDGET_EXCEEDED,
                             f"the chain's hop budget of {self._policy.max_total_hops} hops is used up")
            self._refuse_when_spent(path, depth, target)
            stopped = self._control.stopped()
            if stopped:  # no new hop starts; the chain (or this branch) ends with what it did
                raise ChainEnd(ChainStatus.CANCELLED, stopped)
            entry = None
            if not approved and rules.needs_approval(self._policy, target, agent):
                entry = await self._await_approval(path, depth, target, agent, fallback_for, considered)
                approved = True  # for this handoff, its fallbacks included
            record, result = await self._attempt(path, depth, target, agent, fallback_for, considered, entry)
            if result is not None and result.success:
                return result, agent
            errors.append(f"{agent}: {record.error}")
            self._refuse_when_spent(path, depth, target)  # spent by the hop that failed, or out of time
            path.failed.add(agent)
            fallback_for = fallback_for or agent
            fallback = rules.choose_fallback(self._policy, path, target, await self._candidates(path, target))
            agent, considered = (fallback.agent, fallback.considered) if fallback else (None, considered)
            if agent is not None:
                self._metrics.fallbacks.add(1, {"failed_agent": record.to_agent, "to_agent": agent})
        raise ChainEnd(ChainStatus.FAILED, f"hop {depth} failed on every agent tried ({'; '.join(errors)})")

    async def _first_choice(self, path: Path, depth: int, target: Target) -> rules.Chosen:
        """The agent the handoff goes to first, and the agents considered; or a refusal (the
        policy or the loop rules exclude every candidate) or an unreachable hop (no candidate)."""
        if target.to_agent:
            choice: rules.Choice = rules.choose_by_name(self._policy, path, target)
        else:
            choice = rules.choose_by_capability(self._policy, path, target, await self._candidates(path, target))
        if isinstance(choice, rules.Refused):
            self._refuse(path, depth, target, choice.status, choice.reason)
        if isinstance(choice, rules.Unreachable):
            path.hops.append(target.entry(depth, "", HopStatus.UNREACHABLE, workflow.now(), error=choice.reason,
                                          considered=choice.considered))
            raise ChainEnd(ChainStatus.FAILED, choice.reason)
        return choice

    # -- approval ----------------------------------------------------------------------

    async def _await_approval(self, path: Path, depth: int, target: Target, agent: str,
                              fallback_for: str | None, considered: list[str]) -> HopRecord:
        """Wait, durably and holding no worker slot, for a person to approve the hop to `agent`
        (the `decide_approval` Update); its entry is the one the hop then runs in. A rejection
        or no decision within the policy's `approval_timeout_s` refuses it: ChainEnd(rejected)."""
        now = workflow.now()
        approval = ApprovalRecord(asked_by=target.from_agent if target.require_approval else "policy",
                                  requested_at=now)
        entry = target.entry(depth, agent, HopStatus.AWAITING_APPROVAL, now, handoff_id=self._next_handoff_id(),
                             fallback_for=fallback_for, considered=considered, approval=approval)
        path.hops.append(entry)
        self._approvals.open(entry)
        self._record.status = ChainStatus.AWAITING_APPROVAL
        self._visibility.at(depth, agent)
        self._visibility.upsert(ChainStatus.AWAITING_APPROVAL)
        self._visibility.show_open_hops(len(self._approvals.waiting))
        timeout = self._policy.approval_timeout_s
        await self._approvals.wait(entry, timeout, f"approval deadline: hop {depth} to {agent}",
                                   interrupted=lambda: self._control.stop is not None)
        if not self._approvals.waiting:
            self._record.status = ChainStatus.RUNNING
            self._visibility.upsert(ChainStatus.RUNNING)
        self._metrics.approvals.add(1, {"decision": approval.decision or ""})
        if approval.decision == "approved":
            return entry
        stopped = self._control.stopped()
        if approval.decision is None and stopped:
            self._close_hop(entry, HopStatus.CANCELLED, error=stopped)
            raise ChainEnd(ChainStatus.CANCELLED, stopped)
        reason = refusal(approval, timeout)
        self._close_hop(entry, HopStatus.REFUSED, error=reason)
        raise ChainEnd(ChainStatus.REJECTED, f"hop {depth} to {agent!r} {reason}")

    @workflow.update(name=APPROVAL_UPDATE)
    async def decide_approval(self, decision: ApprovalDecision) -> HopRecord:
        """Approve or reject the hop that waits (`handoff approve` / `handoff reject`); the
        decision, who made it and why go into its entry. Returns the entry as decided."""
        return self._approvals.decide(decision)

    @decide_approval.validator
    def _check_decision(self, decision: ApprovalDecision) -> None:
        """Only a hop that waits can be decided, and only once: anything else is rejected
        before it reaches the history."""
        self._approvals.entry_for(decision)

    # -- people steering the chain, or stopping it ---------------------------------------------

    @workflow.update(name=STEER_UPDATE)
    async def steer(self, steering: Steering) -> SteeringMessage:
        """A person's message for the next hop that starts (`handoff steer`), and maybe where
        the chain's next handoff goes instead. Returns the message as the hop will see it."""
        return self._control.steer(steering)

    @steer.validator
    def _check_steering(self, steering: Steering) -> None:
        self._control.check_steering(steering)

    @workflow.update(name=STOP_UPDATE)
    async def stop_after_hop(self, request: StopRequest) -> None:
        """Stop the chain once its running hops end (`handoff cancel --after-hop`)."""
        self._control.stop = request

    @stop_after_hop.validator
    def _check_stop(self, request: StopRequest) -> None:
        self._control.check_stop(request)

    @workflow.signal(name=PROGRESS_SIGNAL)
    def progress(self, note: RawValue) -> None:
        """What a running hop says it is doing (`ctx.progress`): kept in the history only, where
        watchers read it (`handoff.client.watch`); the chain's record and course never depend on
        it, so it is taken undecoded."""

    # -- one try of a hop on one agent ---------------------------------------------------

    async def _attempt(
        self, path: Path, depth: int, target: Target, agent: str, fallback_for: str | None,
        considered: list[str], entry: HopRecord | None = None,
    ) -> tuple[HopRecord, HandoffResult | None]:
        """One try of the hop on `agent` (in `entry`, when it waited for approval): its record,
        and the agent's result (None if it failed)."""
        hop_input = rules.hop_input(
            self._policy, path, depth, target, agent, chain_id=self._record.chain_id, now=workflow.now(),
            handoff_id=entry.handoff_id if entry is not None else self._next_handoff_id(),
            fallback_for=fallback_for, budget_room=self._budget_room(), budget_left=self._budget_left(),
            steering=self._control.take())
        record = path.open(hop_input, target, considered, entry)
        record.steering = hop_input.context.steering
        payload = self._checked_payload(hop_input, record)
        path.visit(target, agent)
        self._hops_used += 1
        self._visibility.hop_started(depth, agent, target, fan_outs=self._fan_outs,
                                     waiting=len(self._approvals.waiting))
        first_scheduled = workflow.now()
        earlier = 0  # attempts of earlier rounds, all gone silent
        while True:
            left = self._budget_left()
            try:
                output: HopOutput = await workflow.execute_activity(
                    HOP_ACTIVITY,
                    payload,  # hop_input, serialized once for its size check
                    task_queue=agent_task_queue(agent),
                    result_type=HopOutput,
                    start_to_close_timeout=timedelta(seconds=self._policy.hop_timeout_s),
                    schedule_to_start_timeout=timedelta(seconds=self._policy.schedule_to_start_s),
                    heartbeat_timeout=timedelta(seconds=self._policy.heartbeat_timeout_s),
                    # the chain's time budget cuts a hop still running when it runs out
                    schedule_to_close_timeout=timedelta(seconds=left.seconds) if left and left.seconds else None,
                    retry_policy=self._retry_policy,
                    summary=hop_summary(hop_input, target, path.label),
                )
                break
            except ActivityError as err:
                if isinstance(err.cause, CancelledError):
                    self._close_hop(record, HopStatus.CANCELLED, error="hop cancelled", attempts=earlier + 1)
                    raise asyncio.CancelledError("chain cancelled") from err
                status, error, attempts = rules.classify(self._policy, err, agent)
                elapsed_s = (workflow.now() - first_scheduled).total_seconds()
                if (rules.went_silent(self._policy, err, earlier + attempts, elapsed_s)
                        and self._behaviour.silent_rounds()):
                    earlier += attempts
                    workflow.logger.warning("hop_silent", extra={**self._log(record), "attempts": earlier})
                    continue
                self._close_hop(record, status, error=error, attempts=earlier + attempts)
                workflow.logger.warning("hop_failed", extra=self._log(record))
                return record, None
        result = output.result
        if self._behaviour.budgets:
            record.usage = rules.hop_usage(self._policy.budget, result)
            if record.usage is not None:
                self._record.spend(agent, record.usage)
                self._metrics.spent(agent, record.usage)
        if self._behaviour.cost_floor:
            size = len(to_json(result.result_data))
            if size > INLINE_RESULT_BYTES:
                self._in_history[record.handoff_id] = size
        record.decision = result.decision
        record.build_id = output.build_id
        self._close_hop(
            record, HopStatus.COMPLETED if result.success else HopStatus.FAILED,
            attempts=earlier + output.attempt, result_data=result.result_data,
            error=None if result.success else str(result.result_data.get("error", "agent reported failure")),
        )
        workflow.logger.info("hop_completed", extra=self._log(record))
        return record, result

    def _checked_payload(self, hop_input: HopInput, record: HopRecord) -> RawValue:
        """`hop_input` serialized; a hop input over the chain's size limit is refused."""
        payload, size = sized_payload(hop_input)
        refused = rules.context_refusal(self._policy, size)
        if refused:
            self._close_hop(record, HopStatus.REFUSED, error=refused)
            self._metrics.refusals.add(1, {"reason": "context_too_large"})
            status = ChainStatus.REJECTED if not self._completed else ChainStatus.FAILED
            raise ChainEnd(status, f"context too large for hop {hop_input.hop}: {record.error}")
        return payload

    # -- record keeping ----------------------------------------------------------------

    def _close_hop(self, record: HopRecord, status: HopStatus, *, error: str | None = None,
                   attempts: int | None = None, result_data: dict[str, Any] | None = None) -> None:
        record.close(status, error, workflow.now(), attempts=attempts, result_data=result_data)
        self._metrics.hop(record)

    def _finish(self, status: ChainStatus, error: str | None = None) -> ChainRecord:
        """End the chain's record; the record as the workflow returns it (`_returned`), kept
        within the payload limit (a record that had to leave results out ends `failed`)."""
        record = self._record
        record.end(status, error, workflow.now())
        returned = self._returned(record)
        oversize = rules.fit_record(returned, self._policy.max_context_bytes)
        if oversize:
            status = record.status = returned.status = ChainStatus.FAILED
            error = record.error = returned.error = oversize
        self._metrics.chains.add(1, {"status": status.value})
        self._visibility.ended(status, error)
        workflow.logger.info("chain_finished", extra={"chain_id": str(record.chain_id),
                                                      "status": status.value, "reason": error})
        return returned

    async def _progress_after(self, delay_s: float) -> None:
        """From `delay_s` into the chain on, every hop upserts its progress; a chain that ends
        sooner never wakes this timer and writes its search attributes once, in `_finish`."""
        await workflow.sleep(delay_s, summary=PROGRESS_TIMER_SUMMARY)
        self._visibility.live = True
        self._visibility.upsert()

    def _log(self, record: HopRecord) -> dict[str, Any]:
        return log_fields(self._record.chain_id, record)

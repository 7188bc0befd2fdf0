"""The chain workflow: one durable execution per delegation chain (`workflow_id == chain_id`).

Per hop: resolve the target (by id, or by capability through the registry), check the
depth, budget, policy and loop rules, wait for a person's approval where the policy or the
handoff asks for it, run the hop activity on the target agent's own task queue, record the hop,
then follow the agent's `next_handoff` or `fan_out`. A hop that cannot start or fails after its
retries falls back to another live agent with the same capability, then to the configured
fallback agent. A fan-out runs its branches concurrently in this workflow, each a path of hops
under the same rules, and the chain goes on from their join. Whatever happens, the chain ends
with a status and every earlier result kept.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
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
        APPROVAL_UPDATE,
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
        Addressed,
        AgentCapability,
        ApprovalDecision,
        ApprovalRecord,
        BranchOutcome,
        BranchPosition,
        BranchRecord,
        Candidate,
        ChainRecord,
        ChainRequest,
        ChainStatus,
        FanOut,
        FanOutRecord,
        HandoffContext,
        HandoffDirective,
        HandoffResult,
        HopInput,
        HopKind,
        HopLimits,
        HopOutput,
        HopRecord,
        HopStatus,
        ResolveRequest,
        sized_payload,
        walk_hops,
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
    kind: HopKind = HopKind.HANDOFF
    require_approval: bool = False
    """The sending agent asked for a person's approval of this hop."""
    branches: tuple[BranchOutcome, ...] = ()
    """For a join or a return: how each branch ended."""
    chosen_by: str = ""
    """How the sending agent's model chose this hop (`AgentDecision.summary`), for the Web UI."""

    @property
    def addressed(self) -> str:
        """What the handoff names, for messages: the agent, else the capability."""
        return self.to_agent or (self.capability.value if self.capability else "")

    @classmethod
    def of(cls, spec: Addressed, from_agent: str, kind: HopKind = HopKind.HANDOFF) -> Target:
        """The target a directive, a branch or a join names; `from_agent` is set by the workflow."""
        return cls(
            to_agent=spec.to_agent, capability=spec.to_capability, task=spec.task_description,
            from_agent=from_agent,
            visible_keys=tuple(spec.visible_context_keys) if spec.visible_context_keys is not None else None,
            visible_previous=spec.visible_previous_results, kind=kind, require_approval=spec.require_approval,
        )

    def returns_to(self, agent: str) -> bool:
        """Whether a hop to `agent` brings the chain back to the agent that delegated (or fanned
        out): not a loop, so the loop and visit rules leave it alone."""
        return self.kind is HopKind.RETURN and agent == self.to_agent


@dataclass
class Path:
    """One line of handoffs: the chain itself, or one branch of a fan-out. It holds what the
    rules judge along it (visits, tasks asked, agents that failed) and what its next hop sees.
    A branch starts as a copy of the path it forks from and is merged back into it at the join."""

    hops: list[HopRecord]
    """Where this path's hop entries go: the record's hops, or its branch's."""
    context: dict[str, Any]
    results: list[dict[str, Any]]
    visits: Counter[str] = field(default_factory=Counter)
    asked: set[tuple[str, str]] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    label: str = ""
    """"" for the chain; "b1.0" for branch 0 of the fan-out at hop 1 ("b1.0/b2.1" nested)."""
    position: BranchPosition | None = None

    def fork(self, hops: list[HopRecord], position: BranchPosition, context_data: dict[str, Any]) -> Path:
        label = f"b{position.hop}.{position.index}"
        return Path(hops=hops, context={**self.context, **context_data}, results=list(self.results),
                    visits=Counter(self.visits), asked=set(self.asked), failed=set(self.failed),
                    label=f"{self.label}/{label}" if self.label else label, position=position)

    def merge(self, branches: list[Path]) -> None:
        """What the branches forked from this path did joins it, in branch order: their
        results, their visits, the tasks they asked and the agents that failed in them."""
        forked, base = len(self.results), Counter(self.visits)
        for branch in branches:
            self.results.extend(branch.results[forked:])
            self.visits.update(branch.visits - base)
            self.asked |= branch.asked
            self.failed |= branch.failed


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

MAX_ASKED_TASK_CHARS = 1000
"""`HopLimits.asked` carries the tasks up to this long: what an agent writes as a next task is
shorter, and longer ones would be copied into every later hop's input."""

CUT_REASONS = {
    "late": "cut: still running at the join's deadline",
    "not_needed": "cut: the join already had the branches it waits for",
}


SILENT_ATTEMPTS = 3
"""A hop whose attempts all went silent is scheduled again, up to this many times `max_attempts`
attempts in all (and while its timeout lasts)."""
SILENT_ROUNDS_PATCH = "silent-rounds"


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
        self._root = Path(hops=self._record.hops, context=dict(request.context_data),
                          results=list(request.previous_results))
        self._completed = 0  # hops completed in this chain, every branch included
        self._first_handoff_id = request.first_handoff_id
        self._agents: list[str] = []
        # The hop budget, versioned by the input: requests recorded before it existed lack the field.
        self._budgeted = "max_total_hops" in policy.model_fields_set
        self._hops_used = 0
        self._hops_reserved = 0  # one per fan-out waiting for its branches, for its join
        self._fan_outs = 0  # fan-outs whose branches are running
        self._awaiting: dict[Any, HopRecord] = {}  # hops waiting for a person, by handoff id
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
            "handoff_hop_duration", "hop duration from scheduling to outcome, in milliseconds", "ms")
        self._fallbacks_metric = meter.create_counter(
            "handoff_fallbacks", "hops retried on another agent after a failure")
        self._refusals_metric = meter.create_counter(
            "handoff_refusals", "handoffs refused by the chain's rules")
        self._chains_metric = meter.create_counter("handoff_chains", "chains by final status")
        self._branches_metric = meter.create_counter("handoff_branches", "fan-out branches by final status")
        self._approvals_metric = meter.create_counter("handoff_approvals", "approval waits by decision")

    @workflow.query(name="chain_state")
    def chain_state(self) -> ChainRecord:
        return self._record

    @property
    def record(self) -> ChainRecord:
        """The chain's record as this run holds it (what `chain_state` answers); the rebuild
        of a record from history (`handoff.client.audit`) replays the history and reads it here."""
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
            await self._walk(self._root, request.start_depth, target)
            return self._ended(request, ChainStatus.COMPLETED)
        except ChainEnd as end:
            return self._ended(request, end.status, end.error)
        except (asyncio.CancelledError, CancelledError):
            for hop in self._record.close_running(HopStatus.CANCELLED, "chain cancelled", workflow.now()):
                self._count_hop(hop)
            self._finish(ChainStatus.CANCELLED, "chain cancelled")
            raise

    def _ended(self, request: ChainRequest, status: ChainStatus, error: str | None = None) -> ChainRecord:
        """The chain's end: its record, the workflow's result. A chain that ended unsuccessfully
        fails its workflow instead (protocol 2), the record in the failure's details, so the Web
        UI lists it as Failed and its Failures filter finds it."""
        record = self._finish(status, error)
        if record.status is not ChainStatus.COMPLETED and request.protocol >= 2:
            raise ApplicationError(f"chain {record.status.value}: {record.error}", record,
                                   type=UNSUCCESSFUL_CHAIN_ERROR, non_retryable=True)
        return record

    # -- a path of handoffs ------------------------------------------------------------

    async def _walk(self, path: Path, depth: int, target: Target) -> None:
        """Follow the handoffs along `path` from `target` at `depth` until a hop completes
        without handing on; raises ChainEnd when a rule or a failure ends the path first."""
        while True:
            if depth >= self._policy.max_depth:
                self._refuse(path, depth, target, ChainStatus.DEPTH_EXCEEDED,
                             f"a handoff to depth {depth} exceeds the limit of "
                             f"{self._policy.max_depth} hops")
            result, agent = await self._handoff(path, depth, target)
            path.results.append(result.result_data)
            self._completed += 1
            if result.fan_out is not None and result.next_handoff is None:
                target, depth = await self._fan_out(path, depth, agent, result.fan_out)
            elif result.next_handoff is not None:
                target = self._next_target(path, depth + 1, result, agent)
                depth += 1
            else:
                return

    def _next_target(self, path: Path, depth: int, result: HandoffResult, agent: str) -> Target:
        directive: HandoffDirective = result.next_handoff  # type: ignore[assignment]
        path.hops[-1].context_added = sorted(directive.context_data)
        target = Target.of(directive, from_agent=agent)  # set here, never taken from the agent
        if result.decision is not None:
            target = replace(target, chosen_by=result.decision.summary)
        problem = directive.problem()
        if result.fan_out is not None:
            problem = "a result either hands off or fans out, not both"
        if problem:  # judged by what it names: one agent or one capability, never both
            self._refuse(path, depth, target, ChainStatus.REJECTED, f"{agent!r} handed off badly: {problem}")
        path.context.update(directive.context_data)
        return target

    # -- fan-out and join --------------------------------------------------------------

    async def _fan_out(self, path: Path, depth: int, agent: str, fan: FanOut) -> tuple[Target, int]:
        """Run the branches of `agent`'s fan-out concurrently, each a path of its own, until the
        join may run (every branch ended, its first `wait_for` completed, or its deadline);
        cut the rest. Returns the join's target (its context shows every branch's outcome) and
        depth: one past the deepest hop of any branch, so the depth limit holds along every path."""
        join = fan.join
        join_target = Target.of(join, agent, HopKind.RETURN if join.to_agent == agent else HopKind.JOIN)
        problem = fan.problem()
        if not problem and len(fan.branches) > self._policy.max_branches:
            problem = f"{len(fan.branches)} branches, over the limit of {self._policy.max_branches}"
        if problem:
            self._refuse(path, depth + 1, join_target, ChainStatus.REJECTED, f"{agent!r} fanned out badly: {problem}")
        fanning = path.hops[-1]
        fanning.context_added = sorted(fan.context_data)
        path.context.update(fan.context_data)
        record = fanning.fan_out = FanOutRecord(wait_for=join.wait_for, deadline_s=join.deadline_s, branches=[
            BranchRecord(index=i, to_agent=b.to_agent, capability=b.to_capability, task_description=b.task_description)
            for i, b in enumerate(fan.branches)])
        room = self._budget_room() - 1  # the join's hop is kept free
        self._hops_reserved += 1
        self._fan_outs += 1
        paths: list[Path] = []
        tasks: list[asyncio.Task[None]] = []
        for branch, entry in zip(fan.branches, record.branches):
            sub = path.fork(entry.hops, BranchPosition(hop=depth, index=entry.index, of=len(fan.branches)),
                            branch.context_data)
            paths.append(sub)
            target = Target.of(branch, agent)
            entry.started_at = workflow.now()
            if entry.index >= room:
                self._refuse_branch(sub, depth + 1, target, entry)
                continue
            tasks.append(asyncio.create_task(self._branch(sub, depth + 1, target, entry)))
        try:
            cut = await self._join_wait(record, depth)
        except (asyncio.CancelledError, CancelledError):
            await self._settle(record, tasks, None)
            raise
        await self._settle(record, tasks, cut)
        self._hops_reserved -= 1
        self._fan_outs -= 1
        path.merge(paths)
        for entry in record.branches:
            self._branches_metric.add(1, {"status": entry.status.value})
        deepest = max((h.hop for b in record.branches for h in walk_hops(b.hops) if h.status is not HopStatus.REFUSED),
                      default=depth)
        return (replace(join_target, branches=tuple(b.outcome() for b in record.branches)),
                max(deepest, depth) + 1)

    async def _join_wait(self, record: FanOutRecord, depth: int) -> str:
        """Wait until the join may run; why the branches still running are cut."""

        def ready() -> bool:
            ended = [b for b in record.branches if b.status.ended]
            if len(ended) == len(record.branches):
                return True
            completed = sum(b.status is ChainStatus.COMPLETED for b in ended)
            return record.wait_for is not None and completed >= record.wait_for

        try:
            await workflow.wait_condition(ready, timeout=record.deadline_s,
                                          timeout_summary=f"join deadline of the fan-out at hop {depth}")
        except asyncio.TimeoutError:
            return "late"
        return "not_needed"

    async def _settle(self, record: FanOutRecord, tasks: list[asyncio.Task[None]], cut: str | None) -> None:
        """Cut the branches still running (`cut`: why; None when the chain is cancelled), wait
        for every branch task to end, and surface a bug in one of them: it must fail the
        workflow, not hide in a branch."""
        reason = CUT_REASONS.get(cut or "", "chain cancelled")
        for entry in record.branches:
            if not entry.status.ended:
                entry.cut = cut  # type: ignore[assignment]
        for task in tasks:
            if not task.done():
                task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for entry in record.branches:  # a branch cancelled before it began never ended itself
            if not entry.status.ended:
                self._close_open(entry.hops, reason)
                entry.end(ChainStatus.CANCELLED, reason, workflow.now())
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, (asyncio.CancelledError,
                                                                                 CancelledError)):
                raise outcome

    async def _branch(self, path: Path, depth: int, target: Target, entry: BranchRecord) -> None:
        """One branch of a fan-out, to its end; its record says how it ended. (No `finally`
        here: a workflow evicted from the worker's cache closes its coroutines outside the
        workflow's event loop, where `workflow.now()` cannot be called.)"""
        group = workflow.create_event_group(
            path.label, label=f"hop {depth - 1}, branch {entry.index}: {target.addressed}")
        try:
            with group.scope():
                await self._walk(path, depth, target)
            status, error = ChainStatus.COMPLETED, None
        except ChainEnd as end:
            status, error = end.status, end.error
        except (asyncio.CancelledError, CancelledError):
            error = CUT_REASONS.get(entry.cut or "", "chain cancelled")
            self._close_open(entry.hops, error)
            status = ChainStatus.CANCELLED
        except Exception:  # a bug: the branch ends so the join wakes, then the bug fails the workflow
            entry.end(ChainStatus.FAILED, "the branch did not end normally", workflow.now())
            raise
        entry.end(status, error, workflow.now())

    def _refuse_branch(self, path: Path, depth: int, target: Target, entry: BranchRecord) -> None:
        """A branch the hop budget leaves no room for: refused before it starts."""
        try:
            self._refuse(path, depth, target, ChainStatus.BUDGET_EXCEEDED,
                         f"the chain's hop budget of {self._policy.max_total_hops} leaves no room for this branch")
        except ChainEnd as end:
            entry.end(end.status, end.error, workflow.now())

    def _close_open(self, hops: list[HopRecord], reason: str) -> None:
        for hop in walk_hops(hops):
            if hop.status.open:
                self._close_hop(hop, HopStatus.CANCELLED, error=reason)

    # -- rules -------------------------------------------------------------------------

    def _loop_violation(self, path: Path, agent: str, task: str) -> str | None:
        if (agent, task) in path.asked:
            return f"{agent!r} was already asked to {task!r} in this chain"
        if path.visits[agent] >= self._policy.max_visits_per_agent:
            return (f"{agent!r} was already visited {path.visits[agent]} times "
                    f"(limit {self._policy.max_visits_per_agent} per chain)")
        return None

    def _permits(self, target: Target, agent: str) -> bool:
        return self._policy.permits(target.from_agent, agent, target.capability)

    def _budget_room(self) -> int:
        """How many more hops the chain's budget allows (unbounded for requests without one)."""
        if not self._budgeted:
            return self._policy.max_total_hops * 1000
        return self._policy.max_total_hops - self._hops_used - self._hops_reserved

    def _check_budget(self, path: Path, depth: int, target: Target) -> None:
        if self._budget_room() <= 0:
            self._refuse(path, depth, target, ChainStatus.BUDGET_EXCEEDED,
                         f"the chain's hop budget of {self._policy.max_total_hops} hops is used up")

    def _refuse(self, path: Path, depth: int, target: Target, status: ChainStatus, reason: str) -> NoReturn:
        path.hops.append(HopRecord(
            hop=depth, from_agent=target.from_agent, to_agent=target.to_agent,
            capability=target.capability, task_description=target.task,
            status=HopStatus.REFUSED, error=reason, kind=target.kind,
            started_at=workflow.now(), completed_at=workflow.now(), duration_ms=0.0,
        ))
        self._refusals_metric.add(1, {"reason": status.value})
        raise ChainEnd(status, reason)

    # -- one handoff, with fallback ----------------------------------------------------

    async def _handoff(self, path: Path, depth: int, target: Target) -> tuple[HandoffResult, str]:
        """Run one handoff: the first choice, then fallbacks. Returns the result and the agent
        that produced it, or raises ChainEnd."""
        agent, considered = await self._first_choice(path, depth, target)
        fallback_for: str | None = None
        errors: list[str] = []
        approved = False
        while agent is not None:
            self._check_budget(path, depth, target)
            entry = None
            if not approved and (target.require_approval or (
                    not target.returns_to(agent) and self._policy.requires_approval(agent, target.capability))):
                entry = await self._await_approval(path, depth, target, agent, fallback_for, considered)
                approved = True  # for this handoff, its fallbacks included
            record, result = await self._attempt(path, depth, target, agent, fallback_for, considered, entry)
            if result is not None and result.success:
                return result, agent
            errors.append(f"{agent}: {record.error}")
            path.failed.add(agent)
            fallback_for = fallback_for or agent
            agent, considered = await self._fallback_choice(path, target)
            if agent is not None:
                self._fallbacks_metric.add(1, {"failed_agent": record.to_agent, "to_agent": agent})
        raise ChainEnd(ChainStatus.FAILED, f"hop {depth} failed on every agent tried ({'; '.join(errors)})")

    async def _first_choice(self, path: Path, depth: int, target: Target) -> tuple[str, list[str]]:
        """The agent the handoff goes to first, and the agents considered; or a refusal (the
        policy or the loop rules exclude every candidate) or an unreachable hop (no candidate)."""
        if target.to_agent:
            agent = target.to_agent
            if target.returns_to(agent):  # the chain comes back: not a new handoff to judge
                return agent, [agent]
            if not self._permits(target, agent):
                self._refuse(path, depth, target, ChainStatus.REJECTED,
                             f"the handoff policy does not let {target.from_agent!r} hand off to {agent!r}")
            violation = self._loop_violation(path, agent, target.task)
            if violation:
                self._refuse(path, depth, target, ChainStatus.LOOP_DETECTED, violation)
            return agent, [agent]
        candidates = await self._candidates(path, target)
        considered = [c.agent_id for c in candidates]
        permitted = [c for c in candidates if self._permits(target, c.agent_id)]
        if candidates and not permitted:
            self._refuse(path, depth, target, ChainStatus.REJECTED,
                         f"the handoff policy does not let {target.from_agent!r} hand off to {target.addressed}")
        live = [c for c in permitted if c.live]
        allowed = [c for c in live if not self._loop_violation(path, c.agent_id, target.task)]
        if allowed:
            return allowed[0].agent_id, considered
        if live:
            self._refuse(path, depth, target, ChainStatus.LOOP_DETECTED,
                         self._loop_violation(path, live[0].agent_id, target.task) or "loop")
        fallback = self._usable_fallback(path, target)
        if fallback:
            return fallback, [*considered, fallback]
        path.hops.append(HopRecord(
            hop=depth, from_agent=target.from_agent, to_agent="", capability=target.capability,
            task_description=target.task, status=HopStatus.UNREACHABLE, candidates=considered,
            error=f"no live agent with capability {target.addressed} (considered: {considered or 'none'})",
            started_at=workflow.now(), completed_at=workflow.now(), duration_ms=0.0, kind=target.kind,
        ))
        raise ChainEnd(ChainStatus.FAILED, path.hops[-1].error or "")

    async def _fallback_choice(self, path: Path, target: Target) -> tuple[str | None, list[str]]:
        """After a failed try: the least loaded live agent with the capability (for a hop
        addressed by name, that agent's primary capability) the rules allow, else the configured
        fallback agent; None when there is neither."""
        candidates = await self._candidates(path, target)
        considered = [c.agent_id for c in candidates]
        allowed = [c for c in candidates if c.live and self._permits(target, c.agent_id)
                   and not self._loop_violation(path, c.agent_id, target.task)]
        if allowed:
            return allowed[0].agent_id, considered
        fallback = self._usable_fallback(path, target)
        return (fallback, [*considered, fallback]) if fallback else (None, considered)

    def _usable_fallback(self, path: Path, target: Target) -> str | None:
        fallback = self._policy.fallback_agent
        if (fallback and fallback not in path.failed and not self._loop_violation(path, fallback, target.task)
                and self._permits(target, fallback)):
            return fallback
        return None

    async def _candidates(self, path: Path, target: Target) -> list[Candidate]:
        """The registered agents with the target's capability (or the capability of the agent it
        names), minus the agents that failed on this path, ranked (the resolve activity).

        On the chain's own path, a local activity (no round trip through the server). Inside a
        branch, a regular activity: a local activity resolves when it finishes, outside the
        history's order of events, so with branches running side by side the live run and a
        replay could resume them in different orders and attach later results to the wrong
        branch; a regular activity's completion is an event, in the same order in both."""
        request = ResolveRequest(
            capability=target.capability,
            like_agent=None if target.capability else target.to_agent,
            exclude=sorted(path.failed),
        )
        summary = f"resolve {target.capability.value if target.capability else 'like ' + target.to_agent}"
        retry = RetryPolicy(maximum_attempts=3, initial_interval=timedelta(milliseconds=200))
        try:
            if path.position is None:
                return await workflow.execute_local_activity(
                    RESOLVE_ACTIVITY, request, result_type=list[Candidate],
                    start_to_close_timeout=timedelta(seconds=10), retry_policy=retry, summary=summary)
            return await workflow.execute_activity(
                RESOLVE_ACTIVITY, request, result_type=list[Candidate],
                start_to_close_timeout=timedelta(seconds=10), retry_policy=retry, summary=summary)
        except ActivityError as err:  # registry unreachable: no candidates, the chain ends with a status
            if isinstance(err.cause, CancelledError):  # the branch was cut or the chain cancelled
                raise asyncio.CancelledError("resolve cancelled") from err
            workflow.logger.warning("resolve_failed", extra={"chain_id": str(self._record.chain_id),
                                                             "reason": str(err.cause or err)})
            return []

    # -- approval ----------------------------------------------------------------------

    async def _await_approval(self, path: Path, depth: int, target: Target, agent: str,
                              fallback_for: str | None, considered: list[str]) -> HopRecord:
        """Wait, durably and holding no worker slot, for a person to approve the hop to `agent`
        (the `decide_approval` Update); its entry is the one the hop then runs in. A rejection
        or no decision within the policy's `approval_timeout_s` refuses it: ChainEnd(rejected)."""
        now = workflow.now()
        handoff_id, self._first_handoff_id = self._first_handoff_id or workflow.uuid4(), None
        approval = ApprovalRecord(asked_by=target.from_agent if target.require_approval else "policy",
                                  requested_at=now)
        entry = HopRecord(
            hop=depth, handoff_id=handoff_id, from_agent=target.from_agent, to_agent=agent,
            capability=target.capability, task_description=target.task, status=HopStatus.AWAITING_APPROVAL,
            fallback_for=fallback_for, candidates=considered if (target.capability or fallback_for) else [],
            kind=target.kind, started_at=now, approval=approval,
        )
        path.hops.append(entry)
        self._awaiting[handoff_id] = entry
        self._record.status = ChainStatus.AWAITING_APPROVAL
        self._progress = (sorted(set(self._agents)), agent, depth)
        self._upsert_search_attributes(ChainStatus.AWAITING_APPROVAL)
        self._set_details()
        timeout = self._policy.approval_timeout_s
        try:
            await workflow.wait_condition(lambda: approval.decision is not None, timeout=timeout,
                                          timeout_summary=f"approval deadline: hop {depth} to {agent}")
        except asyncio.TimeoutError:
            approval.decision, approval.decided_at = "timed_out", workflow.now()
        finally:
            del self._awaiting[handoff_id]
        if not self._awaiting:
            self._record.status = ChainStatus.RUNNING
            self._upsert_search_attributes(ChainStatus.RUNNING)
        self._approvals_metric.add(1, {"decision": approval.decision or ""})
        if approval.decision == "approved":
            return entry
        reason = (f"rejected by {approval.by}: {approval.comment}" if approval.decision == "rejected"
                  else f"no approval decision within {timeout:g}s")
        self._close_hop(entry, HopStatus.REFUSED, error=reason)
        raise ChainEnd(ChainStatus.REJECTED, f"hop {depth} to {agent!r} {reason}")

    @workflow.update(name=APPROVAL_UPDATE)
    async def decide_approval(self, decision: ApprovalDecision) -> HopRecord:
        """Approve or reject the hop that waits (`handoff approve` / `handoff reject`); the
        decision, who made it and why go into its entry. Returns the entry as decided."""
        entry = self._awaiting_entry(decision)
        assert entry.approval is not None
        entry.approval.decide(decision, workflow.now())
        return entry.model_copy(deep=True)

    @decide_approval.validator
    def _check_decision(self, decision: ApprovalDecision) -> None:
        """Only a hop that waits can be decided, and only once: anything else is rejected
        before it reaches the history."""
        self._awaiting_entry(decision)

    def _awaiting_entry(self, decision: ApprovalDecision) -> HopRecord:
        problem = decision.problem()
        if problem:
            raise ValueError(problem)
        waiting = [e for e in self._awaiting.values() if e.approval is not None and e.approval.decision is None]
        chain = self._record.chain_id
        if decision.handoff_id is not None:
            for entry in waiting:
                if entry.handoff_id == decision.handoff_id:
                    return entry
            raise ValueError(f"no hop {decision.handoff_id} of chain {chain} awaits approval")
        if not waiting:
            raise ValueError(f"chain {chain} is not awaiting approval")
        if len(waiting) > 1:
            ids = ", ".join(f"{e.handoff_id} (hop {e.hop} to {e.to_agent})" for e in waiting)
            raise ValueError(f"{len(waiting)} hops of chain {chain} await approval: name one of {ids}")
        return waiting[0]

    # -- one try of a hop on one agent ---------------------------------------------------

    async def _attempt(
        self, path: Path, depth: int, target: Target, agent: str, fallback_for: str | None,
        considered: list[str], entry: HopRecord | None = None,
    ) -> tuple[HopRecord, HandoffResult | None]:
        """One try of the hop on `agent` (in `entry`, when it waited for approval): its record,
        and the agent's result (None if it failed)."""
        hop_input = self._hop_input(path, depth, target, agent, fallback_for,
                                    entry.handoff_id if entry is not None else None)
        record = self._open_hop(path, hop_input, target, considered, entry)
        payload = self._checked_payload(hop_input, record)
        if not target.returns_to(agent):
            path.visits[agent] += 1
            path.asked.add((agent, target.task))
        self._hops_used += 1
        self._agents.append(agent)
        self._show_progress(depth, agent, target)
        first_scheduled = workflow.now()
        earlier = 0  # attempts of earlier rounds, all gone silent
        while True:
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
                    summary=_hop_summary(hop_input, target, path.label),
                )
                break
            except ActivityError as err:
                if isinstance(err.cause, CancelledError):
                    self._close_hop(record, HopStatus.CANCELLED, error="hop cancelled", attempts=earlier + 1)
                    raise asyncio.CancelledError("chain cancelled") from err
                status, error, attempts = self._classify(err, agent)
                if self._silent_again(err, earlier + attempts, first_scheduled):
                    earlier += attempts
                    workflow.logger.warning("hop_silent", extra={**self._log_fields(record), "attempts": earlier})
                    continue
                self._close_hop(record, status, error=error, attempts=earlier + attempts)
                workflow.logger.warning("hop_failed", extra=self._log_fields(record))
                return record, None
        result = output.result
        record.decision = result.decision
        record.build_id = output.build_id
        self._close_hop(
            record,
            HopStatus.COMPLETED if result.success else HopStatus.FAILED,
            attempts=earlier + output.attempt,
            result_data=result.result_data,
            error=None if result.success else str(result.result_data.get("error", "agent reported failure")),
        )
        workflow.logger.info("hop_completed", extra=self._log_fields(record))
        return record, result

    def _hop_input(self, path: Path, depth: int, target: Target, agent: str, fallback_for: str | None,
                   handoff_id: Any = None) -> HopInput:
        """The hop activity's input: the path's context and earlier results, as far as the
        sender's filter lets the agent see them."""
        shown_context, withheld = path.context, []
        if target.visible_keys is not None:
            shown_context = {k: v for k, v in path.context.items() if k in target.visible_keys}
            withheld = sorted(k for k in path.context if k not in target.visible_keys)
        shown_results = path.results
        shown_count = None
        if target.visible_previous is not None:
            shown_results = shown_results[-target.visible_previous:] if target.visible_previous else []
            shown_count = len(shown_results)
        if handoff_id is None:
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
            branch=path.position,
            branches=list(target.branches),
            returning=target.returns_to(agent),
            limits=self._limits(path, depth, target, agent),
        )
        return HopInput(
            hop=depth, context=context, fallback_for=fallback_for,
            heartbeat_interval_s=self._policy.heartbeat_timeout_s / 4,
            max_result_bytes=self._policy.max_context_bytes, withheld_context_keys=withheld,
            previous_results_shown=shown_count,
        )

    def _limits(self, path: Path, depth: int, target: Target, agent: str) -> HopLimits:
        """What the rules leave `agent` for its next step, once this hop has run."""
        policy = self._policy
        visits = Counter(path.visits)
        asked = set(path.asked)
        if not target.returns_to(agent):
            visits[agent] += 1
            asked.add((agent, target.task))
        rules = None
        if policy.allowed_handoffs is not None:
            rules = policy.allowed_handoffs.get(agent, policy.allowed_handoffs.get("*", []))
        return HopLimits(
            can_hand_off=depth + 1 < policy.max_depth and self._budget_room() > 1,
            allowed_targets=rules,
            excluded_agents=sorted(a for a, n in visits.items() if n >= policy.max_visits_per_agent),
            asked=sorted((a, t) for a, t in asked if len(t) <= MAX_ASKED_TASK_CHARS),
        )

    def _open_hop(self, path: Path, hop_input: HopInput, target: Target, considered: list[str],
                  entry: HopRecord | None) -> HopRecord:
        """The hop's entry in the record, running from now (the entry it waited for approval
        in, if it did)."""
        context = hop_input.context
        fields = dict(
            hop=hop_input.hop, handoff_id=context.handoff_id, from_agent=context.from_agent,
            to_agent=context.to_agent, capability=target.capability, task_description=target.task,
            status=HopStatus.RUNNING, started_at=context.created_at, fallback_for=hop_input.fallback_for,
            candidates=considered if (target.capability or hop_input.fallback_for) else [],
            withheld_context_keys=hop_input.withheld_context_keys,
            previous_results_shown=hop_input.previous_results_shown,
            kind=target.kind,
        )
        if entry is not None:
            for name, value in fields.items():
                setattr(entry, name, value)
            return entry
        record = HopRecord(**fields)
        path.hops.append(record)
        return record

    def _checked_payload(self, hop_input: HopInput, record: HopRecord) -> RawValue:
        """`hop_input` serialized; a hop input over the chain's size limit is refused."""
        payload, size = sized_payload(hop_input)
        limit = self._policy.max_context_bytes
        if size > limit:
            self._close_hop(record, HopStatus.REFUSED,
                            error=f"hop input is {size:,} bytes, over the {limit:,}-byte limit")
            self._refusals_metric.add(1, {"reason": "context_too_large"})
            status = ChainStatus.REJECTED if not self._completed else ChainStatus.FAILED
            raise ChainEnd(status, f"context too large for hop {hop_input.hop}: {record.error}")
        return payload

    def _silent_again(self, err: ActivityError, attempts: int, first_scheduled: Any) -> bool:
        """Whether to schedule the hop again after every attempt went silent (heartbeat timeouts):
        its worker died or lost the network mid-hop, or the server handed the retry to a poll of
        a worker it could no longer reach (a partitioned host's polls outlive it on the server
        until its connection is found dead). Another worker of the agent, a replica on another
        host, may take it: again while the hop's timeout lasts, up to `SILENT_ATTEMPTS` times
        `max_attempts` in all. A handler that fails, or runs out its time while heartbeating,
        is not silent."""
        cause = err.cause
        if not (isinstance(cause, TimeoutError) and cause.type == TimeoutType.HEARTBEAT
                and err.retry_state == RetryState.MAXIMUM_ATTEMPTS_REACHED):
            return False
        within = (workflow.now() - first_scheduled).total_seconds() < self._policy.hop_timeout_s
        if not (within and attempts < SILENT_ATTEMPTS * self._policy.max_attempts):
            return False
        # marked in history only when a hop goes silent: histories from before replay as they were
        return workflow.patched(SILENT_ROUNDS_PATCH)

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
        branches = [b for h in self._record.all_hops() if h.fan_out for b in h.fan_out.branches]
        for branch in branches:  # copies of their last hops' results
            branch.final_result = {}
        for hop in sorted(self._record.all_hops(), key=lambda h: len(to_json(h.result_data)), reverse=True):
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
        if self._fan_outs or self._awaiting:
            self._set_details()
        else:
            workflow.set_current_details(f"hop {depth}: {target.from_agent} -> **{agent}**: {target.task[:120]}")

    def _set_details(self) -> None:
        """The workflow's current details while branches run or a hop waits for a person: one
        line per open hop, with where it stands in the tree of branches."""
        lines = []
        for label, hop in _open_hops(self._record.hops):
            where = f"hop {hop.hop}" + (f" [{label}]" if label else "")
            line = f"- {where}: {hop.from_agent} -> **{hop.to_agent}**: {hop.task_description[:80]}"
            if hop.status is HopStatus.AWAITING_APPROVAL:
                line += (f" — **awaiting approval**: `handoff approve {self._record.chain_id}"
                         + (f" --hop {hop.handoff_id}`" if len(self._awaiting) > 1 else "`"))
            lines.append(line)
        workflow.set_current_details("\n".join(lines) or "running")

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


def _open_hops(hops: list[HopRecord], label: str = "") -> Iterator[tuple[str, HopRecord]]:
    """Every hop still running or waiting for approval, with its branch label."""
    for hop in hops:
        if hop.status.open:
            yield label, hop
        if hop.fan_out is not None:
            for branch in hop.fan_out.branches:
                sub = f"b{hop.hop}.{branch.index}"
                yield from _open_hops(branch.hops, f"{label}/{sub}" if label else sub)


def _hop_summary(hop_input: HopInput, target: Target, label: str = "") -> str:
    """The hop as the Web UI's timeline names it."""
    context = hop_input.context
    summary = f"hop {hop_input.hop}" + (f" [{label}]" if label else "")
    summary += f": {context.from_agent} -> {context.to_agent}"
    if target.kind is HopKind.JOIN:
        summary += f" (join of {len(target.branches)} branches)"
    elif target.kind is HopKind.RETURN:
        summary += " (return)"
    if hop_input.fallback_for:
        summary += f" (fallback for {hop_input.fallback_for})"
    summary = f"{summary}: {target.task[:80]}"
    return f"{summary} [{target.chosen_by[:100]}]" if target.chosen_by else summary

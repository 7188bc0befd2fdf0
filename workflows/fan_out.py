"""Fan-outs of the chain workflow: a hop's agent hands the chain to several agents at once; each
branch runs concurrently in the workflow, a path of hops of its own under the chain's rules, until
the join may run (every branch ended, its first `wait_for` completed, or its deadline); the
branches still running are then cut, and the chain goes on from the join. Why branches are
coroutines of the chain and not child workflows: docs/design.md, "Fan-out and join"."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from temporalio import workflow
from temporalio.exceptions import CancelledError

with workflow.unsafe.imports_passed_through():
    from handoff.models import (
        BranchPosition,
        BranchRecord,
        ChainPolicy,
        ChainStatus,
        FanOut,
        FanOutRecord,
        HopKind,
        HopRecord,
        HopStatus,
        walk_hops,
    )

    from handoff.workflows import rules
    from handoff.workflows.paths import Path, Target
    from handoff.workflows.visibility import Metrics


class ChainEnd(Exception):
    """Ends the chain (or its branch) with a deliberate status; always caught in `run` (or in
    the branch)."""

    def __init__(self, status: ChainStatus, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


CUT_REASONS = {
    "late": "cut: still running at the join's deadline",
    "not_needed": "cut: the join already had the branches it waits for",
}


class FanOuts:
    """The chain workflow's fan-out steps: a part of `HandoffChainWorkflow`, which provides the
    state declared here and the steps they call (`_walk`, `_refuse`, `_budget_room`, `_close_hop`)."""

    _policy: ChainPolicy
    _metrics: Metrics
    _hops_reserved: int
    _fan_outs: int

    async def _fan_out(self, path: Path, depth: int, agent: str, fan: FanOut) -> tuple[Target, int]:
        """Run the branches of `agent`'s fan-out concurrently, each a path of its own, until the
        join may run (every branch ended, its first `wait_for` completed, or its deadline); cut
        the rest. Returns the join's target (its context shows every branch's outcome) and depth."""
        join = fan.join
        join_target = Target.of(join, agent, HopKind.RETURN if join.to_agent == agent else HopKind.JOIN)
        problem = rules.fan_out_problem(self._policy, fan, agent)
        if problem:
            self._refuse(path, depth + 1, join_target, ChainStatus.REJECTED, problem)
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
            self._metrics.branches.add(1, {"status": entry.status.value})
        return (replace(join_target, branches=tuple(b.outcome() for b in record.branches)),
                rules.join_depth(record, depth))

    async def _join_wait(self, record: FanOutRecord, depth: int) -> str:
        """Wait until the join may run; why the branches still running are cut."""
        try:
            await workflow.wait_condition(lambda: rules.join_ready(record), timeout=record.deadline_s,
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

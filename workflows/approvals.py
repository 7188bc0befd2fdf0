"""Hops that wait for a person: durably, on a timer, holding no worker slot. A decision comes in
through the chain's `decide_approval` Update, whose validator accepts it only for a hop that waits
and is undecided, so a second decision (or one for a chain that does not wait) never reaches
history."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from handoff.models import ApprovalDecision, ApprovalRecord, HopRecord


class Approvals:
    """The hops of one chain waiting for a person, by handoff id."""

    def __init__(self, chain_id: Any) -> None:
        self._chain_id = chain_id
        self.waiting: dict[Any, HopRecord] = {}

    def open(self, entry: HopRecord) -> None:
        self.waiting[entry.handoff_id] = entry

    async def wait(self, entry: HopRecord, timeout_s: float, summary: str,
                   interrupted: Callable[[], bool] = lambda: False) -> ApprovalRecord:
        """Wait for the decision on `entry` (opened), or `timeout_s`: then it is `timed_out`; or
        until `interrupted()` (the chain was asked to stop): then it stays undecided."""
        approval = entry.approval
        assert approval is not None
        try:
            await workflow.wait_condition(lambda: approval.decision is not None or interrupted(),
                                          timeout=timeout_s, timeout_summary=summary)
        except asyncio.TimeoutError:
            approval.decision, approval.decided_at = "timed_out", workflow.now()
        finally:
            del self.waiting[entry.handoff_id]
        return approval

    def decide(self, decision: ApprovalDecision) -> HopRecord:
        """Record `decision` in the entry it decides; that entry, as decided."""
        entry = self.entry_for(decision)
        assert entry.approval is not None
        entry.approval.decide(decision, workflow.now())
        return entry.model_copy(deep=True)

    def entry_for(self, decision: ApprovalDecision) -> HopRecord:
        """The waiting entry `decision` decides; ValueError saying why there is none."""
        problem = decision.problem()
        if problem:
            raise ValueError(problem)
        waiting = [e for e in self.waiting.values() if e.approval is not None and e.approval.decision is None]
        chain = self._chain_id
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


def refusal(approval: ApprovalRecord, timeout_s: float) -> str:
    """Why a hop that waited was refused: rejected by whom and why, or no decision in time."""
    if approval.decision == "rejected":
        return f"rejected by {approval.by}: {approval.comment}"
    return f"no approval decision within {timeout_s:g}s"

"""Minimal agents for the benchmarks: each hands the chain straight on, so what is measured is
the handoff machinery, not agent work."""

from __future__ import annotations

import time

from handoff import Agent, AgentCapability, Branch, HandoffContext, HandoffResult, Join

HOPS = 5
IDS = [f"bench-r{i}" for i in range(HOPS)]
FAN_OUT = 8
BRANCH_IDS = [f"bench-b{i}" for i in range(FAN_OUT)]
LEAD, JOIN, GATE = "bench-lead", "bench-join", "bench-gate"


async def relay(ctx: HandoffContext) -> HandoffResult:
    index = IDS.index(ctx.to_agent)
    if index + 1 < len(IDS) and index + 1 < int(ctx.context_data.get("hops", HOPS)):
        return ctx.handoff(to_agent=IDS[index + 1], task_description=f"hop {index + 1}",
                           result_data={"hop": index})
    return ctx.complete({"hop": index})


async def lead(ctx: HandoffContext) -> HandoffResult:
    """Fans out to `context_data["branches"]` agents at once, joined by `bench-join`; or, with
    `context_data["approval"]`, hands off to `bench-gate` asking for a person's approval."""
    if ctx.context_data.get("approval"):
        return ctx.handoff(to_agent=GATE, task_description="gate", require_approval=True)
    count = int(ctx.context_data.get("branches", 1))
    return ctx.fan_out([Branch(to_agent=b, task_description=f"branch {i}") for i, b in enumerate(BRANCH_IDS[:count])],
                       join=Join(to_agent=JOIN, task_description="join"))


async def done(ctx: HandoffContext) -> HandoffResult:
    return ctx.complete({"by": ctx.to_agent, "branches": len(ctx.branches)})


async def gate(ctx: HandoffContext) -> HandoffResult:
    """The hop after an approval: says when it started (wall clock, to compare across processes)."""
    return ctx.complete({"started_at": time.time()})


def _agent(agent_id: str, handler) -> Agent:
    return Agent(id=agent_id, name=agent_id, capabilities=[AgentCapability.TESTING], handler=handler,
                 max_concurrent=100)


ALL = [_agent(i, relay) for i in IDS] + [_agent(LEAD, lead), _agent(JOIN, done), _agent(GATE, gate)] + [
    _agent(b, done) for b in BRANCH_IDS]

"""Minimal agents for the benchmarks: each hands the chain straight on, so what is measured is
the handoff machinery, not agent work."""

from __future__ import annotations

from handoff import Agent, AgentCapability, HandoffContext, HandoffResult

HOPS = 5
IDS = [f"bench-r{i}" for i in range(HOPS)]


async def relay(ctx: HandoffContext) -> HandoffResult:
    index = IDS.index(ctx.to_agent)
    if index + 1 < len(IDS) and index + 1 < int(ctx.context_data.get("hops", HOPS)):
        return ctx.handoff(to_agent=IDS[index + 1], task_description=f"hop {index + 1}",
                           result_data={"hop": index})
    return ctx.complete({"hop": index})


ALL = [Agent(id=i, name=i, capabilities=[AgentCapability.TESTING], handler=relay, max_concurrent=100)
       for i in IDS]

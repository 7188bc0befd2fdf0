"""Agents of the multi-host tests (tests/test_hosts.py), run by `handoff worker` on the test
bed's hosts. Every execution of a hop leaves its side effects in a file of its own host and
process (HANDOFF_BED_EFFECTS): a `start` line when it begins and a `done` line when its work is
finished, whether or not its completion ever reaches the server. The test counts them against
the record.

A chain's `context_data` carries its `plan` (the agent ids in order) and `seconds` (how long each
agent works on it); each agent hands on to the next in the plan, the last completes.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from handoff import Agent, AgentCapability, HandoffContext, HandoffResult

SUFFIX = os.environ.get("HANDOFF_TEST_SUFFIX", "local")
HOST = os.environ.get("HANDOFF_BED_HOST", "?")
EFFECTS = Path(os.environ.get("HANDOFF_BED_EFFECTS", "/tmp"))


def mark(ctx: HandoffContext, phase: str) -> None:
    line = json.dumps({"chain": str(ctx.chain_id), "hop": str(ctx.handoff_id), "agent": ctx.to_agent,
                       "host": HOST, "pid": os.getpid(), "phase": phase})
    with open(EFFECTS / f"{HOST}-{os.getpid()}.jsonl", "a") as effects:
        effects.write(line + "\n")


async def work(ctx: HandoffContext) -> HandoffResult:
    mark(ctx, "start")
    await asyncio.sleep(float(ctx.context_data.get("seconds", {}).get(ctx.to_agent, 0.1)))
    mark(ctx, "done")
    plan: list[str] = ctx.context_data["plan"]
    at = plan.index(ctx.to_agent, ctx.chain_depth)
    done = {"by": ctx.to_agent, "host": HOST}
    if at + 1 < len(plan):
        return ctx.handoff(to_agent=plan[at + 1], task_description=f"step {at + 1}", result_data=done,
                           context_data=ctx.context_data)
    return ctx.complete(done)


def _agent(name: str) -> Agent:
    return Agent(id=f"{name}-{SUFFIX}", name=name.title(), capabilities=[AgentCapability.TESTING], handler=work,
                 max_concurrent=20)


replica = _agent("replica")
"""Runs on two hosts: the same agent, one task queue, two workers."""
edge = _agent("edge")
far = _agent("far")
"""Runs on a host whose link to the server has latency and loss."""

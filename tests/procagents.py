"""Agents run as separate worker processes by tests/test_processes.py (`handoff worker --agent`).

Their ids carry HANDOFF_TEST_SUFFIX so every test run uses fresh task queues.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from handoff import Agent, AgentCapability, HandoffContext, HandoffResult, PermanentError

SUFFIX = os.environ.get("HANDOFF_TEST_SUFFIX", "local")
MARKS = Path(os.environ.get("HANDOFF_TEST_MARKS", "/tmp"))


async def audit(ctx: HandoffContext) -> HandoffResult:
    return ctx.complete({"audited_by": ctx.to_agent, "pid": os.getpid()})


async def slow_build(ctx: HandoffContext) -> HandoffResult:
    """Leaves a mark naming the process that took the hop, then works for a while."""
    (MARKS / f"started-{os.getpid()}").write_text(str(ctx.handoff_id))
    await asyncio.sleep(float(ctx.context_data.get("seconds", 3)))
    return ctx.complete({"built_by": os.getpid()})


sec_a = Agent(id=f"sec-a-{SUFFIX}", name="Auditor A", capabilities=[AgentCapability.SECURITY_AUDIT],
              handler=audit)
sec_b = Agent(id=f"sec-b-{SUFFIX}", name="Auditor B", capabilities=[AgentCapability.SECURITY_AUDIT],
              handler=audit)
builder = Agent(id=f"builder-{SUFFIX}", name="Builder", capabilities=[AgentCapability.DEPLOYMENT],
                handler=slow_build, max_concurrent=1)


async def check_blob(ctx: HandoffContext) -> HandoffResult:
    """Checks the context's blob against its SHA-256; the first checker hands on to the second."""
    blob = ctx.context_data["blob"]
    intact = hashlib.sha256(blob.encode()).hexdigest() == ctx.context_data["sha256"]
    seen = {"by": ctx.to_agent, "intact": intact, "size": len(blob)}
    if ctx.to_agent == checker_a.id:
        return ctx.handoff(to_agent=checker_b.id, task_description="check it again", result_data=seen)
    return ctx.complete(seen)


checker_a = Agent(id=f"blob-a-{SUFFIX}", name="Blob checker A", capabilities=[AgentCapability.TESTING],
                  handler=check_blob)
checker_b = Agent(id=f"blob-b-{SUFFIX}", name="Blob checker B", capabilities=[AgentCapability.TESTING],
                  handler=check_blob)
checkers = [checker_a, checker_b]


async def refuse(ctx: HandoffContext) -> HandoffResult:
    raise PermanentError(f"{ctx.to_agent} will not do {ctx.task_description!r}")


async def divide(ctx: HandoffContext) -> HandoffResult:
    return ctx.complete({"ratio": 1 / len(ctx.context_data)})  # a bug: an empty context


refuser = Agent(id=f"refuser-{SUFFIX}", name="Refuser", capabilities=[AgentCapability.TESTING], handler=refuse)
buggy = Agent(id=f"buggy-{SUFFIX}", name="Buggy", capabilities=[AgentCapability.TESTING], handler=divide)
failing = [refuser, buggy]

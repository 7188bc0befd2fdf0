"""Minimal agents for the benchmarks: each hands the chain straight on, so what is measured is
the handoff machinery, not agent work."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path

from handoff import Agent, AgentCapability, Branch, HandoffContext, HandoffResult, Join, PermanentError

HOPS = 5
IDS = [f"bench-r{i}" for i in range(HOPS)]
FAN_OUT = 8
BRANCH_IDS = [f"bench-b{i}" for i in range(FAN_OUT)]
LEAD, JOIN, GATE = "bench-lead", "bench-join", "bench-gate"
RESULT_BYTES = "result_random_bytes"
"""With this in the context, each relay's result carries that many random bytes, base64-encoded
(incompressible text, 4/3 as long) under `data`."""
REPORT_USAGE = "report_usage"
"""With this true in the context, each relay reports `RELAY_USAGE` for its hop (`ctx.report_usage`)."""
RELAY_USAGE = {"model": "m", "prompt_tokens": 10, "completion_tokens": 5, "model_calls": 1}
HOP_SLEEP_MS = "hop_sleep_ms"
"""With this in the context, each relay sleeps that many milliseconds before it hands on."""
WAITER, STEERED = "bench-waiter", "bench-steered"
PROGRESS_NOTES = "progress_notes"
"""Context key: each relay hop says this many progress notes, a second apart (`ctx.progress`)."""
STAMP_DONE = "stamp_done"
"""Context key: each relay hop's result says when its handler returned (wall clock, `done_at`)."""
WAIT_FOR = "wait_for"
"""The waiter's context key: the path of the file it waits for."""
WAIT_POLL_S, WAIT_TIMEOUT_S = 0.005, 30.0
RELAY_CAPABILITIES = [AgentCapability.CODE_ANALYSIS, AgentCapability.SECURITY_AUDIT,
                      AgentCapability.PERFORMANCE_OPTIMIZATION, AgentCapability.DATABASE_OPERATIONS,
                      AgentCapability.API_INTEGRATION]
"""One capability per capability relay, none of them another bench agent's (they have TESTING),
so each hop by capability has exactly one candidate."""
CAPABILITY_IDS = [f"bench-c{i}" for i in range(HOPS)]


def _result(ctx: HandoffContext, index: int) -> dict:
    size = int(ctx.context_data.get(RESULT_BYTES, 0))
    return {"hop": index, **({"data": base64.b64encode(os.urandom(size)).decode()} if size else {}),
            **({"done_at": time.time()} if ctx.context_data.get(STAMP_DONE) else {})}


async def relay(ctx: HandoffContext) -> HandoffResult:
    index = IDS.index(ctx.to_agent)
    if ctx.context_data.get(REPORT_USAGE):
        ctx.report_usage(**RELAY_USAGE)
    if HOP_SLEEP_MS in ctx.context_data:
        await asyncio.sleep(float(ctx.context_data[HOP_SLEEP_MS]) / 1000)
    for note in range(int(ctx.context_data.get(PROGRESS_NOTES, 0))):
        await ctx.progress(f"note {note}")
        await asyncio.sleep(1.05)  # one note a second gets through unbounded by the rate
    if index + 1 < len(IDS) and index + 1 < int(ctx.context_data.get("hops", HOPS)):
        return ctx.handoff(to_agent=IDS[index + 1], task_description=f"hop {index + 1}",
                           result_data=_result(ctx, index))
    return ctx.complete(_result(ctx, index))


async def capability_relay(ctx: HandoffContext) -> HandoffResult:
    """Hands the chain on to the next capability of `RELAY_CAPABILITIES`; the last completes."""
    index = CAPABILITY_IDS.index(ctx.to_agent)
    if index + 1 < len(CAPABILITY_IDS):
        return ctx.handoff(capability=RELAY_CAPABILITIES[index + 1], task_description=f"hop {index + 1}",
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


async def waiter(ctx: HandoffContext) -> HandoffResult:
    """Waits until the file `context_data["wait_for"]` names exists (polling it every 5 ms), then
    hands on to `bench-steered` at once, saying when it saw the file (wall clock)."""
    marker = Path(ctx.context_data[WAIT_FOR])
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not marker.exists():
        if time.monotonic() > deadline:
            raise PermanentError(f"{marker} did not appear within {WAIT_TIMEOUT_S:g}s")
        await asyncio.sleep(WAIT_POLL_S)
    return ctx.handoff(to_agent=STEERED, task_description="after the wait",
                       result_data={"released_at": time.time()})


async def steered(ctx: HandoffContext) -> HandoffResult:
    """Says when it started (wall clock, to compare across processes) and the steering messages it got."""
    return ctx.complete({"started_at": time.time(), "steering": [m.message for m in ctx.steering]})


def _agent(agent_id: str, handler) -> Agent:
    return Agent(id=agent_id, name=agent_id, capabilities=[AgentCapability.TESTING], handler=handler,
                 max_concurrent=100)


ALL = [_agent(i, relay) for i in IDS] + [_agent(LEAD, lead), _agent(JOIN, done), _agent(GATE, gate)] + [
    _agent(b, done) for b in BRANCH_IDS]
BY_CAPABILITY = [Agent(id=agent_id, name=agent_id, capabilities=[capability], handler=capability_relay,
                       max_concurrent=100) for agent_id, capability in zip(CAPABILITY_IDS, RELAY_CAPABILITIES)]
"""Kept out of `ALL`: the main benchmark's LLM figures offer a tool per live agent."""
CONTROL = [_agent(WAITER, waiter), _agent(STEERED, steered)]
"""The steering benchmark's agents (`bench/control.py`), kept out of `ALL` as `BY_CAPABILITY` is."""

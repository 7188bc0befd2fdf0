"""Agents whose hops take seconds, for the cost benchmark (`bench/cost.py`), where a long hop's
heartbeats are what is counted.

- `bench-llm-30s`, `bench-llm-1s`: LLM agents (`handoff.agents.llm`) whose model answers `finish`
  after 30 s or 1 s. The model is the benchmark's `handoff.testing.ScriptedModel`, found through
  `OPENAI_BASE_URL`; each agent's model is named after the agent, so the model knows its delay.
- `bench-sleeper`: sleeps `context_data["sleep_s"]` (60 s by default); cancelled, it appends its
  chain id and the wall-clock time it saw the cancellation to the file `BENCH_CANCELLED_AT` names.

Served by `handoff worker --agent bench.slow:ALL`.
"""

from __future__ import annotations

import asyncio
import os
import time

from handoff import Agent, AgentCapability, HandoffContext, HandoffResult
from handoff.agents.llm import llm_agent

MODEL_DELAYS_S = {"bench-llm-30s": 30.0, "bench-llm-1s": 1.0}
"""Each LLM agent's id, which is also its model's name, and how long that model takes to answer."""
SLEEPER = "bench-sleeper"
CANCELLED_AT_ENV = "BENCH_CANCELLED_AT"


async def sleep(ctx: HandoffContext) -> HandoffResult:
    try:
        await asyncio.sleep(float(ctx.context_data.get("sleep_s", 60)))
    except asyncio.CancelledError:
        seen = time.time()
        path = os.environ.get(CANCELLED_AT_ENV)
        if path:
            with open(path, "a") as marks:
                marks.write(f"{ctx.chain_id} {seen}\n")
        raise
    return ctx.complete({"slept": True})


ALL = [
    *(llm_agent(id=agent_id, name=agent_id, capabilities=[AgentCapability.TESTING], instructions="Do the work.",
                model=agent_id, max_concurrent=10) for agent_id in MODEL_DELAYS_S),
    Agent(id=SLEEPER, name=SLEEPER, capabilities=[AgentCapability.TESTING], handler=sleep, max_concurrent=10),
]

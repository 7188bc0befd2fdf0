"""A fleet of agents of one capability, all their workers in this one process, until SIGTERM:

    python -m bench.fleet PREFIX COUNT [CAPABILITY]

(`bench/registry.py` starts it, so its own process measures lookups and chains undisturbed.)"""

from __future__ import annotations

import asyncio
import logging
import sys

import structlog

from handoff.agents.agent import Agent
from handoff.client import connect
from handoff.models import AgentCapability, HandoffContext, HandoffResult
from handoff.workers.main import run_workers, stop_on_signals

CAPABILITY = AgentCapability.API_INTEGRATION
REFERENCE = AgentCapability.DATABASE_OPERATIONS
"""The reference fleet's capability: 10 agents that run beside the fleet measured."""


async def answer(ctx: HandoffContext) -> HandoffResult:
    return ctx.complete({"by": ctx.to_agent})


def fleet(prefix: str, count: int, capability: AgentCapability = CAPABILITY) -> list[Agent]:
    return [Agent(id=f"{prefix}-{i}", name=f"{prefix} {i}", capabilities=[capability], handler=answer,
                  max_concurrent=5) for i in range(count)]


async def main(prefix: str, count: int, capability: AgentCapability) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    client = await connect()
    stop = asyncio.Event()
    stop_on_signals(stop)
    await run_workers(client, fleet(prefix, count, capability), chains=False, stop=stop)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), AgentCapability(sys.argv[3]) if len(sys.argv) > 3 else CAPABILITY))

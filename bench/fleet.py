"""A fleet of agents of one capability, all their workers in this one process, until SIGTERM:

    python -m bench.fleet PREFIX COUNT

(`bench/registry.py` starts it, so its own process measures lookups and chains undisturbed.)"""

from __future__ import annotations

import asyncio
import logging
import sys

import structlog

from handoff.agent import Agent
from handoff.client import connect
from handoff.models import AgentCapability, HandoffContext, HandoffResult
from handoff.workers.main import run_workers, stop_on_signals

CAPABILITY = AgentCapability.API_INTEGRATION


async def answer(ctx: HandoffContext) -> HandoffResult:
    return ctx.complete({"by": ctx.to_agent})


def fleet(prefix: str, count: int) -> list[Agent]:
    return [Agent(id=f"{prefix}-{i}", name=f"{prefix} {i}", capabilities=[CAPABILITY], handler=answer,
                  max_concurrent=5) for i in range(count)]


async def main(prefix: str, count: int) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    client = await connect()
    stop = asyncio.Event()
    stop_on_signals(stop)
    await run_workers(client, fleet(prefix, count), chains=False, stop=stop)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))

"""The baselines handoff is measured against, on the same server in the same run.

- `BareChain`: the least Temporal can do for an N-hop chain: one workflow calling one activity
  per hop, each on its own task queue, served by a separate worker process. No routing, no
  records, no rules: what is left of handoff's latency over it is handoff's own overhead.
- `HubChain`: the same N hops of work, hub-and-spoke: control returns to an orchestrator agent
  (an activity on the hub's queue) before every hop and once after the last, N+1 turns, as a
  supervisor or manager agent does in orchestrator-centred frameworks (it picks each next
  agent, then composes the answer); in peer-to-peer handoff the last agent's result ends the chain.
- `BareSlowHop`: one activity that works for N seconds, heartbeating every second with the SDK's
  defaults (a 10 s heartbeat timeout; the SDK sends at most one heartbeat per 80 % of it): what a
  long hop costs in Temporal actions without handoff (`bench/cost.py`).

The workflows run with the SDK's defaults (`workflows`), and, for a stricter comparison, also
without the workflow sandbox as handoff's chain worker runs them (`workflows-unsandboxed`).

Run as processes: `python -m bench.baseline ADDRESS workflows|workflows-unsandboxed|activities`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

WORKFLOW_QUEUE = "bench.baseline"
UNSANDBOXED_QUEUE = "bench.baseline.unsandboxed"
HUB_QUEUE = "bench.hub"
HOPS = 5
SPOKE_QUEUES = [f"bench.spoke{i}" for i in range(HOPS)]
SLOW_QUEUE = "bench.slow"
HOP_OPTIONS = {"start_to_close_timeout": timedelta(seconds=60),
               "retry_policy": RetryPolicy(maximum_attempts=3)}


@activity.defn(name="bench.work")
async def work(step: int) -> int:
    return step


@activity.defn(name="bench.route")
async def route(step: int) -> int:
    """The orchestrator deciding where the next step goes (or, after the last, the answer)."""
    return step


@activity.defn(name="bench.slow_work")
async def slow_work(seconds: float) -> float:
    """Work that takes `seconds`, heartbeating every second, as a long activity is written."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        activity.heartbeat()
        await asyncio.sleep(min(1.0, left))
    return seconds


@workflow.defn(name="BareChain")
class BareChain:
    @workflow.run
    async def run(self, hops: int) -> int:
        for step in range(hops):
            await workflow.execute_activity("bench.work", step, task_queue=SPOKE_QUEUES[step], **HOP_OPTIONS)
        return hops


@workflow.defn(name="HubChain")
class HubChain:
    @workflow.run
    async def run(self, hops: int) -> int:
        for step in range(hops):
            await workflow.execute_activity("bench.route", step, task_queue=HUB_QUEUE, **HOP_OPTIONS)
            await workflow.execute_activity("bench.work", step, task_queue=SPOKE_QUEUES[step], **HOP_OPTIONS)
        await workflow.execute_activity("bench.route", hops, task_queue=HUB_QUEUE, **HOP_OPTIONS)
        return hops


@workflow.defn(name="BareSlowHop")
class BareSlowHop:
    @workflow.run
    async def run(self, seconds: float) -> float:
        return await workflow.execute_activity("bench.slow_work", seconds, task_queue=SLOW_QUEUE,
                                               heartbeat_timeout=timedelta(seconds=10), **HOP_OPTIONS)


async def serve(address: str, role: str) -> None:
    """Serve the baseline workflows (`role` = workflows, workflows-unsandboxed) or every activity
    (`activities`): separate processes, like handoff's chain worker and agent worker."""
    client = await Client.connect(address)
    if role == "workflows":
        workers = [Worker(client, task_queue=WORKFLOW_QUEUE, workflows=[BareChain, HubChain, BareSlowHop])]
    elif role == "workflows-unsandboxed":
        workers = [Worker(client, task_queue=UNSANDBOXED_QUEUE, workflows=[BareChain, HubChain, BareSlowHop],
                          workflow_runner=UnsandboxedWorkflowRunner())]
    else:
        workers = [
            Worker(client, task_queue=HUB_QUEUE, activities=[route], max_concurrent_activities=100),
            *(Worker(client, task_queue=q, activities=[work], max_concurrent_activities=100)
              for q in SPOKE_QUEUES),
            Worker(client, task_queue=SLOW_QUEUE, activities=[slow_work], max_concurrent_activities=10),
        ]
    await asyncio.gather(*(w.run() for w in workers))


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2]))

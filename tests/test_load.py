"""Load with random faults: 1,000 chains at concurrency 50. Every chain ends with a deliberate
status (none stuck, none lost) and its record shows exactly the hops that ran."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import pytest
from temporalio import activity

from handoff import ChainStatus, PermanentError, start_chain, wait_chain
from tests.support import make_agent, running

pytestmark = [pytest.mark.usefixtures("chains"), pytest.mark.timeout(600)]

CHAINS = 1000
CONCURRENCY = 50
DELIBERATE = {ChainStatus.COMPLETED, ChainStatus.FAILED, ChainStatus.DEPTH_EXCEEDED,
              ChainStatus.LOOP_DETECTED}


async def test_thousand_chains_with_random_faults_all_end_deliberately(client, uid):
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    pool = [f"load{i}-{uid}" for i in range(6)]
    runs: Counter = Counter()

    async def handle(ctx):
        runs[str(ctx.handoff_id)] += 1
        plan = ctx.context_data["plan"][ctx.chain_depth]
        if plan == "flaky" and activity.info().attempt == 1:
            raise ConnectionError("transient")
        if plan == "broken":
            raise PermanentError("broken input")
        if plan == "hang":
            await asyncio.sleep(5)
        following = ctx.context_data["route"][ctx.chain_depth + 1:]
        if following:
            return ctx.handoff(to_agent=following[0], task_description=f"step {ctx.chain_depth + 1}",
                               result_data={"depth": ctx.chain_depth})
        return ctx.complete({"depth": ctx.chain_depth})

    def random_chain() -> dict:
        length = rng.randint(1, 6)  # 6 hops asked: depth_exceeded
        route = [rng.choice(pool) for _ in range(length)]  # repeats can loop
        plan = [rng.choices(["ok", "flaky", "broken", "hang"], [85, 8, 4, 3])[0] for _ in range(length)]
        return {"route": route, "plan": plan}

    semaphore = asyncio.Semaphore(CONCURRENCY)
    started_ids: list[str] = []

    async def one(spec: dict):
        async with semaphore:
            chain_id = await start_chain(
                client, to_agent=spec["route"][0], task_description="load", context_data=spec,
                hop_timeout=1, policy={"retry_initial_s": 0.05, "max_attempts": 2, "heartbeat_timeout_s": 1},
            )
            started_ids.append(str(chain_id))
            return await asyncio.wait_for(wait_chain(client, chain_id), 120)

    began = time.monotonic()
    async with running(client, *[make_agent(a, handle, max_concurrent=50) for a in pool]):
        records = await asyncio.gather(*(one(random_chain()) for _ in range(CHAINS)))
    elapsed = time.monotonic() - began

    statuses = Counter(r.status for r in records)
    print(f"{CHAINS} chains in {elapsed:.1f} s ({CHAINS / elapsed:.1f}/s): "
          f"{ {s.value: n for s, n in statuses.items()} }")
    assert len(records) == len(started_ids) == CHAINS, "no chain lost"
    assert set(statuses) <= DELIBERATE, "every chain ends with a deliberate status, none stuck"
    for record in records:
        ids = [h.handoff_id for h in record.hops if h.handoff_id is not None]
        assert len(ids) == len(set(ids)), "no hop appears twice"
        for hop in record.hops:
            if hop.status.value in ("completed", "failed", "timed_out"):
                assert hop.attempts == runs[str(hop.handoff_id)], hop

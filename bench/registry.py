"""Registration and discovery at scale: N agents of one capability, all their workers in one
process (`bench/fleet.py`), starting together (a fleet restarting after an outage), on the
benchmark's embedded server and chain worker.

For N in 10, 100, 500: how long until every one is registered and live; how long a lookup takes
(the resolve activity's `Directory`, as warm as a chain worker's); chains/s of 1-hop chains
addressed by the capability at concurrency 20. Then stale registrations: 500 cards whose agents
never ran (so never deregistered) beside 10 live agents: the lookup's time, and whether a stale
one is ever chosen.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time

from temporalio.client import Client

from bench.fleet import CAPABILITY, fleet
from handoff.client import run_chain
from handoff.models import ChainStatus
from handoff.registry import Directory, agent_statuses, forget_agents, register_agent, registered_agents

LIVE_WITHIN_S = 30.0
"""The target: every agent of a fleet starting together registered and live within this."""


def start_fleet(address: str, prefix: str, count: int) -> subprocess.Popen:
    env = {**os.environ, "TEMPORAL_ADDRESS": address}
    return subprocess.Popen([sys.executable, "-m", "bench.fleet", prefix, str(count)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_fleet(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)


async def live_among(client: Client, ids: set[str]) -> int:
    cards = [c for c in await registered_agents(client) if c.agent_id in ids]
    return sum(s.stats.live for s in await agent_statuses(client, cards))


async def gone(client: Client, ids: set[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while ids & {c.agent_id for c in await registered_agents(client)} and time.monotonic() < deadline:
        await asyncio.sleep(0.5)


async def lookups(client: Client, samples: int, *, stale: set[str] = frozenset()) -> dict:
    """A warm `Directory`'s lookup times (ms) for the capability, and how often its first
    candidate was a stale agent."""
    directory = Directory(client)
    await directory.candidates(CAPABILITY)
    times, picked_stale = [], 0
    for _ in range(samples):
        started = time.perf_counter()
        found = await directory.candidates(CAPABILITY)
        times.append((time.perf_counter() - started) * 1000)
        picked_stale += bool(found) and found[0].agent_id in stale
        await asyncio.sleep(0.01)
    ordered = sorted(times)
    return {"p50_ms": round(statistics.median(times), 3), "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))], 3),
            "candidates": len(found), "first_was_stale": picked_stale}


async def throughput(client: Client, chains: int, concurrency: int = 20) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            record = await run_chain(client, capability=CAPABILITY, task_description=f"scale {i}")
            if record.status is not ChainStatus.COMPLETED:
                raise RuntimeError(f"scale chain ended {record.status.value}: {record.error}")

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(chains)))
    return round(chains / (time.perf_counter() - started), 2)


async def scale(client: Client, address: str, count: int, samples: int, chains: int) -> dict:
    ids = {a.id for a in fleet(f"scale{count}", count)}
    started = time.perf_counter()
    workers = start_fleet(address, f"scale{count}", count)
    live, live_s = 0, None
    try:
        while True:
            live = await live_among(client, ids)
            if live == count:
                live_s = round(time.perf_counter() - started, 2)
                break
            if time.perf_counter() - started > 2 * LIVE_WITHIN_S:
                break
            await asyncio.sleep(0.25)
        result = {"agents": count, "live": live, "all_live_s": live_s,
                  "lookup": await lookups(client, samples),
                  "chains_per_s": await throughput(client, chains)}
    finally:
        await asyncio.to_thread(stop_fleet, workers)
        await gone(client, ids)
    return result


async def stale(client: Client, address: str, samples: int, chains: int, count: int = 500) -> dict:
    """`count` registered agents that never ran beside 10 live ones."""
    ghosts = fleet("ghost", count)
    await asyncio.gather(*(register_agent(client, g, "never-ran") for g in ghosts))
    ghost_ids = {g.id for g in ghosts}
    for _ in range(120):
        if ghost_ids <= {c.agent_id for c in await registered_agents(client)}:
            break
        await asyncio.sleep(0.25)
    alive = {a.id for a in fleet("alive", 10)}
    workers = start_fleet(address, "alive", 10)
    try:
        while await live_among(client, alive) < len(alive):
            await asyncio.sleep(0.25)
        return {"stale": count, "live": len(alive), "lookup": await lookups(client, samples, stale=ghost_ids),
                "chains_per_s": await throughput(client, chains)}
    finally:
        await asyncio.to_thread(stop_fleet, workers)
        await forget_agents(client, sorted(ghost_ids))
        await gone(client, ghost_ids | alive)


async def registry_scale(client: Client, address: str, *, sizes=(10, 100, 500), samples: int = 200,
                         chains: int = 100) -> dict:
    results = {f"n{n}": await scale(client, address, n, samples, chains) for n in sizes}
    results["stale"] = await stale(client, address, samples, chains)
    base = results[f"n{sizes[0]}"]["chains_per_s"]
    for n in sizes:
        results[f"n{n}"]["chains_ratio_to_first"] = round(results[f"n{n}"]["chains_per_s"] / base, 3) if base else None
    return results

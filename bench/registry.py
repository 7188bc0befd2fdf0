"""Registration and discovery at scale: N agents of one capability, all their workers in one
process (`bench/fleet.py`), starting together (a fleet restarting after an outage), on an
embedded server of its own with handoff's chain worker (`run_registry_scale`).

For N in 10, 100, 500: how long until every one is registered and live; how long a lookup takes
(the resolve activity's `Directory`, as warm as a chain worker's); chains/s of 1-hop chains
addressed by the capability at concurrency 20, in rounds alternating with a reference fleet of 10
agents of another capability that runs throughout (the medians and their ratio). Then stale
registrations: 500 cards whose agents
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
import tempfile
import time
from pathlib import Path

from temporalio.client import Client

from bench.fleet import CAPABILITY, REFERENCE, fleet
from handoff.client import connect, run_chain
from handoff.models import ChainStatus
from handoff.registry import Directory, agent_statuses, forget_agents, register_agent, registered_agents
from handoff.servers.embedded import EmbeddedServer, free_port

LIVE_WITHIN_S = 30.0
"""The target: every agent of a fleet starting together registered and live within this."""


def start_fleet(address: str, prefix: str, count: int, capability=CAPABILITY) -> subprocess.Popen:
    env = {**os.environ, "TEMPORAL_ADDRESS": address}
    return subprocess.Popen([sys.executable, "-m", "bench.fleet", prefix, str(count), capability.value], env=env,
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
            "candidates": len(found), "first_was_stale": picked_stale, "samples": samples}


async def throughput(client: Client, chains: int, capability=CAPABILITY, concurrency: int = 20) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            record = await run_chain(client, capability=capability, task_description=f"scale {i}")
            if record.status is not ChainStatus.COMPLETED:
                raise RuntimeError(f"scale chain ended {record.status.value}: {record.error}")

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(chains)))
    return round(chains / (time.perf_counter() - started), 2)


async def against_reference(client: Client, chains: int, rounds: int = 3) -> dict:
    """Chains/s by the fleet's capability and by the reference fleet's (10 agents), in
    alternating rounds after a few chains of each to warm up: the medians, and their ratio. The
    server's database grows over a run and the machine is shared, so a fleet is compared with the
    reference measured beside it, not with the first fleet measured minutes earlier."""
    for capability in (CAPABILITY, REFERENCE):
        await throughput(client, max(2, chains // 10), capability)
    fleet_, reference = [], []
    for _ in range(rounds):
        reference.append(await throughput(client, chains, REFERENCE))
        fleet_.append(await throughput(client, chains, CAPABILITY))
    mine, ref = statistics.median(fleet_), statistics.median(reference)
    return {"chains_per_s": mine, "reference_chains_per_s": ref, "ratio_to_reference": round(mine / ref, 3)}


async def reference_fleet(client: Client, address: str) -> subprocess.Popen:
    """The 10 agents every fleet is compared with, live."""
    ids = {a.id for a in fleet("reference", 10, REFERENCE)}
    workers = start_fleet(address, "reference", 10, REFERENCE)
    while await live_among(client, ids) < len(ids):
        await asyncio.sleep(0.25)
    return workers


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
                  "lookup": await lookups(client, samples), **await against_reference(client, chains)}
    finally:
        await asyncio.to_thread(stop_fleet, workers)
        await gone(client, ids)
    return result


async def stale(client: Client, address: str, samples: int, chains: int, count: int) -> dict:
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
                **await against_reference(client, chains)}
    finally:
        await asyncio.to_thread(stop_fleet, workers)
        await forget_agents(client, sorted(ghost_ids))
        await gone(client, ghost_ids | alive)


async def registry_scale(client: Client, address: str, *, sizes=(10, 100, 500), samples: int = 200,
                         chains: int = 150, stale_count: int = 500) -> dict:
    reference = await reference_fleet(client, address)
    try:
        results = {f"n{n}": await scale(client, address, n, samples, chains) for n in sizes}
        results["stale"] = await stale(client, address, samples, chains, stale_count)
    finally:
        await asyncio.to_thread(stop_fleet, reference)
    results["sizes"] = list(sizes)
    return results


def run_registry_scale(**options) -> dict:
    """`registry_scale` on an embedded server of its own (tuned, on a WAL database file) with
    handoff's chain worker in its own process."""
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(port=free_port(), ui_port=free_port(), db=str(Path(tmp) / "registry.db"),
                                extra_args=["--headless"]).start()
        env = {**os.environ, "TEMPORAL_ADDRESS": server.address}
        chains = subprocess.Popen([str(Path(sys.executable).parent / "handoff"), "worker", "--chains"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async def go() -> dict:
                return await registry_scale(await connect(address=server.address), server.address, **options)

            return asyncio.run(go())
        finally:
            chains.terminate()
            chains.wait(timeout=30)
            server.stop()


# The targets, by the names `targets` reports them under.
ALL_LIVE = "{n} agents starting together all live within 30 s"
LOOKUP = "lookup p50 at {n} agents <= 20 ms"
SCALE_THROUGHPUT = "chains/s at {n} agents >= 0.9x the 10-agent reference beside it"
STALE = "{n} stale registrations: lookup p50 <= 20 ms, never chosen"


def registry_targets(scale: dict) -> dict:
    """(value, target, met) per target, for the largest fleet measured and the stale ones."""
    n = scale["sizes"][-1]
    big, stale_ = scale[f"n{n}"], scale["stale"]
    all_live = big["all_live_s"] if big["live"] == big["agents"] else None
    return {
        ALL_LIVE.format(n=n): (all_live, LIVE_WITHIN_S, all_live is not None and all_live <= LIVE_WITHIN_S),
        LOOKUP.format(n=n): (big["lookup"]["p50_ms"], 20, big["lookup"]["p50_ms"] <= 20),
        SCALE_THROUGHPUT.format(n=n): (big["ratio_to_reference"], 0.9, big["ratio_to_reference"] >= 0.9),
        STALE.format(n=stale_["stale"]): (stale_["lookup"]["p50_ms"], 20,
                                          stale_["lookup"]["p50_ms"] <= 20 and stale_["lookup"]["first_was_stale"] == 0),
    }


def registry_rows(scale: dict, goal) -> list[str]:
    """The README table's rows: `goal(name, text)` gives a target's target and met cells."""
    sizes = scale["sizes"]
    n = sizes[-1]
    at = [scale[f"n{k}"] for k in sizes]
    stale_ = scale["stale"]
    counts = " / ".join(map(str, sizes))
    live = " / ".join(f"{r['all_live_s']} s" if r["live"] == r["agents"] else f"{r['live']} live" for r in at)
    lookups = " / ".join(f"{r['lookup']['p50_ms']:.2f}" for r in at)
    rates = " / ".join(f"{r['chains_per_s']:.1f}" for r in at)
    references = " / ".join(f"{r['reference_chains_per_s']:.1f}" for r in at)
    ratios = " / ".join(f"{r['ratio_to_reference']:.2f}" for r in at)
    return [
        f"| {counts} agents of one capability starting together: all registered and live | {live} | | | "
        f"{goal(ALL_LIVE.format(n=n), '<= {} s')} |",
        f"| capability lookup p50 at {counts} agents | {lookups} ms (p99 {at[-1]['lookup']['p99_ms']:.2f} ms at {n}) "
        f"| | | {goal(LOOKUP.format(n=n), '<= {} ms')} |",
        f"| 1-hop chains/s by capability at concurrency 20, {counts} agents | {rates} | 10-agent reference beside "
        f"each: {references} | {ratios} | {goal(SCALE_THROUGHPUT.format(n=n), '>= {}')} |",
        f"| {stale_['stale']} stale registrations beside {stale_['live']} live agents: lookup p50; lookups whose "
        f"first candidate was stale; chains/s | {stale_['lookup']['p50_ms']:.2f} ms; {stale_['lookup']['first_was_stale']} of "
        f"{stale_['lookup']['samples']}; {stale_['chains_per_s']:.1f} | reference {stale_['reference_chains_per_s']:.1f} | "
        f"{stale_['ratio_to_reference']:.2f} | {goal(STALE.format(n=stale_['stale']), '<= {} ms; 0')} |",
    ]

"""What watching a chain costs and how soon a watcher hears (`handoff.client.watch`):

    python -m bench.watch [--latency-chains 40] [--turns 40] [--crowd-chains 10] [--at-once 1000]

writes bench/results/watch.json (also printed) and bench/results/watch.md. Everything runs on an
embedded server started here, with handoff's chain worker and agent worker in processes of their
own; the watchers run in this process.

- latency: 5-hop relay chains, one at a time, each watched from its start; for every hop, from
  its handler returning (wall clock, in the agent's process) to its `hop.completed` event
  reaching the watcher.
- nobody watching: the same chain with no watcher and with one, taking turns (p50 of each).
- a crowd: `--crowd-chains` chains one after another, each with 100 watchers, against the same
  with none: the server's CPU per chain.
- at once: `--at-once` chains started together (each hop sleeps `AT_ONCE_SLEEP_MS`, so all run
  at the same time), each with one watcher, against the same with none: the server's CPU per chain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from temporalio.client import Client

from bench.agents import HOP_SLEEP_MS, HOPS, IDS, PROGRESS_NOTES, STAMP_DONE
from bench.control import WARM_UP, completed, ratio, stack, summary
from bench.race import Cpu, history_size
from handoff.client import run_chain, start_chain, wait_chain
from handoff.client.watch import ChainWatch, watch_chain
from handoff.models import EventKind
from handoff.payloads.storage import PAYLOAD_DIR_ENV

RESULTS = Path(__file__).resolve().parent / "results"
TASK = "bench watch"
CROWD = 100
CROWD_SLEEP_MS = 100
AT_ONCE_HOPS = 2
AT_ONCE_SLEEP_MS = 3000
NOTES = 3

LATENCY_TARGET_P50 = "watch: hop completed to its event at a watcher, p50 < 50 ms"
LATENCY_TARGET_P99 = "watch: hop completed to its event at a watcher, p99 < 250 ms"
CROWD_TARGET = "watch: server CPU per chain with 100 watchers <= 1.2x unwatched"
AT_ONCE_TARGET = "watch: server CPU per chain, 1,000 chains watched at once <= 1.2x unwatched"


async def _watched(client: Client, chain_id: UUID, arrivals: list[float] | None = None) -> ChainWatch:
    """Watch the chain to its end; with `arrivals`, each hop's handler return to its event here (ms)."""
    watch = ChainWatch(client, chain_id)
    async for event in watch:
        if arrivals is not None and event.kind is EventKind.HOP_COMPLETED:
            now = time.time()
            hop = next(h for h in watch.record.all_hops() if str(h.handoff_id) == event.data["handoff_id"])
            arrivals.append((now - hop.result_data["done_at"]) * 1000)
    return watch


async def _events(client: Client, chain_id: UUID) -> int:
    """Watch the chain to its end as a program would (`watch_chain`: watchers in one process share
    one reader); how many events it read."""
    return len([event async for event in watch_chain(client, chain_id)])


async def latency(client: Client, chains: int) -> list[float]:
    arrivals: list[float] = []
    for n in range(WARM_UP + chains):
        chain_id = await start_chain(client, to_agent=IDS[0], task_description=TASK,
                                     context_data={"hops": HOPS, STAMP_DONE: True})
        watch = await _watched(client, chain_id, arrivals if n >= WARM_UP else None)
        if watch.record is None or len(watch.record.hops) != HOPS:
            raise RuntimeError(f"the watched chain {chain_id} did not end with {HOPS} hops")
    return arrivals


async def unwatched_and_watched(client: Client, turns: int) -> dict[str, list[float]]:
    async def plain() -> float:
        started = time.perf_counter()
        completed(await run_chain(client, to_agent=IDS[0], task_description=TASK, context_data={"hops": HOPS}), HOPS)
        return (time.perf_counter() - started) * 1000

    async def watched() -> float:
        started = time.perf_counter()
        chain_id = await start_chain(client, to_agent=IDS[0], task_description=TASK, context_data={"hops": HOPS})
        watching = asyncio.create_task(_watched(client, chain_id))
        completed(await wait_chain(client, chain_id), HOPS)
        took = (time.perf_counter() - started) * 1000
        await watching
        return took

    for _ in range(WARM_UP):
        await plain()
        await watched()
    found: dict[str, list[float]] = {"unwatched": [], "watched": []}
    for turn in range(turns):
        order = [("unwatched", plain), ("watched", watched)]
        for name, sample in order if turn % 2 == 0 else reversed(order):
            found[name].append(await sample())
    return found


async def _server_cpu_ms(cpu: Cpu, run: Any) -> float:
    before = cpu.read()
    await run()
    return Cpu.spent(before, cpu.read())["server"] * 1000


async def crowd(client: Client, cpu: Cpu, chains: int) -> dict[str, float]:
    """Server CPU per chain of `chains` 5-hop chains, one at a time, watched by `CROWD` each or none."""
    context = {"hops": HOPS, HOP_SLEEP_MS: CROWD_SLEEP_MS}

    async def some(watchers: int) -> None:
        for _ in range(chains):
            chain_id = await start_chain(client, to_agent=IDS[0], task_description=TASK, context_data=context)
            watching = [asyncio.create_task(_events(client, chain_id)) for _ in range(watchers)]
            completed(await wait_chain(client, chain_id), HOPS)
            await asyncio.gather(*watching)

    unwatched = await _server_cpu_ms(cpu, lambda: some(0)) / chains
    watched = await _server_cpu_ms(cpu, lambda: some(CROWD)) / chains
    return {"unwatched_ms": round(unwatched, 2), "watched_ms": round(watched, 2), "ratio": ratio(watched, unwatched)}


async def at_once(client: Client, cpu: Cpu, chains: int) -> dict[str, float]:
    """Server CPU per chain of `chains` chains running together, each with one watcher or none."""
    context = {"hops": AT_ONCE_HOPS, HOP_SLEEP_MS: AT_ONCE_SLEEP_MS}

    async def together(watched: bool) -> None:
        ids = await asyncio.gather(*(start_chain(client, to_agent=IDS[0], task_description=TASK,
                                                 context_data=context) for _ in range(chains)))
        watching = [asyncio.create_task(_watched(client, c)) for c in ids] if watched else []
        for record in await asyncio.gather(*(wait_chain(client, c) for c in ids)):
            completed(record, AT_ONCE_HOPS)
        await asyncio.gather(*watching)

    unwatched = await _server_cpu_ms(cpu, lambda: together(False)) / chains
    watched = await _server_cpu_ms(cpu, lambda: together(True)) / chains
    return {"unwatched_ms": round(unwatched, 2), "watched_ms": round(watched, 2), "ratio": ratio(watched, unwatched),
            "hops": AT_ONCE_HOPS, "hop_sleep_ms": AT_ONCE_SLEEP_MS}


async def progress_cost(client: Client) -> dict[str, Any]:
    """History events and bytes a 1-hop chain gains per progress note (a chain with `NOTES`, against none)."""
    plain = await run_chain(client, to_agent=IDS[0], task_description=TASK, context_data={"hops": 1})
    noted = await run_chain(client, to_agent=IDS[0], task_description=TASK,
                            context_data={"hops": 1, PROGRESS_NOTES: NOTES})
    a, b = await history_size(client, str(plain.chain_id)), await history_size(client, str(noted.chain_id))
    return {"events_per_note": round((b["events"] - a["events"]) / NOTES, 2),
            "bytes_per_note": round((b["bytes"] - a["bytes"]) / NOTES, 1), "one_hop_chain": a}


def watch_targets(found: dict) -> dict[str, tuple[float, float, bool]]:
    """(value, target, met) of each watching target."""
    lat = found["latency_ms"]
    crowd_, once = found["crowd"]["ratio"], found["at_once"]["ratio"]
    return {LATENCY_TARGET_P50: (lat["p50"], 50, lat["p50"] < 50),
            LATENCY_TARGET_P99: (lat["p99"], 250, lat["p99"] < 250),
            CROWD_TARGET: (crowd_, 1.2, crowd_ <= 1.2), AT_ONCE_TARGET: (once, 1.2, once <= 1.2)}


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {**summary(values), "p99": round(ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 2)}


async def measured(tmp: Path, args: argparse.Namespace) -> dict:
    async with stack(tmp) as chains:
        client = chains.client
        cpu = Cpu({"server": chains.server_pid})
        arrivals = await latency(client, args.latency_chains)
        turns = await unwatched_and_watched(client, args.turns)
        unwatched, watched = summary(turns["unwatched"]), summary(turns["watched"])
        found = {
            "latency_ms": _percentiles(arrivals),
            "nobody_watching": {"unwatched_ms": unwatched, "watched_ms": watched,
                                "ratio_p50": ratio(watched["p50"], unwatched["p50"])},
            "crowd": {**await crowd(client, cpu, args.crowd_chains), "watchers": CROWD, "chains": args.crowd_chains},
            "at_once": {**await at_once(client, cpu, args.at_once), "chains": args.at_once},
            "progress": await progress_cost(client),
        }
    found["targets"] = {name: {"value": v, "target": t, "met": met}
                        for name, (v, t, met) in watch_targets(found).items()}
    return found


def watch_rows(found: dict, goal: Any) -> list[str]:
    """Rows of the results table (| measure | handoff | baseline | ratio | target | met |);
    `goal(name, text)` gives the target and met cells."""
    lat, turns, crowd_, once, notes = (
        found[k] for k in ("latency_ms", "nobody_watching", "crowd", "at_once", "progress"))
    return [
        f"| watching: a hop completed to its event at a watcher, p50 | {lat['p50']:.1f} ms ({lat['n']} hops) | | | "
        f"{goal(LATENCY_TARGET_P50, '< {} ms')} |",
        f"| watching: a hop completed to its event at a watcher, p99 | {lat['p99']:.1f} ms | | | "
        f"{goal(LATENCY_TARGET_P99, '< {} ms')} |",
        f"| watching: 5-hop chain p50, one watcher in the starter's process | {turns['watched_ms']['p50']:.1f} ms | "
        f"nobody watching {turns['unwatched_ms']['p50']:.1f} ms | {turns['ratio_p50']:.3f} | | |",
        f"| watching: server CPU per chain, {crowd_['watchers']} watchers in one process | "
        f"{crowd_['watched_ms']:.1f} ms | "
        f"none {crowd_['unwatched_ms']:.1f} ms | {crowd_['ratio']:.2f} | {goal(CROWD_TARGET, '<= {}x')} |",
        f"| watching: server CPU per chain, {once['chains']:,} chains at once, one watcher each | "
        f"{once['watched_ms']:.1f} ms | none {once['unwatched_ms']:.1f} ms | {once['ratio']:.2f} | "
        f"{goal(AT_ONCE_TARGET, '<= {}x')} |",
        f"| watching: the history a progress note adds | {notes['events_per_note']:g} events, "
        f"{notes['bytes_per_note']:.0f} bytes | | | | |",
    ]


def markdown(found: dict) -> str:
    def goal(name: str, text: str) -> str:
        target = found["targets"][name]
        return f"{text.format(target['target'])} | {'yes' if target['met'] else 'no'}"

    rows = ["| measure | handoff | baseline | ratio | target | met |", "|---|---|---|---|---|---|",
            *watch_rows(found, goal)]
    return "\n".join(["# Watching a chain", "", "`python -m bench.watch`", "", *rows, ""])


def run_watch(args: argparse.Namespace | None = None) -> dict:
    """Every watching figure, on a stack of its own (a few minutes)."""
    args = args or parser().parse_args([])
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[PAYLOAD_DIR_ENV] = str(Path(tmp) / "payloads")
        found = asyncio.run(measured(Path(tmp), args))
    return {"settings": {k: getattr(args, k) for k in ("latency_chains", "turns", "crowd_chains", "at_once")},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, **found}


def parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    found.add_argument("--latency-chains", type=int, default=40)
    found.add_argument("--turns", type=int, default=40)
    found.add_argument("--crowd-chains", type=int, default=10)
    found.add_argument("--at-once", type=int, default=1000)
    found.add_argument("--out", default=str(RESULTS / "watch.json"), help="the JSON's path (the .md beside it)")
    return found


def main() -> None:
    args = parser().parse_args()
    found = run_watch(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(found, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(found))
    print(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()

"""Benchmarks: `python -m bench` prints JSON (and writes bench/results/latest.json).

Each scenario starts its own embedded Temporal server on free ports, a chain worker process and
an agent worker process (`handoff worker`), then measures from a client in this process.
Scenarios are compared within one run, so ratios hold on a noisy machine where absolutes do not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from handoff.client import connect, run_chain
from handoff.models import ChainStatus
from handoff.server import EmbeddedServer, free_port

ROOT = Path(__file__).resolve().parent.parent
HANDOFF = str(Path(sys.executable).parent / "handoff")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 0.50), 2),
        "p95": round(percentile(values, 0.95), 2),
        "p99": round(percentile(values, 0.99), 2),
        "mean": round(statistics.fmean(values), 2),
        "n": len(values),
    }


@contextmanager
def stack(tuned: bool, db: str | None) -> Iterator[EmbeddedServer]:
    """An embedded server (tuned, or the dev server's defaults) plus worker processes."""
    server = EmbeddedServer(port=free_port(), ui_port=free_port(), db=db)
    if not tuned:
        server.argv = _untuned_argv(server)  # type: ignore[method-assign]
    server.start()
    env = {**os.environ, "TEMPORAL_ADDRESS": server.address, "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen([HANDOFF, "worker", "--chains"], env=env, stdout=subprocess.DEVNULL),
        subprocess.Popen([HANDOFF, "worker", "--agent", "bench.agents:ALL"], env=env,
                         stdout=subprocess.DEVNULL),
    ]
    try:
        yield server
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)
        server.stop()


def _untuned_argv(server: EmbeddedServer):
    from handoff.server import search_attribute_args, temporal_binary

    def argv() -> list[str]:
        args = [temporal_binary(), "server", "start-dev", "--ip", server.ip, "--port", str(server.port),
                "--ui-port", str(server.ui_port), "--log-level", "error", *search_attribute_args()]
        return args + (["--db-filename", server.db] if server.db else [])

    return argv


async def chains(address: str, hops: int, count: int, concurrency: int) -> dict:
    client = await connect(address=address)
    await run_chain(client, to_agent="bench-r0", task_description="warm-up", context_data={"hops": hops})
    latencies: list[float] = []
    failures = 0
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal failures
        async with semaphore:
            started = time.perf_counter()
            record = await run_chain(client, to_agent="bench-r0", task_description=f"bench {i}",
                                     context_data={"hops": hops})
            latencies.append((time.perf_counter() - started) * 1000)
            failures += record.status is not ChainStatus.COMPLETED or len(record.hops) != hops

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    elapsed = time.perf_counter() - started
    return {
        "hops": hops, "chains": count, "concurrency": concurrency, "failures": failures,
        "chain_ms": summary(latencies),
        "per_hop_ms_p50": round(percentile(latencies, 0.5) / hops, 2),
        "chains_per_s": round(count / elapsed, 2),
    }


def run(args: argparse.Namespace) -> dict:
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "scenarios": {},
    }
    configs = [("tuned", True)] + ([("default", False)] if args.compare_default else [])
    with tempfile.TemporaryDirectory() as tmp:
        for name, tuned in configs:
            db = str(Path(tmp) / f"{name}.db") if args.db else None
            with stack(tuned, db) as server:
                scenario = {
                    "latency": asyncio.run(chains(server.address, args.hops, args.chains, 1)),
                    "throughput": asyncio.run(chains(server.address, args.hops, args.load_chains,
                                                     args.concurrency)),
                }
            results["scenarios"][name] = scenario
    if args.compare_default:
        tuned_p50 = results["scenarios"]["tuned"]["latency"]["chain_ms"]["p50"]
        default_p50 = results["scenarios"]["default"]["latency"]["chain_ms"]["p50"]
        results["speedup_vs_default_dev_server_p50"] = round(default_p50 / tuned_p50, 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--hops", type=int, default=5)
    parser.add_argument("--chains", type=int, default=100, help="sequential chains for latency")
    parser.add_argument("--load-chains", type=int, default=200, help="chains for throughput")
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--db", action="store_true", help="persist to a database file (WAL)")
    parser.add_argument("--compare-default", action="store_true",
                        help="also measure a default `temporal server start-dev`")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    args = parser.parse_args()
    results = run(args)
    text = json.dumps(results, indent=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

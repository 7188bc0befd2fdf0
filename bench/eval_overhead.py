"""What `handoff eval` adds to each case it runs, against running the same chain alone.

    python -m bench.eval_overhead [--cases 50] [--rounds 6] [--concurrency 1 8]

prints JSON and writes bench/results/eval.json. Everything runs on an embedded server started
here, the chain worker and three instant agents (each hands straight on: a 3-hop chain) each in a
worker process of their own. Each round runs `--cases` chains alone (`run_chain`, at most
`--concurrency` at once) and the same chains as an evaluation's cases (`handoff.eval.run_eval`,
as many at once, under a fresh run id, then `build_report`), taking turns which goes first. The
overhead is eval's time per case over the chain's alone, minus one: the median over rounds and
the pooled figure (all eval time over all chain time). Also measured: an evaluation run again
under the same run id, which finds every chain recorded and starts none.
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
from datetime import datetime, timezone
from pathlib import Path
from uuid import uuid4

from handoff import Agent, AgentCapability, HandoffContext, HandoffResult
from handoff.client import connect, run_chain
from handoff.eval import EvalSettings, build_report, parse_cases, run_eval
from handoff.models import ChainStatus
from handoff.payloads.storage import PAYLOAD_DIR_ENV
from handoff.registry import wait_live
from handoff.servers.embedded import EmbeddedServer, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HANDOFF = str(Path(sys.executable).parent / "handoff")
IDS = ["eval-bench-0", "eval-bench-1", "eval-bench-2"]
TARGET = 0.10
"""eval's own overhead per case stays under this share of the chain's time."""


async def relay(ctx: HandoffContext) -> HandoffResult:
    index = IDS.index(ctx.to_agent)
    if index + 1 < len(IDS):
        return ctx.handoff(to_agent=IDS[index + 1], task_description=f"hop {index + 1}", result_data={"hop": index})
    return ctx.complete({"hop": index, "done": True})


AGENTS = [Agent(id=agent_id, name=agent_id, capabilities=[AgentCapability.TESTING], handler=relay,
                max_concurrent=50) for agent_id in IDS]
"""The instant agents (`handoff worker --agent bench.eval_overhead:AGENTS`)."""


def case_lines(count: int, tag: str) -> str:
    return "".join(json.dumps({"name": f"case {i}", "to_agent": IDS[0], "task": f"{tag} case {i}",
                               "expect": {"hops": IDS, "status": "completed", "result_keys": ["done"]}}) + "\n"
                   for i in range(count))


async def chains_alone(client, count: int, concurrency: int, tag: str) -> float:
    """Seconds to run `count` chains, `concurrency` at once."""
    semaphore = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with semaphore:
            record = await run_chain(client, to_agent=IDS[0], task_description=f"{tag} case {i}")
        if record.status is not ChainStatus.COMPLETED:
            raise RuntimeError(f"bench chain ended {record.status.value}: {record.error}")

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return time.perf_counter() - started


async def evaluation(client, count: int, concurrency: int, run_id: str, tag: str) -> tuple[float, int]:
    """Seconds to evaluate `count` cases of the same chains, and how many passed."""
    cases = parse_cases(case_lines(count, tag))
    settings = EvalSettings(run_id=run_id, concurrency=concurrency)
    started = time.perf_counter()
    began = datetime.now(timezone.utc)
    scores = await run_eval(client, cases, settings)
    report = build_report(scores, settings, cases=[c.name for c in cases], started_at=began,
                          completed_at=datetime.now(timezone.utc))
    elapsed = time.perf_counter() - started
    return elapsed, report.summaries["current"].passed.hits


async def measure(address: str, count: int, rounds: int, concurrency: int) -> dict:
    client = await connect(address=address)
    await wait_live(client, set(IDS), timeout_s=60)
    await chains_alone(client, count, concurrency, "warm-up")
    await evaluation(client, count, concurrency, f"warm-{uuid4().hex[:8]}", "warm-up")
    alone, evaluated, rerun = [], [], []
    for turn in range(rounds):
        run_id = f"bench-{uuid4().hex[:12]}"
        order = ["alone", "eval"] if turn % 2 == 0 else ["eval", "alone"]
        for what in order:
            if what == "alone":
                alone.append(await chains_alone(client, count, concurrency, f"round {turn}") / count * 1000)
            else:
                seconds, passed = await evaluation(client, count, concurrency, run_id, f"round {turn}")
                if passed != count:
                    raise RuntimeError(f"{count - passed} of the bench's cases did not pass")
                evaluated.append(seconds / count * 1000)
        seconds, _ = await evaluation(client, count, concurrency, run_id, f"round {turn}")
        rerun.append(seconds / count * 1000)
    ratios = [e / a - 1 for e, a in zip(evaluated, alone)]
    pooled = sum(evaluated) / sum(alone) - 1
    return {
        "concurrency": concurrency,
        "cases": count,
        "rounds": rounds,
        "chain_alone_ms_per_case": [round(v, 3) for v in alone],
        "eval_ms_per_case": [round(v, 3) for v in evaluated],
        "rerun_ms_per_case": [round(v, 3) for v in rerun],
        "overhead_median": round(statistics.median(ratios), 4),
        "overhead_pooled": round(pooled, 4),
        "ok": statistics.median(ratios) < TARGET and pooled < TARGET,
    }


def run(count: int, rounds: int, concurrencies: list[int]) -> dict:
    server = EmbeddedServer(port=free_port(), ui_port=free_port(), extra_args=["--headless"]).start()
    with tempfile.TemporaryDirectory() as payloads:
        env = {**os.environ, "TEMPORAL_ADDRESS": server.address, "PYTHONPATH": str(ROOT), PAYLOAD_DIR_ENV: payloads}
        workers = [subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for command in ([HANDOFF, "worker", "--chains"],
                                   [HANDOFF, "worker", "--agent", "bench.eval_overhead:AGENTS"])]
        try:
            results = [asyncio.run(measure(server.address, count, rounds, c)) for c in concurrencies]
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(timeout=30)
            server.stop()
    return {
        "benchmark": "eval_overhead",
        "date": datetime.now(timezone.utc).date().isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.system()},
        "what": "handoff eval's time per case over the same 3-hop chain of instant agents run alone, minus one",
        "target": f"< {TARGET:.0%}",
        "results": results,
        "ok": all(r["ok"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=50, help="cases (and chains alone) per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    result = run(args.cases, args.rounds, args.concurrency)
    text = json.dumps(result, indent=2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

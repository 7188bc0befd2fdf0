"""What the chain controls cost: budget accounting per hop, how soon a steering message reaches
the next hop, and a re-run from a late hop against running the chain again.

    python -m bench.control [--budget-samples 200] [--steering-samples 30] [--rerun-samples 30]

writes bench/results/control.json (also printed) and bench/results/control.md; `python -m bench`
runs it too, under "control". Everything runs on an embedded server started here, with handoff's
chain worker and agent worker in processes of their own, one chain at a time:

- budget: a 5-hop relay chain with a budget (`BUDGET_POLICY`) whose hops each report usage
  (`ctx.report_usage`), against the same chain with neither, taking turns.
- steering: `bench-waiter` waits for a file; once its hop runs, `steer_chain` is called, the file
  is created as soon as the call returns, and `bench-steered`, the next hop, says when it started
  and what steering it got (a message it did not get fails the benchmark).
- re-run: a 5-hop relay chain whose hops sleep `HOP_SLEEP_MS` each, then `rerun_chain` of it
  from hop 4 and `wait_chain`, taking turns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from uuid import UUID, uuid4

from temporalio.api.enums.v1 import PendingActivityState
from temporalio.client import Client

from bench.agents import ALL as BENCH_AGENTS
from bench.agents import CONTROL as CONTROL_AGENTS
from bench.agents import HOP_SLEEP_MS, HOPS, IDS, RELAY_USAGE, REPORT_USAGE, STEERED, WAIT_FOR, WAIT_POLL_S, WAITER
from handoff.client import connect, rerun_chain, run_chain, start_chain, steer_chain, wait_chain
from handoff.models import ChainRecord, ChainStatus
from handoff.payloads.storage import PAYLOAD_DIR_ENV
from handoff.registry import wait_live
from handoff.servers.embedded import EmbeddedServer, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HANDOFF = str(Path(sys.executable).parent / "handoff")

WARM_UP = 10
"""Chains of each kind run before any is measured."""
PRICES = {"m": {"prompt": 1.0, "completion": 2.0}}
BUDGET_POLICY = {"budget": {"max_tokens": 10**9, "max_cost": 10**6, "prices": PRICES}}
"""Limits no chain here reaches: what is measured is the accounting, not a refusal."""
SLEEP_MS = 20
"""How long each hop of the re-run benchmark's chains takes."""
RERUN_FROM = 4
STEER_MESSAGE = "bench: use the staging cluster"
TASK = "bench control"


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 2)

    return {"p50": at(0.50), "p95": at(0.95), "mean": round(statistics.fmean(values), 2), "n": len(values)}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def completed(record: ChainRecord, hops: int) -> ChainRecord:
    if record.status is not ChainStatus.COMPLETED or len(record.hops) != hops:
        raise RuntimeError(f"bench chain ended {record.status.value} after {len(record.hops)} hops: {record.error}")
    return record


Sample = Callable[[], Awaitable[float]]
"""Runs one chain (checking it did what it should) and returns the milliseconds measured."""


async def taking_turns(samples: dict[str, Sample], count: int) -> dict[str, list[float]]:
    """`count` samples of each, taking turns (the order reversed every other turn), so drift on a
    shared machine hits all alike; after `WARM_UP` unmeasured ones of each."""
    for _ in range(WARM_UP):
        for sample in samples.values():
            await sample()
    found: dict[str, list[float]] = {name: [] for name in samples}
    for turn in range(count):
        names = list(samples) if turn % 2 == 0 else list(reversed(samples))
        for name in names:
            found[name].append(await samples[name]())
    return found


# -- the chains --------------------------------------------------------------------------

class Chains:
    """Each benchmark's chain, run to its end and checked (`Sample`)."""

    def __init__(self, client: Client, tmp: Path) -> None:
        self.client = client
        self.tmp = tmp
        self.released_ms: list[float] = []  # steer call returned -> the waiter saw its file
        self.originals: list[UUID] = []  # the re-run benchmark's original chains, the latest last
        self.server_pid = 0  # the embedded server's process

    async def plain(self) -> float:
        started = time.perf_counter()
        record = await run_chain(self.client, to_agent=IDS[0], task_description=TASK, context_data={"hops": HOPS})
        took = (time.perf_counter() - started) * 1000
        if completed(record, HOPS).usage is not None:
            raise RuntimeError(f"the chain without a budget recorded usage: {record.usage}")
        return took

    async def budgeted(self) -> float:
        started = time.perf_counter()
        record = await run_chain(self.client, to_agent=IDS[0], task_description=TASK,
                                 context_data={"hops": HOPS, REPORT_USAGE: True}, policy=BUDGET_POLICY)
        took = (time.perf_counter() - started) * 1000
        check_usage(completed(record, HOPS))
        return took

    async def steered(self) -> float:
        """From the steer call returning to the start of the hop after the one it was sent during."""
        marker = self.tmp / f"steer-{uuid4()}"
        chain_id = await start_chain(self.client, to_agent=WAITER, task_description=TASK,
                                     context_data={WAIT_FOR: str(marker)})
        await self._hop_running(str(chain_id))
        await steer_chain(self.client, chain_id, message=STEER_MESSAGE, by="bench")
        accepted = time.time()
        marker.touch()
        record = completed(await wait_chain(self.client, chain_id), 2)
        first, second = record.hops
        if second.to_agent != STEERED or second.result_data.get("steering") != [STEER_MESSAGE]:
            raise RuntimeError(f"the hop after the steer ({second.to_agent}) got steering "
                               f"{second.result_data.get('steering')!r}, not [{STEER_MESSAGE!r}]")
        if [m.message for m in second.steering] != [STEER_MESSAGE] or first.steering:
            raise RuntimeError(f"the record holds steering {[h.steering for h in record.hops]}")
        self.released_ms.append((first.result_data["released_at"] - accepted) * 1000)
        return (second.result_data["started_at"] - accepted) * 1000

    async def _hop_running(self, chain_id: str, timeout_s: float = 30.0) -> None:
        """Until the server says the chain's hop has started on its agent's worker."""
        handle = self.client.get_workflow_handle(chain_id)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pending = (await handle.describe()).raw_description.pending_activities
            if pending and pending[0].state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED:
                return
            await asyncio.sleep(0.01)
        raise TimeoutError(f"chain {chain_id}'s first hop did not start within {timeout_s:g}s")

    async def original(self) -> float:
        started = time.perf_counter()
        record = await run_chain(self.client, to_agent=IDS[0], task_description=TASK,
                                 context_data={"hops": HOPS, HOP_SLEEP_MS: SLEEP_MS})
        took = (time.perf_counter() - started) * 1000
        self.originals.append(completed(record, HOPS).chain_id)
        return took

    async def rerun(self) -> float:
        """A re-run of the latest original from hop `RERUN_FROM`, from the call to its end."""
        original = self.originals[-1]
        started = time.perf_counter()
        chain_id = await rerun_chain(self.client, original, from_hop=RERUN_FROM)
        record = await wait_chain(self.client, chain_id)
        took = (time.perf_counter() - started) * 1000
        check_rerun(completed(record, HOPS), original)
        return took


def check_usage(record: ChainRecord) -> None:
    """The budgeted chain's usage is every hop's report, priced at `PRICES`."""
    per_million = PRICES[RELAY_USAGE["model"]]
    cost = HOPS * (RELAY_USAGE["prompt_tokens"] * per_million["prompt"]
                   + RELAY_USAGE["completion_tokens"] * per_million["completion"]) / 1_000_000
    usage = record.usage
    if (usage is None or usage.tokens != HOPS * (RELAY_USAGE["prompt_tokens"] + RELAY_USAGE["completion_tokens"])
            or usage.model_calls != HOPS * RELAY_USAGE["model_calls"] or not math.isclose(usage.cost, cost)):
        raise RuntimeError(f"the budgeted chain recorded usage {usage}, expected {HOPS} hops' reports costing {cost}")


def check_rerun(record: ChainRecord, original: UUID) -> None:
    """The re-run carried the original's hops before `RERUN_FROM` and ran that one only."""
    carried = [hop.carried_from for hop in record.hops]
    if (record.rerun_of is None or record.rerun_of.chain_id != original or record.rerun_of.hop != RERUN_FROM
            or carried != [original] * RERUN_FROM + [None] * (HOPS - RERUN_FROM)):
        raise RuntimeError(f"the re-run of {original} records rerun_of {record.rerun_of}, carried {carried}")


# -- the stack ---------------------------------------------------------------------------

@asynccontextmanager
async def stack(tmp: Path) -> AsyncIterator[Chains]:
    """An embedded server and a process for each worker: handoff's chain worker and its agent
    worker (the bench relays and the steering agents)."""
    server = EmbeddedServer(port=free_port(), ui_port=free_port(), db=str(tmp / "control.db"),
                            extra_args=["--headless"])
    server.start()
    env = {**os.environ, "TEMPORAL_ADDRESS": server.address, "PYTHONPATH": str(ROOT),
           PAYLOAD_DIR_ENV: os.environ[PAYLOAD_DIR_ENV]}
    commands = [[HANDOFF, "worker", "--chains"],
                [HANDOFF, "worker", "--agent", "bench.agents:ALL", "--agent", "bench.agents:CONTROL"]]
    workers = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in commands]
    try:
        client = await connect(address=server.address)
        await wait_live(client, {a.id for a in [*BENCH_AGENTS, *CONTROL_AGENTS]}, timeout_s=120)
        chains = Chains(client, tmp)
        chains.server_pid = server.process.pid
        yield chains
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)
        server.stop()


# -- the figures -------------------------------------------------------------------------

BUDGET_TARGET = "control: 5-hop p50 with a budget and usage reported <= 1.03x without"
STEERING_TARGET = "control: steer accepted to the next hop's start < 50 ms (p50)"
RERUN_TARGET = "control: re-run from hop 4 of 5 <= 0.4x the original chain (p50)"


def control_targets(control: dict) -> dict[str, tuple[float, float, bool]]:
    """(value, target, met) of each control target."""
    budget = control["budget"]["ratio_p50"]
    steering = control["steering"]["steer_to_hop_ms"]["p50"]
    rerun = control["rerun"]["ratio_p50"]
    return {BUDGET_TARGET: (budget, 1.03, budget <= 1.03), STEERING_TARGET: (steering, 50, steering < 50),
            RERUN_TARGET: (rerun, 0.4, rerun <= 0.4)}


NOTES = [
    f"budget: policy {json.dumps(BUDGET_POLICY)}; each hop reports {json.dumps(RELAY_USAGE)}; the chain "
    "without a budget reports nothing; both checked (usage priced as expected, none without).",
    f"steering: the waiter polls for its file every {WAIT_POLL_S * 1000:g} ms, so up to that much of the time "
    "from the steer to the next hop is the waiter's own (released_ms: the steer call returning to the waiter "
    "seeing its file); times across processes are wall-clock times on one machine.",
    f"re-run: each hop sleeps {SLEEP_MS} ms; rerun_chain reads the original's history, then starts a chain "
    f"that carries hops 0-{RERUN_FROM - 1} and runs hop {RERUN_FROM}; each re-run follows the original it "
    "re-runs; both timed from the call to the chain's end.",
    f"Samples taken in turns (the order reversed every other turn), after {WARM_UP} unmeasured of each.",
]


async def measured(tmp: Path, budget_samples: int, steering_samples: int, rerun_samples: int) -> dict:
    async with stack(tmp) as chains:
        budget = await taking_turns({"with_budget": chains.budgeted, "without": chains.plain}, budget_samples)
        for _ in range(WARM_UP):
            await chains.steered()
        chains.released_ms.clear()
        steering = [await chains.steered() for _ in range(steering_samples)]
        rerun = await taking_turns({"original": chains.original, "rerun": chains.rerun}, rerun_samples)
    with_budget, without = summary(budget["with_budget"]), summary(budget["without"])
    original, again = summary(rerun["original"]), summary(rerun["rerun"])
    control = {
        "budget": {"with_budget_ms": with_budget, "without_ms": without,
                   "ratio_p50": ratio(with_budget["p50"], without["p50"]),
                   "per_hop_ms_p50": round((with_budget["p50"] - without["p50"]) / HOPS, 2)},
        "steering": {"steer_to_hop_ms": summary(steering), "released_ms": summary(chains.released_ms)},
        "rerun": {"original_ms": original, "rerun_ms": again, "ratio_p50": ratio(again["p50"], original["p50"]),
                  "hop_sleep_ms": SLEEP_MS, "from_hop": RERUN_FROM},
        "notes": NOTES,
    }
    control["targets"] = {name: {"value": v, "target": t, "met": met}
                          for name, (v, t, met) in control_targets(control).items()}
    return control


def run_control(budget_samples: int = 200, steering_samples: int = 30, rerun_samples: int = 30) -> dict:
    """Every control figure, on a stack of its own (a minute or two)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[PAYLOAD_DIR_ENV] = str(Path(tmp) / "payloads")  # this process's client stores like the workers
        return {"settings": {"budget_samples": budget_samples, "steering_samples": steering_samples,
                             "rerun_samples": rerun_samples, "warm_up": WARM_UP},
                **asyncio.run(measured(Path(tmp), budget_samples, steering_samples, rerun_samples))}


# -- the tables --------------------------------------------------------------------------

def control_rows(control: dict, goal: Callable[[str, str], str]) -> list[str]:
    """Rows of the results table (| measure | handoff | baseline | ratio | target | met |);
    `goal(name, text)` gives the target and met cells."""
    budget, steering, rerun = control["budget"], control["steering"], control["rerun"]

    def ms(s: dict) -> str:
        return f"{s['p50']:.1f} / {s['p95']:.1f} ms"

    return [
        f"| 5-hop chain with a budget, each hop reporting usage, p50 / p95 | {ms(budget['with_budget_ms'])} "
        f"({budget['per_hop_ms_p50']:+.2f} ms a hop) | no budget, no usage {ms(budget['without_ms'])} | "
        f"{budget['ratio_p50']:.3f} | {goal(BUDGET_TARGET, '<= {}')} |",
        f"| steering: the steer call returning to the next hop's start, p50 / p95 | "
        f"{ms(steering['steer_to_hop_ms'])} | of it, the waiter seeing its file {ms(steering['released_ms'])} | | "
        f"{goal(STEERING_TARGET, '< {} ms')} |",
        f"| re-run from hop {rerun['from_hop']} of a 5-hop chain ({rerun['hop_sleep_ms']} ms a hop), the call to "
        f"its end, p50 / p95 | {ms(rerun['rerun_ms'])} | the original chain {ms(rerun['original_ms'])} | "
        f"{rerun['ratio_p50']:.2f} | {goal(RERUN_TARGET, '<= {}')} |",
    ]


def markdown(control: dict) -> str:
    """control.md: the rows with their targets, then how they were measured."""
    def goal(name: str, text: str) -> str:
        check = control["targets"][name]
        return f"{text.format(check['target'])} | {'yes' if check['met'] else '**no**'}"

    rows = ["| measure | handoff | baseline | ratio | target | met |", "|---|---|---|---|---|---|",
            *control_rows(control, goal), "", " ".join(control["notes"])]
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.control", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-samples", type=int, default=200,
                        help="chains of each kind, with a budget and without")
    parser.add_argument("--steering-samples", type=int, default=30, help="steered chains")
    parser.add_argument("--rerun-samples", type=int, default=30, help="original chains, each re-run once")
    parser.add_argument("--out", default=str(RESULTS / "control.json"), help="the JSON; the table (.md) goes beside it")
    args = parser.parse_args()
    control = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               **run_control(args.budget_samples, args.steering_samples, args.rerun_samples)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(control, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(control))
    print(json.dumps(control, indent=2))


if __name__ == "__main__":
    main()

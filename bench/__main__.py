"""Benchmarks: `python -m bench` prints JSON (also bench/results/latest.json) and draws
bench/results/latency.png.

Every scenario runs on an embedded server started here on free ports, with every worker in its own
process: handoff's chain worker, handoff's agent worker (5 relay agents), and for the baselines a
workflow worker and an activity worker (`bench/baseline.py`). Handoff and its baselines are measured
in the same run, interleaved, and reported as ratios, which hold on a noisy machine where absolute
figures do not.
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
from typing import Awaitable, Callable, Iterator
from uuid import uuid4

from temporalio.client import Client

from bench.agents import FAN_OUT, LEAD
from bench.baseline import UNSANDBOXED_QUEUE, WORKFLOW_QUEUE
from bench.control import control_rows, control_targets, run_control
from bench.watch import run_watch, watch_rows, watch_targets
from bench.cost import cost_rows, cost_targets, run_cost
from bench.mcp import mcp_rows, mcp_targets, run_mcp
from bench.console import console_rows, console_targets, run_console
from bench.console import parser as console_parser
from bench.peer import FINAL as PEER_FINAL
from bench.peer import QUEUES as PEER_QUEUES
from bench.race import (
    CLIENT,
    PROCESSES,
    SERVER,
    Cpu,
    cpu_per_chain,
    history_size,
    phases,
    race_rows,
    race_targets,
)
from bench.registry import registry_rows, registry_targets, run_registry_scale
from handoff.client import approve_chain, connect, run_chain, start_chain, wait_chain
from handoff.models import ChainRecord, ChainStatus
from handoff.servers.embedded import (
    EmbeddedServer,
    free_port,
    search_attribute_args,
    temporal_binary,
)
from handoff.payloads.storage import PAYLOAD_DIR_ENV

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HANDOFF = str(Path(sys.executable).parent / "handoff")
CONTEXT_SIZES = {"10KB": 10 * 1024, "1MB": 1024 * 1024, "10MB": 10 * 1024 * 1024, "20MB": 20 * 1024 * 1024}

Measure = Callable[[], Awaitable[None]]
PHASE_CHAINS = 20
"""Sequential chains of each system whose histories `bench.race.phases` reads."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 0.50), 2), "p95": round(percentile(values, 0.95), 2),
            "p99": round(percentile(values, 0.99), 2), "mean": round(statistics.fmean(values), 2),
            "n": len(values)}


@contextmanager
def stack(*, tuned: bool, db: str | None, payload_dir: str) -> Iterator[tuple[EmbeddedServer, dict[str, int]]]:
    """An embedded server (tuned, or `temporal server start-dev`'s defaults) and a process for each
    worker: handoff's chain worker and agent worker, the bare baselines' workflow workers and activity
    worker, the peer's workers. Yields the server and every process's pid by name (`bench.race`)."""
    server = EmbeddedServer(port=free_port(), ui_port=free_port(), db=db, extra_args=["--headless"])
    if not tuned:
        server.argv = lambda: [  # type: ignore[method-assign]
            temporal_binary(), "server", "start-dev", "--ip", server.ip, "--port", str(server.port),
            "--headless", "--log-level", "error", *search_attribute_args(),
            *(["--db-filename", db] if db else [])]
    server.start()
    env = {**os.environ, "TEMPORAL_ADDRESS": server.address, "PYTHONPATH": str(ROOT),
           PAYLOAD_DIR_ENV: payload_dir}
    commands = {
        "handoff-chains": [HANDOFF, "worker", "--chains"],
        "handoff-agents": [HANDOFF, "worker", "--agent", "bench.agents:ALL"],
        "bare-workflows": [sys.executable, "-m", "bench.baseline", server.address, "workflows"],
        "bare-unsandboxed": [sys.executable, "-m", "bench.baseline", server.address, "workflows-unsandboxed"],
        "bare-activities": [sys.executable, "-m", "bench.baseline", server.address, "activities"],
        "peer": [sys.executable, "-m", "bench.peer", server.address, "sandboxed"],
        "peer-unsandboxed": [sys.executable, "-m", "bench.peer", server.address, "unsandboxed"],
    }
    workers = {name: subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for name, c in commands.items()}
    assert server.process is not None
    try:
        yield server, {SERVER: server.process.pid, CLIENT: os.getpid(), **{name: w.pid for name, w in workers.items()}}
    finally:
        for worker in workers.values():
            worker.terminate()
        for worker in workers.values():
            worker.wait(timeout=30)
        server.stop()


class Bench:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.last: dict[str, str] = {}  # the workflow id of each system's latest chain (its history)
        self.sampled: dict[str, list[str]] = {}  # the workflow ids of each system's latest sequential chains

    def handoff(self, hops: int, context: dict | None = None) -> Measure:
        async def one() -> None:
            record = await run_chain(self.client, to_agent="bench-r0", task_description="bench",
                                     context_data={"hops": hops, **(context or {})})
            if record.status is not ChainStatus.COMPLETED or len(record.hops) != hops:
                raise RuntimeError(f"bench chain ended {record.status.value}: {record.error}")
            self.last["handoff"] = str(record.chain_id)
        return one

    def fan_out(self, branches: int) -> Measure:
        """The lead fans out to `branches` agents at once; one agent joins them."""
        async def one() -> None:
            record = await run_chain(self.client, to_agent=LEAD, task_description="bench fan-out",
                                     context_data={"branches": branches})
            if record.status is not ChainStatus.COMPLETED or record.final_result.get("branches") != branches:
                raise RuntimeError(f"bench fan-out ended {record.status.value}: {record.error}")
        return one

    async def approval_ms(self) -> float:
        """From a person's decision (the approve call) to the start of the hop it approved."""
        chain_id = await start_chain(self.client, to_agent=LEAD, task_description="bench approval",
                                     context_data={"approval": True})
        handle = self.client.get_workflow_handle(str(chain_id))
        while (await handle.query("chain_state", result_type=ChainRecord)).status is not ChainStatus.AWAITING_APPROVAL:
            await asyncio.sleep(0.01)
        decided = time.time()
        await approve_chain(self.client, chain_id, by="bench")
        record = await wait_chain(self.client, chain_id)
        return (record.final_result["started_at"] - decided) * 1000

    def bare(self, hops: int, workflow: str = "BareChain", *, sandboxed: bool = True) -> Measure:
        queue = WORKFLOW_QUEUE if sandboxed else UNSANDBOXED_QUEUE

        async def one() -> None:
            workflow_id = f"bench-{uuid4()}"
            await self.client.execute_workflow(workflow, hops, id=workflow_id, task_queue=queue)
            self.last["bare" if sandboxed else "bare_unsandboxed"] = workflow_id
        return one

    def peer(self, *, sandboxed: bool = True) -> Measure:
        """The same 5 handoffs on the OpenAI Agents SDK with Temporal's plugin (`bench/peer.py`)."""
        mode = "sandboxed" if sandboxed else "unsandboxed"

        async def one() -> None:
            workflow_id = f"bench-peer-{uuid4()}"
            answer = await self.client.execute_workflow("PeerChain", "bench", id=workflow_id,
                                                        task_queue=PEER_QUEUES[mode])
            if answer != PEER_FINAL:
                raise RuntimeError(f"the peer's chain answered {answer!r}")
            self.last["peer" if sandboxed else "peer_unsandboxed"] = workflow_id
        return one


async def latencies(measure: Measure, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        await measure()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def interleaved(measures: dict[str, Measure], count: int, keep: Bench | None = None) -> dict[str, dict]:
    """Latency of each measure, taking turns, so drift on a shared machine hits all alike. With
    `keep`, each system's workflow ids of its last `PHASE_CHAINS` samples go to `keep.sampled`."""
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for name, measure in measures.items():
        await measure()  # warm-up
    for turn in range(count):
        for name, measure in measures.items():
            samples[name] += await latencies(measure, 1)
            if keep is not None and turn >= count - PHASE_CHAINS:
                keep.sampled.setdefault(name, []).append(keep.last[name])
    return {name: summary(values) for name, values in samples.items()}


async def load(measure: Measure, chains: int, concurrency: int) -> tuple[float, list[float]]:
    """Run `chains` at `concurrency`: the seconds it took and each chain's latency."""
    semaphore = asyncio.Semaphore(concurrency)
    samples: list[float] = []

    async def one() -> None:
        async with semaphore:
            samples.extend(await latencies(measure, 1))

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(chains)))
    return time.perf_counter() - started, samples


async def throughputs(measures: dict[str, Measure], chains: int, concurrency: int, rounds: int,
                      cpu: Cpu | None = None) -> dict[str, dict]:
    """Chains per second of each measure at `concurrency`: `rounds` turns of `chains` each, each
    round starting one system later, so drift on a shared machine hits all alike, and so does the
    server's work left from the turns before (timers that fire seconds after a chain: a fixed order
    gave it all to the system that opened each round); with `cpu`, also the CPU each process spent
    per chain during each system's own turns (`bench.race`)."""
    seconds = {name: 0.0 for name in measures}
    samples: dict[str, list[float]] = {name: [] for name in measures}
    spent: dict[str, dict[str, float]] = {name: {} for name in measures}
    for turn in range(rounds):
        shift = turn % len(measures)
        names = [*list(measures)[shift:], *list(measures)[:shift]]
        for name in names:
            before = cpu.read() if cpu else {}
            took, latency = await load(measures[name], chains, concurrency)
            if cpu:
                for process, used in Cpu.spent(before, cpu.read()).items():
                    spent[name][process] = spent[name].get(process, 0.0) + used
            seconds[name] += took
            samples[name] += latency
    return {name: {"concurrency": concurrency, "chains": chains * rounds,
                   "per_s": round(chains * rounds / seconds[name], 2), "latency_ms": summary(samples[name]),
                   **({"cpu_ms_per_chain": cpu_per_chain(name, spent[name], chains * rounds)}
                      if cpu and name in PROCESSES else {})}
            for name in measures}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


RATIO_SUFFIX = {"bare": "", "bare_unsandboxed": "_unsandboxed",
                "peer": "_peer", "peer_unsandboxed": "_peer_unsandboxed"}
"""What handoff is compared with in the race, and the suffix of each comparison's ratio keys."""


async def race(bench: Bench, args: argparse.Namespace, cpu: Cpu) -> dict:
    """The 5-hop chain on every system, taking turns: handoff, bare Temporal and the OpenAI Agents
    SDK on Temporal (`bench/peer.py`), each of the two with the workflow sandbox (the SDK's default)
    and without it (as handoff's chain worker runs). Latency, throughput at concurrency 1/20/50
    with the CPU every process spent per chain, and the size of one chain's history."""
    measures = {"handoff": bench.handoff(5), "bare": bench.bare(5), "bare_unsandboxed": bench.bare(5, sandboxed=False),
                "peer": bench.peer(), "peer_unsandboxed": bench.peer(sandboxed=False)}
    five = await interleaved(measures, args.samples, keep=bench)
    for other, suffix in RATIO_SUFFIX.items():
        five[f"ratio_p50{suffix}"] = ratio(five["handoff"]["p50"], five[other]["p50"])
    levels = []
    for concurrency in (1, 20, 50):
        chains = args.samples if concurrency == 1 else args.load_chains
        measured = await throughputs(measures, chains, concurrency, args.rounds, cpu)
        levels.append({"concurrency": concurrency, **measured, **{
            f"ratio_per_s{suffix}": ratio(measured["handoff"]["per_s"], measured[other]["per_s"])
            for other, suffix in RATIO_SUFFIX.items()}})
    history = {}
    for name in measures:
        history[name] = {**await history_size(bench.client, bench.last[name]),
                         "phases_ms": await phases(bench.client, bench.sampled[name])}
    return {"five_hops": five, "throughput_5_hops": levels, "history_5_hops": history}


async def main_scenarios(address: str, args: argparse.Namespace, pids: dict[str, int]) -> dict:
    bench = Bench(await connect(address=address))
    raced = await race(bench, args, Cpu(pids))
    if args.race_only:
        return raced
    result: dict = {}
    # (1) hop latency, 1-5 hops, handoff vs bare Temporal (5 hops: every system, from the race)
    by_hops = {}
    for hops in range(1, 5):
        measured = await interleaved({"handoff": bench.handoff(hops), "bare": bench.bare(hops)}, args.samples)
        measured["ratio_p50"] = ratio(measured["handoff"]["p50"], measured["bare"]["p50"])
        by_hops[hops] = measured
    by_hops[5] = raced["five_hops"]
    result["latency_by_hops"] = by_hops
    result["throughput_5_hops"] = raced["throughput_5_hops"]
    result["history_5_hops"] = raced["history_5_hops"]
    # (2) peer-to-peer against hub-and-spoke, same 5 hops of work
    hub = await interleaved({"peer_to_peer": bench.handoff(5), "hub_and_spoke": bench.bare(5, "HubChain"),
                             "hub_and_spoke_unsandboxed": bench.bare(5, "HubChain", sandboxed=False)},
                            args.samples)
    hub["ratio_p50"] = ratio(hub["peer_to_peer"]["p50"], hub["hub_and_spoke"]["p50"])
    hub["ratio_p50_unsandboxed"] = ratio(hub["peer_to_peer"]["p50"], hub["hub_and_spoke_unsandboxed"]["p50"])
    result["peer_vs_hub_5_hops"] = hub
    # (3) context transfer
    transfer = {}
    for name, size in CONTEXT_SIZES.items():
        blob = {"blob": "x" * size}
        one_hop = await latencies(bench.handoff(1, blob), args.context_samples)
        transfer[name] = {"one_hop_ms": summary(one_hop)}
        if name == "20MB":
            transfer[name]["two_hops_ms"] = summary(await latencies(bench.handoff(2, blob), args.context_samples))
    result["context_transfer"] = transfer
    # (4) the handoff patterns: an 8-way fan-out and its join against one branch and its join, and
    # what a person's approval adds between the decision and the hop it lets start
    fan = await interleaved({"fan_out_8": bench.fan_out(FAN_OUT), "fan_out_1": bench.fan_out(1)}, args.samples)
    fan["ratio_p50"] = ratio(fan["fan_out_8"]["p50"], fan["fan_out_1"]["p50"])
    result["fan_out"] = fan
    result["approval"] = {"decision_to_hop_ms": summary([await bench.approval_ms() for _ in range(args.samples)])}
    result["llm"] = await llm_overhead(bench.client, args.samples)
    return result


async def llm_overhead(client: Client, samples: int) -> dict:
    """What `handoff.agents.llm` itself costs per hop, the model's time excluded: an LLM agent's handler
    against an instant scripted model, its transfer tools built from the live registry (the
    benchmark's 17 agents), minus the time spent waiting for the model. Also the registry read
    on its own, which the agent repeats once its view is 2 s old."""
    from handoff.agents.llm import llm_agent
    from handoff.models import HandoffContext
    from handoff.registry import agent_statuses
    from handoff.testing import ScriptedModel, call

    async def directory():
        return [s.card for s in await agent_statuses(client) if s.stats.live]

    async with ScriptedModel(lambda request, n: call("transfer_to_bench_r1", task="go on", reason="bench")) as model:
        agent = llm_agent(id="bench-llm", name="Bench LLM", capabilities=["TESTING"], instructions="Route the work.",
                          model="scripted", base_url=model.url, api_key="bench", directory=directory)
        ctx = HandoffContext(to_agent=agent.id, task_description="route this", context_data={"diff": "x" * 2000},
                             previous_results=[{"hop": i} for i in range(3)])
        adapter, calls, reads = [], [], []
        for _ in range(samples):
            started = time.perf_counter()
            result = await agent.handler(ctx)
            total = (time.perf_counter() - started) * 1000
            adapter.append(total - result.decision.model_ms)
            calls.append(result.decision.model_ms)
            started = time.perf_counter()
            await directory()
            reads.append((time.perf_counter() - started) * 1000)
    return {"adapter_ms": summary(adapter), "scripted_model_call_ms": summary(calls),
            "registry_read_ms": summary(reads), "tools_offered": len(result.decision.tools_offered),
            "local_model": await local_model_speed()}


async def local_model_speed(requests: int = 5) -> dict:
    """Tokens per second of the local model (SmolLM2-135M on llama.cpp's server) on this machine,
    where the `llm-local` extra is installed; else why not."""
    from handoff.servers.local_model import LocalModel, LocalModelUnavailable

    try:
        local = LocalModel().start()
    except LocalModelUnavailable as err:
        return {"skipped": str(err)}
    try:
        from openai import AsyncOpenAI

        openai_client = AsyncOpenAI(base_url=local.url, api_key="local", max_retries=0)
        tokens, seconds = 0, 0.0
        for _ in range(requests):
            started = time.perf_counter()
            response = await openai_client.chat.completions.create(
                model="smollm2", max_tokens=64, temperature=0,
                messages=[{"role": "user", "content": "Describe a code review in three sentences."}])
            seconds += time.perf_counter() - started
            tokens += response.usage.completion_tokens
        return {"completion_tokens": tokens, "seconds": round(seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0}
    finally:
        local.stop()


async def five_hop_latency(address: str, samples: int) -> dict:
    bench = Bench(await connect(address=address))
    return (await interleaved({"handoff": bench.handoff(5)}, samples))["handoff"]


# The issue's targets, by the names `targets` reports them under.
LATENCY = "5-hop p50 <= 1.10x bare Temporal"
THROUGHPUT = "5-hop throughput >= 0.9x bare at concurrency 20"
HUB = "peer-to-peer <= 0.6x hub-and-spoke (p50)"
CONTEXT_1MB = "1 MB context hop < 150 ms (p50)"
CONTEXT_20MB = "20 MB context 2-hop chain < 1 s (p50)"
SPEEDUP = "embedded server >= 2x faster than default dev server (5 hops)"
FAN = "8-way fan-out + join <= 1.5x one branch + join (p50)"
LLM_ADAPTER = "LLM adapter's own time per hop, model excluded < 5 ms (p50)"
APPROVAL = "approval: decision to next hop start < 50 ms (p50)"


def targets(results: dict) -> dict:
    five = results["latency_by_hops"][5]
    through = {level["concurrency"]: level for level in results["throughput_5_hops"]}
    transfer = results["context_transfer"]
    checks = {
        LATENCY: (five["ratio_p50"], 1.10, five["ratio_p50"] <= 1.10),
        THROUGHPUT: (
            through[20]["ratio_per_s"], 0.9, through[20]["ratio_per_s"] >= 0.9),
        HUB: (
            results["peer_vs_hub_5_hops"]["ratio_p50"], 0.6, results["peer_vs_hub_5_hops"]["ratio_p50"] <= 0.6),
        CONTEXT_1MB: (
            transfer["1MB"]["one_hop_ms"]["p50"], 150, transfer["1MB"]["one_hop_ms"]["p50"] < 150),
        CONTEXT_20MB: (
            transfer["20MB"]["two_hops_ms"]["p50"], 1000, transfer["20MB"]["two_hops_ms"]["p50"] < 1000),
        FAN: (results["fan_out"]["ratio_p50"], 1.5, results["fan_out"]["ratio_p50"] <= 1.5),
        APPROVAL: (results["approval"]["decision_to_hop_ms"]["p50"], 50,
                   results["approval"]["decision_to_hop_ms"]["p50"] < 50),
        LLM_ADAPTER: (results["llm"]["adapter_ms"]["p50"], 5, results["llm"]["adapter_ms"]["p50"] < 5),
    }
    checks.update(race_targets(five, through))
    if "default_server" in results:
        speedup = results["default_server"]["speedup_p50"]
        checks[SPEEDUP] = (speedup, 2, speedup >= 2)
    if "registry_scale" in results:
        checks.update(registry_targets(results["registry_scale"]))
    if "cost" in results:
        checks.update(cost_targets(results["cost"]))
    if "control" in results:
        checks.update(control_targets(results["control"]))
    if "watch" in results:
        checks.update(watch_targets(results["watch"]))
    if "mcp" in results:
        checks.update(mcp_targets(results["mcp"]))
    if "console" in results:
        checks.update(console_targets(results["console"]))
    return {name: {"value": v, "target": t, "met": met} for name, (v, t, met) in checks.items()}


def markdown(results: dict) -> str:
    """The README's results table, from one run."""
    lat = results["latency_by_hops"]
    one, five = lat[1], lat[5]
    levels = {level["concurrency"]: level for level in results["throughput_5_hops"]}
    hub = results["peer_vs_hub_5_hops"]
    transfer = results["context_transfer"]
    fan = results["fan_out"]
    llm = results["llm"]
    local = llm["local_model"]
    speed = f"{local['tokens_per_s']:.1f} tokens/s" if "tokens_per_s" in local else f"not run: {local['skipped']}"

    def goal(name: str, text: str) -> str:
        """The target and met cells of `name`'s row; `text` shows its target value as {}."""
        check = results["targets"][name]
        return f"{text.format(check['target'])} | {'yes' if check['met'] else '**no**'}"

    def ms(s: dict, *keys: str) -> str:
        return " / ".join(f"{s[k]:.1f}" for k in keys) + " ms"

    def per_s(name: str) -> str:
        return " / ".join(f"{levels[c][name]['per_s']:.1f}" for c in sorted(levels))

    rows = [
        "| measure | handoff | baseline | ratio | target | met |",
        "|---|---|---|---|---|---|",
        f"| 1-hop chain p50 / p95 / p99 | {ms(one['handoff'], 'p50', 'p95', 'p99')} | "
        f"bare Temporal {ms(one['bare'], 'p50', 'p95', 'p99')} | {one['ratio_p50']:.2f} | | |",
        f"| 5-hop chain p50 / p95 / p99 | {ms(five['handoff'], 'p50', 'p95', 'p99')} | "
        f"bare Temporal {ms(five['bare'], 'p50', 'p95', 'p99')} | {five['ratio_p50']:.2f} | "
        f"{goal(LATENCY, '<= {}')} |",
        f"| 5-hop chains/s at concurrency {' / '.join(str(c) for c in sorted(levels))} | {per_s('handoff')} | "
        f"bare {per_s('bare')} | {levels[20]['ratio_per_s']:.2f} at 20 | "
        f"{goal(THROUGHPUT, '>= {}')} |",
        f"| 5 hops of work, p50 | peer-to-peer {hub['peer_to_peer']['p50']:.1f} ms | "
        f"hub-and-spoke {hub['hub_and_spoke']['p50']:.1f} ms | {hub['ratio_p50']:.2f} | "
        f"{goal(HUB, '<= {}')} |",
        "| 1-hop chain with a " + " / ".join(transfer) + " context, p50 | "
        + " / ".join(f"{transfer[n]['one_hop_ms']['p50']:.0f}" for n in transfer) + " ms | | | "
        f"{goal(CONTEXT_1MB, '1 MB < {} ms')} |",
        f"| 2-hop chain with a 20MB context, p50 | {transfer['20MB']['two_hops_ms']['p50']:.0f} ms | | | "
        f"{goal(CONTEXT_20MB, '< {} ms')} |",
        f"| fan-out to 8 agents + join, p50 / p95 | {ms(fan['fan_out_8'], 'p50', 'p95')} | "
        f"one branch + join {ms(fan['fan_out_1'], 'p50', 'p95')} | {fan['ratio_p50']:.2f} | "
        f"{goal(FAN, '<= {}')} |",
        f"| approval: decision to the next hop's start, p50 / p95 | "
        f"{ms(results['approval']['decision_to_hop_ms'], 'p50', 'p95')} | | | {goal(APPROVAL, '< {} ms')} |",
        f"| LLM agent hop, the adapter's own time (model excluded; {llm['tools_offered']} tools from the live "
        f"registry), p50 / p95 | {ms(llm['adapter_ms'], 'p50', 'p95')} | registry read "
        f"{ms(llm['registry_read_ms'], 'p50', 'p95')} (every 2 s) | | {goal(LLM_ADAPTER, '< {} ms')} |",
        f"| local model (SmolLM2-135M, llama.cpp, 2 cores) | {speed} | | | | |",
    ]
    rows += race_rows(five, levels, results["history_5_hops"], goal)
    if "default_server" in results:
        default = results["default_server"]
        rows.append(
            "| 5-hop chain p50, embedded server vs default `temporal server start-dev --db-filename` | "
            f"{default['tuned_5_hops_ms']['p50']:.1f} ms | {default['default_5_hops_ms']['p50']:.1f} ms | "
            f"{default['speedup_p50']:.1f}x faster | "
            f"{goal(SPEEDUP, '>= {}x')} |")
    if "registry_scale" in results:
        rows += registry_rows(results["registry_scale"], goal)
    if "cost" in results:
        rows += cost_rows(results["cost"], goal)
    if "control" in results:
        rows += control_rows(results["control"], goal)
    if "watch" in results:
        rows += watch_rows(results["watch"], goal)
    if "mcp" in results:
        rows += mcp_rows(results["mcp"], goal)
    if "console" in results:
        rows += console_rows(results["console"], goal)
    rows += [
        "",
        "Stricter, for information: against the bare baseline run without the workflow sandbox, as "
        f"handoff's chain worker runs: 5-hop p50 {five['bare_unsandboxed']['p50']:.1f} ms "
        f"(ratio {five['ratio_p50_unsandboxed']:.2f}), chains/s {per_s('bare_unsandboxed')} "
        f"(ratio {levels[20]['ratio_per_s_unsandboxed']:.2f} at 20); hub-and-spoke "
        f"{hub['hub_and_spoke_unsandboxed']['p50']:.1f} ms (peer-to-peer ratio {hub['ratio_p50_unsandboxed']:.2f}).",
    ]
    return "\n".join(rows) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hops = sorted(results["latency_by_hops"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, colour in (("handoff", "tab:blue"), ("bare", "tab:grey")):
        left.plot(hops, [results["latency_by_hops"][h][name]["p50"] for h in hops], "o-", color=colour,
                  label=f"{name} p50")
        left.plot(hops, [results["latency_by_hops"][h][name]["p95"] for h in hops], "o--", color=colour,
                  alpha=0.5, label=f"{name} p95")
    left.set(xlabel="hops in the chain", ylabel="chain latency (ms)", title="Latency: handoff vs bare Temporal",
             xticks=hops)
    left.legend()
    sizes = list(results["context_transfer"])
    right.bar(sizes, [results["context_transfer"][s]["one_hop_ms"]["p50"] for s in sizes], color="tab:blue")
    right.set(xlabel="context size", ylabel="1-hop chain p50 (ms)", title="Context transfer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace) -> dict:
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                     "settings": {"samples": args.samples, "load_chains": args.load_chains,
                                  "rounds": args.rounds}}
    with tempfile.TemporaryDirectory() as tmp:
        payloads = str(Path(tmp) / "payloads")
        os.environ[PAYLOAD_DIR_ENV] = payloads  # this process's client stores like the workers
        with stack(tuned=True, db=str(Path(tmp) / "tuned.db"), payload_dir=payloads) as (server, pids):
            results.update(asyncio.run(main_scenarios(server.address, args, pids)))
            if args.race_only:
                return results
            tuned = results["latency_by_hops"][5]["handoff"]
        if not args.skip_default:
            with stack(tuned=False, db=str(Path(tmp) / "default.db"), payload_dir=payloads) as (server, _):
                default = asyncio.run(five_hop_latency(server.address, min(args.samples, 20)))
            results["default_server"] = {"tuned_5_hops_ms": tuned, "default_5_hops_ms": default,
                                         "speedup_p50": ratio(default["p50"], tuned["p50"])}
    if not args.skip_registry:
        results["registry_scale"] = run_registry_scale(
            sizes=tuple(args.registry_sizes), samples=args.samples * 4, chains=args.registry_chains,
            stale_count=args.stale)
    if not args.skip_cost:
        results["cost"] = run_cost()
    if not args.skip_control:
        results["control"] = run_control()
    if not args.skip_watch:
        results["watch"] = run_watch()
    if not args.skip_mcp:
        results["mcp"] = run_mcp()
    if not args.skip_console:
        results["console"] = run_console(console_parser().parse_args([]))
    results["targets"] = targets(results)
    return results


def sizes(text: str) -> list[int]:
    try:
        found = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 10,100,500, got {text!r}") from None
    if not found or any(not 1 <= n <= 2000 for n in found):
        raise argparse.ArgumentTypeError("each size is between 1 and 2000")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--samples", type=int, default=50, help="sequential samples per latency figure")
    parser.add_argument("--load-chains", type=int, default=100, help="chains per throughput level and round")
    parser.add_argument("--rounds", type=int, default=3, help="turns each system takes per throughput level")
    parser.add_argument("--context-samples", type=int, default=5)
    parser.add_argument("--skip-default", action="store_true", help="skip the default dev server")
    parser.add_argument("--registry-sizes", type=sizes, default=[10, 100, 500],
                        help="fleet sizes for registration and discovery at scale (default 10,100,500)")
    parser.add_argument("--registry-chains", type=int, default=150, help="chains per throughput round at each size")
    parser.add_argument("--stale", type=int, default=500, help="stale registrations beside 10 live agents")
    parser.add_argument("--skip-registry", action="store_true", help="skip registration and discovery at scale")
    parser.add_argument("--skip-cost", action="store_true",
                        help="skip what each chain shape costs in actions and history (`python -m bench.cost`)")
    parser.add_argument("--skip-control", action="store_true",
                        help="skip budget accounting, steering and re-run figures (`python -m bench.control`)")
    parser.add_argument("--skip-watch", action="store_true",
                        help="skip how soon a watcher hears and what watching costs (`python -m bench.watch`)")
    parser.add_argument("--skip-console", action="store_true",
                        help="skip the console's pages with 10,000 chains, 2,000 waiting (`python -m bench.console`)")
    parser.add_argument("--skip-mcp", action="store_true",
                        help="skip chains through `handoff mcp` and MCP tool calls in a hop (`python -m bench.mcp`)")
    parser.add_argument("--race-only", action="store_true",
                        help="only the 5-hop race (handoff, bare, the peer): JSON out, no table")
    parser.add_argument("--out", default=str(RESULTS / "latest.json"),
                        help="the JSON; the README table (.md) and the plot (latency.png) go beside it")
    parser.add_argument("--no-plot", action="store_true", help="skip the plot (needs the bench extra)")
    args = parser.parse_args()
    results = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    if args.race_only:
        print(json.dumps(results, indent=2))
        return
    out.with_suffix(".md").write_text(markdown(results))
    if not args.no_plot:
        plot(results, out.with_name("latency.png"))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

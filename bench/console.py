"""What the console (`handoff console`) takes to answer in a namespace full of chains, and what
chains waiting for a person cost the chain worker:

    python -m bench.console [--chains 10000] [--waiting 2000] [--samples 20] [--chain-samples 100]

writes bench/results/console.json (also printed) and bench/results/console.md (`--chains 500
--waiting 100` to try it). An embedded server is started here, with handoff's chain worker, an
agent worker and the console in processes of their own; this process seeds `--chains` chains
(`SEED_AT_ONCE` at a time): `--waiting` wait for approval of their second hop (to DEPLOYMENT, under
`WAIT_POLICY`), one is a `BRANCHES`-branch fan-out, the rest are 1-hop and the 5-hop chains below.

- pages: the approvals inbox `/`, the chains list `/chains` and the fan-out chain's page over HTTP,
  whole bodies received and checked, taking turns; and the same reads through the client API
  (`handoff.console.views`) in this process, without HTTP or templates.
- memory: the chain worker's resident set (VmRSS) before the waiting chains start and once all
  wait (their progress timer, `DEFAULT_PROGRESS_AFTER_S`, fired).
- 5-hop chains, one at a time: p50 before the waiting chains start and while they wait, each once
  the server and the chain worker are quiet after the seeding (`quiet`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from temporalio.client import Client

from bench.agents import ALL as BENCH_AGENTS
from bench.agents import HOPS, IDS, done
from bench.control import HANDOFF, RESULTS, ROOT, WARM_UP, Sample, completed, ratio, summary, taking_turns
from bench.race import Cpu
from handoff import Agent, AgentCapability, Branch, HandoffContext, HandoffResult, Join
from handoff.client import connect, run_chain, start_chain
from handoff.client.search import chain_query
from handoff.console import views
from handoff.constants import DEFAULT_PROGRESS_AFTER_S
from handoff.errors import ServerUnreachable
from handoff.models import ChainStatus
from handoff.payloads.storage import PAYLOAD_DIR_ENV
from handoff.registry import wait_live
from handoff.servers.embedded import EmbeddedServer, free_port

TASK = "bench console"
LEAD, BRANCH, JOIN = "bench-console-lead", "bench-console-branch", "bench-console-join"
DEPLOYER = "bench-console-deployer"
KIND = "console_kind"
"""The lead's context key: "fan_out" fans out to `BRANCHES` branches, "release" hands on to
DEPLOYMENT; without it the lead completes."""
BRANCHES = 32
FAN_OUT_POLICY = {"max_branches": BRANCHES, "max_total_hops": BRANCHES + 2}
WAIT_POLICY = {"approval_required": [AgentCapability.DEPLOYMENT.value]}
SEED_AT_ONCE = 50
WAITING = chain_query(status=ChainStatus.AWAITING_APPROVAL.value)
CONSOLE_START_S = 60.0
QUIET_CPU_SHARE, QUIET_WITHIN_S = 0.05, 180.0
"""Quiet: the server and the chain worker use under this share of a core over a second."""


async def lead(ctx: HandoffContext) -> HandoffResult:
    kind = ctx.context_data.get(KIND)
    if kind == "fan_out":
        return ctx.fan_out([Branch(to_agent=BRANCH, task_description=f"branch {i}") for i in range(BRANCHES)],
                           join=Join(to_agent=JOIN, task_description="join"))
    if kind == "release":
        return ctx.handoff(capability=AgentCapability.DEPLOYMENT, task_description="release",
                           result_data={"checked": "nothing blocks the release"})
    return ctx.complete({"seeded": True})


def _agent(agent_id: str, handler: Any, capability: AgentCapability = AgentCapability.TESTING) -> Agent:
    return Agent(id=agent_id, name=agent_id, capabilities=[capability], handler=handler, max_concurrent=100)


AGENTS = [_agent(LEAD, lead), _agent(BRANCH, done), _agent(JOIN, done),
          _agent(DEPLOYER, done, AgentCapability.DEPLOYMENT)]
"""The console benchmark's agents; DEPLOYER is the only one with DEPLOYMENT."""


# -- the stack ---------------------------------------------------------------------------

@asynccontextmanager
async def stack(tmp: Path) -> AsyncIterator[tuple[Client, httpx.AsyncClient, dict[str, int]]]:
    """An embedded server, a process each for handoff's chain worker, an agent worker (the bench
    relays and `AGENTS`) and the console: a client, an HTTP client of the console and the process
    ids of the server and the chain worker."""
    server = EmbeddedServer(port=free_port(), ui_port=free_port(), db=str(tmp / "console.db"),
                            extra_args=["--headless"])
    server.start()
    env = {**os.environ, "TEMPORAL_ADDRESS": server.address, "PYTHONPATH": str(ROOT),
           PAYLOAD_DIR_ENV: os.environ[PAYLOAD_DIR_ENV]}
    port = free_port()
    commands = {"chain_worker": [HANDOFF, "worker", "--chains"],
                "agent_worker": [HANDOFF, "worker", "--agent", "bench.agents:ALL", "--agent", "bench.console:AGENTS"],
                "console": [HANDOFF, "console", "--port", str(port)]}
    processes = {name: subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)  # errors on stderr
                 for name, command in commands.items()}
    try:
        client = await eventually(lambda: _client(server.address), 30, "the Temporal server was not healthy")
        await wait_live(client, {a.id for a in [*BENCH_AGENTS, *AGENTS]}, timeout_s=120)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as console:
            await eventually(lambda: _answers(console), CONSOLE_START_S, "the console did not answer")
            yield client, console, {"server": server.process.pid, "chain_worker": processes["chain_worker"].pid}
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.wait(timeout=30)
        server.stop()


async def eventually(attempt: Callable[[], Awaitable[Any]], within_s: float, failing: str) -> Any:
    """The first answer of `attempt` that is not None or false, tried every half second; a
    TimeoutError saying `failing` after `within_s`."""
    deadline = time.monotonic() + within_s
    while not (answer := await attempt()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{failing} within {within_s:g}s")
        await asyncio.sleep(0.5)
    return answer


async def _client(address: str) -> Client | None:
    try:
        return await connect(address=address)
    except ServerUnreachable:  # listening, but not healthy yet
        return None


async def _answers(console: httpx.AsyncClient) -> bool:
    try:
        return (await console.get("/agents")).status_code == 200
    except httpx.TransportError:
        return False


def rss_mb(pid: int) -> float:
    """A process's resident set (VmRSS), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"/proc/{pid}/status says no VmRSS")


async def quiet(pids: dict[str, int]) -> float:
    """Once the processes are quiet (the server's own work after a burst of chains done); the
    seconds it took."""
    cpu, started = Cpu(pids), time.monotonic()

    async def idle() -> bool:
        before = cpu.read()
        await asyncio.sleep(1)
        return sum(Cpu.spent(before, cpu.read()).values()) < QUIET_CPU_SHARE

    await eventually(idle, QUIET_WITHIN_S, "the server and the chain worker did not go quiet")
    return round(time.monotonic() - started, 1)


def timed(call: Callable[[], Awaitable[Any]]) -> Sample:
    """A sample: the milliseconds `call` takes."""
    async def sample() -> float:
        started = time.perf_counter()
        await call()
        return (time.perf_counter() - started) * 1000
    return sample


# -- seeding -----------------------------------------------------------------------------

async def bounded(count: int, make: Callable[[], Awaitable[Any]]) -> list[Any]:
    """`count` calls of `make`, `SEED_AT_ONCE` at a time."""
    gate = asyncio.Semaphore(SEED_AT_ONCE)

    async def one() -> Any:
        async with gate:
            return await make()

    return await asyncio.gather(*(one() for _ in range(count)))


async def seed_completed(client: Client, count: int) -> None:
    """`count` 1-hop chains, each run to its end."""
    for record in await bounded(count, lambda: run_chain(client, to_agent=LEAD, task_description=TASK)):
        completed(record, 1)


async def fan_out_chain(client: Client) -> str:
    """A completed chain whose first hop fanned out to `BRANCHES` branches, all completed."""
    record = completed(await run_chain(client, to_agent=LEAD, task_description=TASK, context_data={KIND: "fan_out"},
                                       policy=FAN_OUT_POLICY), 2)
    fan = record.hops[0].fan_out
    if fan is None or [b.status.value for b in fan.branches] != ["completed"] * BRANCHES:
        raise RuntimeError(f"the fan-out chain {record.chain_id} did not complete {BRANCHES} branches")
    return str(record.chain_id)


async def seed_waiting(client: Client, count: int, timeout_s: float = 600.0) -> None:
    """`count` chains, each started and waiting for approval of its second hop (as visibility says)."""
    await bounded(count, lambda: start_chain(client, to_agent=LEAD, task_description=TASK,
                                              context_data={KIND: "release"}, policy=WAIT_POLICY))

    async def all_wait() -> bool:
        return (await client.count_workflows(WAITING)).count >= count

    await eventually(all_wait, timeout_s, f"not all {count} chains waited for approval")


async def five_hop(client: Client, samples: int) -> list[float]:
    """Milliseconds of `samples` 5-hop relay chains, one at a time, after `WARM_UP` unmeasured."""
    async def chain() -> None:
        completed(await run_chain(client, to_agent=IDS[0], task_description=TASK, context_data={"hops": HOPS}), HOPS)

    return [await timed(chain)() for _ in range(WARM_UP + samples)][WARM_UP:]


# -- the pages ---------------------------------------------------------------------------

def page_loads(console: httpx.AsyncClient, fan_out_id: str, waiting: int) -> dict[str, Sample]:
    """Each page's load (ms): its whole body received and checked for what it must show."""
    checks = {
        "inbox": ("/", lambda body: f"{waiting} chain" in body
                  and body.count("data-hop=") == min(views.INBOX_PAGE, waiting)),
        "chains": ("/chains", lambda body: body.count('<td><a href="/chains/') == views.CHAINS_PAGE),
        "fan_out_chain": (f"/chains/{fan_out_id}", lambda body: body.count("data-branch=") == BRANCHES),
    }

    def load(path: str, shows: Callable[[str], bool]) -> Sample:
        async def get() -> None:
            response = await console.get(path)
            if response.status_code != 200 or not shows(response.text):
                raise RuntimeError(f"the console's {path} answered {response.status_code} without what it must show: "
                                   f"{response.text[:300]}")
        return timed(get)

    return {name: load(path, shows) for name, (path, shows) in checks.items()}


def reads(client: Client, fan_out_id: str, waiting_id: str) -> dict[str, Sample]:
    """What each page reads through the client API, in this process (ms); and of the inbox's reads,
    the scan of every waiting chain and one waiting chain's view."""
    async def scan() -> None:
        await views.waiting_chains(client)

    return {"inbox": timed(lambda: views.inbox(client)), "inbox_scan": timed(scan),
            "waiting_chain": timed(lambda: views.chain_view(client, waiting_id)),
            "chains": timed(lambda: views.chains(client)),
            "fan_out_chain": timed(lambda: views.chain_view(client, fan_out_id))}


# -- the figures -------------------------------------------------------------------------

INBOX_TARGET = "console: the approvals inbox, p50 < 300 ms"
CHAINS_TARGET = "console: the chains list, p50 < 300 ms"
CHAIN_TARGET = f"console: a completed {BRANCHES}-branch fan-out chain's page, p50 < 500 ms"
WAITING_TARGET = "console: 5-hop p50 while chains wait for approval <= 1.1x before"


def console_targets(found: dict) -> dict[str, tuple[float, float, bool]]:
    """(value, target, met) of each console target."""
    pages, chains = found["pages_ms"], found["five_hop"]["ratio_p50"]
    return {INBOX_TARGET: (pages["inbox"]["p50"], 300, pages["inbox"]["p50"] < 300),
            CHAINS_TARGET: (pages["chains"]["p50"], 300, pages["chains"]["p50"] < 300),
            CHAIN_TARGET: (pages["fan_out_chain"]["p50"], 500, pages["fan_out_chain"]["p50"] < 500),
            WAITING_TARGET: (chains, 1.1, chains <= 1.1)}


NOTES = [
    f"Each page's samples taken in turns with the others', after {WARM_UP} unmeasured of each; the reads alone "
    "likewise, after the pages. The inbox reads every waiting chain's start time (a visibility scan), then the "
    f"views of its first page's {views.INBOX_PAGE}; a chain that has not ended is read by replaying its history.",
    "The chain worker's SDK keeps at most 1,000 workflow runs cached (max_cached_workflows, its default): "
    "beyond that, waiting chains are evicted and replayed when they next have a task.",
]


def one_hop_chains(args: argparse.Namespace) -> int:
    """The 1-hop chains seeded: `--chains` less the waiting ones, the fan-out and the 5-hop ones."""
    return args.chains - args.waiting - 1 - 2 * (WARM_UP + args.chain_samples)


async def measured(tmp: Path, args: argparse.Namespace) -> dict:
    one_hop = one_hop_chains(args)
    async with stack(tmp) as (client, console, pids):
        seeding = {"completed": await timed(lambda: seed_completed(client, one_hop))()}
        fan_out_id = await fan_out_chain(client)
        settled = {"completed": await quiet(pids)}
        before = await five_hop(client, args.chain_samples)
        memory = {"none_waiting_mb": rss_mb(pids["chain_worker"])}
        seeding["waiting"] = await timed(lambda: seed_waiting(client, args.waiting))()
        await asyncio.sleep(DEFAULT_PROGRESS_AFTER_S + 2)
        settled["waiting"] = await quiet(pids)
        memory["waiting_mb"] = rss_mb(pids["chain_worker"])
        during = await five_hop(client, args.chain_samples)
        total = (await client.count_workflows(chain_query())).count
        pages = await taking_turns(page_loads(console, fan_out_id, args.waiting), args.samples)
        waiting_id = str((await views.inbox(client)).waiting[0].chain.record.chain_id)
        read = await taking_turns(reads(client, fan_out_id, waiting_id), args.samples)
    added = memory["waiting_mb"] - memory["none_waiting_mb"]
    memory["per_waiting_chain_kb"] = round(added * 1024 / args.waiting, 1)
    before_ms, during_ms = summary(before), summary(during)
    found = {
        "namespace": {"chains": total, "waiting": args.waiting, "one_hop": one_hop, "fan_out_branches": BRANCHES},
        "seeding_s": {**{k: round(ms / 1000, 1) for k, ms in seeding.items()}, "at_once": SEED_AT_ONCE},
        "quiet_after_s": settled,
        "pages_ms": {name: summary(values) for name, values in pages.items()},
        "reads_ms": {name: summary(values) for name, values in read.items()},
        "chain_worker_memory": memory,
        "five_hop": {"before_ms": before_ms, "waiting_ms": during_ms,
                     "ratio_p50": ratio(during_ms["p50"], before_ms["p50"])},
        "notes": NOTES,
    }
    found["targets"] = {name: {"value": v, "target": t, "met": met}
                        for name, (v, t, met) in console_targets(found).items()}
    return found


def console_rows(found: dict, goal: Callable[[str, str], str]) -> list[str]:
    """Rows of the results table (| measure | handoff | baseline | ratio | target | met |);
    `goal(name, text)` gives the target and met cells."""
    space, pages, read, memory, chains = (
        found[k] for k in ("namespace", "pages_ms", "reads_ms", "chain_worker_memory", "five_hop"))
    among = f"{space['waiting']:,} waiting of {space['chains']:,} chains"

    def ms(s: dict) -> str:
        return f"{s['p50']:.1f} / {s['p95']:.1f} ms"

    return [
        f"| console: the approvals inbox `/` ({among}), p50 / p95 | {ms(pages['inbox'])} | its reads alone "
        f"{ms(read['inbox'])} (the scan {ms(read['inbox_scan'])}, one waiting chain's view "
        f"{ms(read['waiting_chain'])}) | | {goal(INBOX_TARGET, '< {} ms')} |",
        f"| console: the chains list `/chains` ({among}), p50 / p95 | {ms(pages['chains'])} | its reads alone "
        f"{ms(read['chains'])} | | {goal(CHAINS_TARGET, '< {} ms')} |",
        f"| console: a completed {space['fan_out_branches']}-branch fan-out chain's page, p50 / p95 | "
        f"{ms(pages['fan_out_chain'])} | its reads alone {ms(read['fan_out_chain'])} | | "
        f"{goal(CHAIN_TARGET, '< {} ms')} |",
        f"| chain worker's memory (VmRSS), {space['waiting']:,} chains waiting for approval | "
        f"{memory['waiting_mb']:.1f} MB ({memory['per_waiting_chain_kb']:+.1f} KB a waiting chain) | none waiting "
        f"{memory['none_waiting_mb']:.1f} MB | {ratio(memory['waiting_mb'], memory['none_waiting_mb']):.2f} | | |",
        f"| 5-hop chain while {space['waiting']:,} chains wait for approval, p50 / p95 | {ms(chains['waiting_ms'])} | "
        f"before they started {ms(chains['before_ms'])} | {chains['ratio_p50']:.3f} | "
        f"{goal(WAITING_TARGET, '<= {}x')} |",
    ]


def markdown(found: dict) -> str:
    def goal(name: str, text: str) -> str:
        check = found["targets"][name]
        return f"{text.format(check['target'])} | {'yes' if check['met'] else '**no**'}"

    settings = found["settings"]
    command = "python -m bench.console " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
    rows = ["| measure | handoff | baseline | ratio | target | met |", "|---|---|---|---|---|---|",
            *console_rows(found, goal)]
    return "\n".join(["# The console with a namespace full of chains", "", f"`{command}`", "", *rows, "",
                      " ".join(found["notes"]), ""])


def run_console(args: argparse.Namespace) -> dict:
    """Every console figure, on a stack of its own."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[PAYLOAD_DIR_ENV] = str(Path(tmp) / "payloads")  # this process's client stores like the workers
        found = asyncio.run(measured(Path(tmp), args))
    return {"settings": {k: getattr(args, k) for k in ("chains", "waiting", "samples", "chain_samples")},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "runtime_s": round(time.perf_counter() - started), **found}


def parser() -> argparse.ArgumentParser:
    found = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    found.add_argument("--chains", type=int, default=10_000, help="chains in the namespace in all")
    found.add_argument("--waiting", type=int, default=2000, help="of them, chains waiting for approval")
    found.add_argument("--samples", type=int, default=20, help="loads of each page")
    found.add_argument("--chain-samples", type=int, default=100, help="5-hop chains before and while chains wait")
    found.add_argument("--out", default=str(RESULTS / "console.json"), help="the JSON; the table (.md) goes beside it")
    return found


def main() -> None:
    args = parser().parse_args()
    if min(args.waiting, args.samples, args.chain_samples) < 1 or one_hop_chains(args) < 0:
        parser().error(f"--chains must hold --waiting, the fan-out and {2 * WARM_UP} + 2 x --chain-samples 5-hop")
    found = run_console(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(found, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(found))
    print(json.dumps(found, indent=2))


if __name__ == "__main__":
    main()

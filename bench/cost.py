"""What a chain costs on a Temporal cluster: billable actions, heartbeats and history size per
chain, for each chain shape, against bare Temporal and the OpenAI Agents SDK on Temporal.

    python -m bench.cost [--runs 3] [--slow-runs 2]

writes bench/results/cost.json (also printed) and bench/results/cost.md; `python -m bench` runs it
too, under "cost". Everything runs on an embedded server started here with its Prometheus metrics
on, every worker in its own process, and the chains one at a time. Two counts per chain:

- `actions_history`: the actions Temporal Cloud bills, counted from the workflow's history by its
  published rules (`HISTORY_RULES`). Heartbeats and queries leave no event, so they are not in it.
- `actions_metric`: the change of the server's own `action` counter (the namespace's, summed over
  its labels, by `action_type` in `actions_metric_by_type`) around that one chain, read once it has
  stopped changing before and after. It counts heartbeats the server recorded (`heartbeats`).

The benchmark itself sends no query: it waits on results, reads histories and describes workflows,
none of them actions; an approval's waiting hop is found by reading the chain's record back from
its history (`get_chain`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from uuid import uuid4

from temporalio.api.enums.v1 import EventType, PendingActivityState
from temporalio.client import Client

from bench.agents import ALL as BENCH_AGENTS
from bench.agents import CAPABILITY_IDS, FAN_OUT, IDS, LEAD, RELAY_CAPABILITIES, RESULT_BYTES
from bench.baseline import UNSANDBOXED_QUEUE
from bench.peer import FINAL as PEER_FINAL
from bench.peer import QUEUES as PEER_QUEUES
from bench.race import history_size
from bench.slow import ALL as SLOW_AGENTS
from bench.slow import CANCELLED_AT_ENV, MODEL_DELAYS_S, SLEEPER
from handoff.client import approve_chain, cancel_chain, connect, get_chain, run_chain, start_chain, wait_chain
from handoff.models import ChainRecord, ChainStatus
from handoff.payloads.storage import PAYLOAD_DIR_ENV
from handoff.registry import wait_live
from handoff.servers.embedded import EmbeddedServer, free_port
from handoff.testing import Reply, ScriptedModel

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HANDOFF = str(Path(sys.executable).parent / "handoff")

RANDOM_BYTES = 15_000
"""Random bytes in each hop's result of the 20 KB chain: 20,000 characters of base64."""
LLM_SLOW, LLM_FAST = "bench-llm-30s", "bench-llm-1s"
CANCEL_AFTER_S = 3.0
"""How long the cancelled hop has been running when the chain is cancelled."""

BY_NAME = "5 hops by name"
BY_CAPABILITY = "5 hops by capability"
FAN = "fan-out 8 + join"
APPROVAL = "approval"
LLM_30 = "LLM hop 30 s"
LLM_1 = "LLM hop 1 s"
CANCELLED = "cancelled hop"
DATA_20KB = "5 hops, 20 KB results"
BARE_5 = "bare Temporal, 5 hops"
BARE_30 = "bare Temporal, 30 s hop"
BARE_1 = "bare Temporal, 1 s hop"
PEER_5 = "OpenAI Agents SDK on Temporal, 5 hops"

HISTORY_RULES = {
    "workflow started": "WorkflowExecutionStarted: 1",
    "activities": "ActivityTaskScheduled: 1, plus 1 per retry (the started event's attempt - 1)",
    "local activities": "MarkerRecorded: 1 per workflow task that recorded markers",
    "timers": "TimerStarted: 1",
    "search attribute upserts": "UpsertWorkflowSearchAttributes: 1",
    "signals": "WorkflowExecutionSignaled: 1",
    "updates": "WorkflowExecutionUpdateAccepted: 1",
    "child workflows": "StartChildWorkflowExecutionInitiated: 1",
}
"""Temporal Cloud's billable actions as history events (heartbeats and queries leave none)."""
QUIET_S = 1.5
"""The action metric counts as settled once it has not changed for this long (the server publishes
it about once a second)."""
HEARTBEAT_TYPES = ("grpc_RecordActivityTaskHeartbeat", "grpc_RecordActivityTaskHeartbeatById")
"""The `action` metric's `action_type`s of a heartbeat the server recorded."""


# -- what the history says ---------------------------------------------------------------

def history_actions(events) -> dict[str, int]:
    """The billable actions in a history, by `HISTORY_RULES`."""
    counted: Counter[str] = Counter()
    marker_tasks = set()
    for event in events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
            counted["workflow started"] += 1
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            counted["activities"] += 1
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            counted["activities"] += max(0, event.activity_task_started_event_attributes.attempt - 1)
        elif kind == EventType.EVENT_TYPE_MARKER_RECORDED:
            marker_tasks.add(event.marker_recorded_event_attributes.workflow_task_completed_event_id)
        elif kind == EventType.EVENT_TYPE_TIMER_STARTED:
            counted["timers"] += 1
        elif kind == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            counted["search attribute upserts"] += 1
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            counted["signals"] += 1
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            counted["updates"] += 1
        elif kind == EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED:
            counted["child workflows"] += 1
    if marker_tasks:
        counted["local activities"] = len(marker_tasks)
    return dict(counted)


# -- what the server's metric says -------------------------------------------------------

_SAMPLE = re.compile(r"^action\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class ActionMetric:
    """The dev server's `action` counter, scraped from its Prometheus endpoint: one namespace's
    actions by `action_type`."""

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self.labels: set[str] = set()  # every label name seen on the counter
        self._last: dict[str, float] | None = None
        self._unchanged_since = 0.0

    def _scrape(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url, timeout=5) as response:
            text = response.read().decode()
        by_type: dict[str, float] = {}
        for line in text.splitlines():
            sample = _SAMPLE.match(line)
            if sample is None:
                continue
            labels = dict(_LABEL.findall(sample["labels"]))
            self.labels |= labels.keys()
            if labels.get("namespace") == self.namespace:
                kind = labels.get("action_type", "")
                by_type[kind] = by_type.get(kind, 0.0) + float(sample["value"])
        return by_type

    async def read(self) -> dict[str, float]:
        now = await asyncio.to_thread(self._scrape)
        if now != self._last:
            self._last, self._unchanged_since = now, time.monotonic()
        return now

    async def settled(self, *, since: float = 0.0, quiet_s: float = QUIET_S, every_s: float = 0.25,
                      timeout_s: float = 60.0) -> dict[str, float]:
        """The counter once it has not changed for `quiet_s`, counted from `since` (a monotonic
        time) at the earliest: the server publishes it about once a second, so what happened just
        before `since` may not show yet."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = await self.read()
            if time.monotonic() - max(self._unchanged_since, since) >= quiet_s:
                return now
            if time.monotonic() > deadline:
                raise TimeoutError(f"the action metric kept changing for {timeout_s:g}s")
            await asyncio.sleep(every_s)

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
        return {kind: round(after[kind] - before.get(kind, 0.0)) for kind in sorted(after)
                if after[kind] != before.get(kind, 0.0)}


# -- one chain, measured -----------------------------------------------------------------

Chain = Callable[[], Awaitable[str]]
"""Runs one chain to its end; returns its workflow id."""


async def measure(client: Client, metric: ActionMetric, chain: Chain) -> dict:
    """One chain's actions (from its history and from the metric), heartbeats and history size."""
    before = await metric.settled()
    started = time.perf_counter()
    workflow_id = await chain()
    wall_s = time.perf_counter() - started
    by_type = ActionMetric.delta(before, await metric.settled(since=time.monotonic()))
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    by_rule = history_actions(history.events)
    from_history, from_metric = sum(by_rule.values()), sum(by_type.values())
    heartbeats = sum(by_type.get(kind, 0) for kind in HEARTBEAT_TYPES)
    return {"actions_history": from_history, "actions_metric": from_metric, "heartbeats": heartbeats,
            "metric_beyond_history_and_heartbeats": from_metric - from_history - heartbeats,
            **await history_size(client, workflow_id), "wall_s": round(wall_s, 2),
            "actions_history_by_rule": by_rule, "actions_metric_by_type": by_type}


def median_of(samples: list[dict]) -> dict:
    """Each figure's median over the runs (a breakdown's, label by label)."""
    def med(values: list[float]) -> float:
        return round(statistics.median(values), 2)

    summary: dict = {"runs": len(samples)}
    for key, value in samples[0].items():
        if isinstance(value, dict):
            labels = sorted({label for sample in samples for label in sample[key]})
            summary[key] = {label: med([sample[key].get(label, 0) for sample in samples]) for label in labels}
        else:
            summary[key] = med([sample[key] for sample in samples])
    return summary


async def repeated(client: Client, metric: ActionMetric, chain: Chain, runs: int) -> dict:
    samples = [await measure(client, metric, chain) for _ in range(runs)]
    return {**median_of(samples), "actions_metric_each_run": [sample["actions_metric"] for sample in samples]}


# -- the chains --------------------------------------------------------------------------

class Chains:
    """Each shape's chain, run to its end (`Chain`)."""

    def __init__(self, client: Client, cancelled_at: Path) -> None:
        self.client = client
        self.cancelled_at = cancelled_at
        self.cancel_latency_ms: list[float] = []
        self.data_bytes: list[int] = []  # the 20 KB chain's results, per run

    @staticmethod
    def _completed(record: ChainRecord, hops: int) -> str:
        if record.status is not ChainStatus.COMPLETED or len(record.hops) != hops:
            raise RuntimeError(f"bench chain ended {record.status.value} after {len(record.hops)} hops: {record.error}")
        return str(record.chain_id)

    async def by_name(self) -> str:
        record = await run_chain(self.client, to_agent=IDS[0], task_description="bench cost", context_data={"hops": 5})
        return self._completed(record, 5)

    async def by_capability(self) -> str:
        record = await run_chain(self.client, capability=RELAY_CAPABILITIES[0], task_description="bench cost")
        if [hop.to_agent for hop in record.hops] != CAPABILITY_IDS:
            raise RuntimeError(f"the capability chain went {[hop.to_agent for hop in record.hops]}")
        return self._completed(record, 5)

    async def with_data(self) -> str:
        record = await run_chain(self.client, to_agent=IDS[0], task_description="bench cost",
                                 context_data={"hops": 5, RESULT_BYTES: RANDOM_BYTES})
        self.data_bytes.append(sum(len(json.dumps(hop.result_data)) for hop in record.hops))
        return self._completed(record, 5)

    async def fan_out(self) -> str:
        record = await run_chain(self.client, to_agent=LEAD, task_description="bench cost",
                                 context_data={"branches": FAN_OUT})
        if record.status is not ChainStatus.COMPLETED or record.final_result.get("branches") != FAN_OUT:
            raise RuntimeError(f"bench fan-out ended {record.status.value}: {record.error}")
        return str(record.chain_id)

    async def approval(self) -> str:
        """Approved once the chain's record, read back from its history, says it waits."""
        chain_id = await start_chain(self.client, to_agent=LEAD, task_description="bench cost",
                                     context_data={"approval": True})
        while (await get_chain(self.client, chain_id)).status is not ChainStatus.AWAITING_APPROVAL:
            await asyncio.sleep(0.05)
        await approve_chain(self.client, chain_id, by="bench")
        return self._completed(await wait_chain(self.client, chain_id), 2)

    def llm(self, agent_id: str) -> Chain:
        async def one() -> str:
            record = await run_chain(self.client, to_agent=agent_id, task_description="bench cost")
            return self._completed(record, 1)
        return one

    async def cancelled(self) -> str:
        """A hop cancelled `CANCEL_AFTER_S` after it started (as the server describes the chain's
        pending activity); how long from the cancel call until the handler saw it."""
        chain_id = str(await start_chain(self.client, to_agent=SLEEPER, task_description="bench cost",
                                         context_data={"sleep_s": 60}, hop_timeout=120))
        handle = self.client.get_workflow_handle(chain_id)
        while True:
            pending = (await handle.describe()).raw_description.pending_activities
            if pending and pending[0].state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED:
                break
            await asyncio.sleep(0.05)
        hop_started = pending[0].last_started_time.ToDatetime().timestamp()
        await asyncio.sleep(max(0.0, hop_started + CANCEL_AFTER_S - time.time()))
        asked = time.time()
        await cancel_chain(self.client, chain_id)
        record = await wait_chain(self.client, chain_id)
        if record.status is not ChainStatus.CANCELLED:
            raise RuntimeError(f"the cancelled chain ended {record.status.value}: {record.error}")
        seen = await self._cancel_seen(chain_id)
        self.cancel_latency_ms.append(round((seen - asked) * 1000, 1))
        return chain_id

    async def _cancel_seen(self, chain_id: str, timeout_s: float = 30.0) -> float:
        """When the sleeper's handler saw its cancellation (the line it wrote for the chain)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.cancelled_at.exists():
                for line in self.cancelled_at.read_text().splitlines():
                    marked, at = line.split()
                    if marked == chain_id:
                        return float(at)
            await asyncio.sleep(0.05)
        raise TimeoutError(f"the sleeper never saw chain {chain_id} cancelled")

    def bare(self, workflow: str, argument: float) -> Chain:
        async def one() -> str:
            workflow_id = f"bench-cost-{uuid4()}"
            await self.client.execute_workflow(workflow, argument, id=workflow_id, task_queue=UNSANDBOXED_QUEUE)
            return workflow_id
        return one

    async def peer(self) -> str:
        workflow_id = f"bench-cost-peer-{uuid4()}"
        answer = await self.client.execute_workflow("PeerChain", "bench", id=workflow_id,
                                                    task_queue=PEER_QUEUES["unsandboxed"])
        if answer != PEER_FINAL:
            raise RuntimeError(f"the peer's chain answered {answer!r}")
        return workflow_id


async def shapes(client: Client, metric: ActionMetric, chains: Chains, runs: int, slow_runs: int) -> dict[str, dict]:
    """Every shape, `runs` chains each (`slow_runs` of the 30 s ones), after one warm-up chain
    on each system's workers."""
    for warm_up in (chains.by_name, chains.by_capability, chains.llm(LLM_FAST), chains.bare("BareChain", 5),
                    chains.bare("BareSlowHop", 1.0), chains.peer):
        await warm_up()
    plan: dict[str, tuple[Chain, int]] = {
        BY_NAME: (chains.by_name, runs),
        BARE_5: (chains.bare("BareChain", 5), runs),
        PEER_5: (chains.peer, runs),
        BY_CAPABILITY: (chains.by_capability, runs),
        FAN: (chains.fan_out, runs),
        APPROVAL: (chains.approval, runs),
        DATA_20KB: (chains.with_data, runs),
        CANCELLED: (chains.cancelled, runs),
        LLM_1: (chains.llm(LLM_FAST), runs),
        BARE_1: (chains.bare("BareSlowHop", 1.0), runs),
        LLM_30: (chains.llm(LLM_SLOW), slow_runs),
        BARE_30: (chains.bare("BareSlowHop", 30.0), slow_runs),
    }
    return {name: await repeated(client, metric, chain, count) for name, (chain, count) in plan.items()}


# -- the figures -------------------------------------------------------------------------

BY_NAME_TARGET = "cost: 5 hops by name, actions - bare Temporal's"
BY_CAPABILITY_TARGET = "cost: 5 hops by capability, actions - bare Temporal's"
LLM_TARGET = "cost: LLM hop of 30 s, actions - a 1 s one's"
HISTORY_TARGET = "cost: 20 KB results' history growth / the results' bytes"
TARGETS = {BY_NAME_TARGET: 1, BY_CAPABILITY_TARGET: 2, LLM_TARGET: 3, HISTORY_TARGET: 1.5}
"""Each target's bound (the value is at most this), by the names `targets` reports them under."""


def history_growth(measured: dict[str, dict], data_bytes: list[int]) -> dict:
    """What 20 KB results add to a 5-hop chain's history, against the same chain's with empty
    results (the `BY_NAME` chain: its results are `{"hop": i}`)."""
    data = round(statistics.median(data_bytes))
    full, empty = measured[DATA_20KB]["bytes"], measured[BY_NAME]["bytes"]
    return {"data_bytes": data, "bytes_20kb": full, "bytes_empty": empty,
            "ratio": round((full - empty) / data, 3), "bound_bytes": round(1.5 * data + empty),
            "within_bound": full <= 1.5 * data + empty}


def differences(measured: dict[str, dict]) -> dict[str, float]:
    """Actions (the metric's: what is billed, heartbeats included) of one shape less another's."""
    def less(a: str, b: str) -> float:
        return round(measured[a]["actions_metric"] - measured[b]["actions_metric"], 2)

    return {f"{BY_NAME} - {BARE_5}": less(BY_NAME, BARE_5), f"{BY_CAPABILITY} - {BARE_5}": less(BY_CAPABILITY, BARE_5),
            f"{BY_NAME} - {PEER_5}": less(BY_NAME, PEER_5), f"{LLM_30} - {LLM_1}": less(LLM_30, LLM_1),
            f"{BARE_30} - {BARE_1}": less(BARE_30, BARE_1), f"{LLM_30} - {BARE_30}": less(LLM_30, BARE_30)}


def cost_targets(cost: dict) -> dict[str, tuple[float, float, bool]]:
    """(value, target, met) of each cost target."""
    found = cost["differences"]
    values = {BY_NAME_TARGET: found[f"{BY_NAME} - {BARE_5}"], BY_CAPABILITY_TARGET: found[f"{BY_CAPABILITY} - {BARE_5}"],
              LLM_TARGET: found[f"{LLM_30} - {LLM_1}"], HISTORY_TARGET: cost["history_20kb"]["ratio"]}
    return {name: (value, TARGETS[name], value <= TARGETS[name]) for name, value in values.items()}


def latency_summary(values: list[float]) -> dict:
    return {"p50": round(statistics.median(values), 1), "max": max(values), "samples": values}


# -- the stack ---------------------------------------------------------------------------

@asynccontextmanager
async def stack(tmp: Path) -> AsyncIterator[tuple[Client, ActionMetric, Chains]]:
    """An embedded server with its metrics on, the scripted model, and a process for each worker:
    handoff's chain worker, its agents (the bench relays and the capability relays; the slow
    agents in one of their own, told the model's URL), bare Temporal's and the peer's."""
    metrics_port = free_port()
    server = EmbeddedServer(port=free_port(), ui_port=free_port(), db=str(tmp / "cost.db"),
                            extra_args=["--headless", "--metrics-port", str(metrics_port)])
    cancelled_at = tmp / "cancelled_at"

    def answer(request: dict, _: int) -> Reply:
        return Reply(tool="finish", arguments={"answer": "done"}, delay_s=MODEL_DELAYS_S[request["model"]])

    async with ScriptedModel(answer) as model:
        server.start()
        env = {**os.environ, "TEMPORAL_ADDRESS": server.address, "PYTHONPATH": str(ROOT),
               PAYLOAD_DIR_ENV: os.environ[PAYLOAD_DIR_ENV]}
        slow_env = {**env, "OPENAI_BASE_URL": model.url, "OPENAI_API_KEY": "bench", CANCELLED_AT_ENV: str(cancelled_at)}
        commands = [
            ([HANDOFF, "worker", "--chains"], env),
            ([HANDOFF, "worker", "--agent", "bench.agents:ALL", "--agent", "bench.agents:BY_CAPABILITY"], env),
            ([HANDOFF, "worker", "--agent", "bench.slow:ALL"], slow_env),
            ([sys.executable, "-m", "bench.baseline", server.address, "workflows-unsandboxed"], env),
            ([sys.executable, "-m", "bench.baseline", server.address, "activities"], env),
            ([sys.executable, "-m", "bench.peer", server.address, "unsandboxed"], env),
        ]
        workers = [subprocess.Popen(c, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for c, e in commands]
        try:
            client = await connect(address=server.address)
            await wait_live(client, {a.id for a in [*BENCH_AGENTS, *SLOW_AGENTS]} | set(CAPABILITY_IDS),
                            timeout_s=120)
            yield client, ActionMetric(f"http://{server.ip}:{metrics_port}/metrics", client.namespace), \
                Chains(client, cancelled_at)
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(timeout=30)
            server.stop()


NOTES = [
    "actions_history counts Temporal Cloud's billable actions from the history; heartbeats and queries "
    "write no event, so they are not in it.",
    "actions_metric is the server's `action` counter (namespace default, all labels summed) around one chain, "
    f"read once it stopped changing for {QUIET_S:g} s before and after; heartbeats are its "
    + " / ".join(HEARTBEAT_TYPES) + " actions.",
    "No query is sent: chains are awaited on their results, the approval's wait is found by reading the "
    "chain's record back from its history (get_chain), the cancelled hop's start by describing the workflow.",
    f"approval: start, the wait, approve_chain (an Update), the end. cancelled hop: cancel_chain "
    f"{CANCEL_AFTER_S:g} s after the hop started, then the end and the handler's cancellation.",
    f"{DATA_20KB}: each hop's result carries base64 of {RANDOM_BYTES} random bytes; the empty-results "
    f"chain it is compared with is '{BY_NAME}' (results {{\"hop\": i}}); data_bytes is the JSON size of the "
    "five hops' results.",
    f"'{BY_CAPABILITY}': the chain starts at a capability and each hop hands on to the next capability; "
    "each capability has one agent.",
    f"'{BARE_30}' / '{BARE_1}': one activity heartbeating every second, a 10 s heartbeat timeout, the SDK's "
    "default throttling (80 % of the timeout).",
]


async def measured(tmp: Path, runs: int, slow_runs: int) -> dict:
    async with stack(tmp) as (client, metric, chains):
        found = await shapes(client, metric, chains, runs, slow_runs)
        labels = sorted(metric.labels)
        url = metric.url
    cost = {"metric": {"url": url, "labels": labels, "breakdown_by": "action_type"}, "history_rules": HISTORY_RULES,
            "notes": NOTES,
            "shapes": found, "cancel_latency_ms": latency_summary(chains.cancel_latency_ms),
            "history_20kb": history_growth(found, chains.data_bytes)}
    cost["differences"] = differences(found)
    cost["targets"] = {name: {"value": v, "target": t, "met": met} for name, (v, t, met) in cost_targets(cost).items()}
    return cost


def run_cost(runs: int = 3, slow_runs: int = 2) -> dict:
    """Every shape's cost, on a stack of its own (a few minutes)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[PAYLOAD_DIR_ENV] = str(Path(tmp) / "payloads")  # this process's client stores like the workers
        return {"settings": {"runs": runs, "slow_runs": slow_runs}, **asyncio.run(measured(Path(tmp), runs, slow_runs))}


# -- the tables --------------------------------------------------------------------------

def cost_rows(cost: dict, goal: Callable[[str, str], str]) -> list[str]:
    """Rows of the results table (| measure | handoff | baseline | ratio | target | met |);
    `goal(name, text)` gives the target and met cells."""
    s, found, growth = cost["shapes"], cost["differences"], cost["history_20kb"]

    def actions(name: str) -> str:
        beats = s[name]["heartbeats"]
        return f"{s[name]['actions_metric']:g} actions ({beats:g} heartbeat{'' if beats == 1 else 's'})"

    cancel = cost["cancel_latency_ms"]
    return [
        f"| actions per chain, 5 hops by name | {actions(BY_NAME)} | bare Temporal {actions(BARE_5)}; the peer "
        f"{actions(PEER_5)} | {found[f'{BY_NAME} - {BARE_5}']:+g} | {goal(BY_NAME_TARGET, '<= +{}')} |",
        f"| actions per chain, 5 hops by capability | {actions(BY_CAPABILITY)} | bare Temporal {actions(BARE_5)} | "
        f"{found[f'{BY_CAPABILITY} - {BARE_5}']:+g} | {goal(BY_CAPABILITY_TARGET, '<= +{}')} |",
        f"| actions per chain, an LLM hop of 30 s against one of 1 s | {actions(LLM_30)}; {actions(LLM_1)} | "
        f"bare Temporal {actions(BARE_30)}; {actions(BARE_1)} | {found[f'{LLM_30} - {LLM_1}']:+g} | "
        f"{goal(LLM_TARGET, '<= +{}')} |",
        f"| actions per chain: fan-out 8 + join / approval / cancelled hop | {actions(FAN)} / {actions(APPROVAL)} / "
        f"{actions(CANCELLED)} | | | | |",
        f"| history of a 5-hop chain with 20 KB results ({growth['data_bytes'] / 1024:.1f} KB of results) | "
        f"{growth['bytes_20kb'] / 1024:.1f} KB | empty results {growth['bytes_empty'] / 1024:.1f} KB | "
        f"{growth['ratio']:.2f}x the results | {goal(HISTORY_TARGET, '<= {}x')} |",
        f"| cancel: the call to the handler's CancelledError, p50 / max | {cancel['p50']:.0f} / {cancel['max']:.0f} ms "
        f"| | | | |",
    ]


def markdown(cost: dict) -> str:
    """cost.md: every shape's figures, then the rows with targets."""
    def goal(name: str, text: str) -> str:
        check = cost["targets"][name]
        return f"{text.format(check['target'])} | {'yes' if check['met'] else '**no**'}"

    rows = ["| chain | actions, history | actions, metric | heartbeats | metric - history - heartbeats | "
            "events | history bytes | runs |", "|---|---|---|---|---|---|---|---|"]
    for name, s in cost["shapes"].items():
        rows.append(f"| {name} | {s['actions_history']:g} | {s['actions_metric']:g} | {s['heartbeats']:g} | "
                    f"{s['metric_beyond_history_and_heartbeats']:g} | {s['events']:g} | {s['bytes']:g} | "
                    f"{s['runs']} |")
    rows += ["", "| measure | handoff | baseline | difference | target | met |", "|---|---|---|---|---|---|",
             *cost_rows(cost, goal), "", "Medians over the runs. " + " ".join(cost["notes"])]
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="chains of each shape (median)")
    parser.add_argument("--slow-runs", type=int, default=2, help="chains of each 30 s shape")
    parser.add_argument("--out", default=str(RESULTS / "cost.json"), help="the JSON; the table (.md) goes beside it")
    args = parser.parse_args()
    cost = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            **run_cost(args.runs, args.slow_runs)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cost, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(cost))
    print(json.dumps(cost, indent=2))


if __name__ == "__main__":
    main()

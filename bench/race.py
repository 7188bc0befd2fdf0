"""The race against the Temporal-native peer (`bench/peer.py`): what each system costs per chain.

`Cpu` reads the CPU time of every process of the stack (the server included) from /proc, so a
throughput round of one system can be charged with what each process spent during it; every system
runs alone during its own rounds, and the others' idle workers cost all alike. `history_size` is
the size of one chain's history as the server stores it: events and bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

from temporalio.client import Client

SERVER = "server"
CLIENT = "client"
"""The benchmark's own process, which starts every chain and waits for its result."""
PROCESSES = {
    # each system's processes besides the server: what its chains cost is charged to them
    "handoff": ("handoff-chains", "handoff-agents"),
    "bare": ("bare-workflows", "bare-activities"),
    "bare_unsandboxed": ("bare-unsandboxed", "bare-activities"),
    "peer": ("peer",),
    "peer_unsandboxed": ("peer-unsandboxed",),
}
TICK_S = 1 / os.sysconf("SC_CLK_TCK")


class Cpu:
    """CPU seconds (user and system, all threads) of named processes, from /proc/PID/stat."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def read(self) -> dict[str, float]:
        return {name: _cpu_s(pid) for name, pid in self.pids.items()}

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: after[name] - before[name] for name in before}


def _cpu_s(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    # the command name (field 2) may hold spaces: the fields after it start past its ')'
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime


def cpu_per_chain(system: str, spent: dict[str, float], chains: int) -> dict[str, float]:
    """Milliseconds of CPU per chain of `system`: the server's, the client's, each of its worker
    processes', the workers' sum and the total."""
    names = (SERVER, CLIENT, *PROCESSES[system])
    per = {name: round(spent.get(name, 0.0) * 1000 / chains, 2) for name in names}
    per["workers"] = round(sum(per[name] for name in PROCESSES[system]), 2)
    per["total"] = round(per[SERVER] + per[CLIENT] + per["workers"], 2)
    return per


async def history_size(client: Client, workflow_id: str) -> dict[str, int]:
    """One chain's history: its events, and their bytes as the server stores them."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return {"events": len(history.events), "bytes": sum(event.ByteSize() for event in history.events)}


# The issue's targets against the peer, by the names `targets` reports them under.
PEER_LATENCY = "5-hop p50 <= 1.0x the OpenAI Agents SDK on Temporal (sandbox off)"
PEER_THROUGHPUT = "5-hop throughput >= 1.0x that peer (sandbox off) at concurrency 20"
PEER_SERVER_CPU = "server CPU per chain <= that peer's (sandbox off) at concurrency 20"
OVERLOAD = "5-hop throughput >= 0.95x bare (sandbox off) at concurrency 50"


def server_cpu_ratio(levels: dict[int, dict]) -> float:
    """handoff's server CPU per chain over the unsandboxed peer's, at concurrency 20."""
    spent = {name: levels[20][name]["cpu_ms_per_chain"][SERVER] for name in ("handoff", "peer_unsandboxed")}
    return spent["handoff"] / spent["peer_unsandboxed"]


def race_targets(five: dict, levels: dict[int, dict]) -> dict[str, tuple[float, float, bool]]:
    """(value, target, met) of each target against the peer; `levels` by concurrency."""
    cpu = server_cpu_ratio(levels)
    return {
        PEER_LATENCY: (five["ratio_p50_peer_unsandboxed"], 1.0, five["ratio_p50_peer_unsandboxed"] <= 1.0),
        PEER_THROUGHPUT: (levels[20]["ratio_per_s_peer_unsandboxed"], 1.0,
                          levels[20]["ratio_per_s_peer_unsandboxed"] >= 1.0),
        PEER_SERVER_CPU: (round(cpu, 3), 1.0, cpu <= 1.0),
        OVERLOAD: (levels[50]["ratio_per_s_unsandboxed"], 0.95, levels[50]["ratio_per_s_unsandboxed"] >= 0.95),
    }


def race_rows(five: dict, levels: dict[int, dict], history: dict[str, dict], goal) -> list[str]:
    """The README table's rows against the peer (`goal(name, text)`: the target and met cells)."""
    def ms(s: dict) -> str:
        return " / ".join(f"{s[k]:.1f}" for k in ("p50", "p95", "p99")) + " ms"

    def per_s(name: str) -> str:
        return " / ".join(f"{levels[c][name]['per_s']:.1f}" for c in sorted(levels))

    def cpu(name: str) -> str:
        spent = levels[20][name]["cpu_ms_per_chain"]
        return f"{spent[SERVER]:.1f} / {spent['workers']:.1f} / {spent[CLIENT]:.1f} ms"

    def kept(name: str) -> str:
        return f"{history[name]['events']} events, {history[name]['bytes'] / 1024:.1f} KB"

    def phased(name: str) -> str:
        spent = history[name]["phases_ms"]
        return " / ".join(f"{spent[phase]:.1f}" for phase in PHASES) + " ms"

    server = server_cpu_ratio(levels)
    return [
        f"| 5-hop chain p50 / p95 / p99 against the OpenAI Agents SDK on Temporal | {ms(five['handoff'])} | "
        f"peer, sandbox off {ms(five['peer_unsandboxed'])}; sandbox on {ms(five['peer'])} | "
        f"{five['ratio_p50_peer_unsandboxed']:.2f} ({five['ratio_p50_peer']:.2f} on) | {goal(PEER_LATENCY, '<= {}')} |",
        f"| 5-hop chains/s at concurrency {' / '.join(str(c) for c in sorted(levels))}, against the peer | "
        f"{per_s('handoff')} | peer, sandbox off {per_s('peer_unsandboxed')}; on {per_s('peer')} | "
        f"{levels[20]['ratio_per_s_peer_unsandboxed']:.2f} at 20 ({levels[20]['ratio_per_s_peer']:.2f} on) | "
        f"{goal(PEER_THROUGHPUT, '>= {}')} |",
        f"| CPU per chain at concurrency 20: server / workers / client | {cpu('handoff')} | "
        f"peer, sandbox off {cpu('peer_unsandboxed')}; on {cpu('peer')}; bare, sandbox off {cpu('bare_unsandboxed')} | "
        f"{server:.2f} (server) | {goal(PEER_SERVER_CPU, '<= {}')} |",
        f"| one 5-hop chain's history | {kept('handoff')} | peer {kept('peer_unsandboxed')}; "
        f"bare {kept('bare_unsandboxed')} | | | |",
        "| a 5-hop chain's time by the server's event times: workflow tasks dispatched / run, activities "
        f"dispatched / run | {phased('handoff')} | peer, sandbox off {phased('peer_unsandboxed')}; bare, sandbox "
        f"off {phased('bare_unsandboxed')} | | | |",
        "| 5-hop chains/s at concurrency 50, against bare Temporal (sandbox off) | "
        f"{levels[50]['handoff']['per_s']:.1f} | "
        f"{levels[50]['bare_unsandboxed']['per_s']:.1f} | {levels[50]['ratio_per_s_unsandboxed']:.2f} | "
        f"{goal(OVERLOAD, '>= {}')} |",
    ]


# History event types, by number (temporal.api.enums.v1.EventType), that `phases` measures between.
_WFT_SCHEDULED, _WFT_STARTED, _WFT_COMPLETED = 5, 6, 7
_ACT_SCHEDULED, _ACT_STARTED, _ACT_COMPLETED = 10, 11, 12
PHASES = {
    "workflow_task_dispatch": (_WFT_SCHEDULED, _WFT_STARTED),
    "workflow_task_run": (_WFT_STARTED, _WFT_COMPLETED),
    "activity_dispatch": (_ACT_SCHEDULED, _ACT_STARTED),
    "activity_run": (_ACT_STARTED, _ACT_COMPLETED),
}
"""Where a chain's time goes, by the server's own event times: a task from scheduled to picked up
by a worker (through matching, or handed back with the workflow task's answer: eager activity
dispatch), and from picked up to its answer recorded (the worker's run and the round trip)."""


async def phases(client: Client, workflow_ids: list[str]) -> dict[str, float]:
    """Milliseconds per chain in each of `PHASES`, the mean over the chains of `workflow_ids`."""
    totals = dict.fromkeys(PHASES, 0.0)
    for workflow_id in workflow_ids:
        events = (await client.get_workflow_handle(workflow_id).fetch_history()).events
        opened: dict[int, object] = {}  # the start of each kind of phase under way (one at a time in a linear chain)
        for event in events:
            for name, (start, end) in PHASES.items():
                if event.event_type == start:
                    opened[start] = event.event_time.ToDatetime()
                elif event.event_type == end and start in opened:
                    began = opened.pop(start)
                    totals[name] += (event.event_time.ToDatetime() - began).total_seconds() * 1000
    return {name: round(total / max(1, len(workflow_ids)), 2) for name, total in totals.items()}

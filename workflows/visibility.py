"""What the Temporal Web UI, visibility search and metrics see of a chain while it runs: its
search attributes (upserted only when they change: each upsert is a visibility write), its
current details (the open hops), each hop's summary in the timeline, its metrics (recorded by
the workflow's replay-safe meter) and the fields of its log lines."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from handoff.constants import SA_AGENTS, SA_COST, SA_CURRENT_AGENT, SA_DEPTH, SA_STATUS
    from handoff.models import ChainRecord, ChainStatus, HopInput, HopKind, HopRecord, HopStatus, Usage

    from handoff.workflows.paths import Target

PROGRESS_TIMER_SUMMARY = ("still running: from here on, the chain's search attributes "
                          "(HandoffCurrentAgent, HandoffDepth, HandoffAgents) follow every hop")
"""The progress timer as the Web UI's timeline names it."""


class Metrics:
    """The chain workflow's metrics (replay-safe: the workflow's meter records nothing while
    replaying history)."""

    def __init__(self) -> None:
        meter = workflow.metric_meter()
        self.hops = meter.create_counter("handoff_hops", "hops by from/to agent and outcome")
        self.hop_ms = meter.create_histogram_float(
            "handoff_hop_duration", "hop duration from scheduling to outcome, in milliseconds", "ms")
        self.fallbacks = meter.create_counter("handoff_fallbacks", "hops retried on another agent after a failure")
        self.refusals = meter.create_counter("handoff_refusals", "handoffs refused by the chain's rules")
        self.chains = meter.create_counter("handoff_chains", "chains by final status")
        self.branches = meter.create_counter("handoff_branches", "fan-out branches by final status")
        self.approvals = meter.create_counter("handoff_approvals", "approval waits by decision")
        self.tokens = meter.create_counter("handoff_tokens", "model tokens spent, by agent and model")
        self.model_calls = meter.create_counter("handoff_model_calls", "model calls, by agent and model")
        self.cost = meter.create_histogram_float("handoff_hop_cost", "what a hop cost, in its budget's currency")

    def spent(self, agent: str, usage: Usage) -> None:
        """A hop's usage: tokens and model calls by agent and model, cost by agent."""
        for model, spent in usage.by_model.items():
            self.tokens.add(spent.tokens, {"agent": agent, "model": model})
            self.model_calls.add(spent.model_calls, {"agent": agent, "model": model})
        if usage.cost:
            self.cost.record(usage.cost, {"agent": agent})

    def hop(self, record: HopRecord) -> None:
        outcome = {"from_agent": record.from_agent, "to_agent": record.to_agent, "outcome": record.status.value}
        self.hops.add(1, outcome)
        if record.duration_ms is not None:
            self.hop_ms.record(record.duration_ms, outcome)


class Visibility:
    """The chain's search attributes and current details. `search_attributes`: whether the
    starter set them (the workflow maintains them only then); `live`: whether each hop upserts
    its progress (else once at the end, or from the progress timer on)."""

    def __init__(self, record: ChainRecord, *, search_attributes: bool, live: bool) -> None:
        self._record = record
        self.enabled = search_attributes
        self.live = live
        self.live_from: Any = None
        """When `live` turns on at the next hop (a chain's time), if it is off."""
        self.agents: list[str] = []  # every agent a hop was scheduled on, in order
        self._progress: tuple[list[str], str, int] | None = None  # (agents, current agent, depth)

    def upsert(self, status: ChainStatus | None = None) -> None:
        """Upsert the progress (and `status`) values that changed."""
        if not self.enabled:
            return
        wanted: list[tuple[Any, Any]] = []
        if self._progress is not None:
            agents, agent, depth = self._progress
            wanted += [(SA_AGENTS, agents), (SA_CURRENT_AGENT, agent), (SA_DEPTH, depth)]
        if status is not None:
            wanted.append((SA_STATUS, status.value))
        current = workflow.info().typed_search_attributes
        if status is not None and status.ended and self._record.usage is not None and current.get(SA_COST) is not None:
            wanted.append((SA_COST, self._record.usage.cost))  # set at the start of a chain with a budget
        changed = [key.value_set(value) for key, value in wanted if current.get(key) != value]
        if changed:
            workflow.upsert_search_attributes(changed)

    def at(self, depth: int, agent: str) -> None:
        """The chain's progress: `agent` is at `depth` now."""
        self._progress = (sorted(set(self.agents)), agent, depth)

    def hop_started(self, depth: int, agent: str, target: Target, *, fan_outs: int, waiting: int) -> None:
        """A hop to `agent` starts. While branches run (`fan_outs`) or hops wait for a person
        (`waiting`), the details list every open hop; else they name this one."""
        self.agents.append(agent)
        self.at(depth, agent)
        if not self.live and self.live_from is not None and workflow.now() >= self.live_from:
            self.live = True
        if self.live:
            self.upsert()
        if fan_outs or waiting:
            self.show_open_hops(waiting)
        else:
            workflow.set_current_details(f"hop {depth}: {target.from_agent} -> **{agent}**: {target.task[:120]}")

    def show_open_hops(self, waiting: int) -> None:
        """The workflow's current details while branches run or a hop waits for a person: one line
        per open hop, with where it stands in the tree of branches (`waiting`: how many hops wait
        for a person: with more than one, the approve command names the hop)."""
        lines = []
        for label, hop in open_hops(self._record.hops):
            where = f"hop {hop.hop}" + (f" [{label}]" if label else "")
            line = f"- {where}: {hop.from_agent} -> **{hop.to_agent}**: {hop.task_description[:80]}"
            if hop.status is HopStatus.AWAITING_APPROVAL:
                line += (f" — **awaiting approval**: `handoff approve {self._record.chain_id}"
                         + (f" --hop {hop.handoff_id}`" if waiting > 1 else "`"))
            lines.append(line)
        workflow.set_current_details("\n".join(lines) or "running")

    def ended(self, status: ChainStatus, error: str | None) -> None:
        self.upsert(status)
        workflow.set_current_details(f"**{status.value}**" + (f": {error}" if error else ""))


def open_hops(hops: list[HopRecord], label: str = "") -> Iterator[tuple[str, HopRecord]]:
    """Every hop still running or waiting for approval, with its branch label."""
    for hop in hops:
        if hop.status.open:
            yield label, hop
        if hop.fan_out is not None:
            for branch in hop.fan_out.branches:
                sub = f"b{hop.hop}.{branch.index}"
                yield from open_hops(branch.hops, f"{label}/{sub}" if label else sub)


def hop_summary(hop_input: HopInput, target: Target, label: str = "") -> str:
    """The hop as the Web UI's timeline names it."""
    context = hop_input.context
    summary = f"hop {hop_input.hop}" + (f" [{label}]" if label else "")
    summary += f": {context.from_agent} -> {context.to_agent}"
    if target.kind is HopKind.JOIN:
        summary += f" (join of {len(target.branches)} branches)"
    elif target.kind is HopKind.RETURN:
        summary += " (return)"
    if hop_input.fallback_for:
        summary += f" (fallback for {hop_input.fallback_for})"
    summary = f"{summary}: {target.task[:80]}"
    return f"{summary} [{target.chosen_by[:100]}]" if target.chosen_by else summary


def log_fields(chain_id: Any, record: HopRecord) -> dict[str, Any]:
    """A hop's fields in the workflow's log lines."""
    return {
        "chain_id": str(chain_id),
        "handoff_id": str(record.handoff_id),
        "hop": record.hop,
        "from_agent": record.from_agent,
        "to_agent": record.to_agent,
        "status": record.status.value,
        "reason": record.error,
    }

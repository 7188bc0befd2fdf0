"""How chains and agents look on a terminal (rich tables)."""

from __future__ import annotations

import json
from datetime import timezone
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from handoff.constants import DEFAULT_UI_URL
from handoff.settings import settings
from handoff.models import BranchRecord, ChainRecord, ChainStatus, HopKind, HopRecord, HopStatus, Usage
from handoff.registry import AgentStatus
from handoff.client.versioning import Routing

STATUS_STYLE = {
    ChainStatus.COMPLETED: "green", HopStatus.COMPLETED: "green",
    ChainStatus.RUNNING: "cyan", HopStatus.RUNNING: "cyan",
    ChainStatus.AWAITING_APPROVAL: "bold cyan", HopStatus.AWAITING_APPROVAL: "bold cyan",
    ChainStatus.BUDGET_EXCEEDED: "magenta",
    ChainStatus.CANCELLED: "yellow", HopStatus.CANCELLED: "yellow",
    HopStatus.REFUSED: "magenta", ChainStatus.DEPTH_EXCEEDED: "magenta",
    ChainStatus.LOOP_DETECTED: "magenta", ChainStatus.REJECTED: "magenta",
}


def ui_url(chain_id: str, namespace: str = "default", base: str | None = None,
           run_id: str | None = None, event_id: int | None = None) -> str:
    """The chain's page in the Temporal Web UI (base: HANDOFF_UI_URL, default the embedded UI),
    or, given its run and an event's id, that event's."""
    base = base or settings().ui_url or DEFAULT_UI_URL
    url = f"{base.rstrip('/')}/namespaces/{namespace}/workflows/{chain_id}"
    return f"{url}/{run_id}/history/events/{event_id}" if run_id and event_id else url


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _brief(data: dict[str, Any], limit: int = 60) -> str:
    text = json.dumps(data, default=str, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def chain_table(record: ChainRecord) -> Group:
    """The chain's record as a table; a fan-out's branches follow the hop that fanned out,
    indented as a tree (a branch's own row, then its hops)."""
    style = STATUS_STYLE.get(record.status, "red")
    title = Text.assemble(
        ("chain ", "bold"), (str(record.chain_id), "bold"), "  ",
        (record.status.value, f"bold {style}"),
        f"  {_ms(record.duration_ms)} ms" if record.duration_ms is not None else "",
    )
    table = Table(title=record.task_description, title_justify="left", expand=False)
    table.add_column("hop", no_wrap=True)
    table.add_column("from -> to", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("ms", no_wrap=True, justify="right")
    table.add_column("task / result", overflow="fold", min_width=24)
    _hop_rows(table, record.hops, "")
    parts: list[Any] = [title]
    if record.rerun_of is not None:
        parts.append(Text(f"a re-run of chain {record.rerun_of.chain_id} from hop {record.rerun_of.hop} "
                          "(the hops before it carried from there)", style="dim"))
    parts.append(table)
    if record.final_result:
        final = record.final_result.get("summary") or _brief(record.final_result, 400)
        parts.append(Text(f"final result: {final}"))
    if record.usage is not None:
        parts.append(Text(f"spent: {spent(record.usage, record.currency)}"))
        for agent, usage in record.usage_by_agent.items():
            parts.append(Text(f"  {agent}: {spent(usage, record.currency)}", style="dim"))
        for model, usage in record.usage.by_model.items():
            parts.append(Text(f"  {model}: {usage.tokens:,} tokens in {usage.model_calls:,} calls", style="dim"))
    if record.error:
        parts.append(Text(f"error: {record.error}", style=style))
    return Group(*parts)


def spent(usage: Usage, currency: str | None = None) -> str:
    """What a hop, an agent or a chain spent, in one line."""
    line = (f"{usage.tokens:,} tokens ({usage.prompt_tokens:,} prompt, {usage.completion_tokens:,} completion), "
            f"{usage.model_calls:,} model call{'s' if usage.model_calls != 1 else ''}")
    return line + (f", {usage.cost:.6g} {currency or ''}".rstrip() if usage.cost else "")


def _hop_rows(table: Table, hops: list[HopRecord], indent: str) -> None:
    """Each hop's row, then (for a hop that fanned out) each branch's row and its hops' rows,
    the tree's lines carried down the hop column."""
    for hop in hops:
        below = indent + ("│ " if hop.fan_out else "")
        table.add_row(Text(f"{indent}{hop.hop}\n{below}"), *_hop_cells(hop))
        if hop.fan_out is None:
            continue
        branches = hop.fan_out.branches
        for i, branch in enumerate(branches):
            last = i == len(branches) - 1
            inner = indent + ("  " if last else "│ ")
            head = Text(f"{indent}{'└' if last else '├'} b{hop.hop}.{branch.index}", style="bold")
            if branch.error or branch.cut:  # the branch's row has a second line
                head.append(f"\n{inner}")
            table.add_row(head, *_branch_cells(branch))
            _hop_rows(table, branch.hops, inner)


def _hop_cells(hop: HopRecord) -> tuple[Text, Text, str, Text]:
    outcome = hop.error or hop.result_data.get("summary") or _brief(hop.result_data)
    if hop.fallback_for:
        outcome = f"(fallback for {hop.fallback_for}) {outcome}"
    route = Text(f"{hop.from_agent} -> {hop.to_agent or '?'}")
    if hop.capability:
        route.append(f"\n{hop.capability.value}", style="dim")
    status = Text(hop.status.value, style=STATUS_STYLE.get(hop.status, "red"))
    status.append(f"\n{hop.attempts} attempt{'s' if hop.attempts != 1 else ''}", style="dim")
    if hop.build_id is not None:
        status.append(f"\nbuild {hop.build_id}", style="dim")
    if hop.carried_from is not None:
        status.append("\ncarried", style="dim")
    detail = Text(hop.task_description)
    if hop.kind is HopKind.JOIN:
        detail = Text.assemble(("join: ", "bold"), detail)
    elif hop.kind is HopKind.RETURN:
        detail = Text.assemble(("return: ", "bold"), detail)
    if hop.decision is not None:
        detail.append(f"\n{hop.decision.summary}", style="italic")
    if hop.approval is not None:
        approval = hop.approval
        said = (f"{approval.decision.replace('_', ' ')}" + (f" by {approval.by}" if approval.by else "")
                + (f": {approval.comment}" if approval.comment else "")) if approval.decision else "awaiting approval"
        detail.append(f"\n{said}", style="bold cyan")
    if hop.usage is not None:
        detail.append(f"\nspent {spent(hop.usage)}", style="dim")
    detail.append(f"\n{outcome or ''}", style="dim")
    return route, status, _ms(hop.duration_ms), detail


def _branch_cells(branch: BranchRecord) -> tuple[Text, Text, str, Text]:
    route = Text(branch.to_agent or (branch.capability.value if branch.capability else "?"), style="bold")
    status = Text(branch.status.value, style=STATUS_STYLE.get(branch.status, "red"))
    if branch.cut:
        status.append(f"\ncut: {branch.cut.replace('_', ' ')}", style="dim")
    detail = Text(branch.task_description, style="bold")
    if branch.error:
        detail.append(f"\n{branch.error}", style="dim")
    return route, status, _ms(branch.duration_ms), detail


def agents_table(statuses: list[AgentStatus], routings: dict[str, Routing | None] | None = None) -> Table:
    """Agents, laid out so ids and capabilities stay whole in 80 columns: name and version under
    the id (for a versioned agent, the version hops go to and a ramping one), one capability a
    line, the queue (live, queued/max, pollers) in one short column."""
    table = Table(title="registered agents", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("agent / name, version", no_wrap=True)
    table.add_column("capabilities", no_wrap=True)
    table.add_column("queue", no_wrap=True)
    for s in statuses:
        agent = Text(s.card.agent_id)
        agent.append(f"\n{s.card.name}, v{s.card.version}", style="dim")
        routing = (routings or {}).get(s.card.agent_id)
        if routing is not None:
            agent.append(f"\ncurrent {routing.current or '-'}", style="dim")
            if routing.ramping:
                agent.append(f", ramping {routing.ramping} {routing.ramping_percentage:g}%", style="dim")
        queue = Text("live" if s.stats.live else "down", style="green" if s.stats.live else "red")
        queue.append(f" {s.stats.backlog}/{s.card.max_concurrent}")
        queue.append(f"\n{s.stats.pollers} poller{'s' if s.stats.pollers != 1 else ''}", style="dim")
        table.add_row(agent, "\n".join(c.value for c in s.card.capabilities), queue)
    return table


def chains_table(rows: list[dict[str, Any]]) -> Table:
    """Chains found in visibility, laid out so chain ids and agent ids stay whole in 80 columns:
    the agents visited under the chain's id."""
    table = Table(title="chains", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("chain id / agents", no_wrap=True, min_width=36)
    table.add_column("status", no_wrap=True)
    table.add_column("depth", no_wrap=True, justify="right")
    table.add_column("started (UTC)", no_wrap=True)
    for row in rows:
        chain = Text(row["chain_id"])
        for agent in row["agents"]:
            chain.append(f"\n  {agent}", style="dim")
        started = row["started_at"]
        when = started.astimezone(timezone.utc).strftime("%m-%d %H:%M:%S") if started else ""
        status = Text(row["status"], style=STATUS_STYLE.get(_status(row["status"]), "red"))
        if row.get("cost") is not None:
            status.append(f"\nspent {row['cost']:.6g}", style="dim")
        table.add_row(chain, status, "" if row["depth"] is None else str(row["depth"]), when)
    return table


def _status(value: str) -> ChainStatus | None:
    try:
        return ChainStatus(value)
    except ValueError:
        return None

"""How chains and agents look on a terminal (rich tables)."""

from __future__ import annotations

import json
import os
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from handoff.models import ChainRecord, ChainStatus, HopStatus
from handoff.registry import AgentStatus

STATUS_STYLE = {
    ChainStatus.COMPLETED: "green", HopStatus.COMPLETED: "green",
    ChainStatus.RUNNING: "cyan", HopStatus.RUNNING: "cyan",
    ChainStatus.CANCELLED: "yellow", HopStatus.CANCELLED: "yellow",
    HopStatus.REFUSED: "magenta", ChainStatus.DEPTH_EXCEEDED: "magenta",
    ChainStatus.LOOP_DETECTED: "magenta", ChainStatus.REJECTED: "magenta",
}


def ui_url(chain_id: str, namespace: str = "default", base: str | None = None) -> str:
    """The chain's page in the Temporal Web UI (base: HANDOFF_UI_URL, default the embedded UI)."""
    base = base or os.environ.get("HANDOFF_UI_URL", "http://localhost:8233")
    return f"{base.rstrip('/')}/namespaces/{namespace}/workflows/{chain_id}"


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _brief(data: dict[str, Any], limit: int = 60) -> str:
    text = json.dumps(data, default=str, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def chain_table(record: ChainRecord) -> Group:
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
    for hop in record.hops:
        outcome = hop.error or hop.result_data.get("summary") or _brief(hop.result_data)
        if hop.fallback_for:
            outcome = f"(fallback for {hop.fallback_for}) {outcome}"
        route = Text(f"{hop.from_agent} -> {hop.to_agent or '?'}")
        if hop.capability:
            route.append(f"\n{hop.capability.value}", style="dim")
        status = Text(hop.status.value, style=STATUS_STYLE.get(hop.status, "red"))
        status.append(f"\n{hop.attempts} attempt{'s' if hop.attempts != 1 else ''}", style="dim")
        detail = Text(hop.task_description)
        detail.append(f"\n{outcome or ''}", style="dim")
        table.add_row(str(hop.hop), route, status, _ms(hop.duration_ms), detail)
    parts: list[Any] = [title, table]
    if record.final_result:
        final = record.final_result.get("summary") or _brief(record.final_result, 400)
        parts.append(Text(f"final result: {final}"))
    if record.error:
        parts.append(Text(f"error: {record.error}", style=style))
    return Group(*parts)


def agents_table(statuses: list[AgentStatus]) -> Table:
    table = Table(title="registered agents", title_justify="left")
    for column in ("agent", "name", "capabilities", "state", "pollers", "backlog", "load", "max", "version"):
        table.add_column(column)
    for s in statuses:
        table.add_row(
            s.card.agent_id, s.card.name, ", ".join(c.value for c in s.card.capabilities),
            Text("live", style="green") if s.stats.live else Text("down", style="red"),
            str(s.stats.pollers), str(s.stats.backlog), f"{s.load:.2f}",
            str(s.card.max_concurrent), s.card.version,
        )
    return table

"""How chains and agents look on a terminal (rich tables)."""

from __future__ import annotations

import json
import os
from typing import Any

from rich.console import Console, Group
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


def ui_url(chain_id: str, namespace: str = "default") -> str:
    """The chain's page in the Temporal Web UI (base from HANDOFF_UI_URL, default the embedded UI)."""
    base = os.environ.get("HANDOFF_UI_URL", "http://localhost:8233").rstrip("/")
    return f"{base}/namespaces/{namespace}/workflows/{chain_id}"


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
    for column in ("hop", "from", "to", "capability", "status", "tries", "ms", "result / error"):
        table.add_column(column, no_wrap=column != "result / error", overflow="fold")
    for hop in record.hops:
        detail = hop.error if hop.error else _brief(hop.result_data)
        if hop.fallback_for:
            detail = f"(fallback for {hop.fallback_for}) {detail}"
        table.add_row(
            str(hop.hop), hop.from_agent, hop.to_agent or "-",
            hop.capability.value if hop.capability else "",
            Text(hop.status.value, style=STATUS_STYLE.get(hop.status, "red")),
            str(hop.attempts), _ms(hop.duration_ms), detail or "",
        )
    parts: list[Any] = [title, table]
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

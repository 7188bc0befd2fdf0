"""`handoff follow`: a chain's events as they happen (`handoff.client.watch`), to its end. On a
terminal, the chain's record as a table that grows in place, with the latest events under it;
piped, one line per event; with `--json`, one JSON object per event."""

from __future__ import annotations

from collections import deque

import typer
from rich.console import Group
from rich.live import Live
from rich.text import Text

from handoff.cli.common import app, exit_for, fail, out, run
from handoff.cli.render import chain_table
from handoff.client import connect
from handoff.client.watch import ChainWatch
from handoff.models import ChainEvent, ChainRecord

SHOWN_EVENTS = 6
"""How many of the latest events a terminal shows under the chain's table."""


def _screen(watch: ChainWatch, latest: deque[ChainEvent], earlier: int) -> Group:
    parts = [chain_table(watch.record)] if watch.record is not None else [Text(f"chain {watch.chain_id}: waiting")]
    if earlier:
        parts.append(Text(f"({earlier} earlier events; --from-start lists them)", style="dim"))
    parts.extend(Text(event.line(), style="dim" if i < len(latest) - 1 else "") for i, event in enumerate(latest))
    return Group(*parts)


async def _follow(chain_id: str, after: int, from_start: bool, as_json: bool) -> ChainRecord | None:
    watch = ChainWatch(await connect(), chain_id, after=after)
    everything = from_start or after > 0
    earlier = 0
    if as_json or not out.is_terminal:
        async for event in watch:
            if not everything and watch.backlog:
                continue
            print(event.model_dump_json() if as_json else event.line(), flush=True)
        return watch.record
    latest: deque[ChainEvent] = deque(maxlen=SHOWN_EVENTS)
    with Live(_screen(watch, latest, 0), console=out, auto_refresh=False, transient=False) as live:
        async for event in watch:
            if not everything and watch.backlog:
                earlier += 1
                continue
            latest.append(event)
            live.update(_screen(watch, latest, earlier), refresh=True)
        live.update(_screen(watch, latest, earlier), refresh=True)
    return watch.record


@app.command()
def follow(
    chain_id: str = typer.Argument(..., help="the chain id"),
    from_start: bool = typer.Option(
        False, "--from-start", help="every event since the chain started, not only new ones"),
    after: int | None = typer.Option(None, "--after", help="the events after this cursor (resume where you left off)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per event on stdout"),
) -> None:
    """Watch a chain as it runs, until it ends: its hops as they are scheduled, report progress
    and end, its approvals, steering and fan-outs. Exits 0 when it completes, 1 otherwise."""
    if after is not None and after < 0:
        fail("--after takes a cursor from 0")
    if after is not None and from_start:
        fail("--after and --from-start do not go together")
    record = run(lambda: _follow(chain_id, after or 0, from_start, as_json))
    if record is not None:
        exit_for(record)


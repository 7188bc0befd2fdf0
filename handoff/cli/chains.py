"""The CLI's chain commands: start, show, list, cancel, approve, reject."""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
import time
from contextlib import aclosing
from typing import Any
from uuid import UUID

import typer
from temporalio.client import Client

from handoff.cli.common import (
    ChainStillRunning,
    OtelOption,
    app,
    exit_for,
    json_object_arg,
    out,
    print_record,
    run,
    say,
)
from handoff.cli.render import chains_table, ui_url
from handoff.client import (
    build_request,
    cancel_chain,
    connect,
    decide_approval,
    get_chain,
    start_request,
    rerun_chain,
    steer_chain,
    stop_chain,
)
from handoff.client.follow import follow_chain
from handoff.client.search import chain_query, find_chains, parse_since
from handoff.constants import agent_task_queue
from handoff.errors import InvalidRequest
from handoff.models import ChainRecord, ChainStatus
from handoff.observability.telemetry import Telemetry
from handoff.registry import queue_stats, registered_agents
from handoff.settings import Settings, settings


@app.command()
def start(
    task: str = typer.Option(..., "--task", help="what the first agent is asked to do"),
    to: str | None = typer.Option(None, "--to", help="first agent, by id"),
    capability: str | None = typer.Option(None, "--capability", help="first agent, by capability"),
    context: str | None = typer.Option(None, "--context", help="JSON object, or @file with one"),
    hop_timeout: float | None = typer.Option(None, "--hop-timeout", help="seconds per hop (default 60)"),
    max_depth: int | None = typer.Option(None, "--max-depth", help="at most this many hops (1-5)"),
    chain_id: str | None = typer.Option(None, "--id", help="chain id (a UUID); default a new one"),
    reuse_id: bool = typer.Option(
        False, "--reuse-id", help="with --id of a chain that has ended: start a new run under that id "
                                  "(`show` then shows the new run)"),
    fallback_agent: str | None = typer.Option(None, "--fallback-agent", help="agent to try when all else fails"),
    schedule_to_start: float | None = typer.Option(
        None, "--schedule-to-start", help="seconds before an agent counts as down (default 10)"),
    policy_arg: str | None = typer.Option(
        None, "--policy", help="the chain's whole policy (ChainPolicy: approvals, allowed handoffs, bounds, "
                               "budget) as a JSON object, or @file with one"),
    wait: bool = typer.Option(False, "--wait", help="wait for the chain to end and print its record"),
    wait_timeout: float | None = typer.Option(
        None, "--wait-timeout", min=1, help="with --wait: give up waiting after this many seconds (exit 1)"),
    as_json: bool = typer.Option(False, "--json", help="with --wait: only the record's JSON on stdout"),
    otel: bool = OtelOption,
) -> None:
    """Start a chain: print its id and Web UI link (or, with --wait, its record)."""

    async def go() -> ChainRecord | None:
        telemetry = Telemetry.start(tracing=otel)
        policy = json_object_arg(policy_arg, "--policy") if policy_arg is not None else {}
        for name, value in (("fallback_agent", fallback_agent), ("schedule_to_start_s", schedule_to_start)):
            if value is not None:
                if name in policy:
                    raise InvalidRequest(f"{name} is given twice: as an option and in --policy")
                policy[name] = value
        request = build_request(
            task_description=task, to_agent=to, capability=capability,
            context_data=json_object_arg(context), chain_id=chain_id,
            hop_timeout=hop_timeout, max_depth=max_depth, policy=policy,
        )
        client = await connect(tracing=telemetry.tracing)
        try:
            await start_request(client, request, reuse_id=reuse_id)
            link = ui_url(str(request.chain_id), client.namespace)
            if not (wait and as_json):
                out.print(f"chain [bold]{request.chain_id}[/bold] started")
                out.print(f"Web UI: {link}", soft_wrap=True)
            if to is not None:
                await _warn_if_nobody_serves(client, to, request.policy.schedule_to_start_s)
            return await _wait_telling_why(client, request.chain_id, wait_timeout) if wait else None
        finally:
            telemetry.flush()

    record = run(go)
    if record is not None:
        print_record(record, as_json)
        exit_for(record)


async def _warn_if_nobody_serves(client: Client, agent_id: str, schedule_to_start_s: float) -> None:
    """Say on stderr, at once, when the agent a chain was started at is neither registered nor
    polling its queue: its hop will fail unless a worker of it starts in time (a chain to an
    agent that starts later is not refused)."""
    try:
        if (await queue_stats(client, agent_task_queue(agent_id))).live:
            return
        registered = any(c.agent_id == agent_id for c in await registered_agents(client))
    except Exception:  # the chain is started: a failed check is no reason to fail the command
        return
    why = ("is registered but no worker of it is polling" if registered
           else "is not registered and no worker of it is polling")
    say(f"warning: agent {agent_id!r} {why}: its hop fails after {schedule_to_start_s:g}s unless one starts "
        "(`handoff agents` lists the registered agents)")


WAIT_NOTICE_S = 10.0
"""How often `--wait` reads the chain while it runs, to say why it still waits."""

WAIT_NOTICES = {
    "no_worker": "waiting: no chain worker has taken chain {chain_id} up yet "
                 "(is `handoff worker --chains` running on this server?)",
    "approval": "waiting: chain {chain_id} awaits approval: `handoff approve {chain_id}` "
                "or `handoff reject {chain_id} --reason ...`",
}


async def _wait_telling_why(client: Client, chain_id: UUID, timeout_s: float | None) -> ChainRecord:
    """Wait for the chain's end; say on stderr when no chain worker has taken it up or when it
    waits for a person's approval, and give up (`ChainStillRunning`, exit 1) after `timeout_s`."""
    started = time.monotonic()
    told: set[str] = set()

    async def followed() -> ChainRecord:
        async with aclosing(follow_chain(client, chain_id, every_s=WAIT_NOTICE_S)) as records:
            async for record in records:
                if record.status.ended:
                    return record
                notice = None
                if record.status is ChainStatus.AWAITING_APPROVAL:
                    notice = "approval"
                elif "no_worker" not in told and time.monotonic() - started >= WAIT_NOTICE_S * 0.9:
                    info = (await client.get_workflow_handle(str(chain_id)).describe()).raw_description
                    if info.workflow_execution_info.history_length <= 3:  # no workflow task completed
                        notice = "no_worker"
                if notice and notice not in told:
                    told.add(notice)
                    say(WAIT_NOTICES[notice].format(chain_id=chain_id))
        raise AssertionError("a followed chain always ends with its record")

    try:
        return await asyncio.wait_for(followed(), timeout_s)
    except TimeoutError:
        raise ChainStillRunning(f"chain {chain_id} is still running after {timeout_s:g}s; "
                                f"`handoff show {chain_id}` tells how it goes on") from None


@app.command()
def show(
    chain_id: str = typer.Argument(..., help="the chain id"),
    as_json: bool = typer.Option(False, "--json", help="the record as JSON"),
) -> None:
    """The chain's audit trail, rebuilt from workflow history (no worker needed)."""

    async def go() -> ChainRecord:
        return await get_chain(await connect(), chain_id)

    record = run(go)
    print_record(record, as_json)
    exit_for(record)


ENV_IDENTITY = Settings.env_name("identity")

ByOption = typer.Option(
    None, "--by", help=f"who decides (recorded in the hop entry); default ${ENV_IDENTITY}, else user@host")
HopOption = typer.Option(None, "--hop", help="the handoff id of the waiting hop, when several wait")
AskedByOption = typer.Option(
    None, "--by", help=f"who asks (recorded in the chain's record); default ${ENV_IDENTITY}, else user@host")


@app.command()
def cancel(
    chain_id: str = typer.Argument(..., help="the chain id"),
    after_hop: bool = typer.Option(
        False, "--after-hop", help="let the running hops finish (their results kept); start no new hop"),
    by: str | None = AskedByOption,
    reason: str = typer.Option("", "--reason", help="with --after-hop: why (recorded in the chain's error)"),
) -> None:
    """Cancel a running chain: its running hops are cancelled within about a second (or, with
    --after-hop, finish first)."""

    async def go() -> None:
        client = await connect()
        if after_hop:
            await stop_chain(client, chain_id, by=_identity(by), reason=reason)
        else:
            await cancel_chain(client, chain_id)

    run(go)
    out.print(f"chain {chain_id}: " + ("stops once its running hops end" if after_hop else "cancellation requested"))


@app.command()
def steer(
    chain_id: str = typer.Argument(..., help="the chain id"),
    message: str = typer.Option(..., "--message", help="what the next hop should know (its handler and model see it)"),
    by: str | None = AskedByOption,
    redirect: str | None = typer.Option(
        None, "--redirect", help="an agent id or a capability: the chain's next handoff goes there instead"),
) -> None:
    """Tell a running chain's next hop something new (and maybe where the next handoff goes)."""

    async def go():
        return await steer_chain(await connect(), chain_id, message=message, by=_identity(by), redirect=redirect)

    sent = run(go)
    out.print(f"chain {chain_id}: the next hop will hear it" + (f"; its next handoff goes to {sent.redirect}"
                                                               if sent.redirect else ""))


def _identity(by: str | None) -> str:
    if by is not None:
        return by
    return settings().identity or f"{getpass.getuser()}@{socket.gethostname()}"


def _decide(chain_id: str, approved: bool, by: str | None, comment: str, hop: str | None) -> None:
    async def go():
        return await decide_approval(await connect(), chain_id, approved=approved, by=_identity(by),
                                     comment=comment, handoff_id=hop)

    entry = run(go)
    verb = "approved" if approved else "rejected"
    out.print(f"chain {chain_id}: hop {entry.hop} {entry.from_agent} -> {entry.to_agent} {verb} "
              f"by {entry.approval.by if entry.approval else ''}", markup=False, highlight=False, soft_wrap=True)


@app.command()
def approve(
    chain_id: str = typer.Argument(..., help="the chain id"),
    comment: str = typer.Option("", "--comment", help="why (recorded in the hop entry)"),
    by: str | None = ByOption,
    hop: str | None = HopOption,
) -> None:
    """Approve the hop a chain waits on: it starts at once."""
    _decide(chain_id, True, by, comment, hop)


@app.command()
def reject(
    chain_id: str = typer.Argument(..., help="the chain id"),
    reason: str = typer.Option(..., "--reason", help="why (recorded; the chain ends rejected with it)"),
    by: str | None = ByOption,
    hop: str | None = HopOption,
) -> None:
    """Reject the hop a chain waits on: the chain (or its branch) ends rejected."""
    _decide(chain_id, False, by, reason, hop)


@app.command()
def rerun(
    chain_id: str = typer.Argument(..., help="the chain to re-run"),
    from_hop: int = typer.Option(..., "--from-hop", min=0, max=4, help="the hop to run again (its depth)"),
    to: str | None = typer.Option(None, "--to", help="run the hop on this agent instead"),
    capability: str | None = typer.Option(None, "--capability", help="run the hop by this capability instead"),
    task: str | None = typer.Option(None, "--task", help="ask the hop this instead"),
    context: str | None = typer.Option(None, "--context", help="the hop's context instead: JSON object, or @file"),
    policy_arg: str | None = typer.Option(None, "--policy", help="the re-run's policy instead: JSON object, or @file"),
    wait: bool = typer.Option(False, "--wait", help="wait for the re-run to end and print its record"),
    as_json: bool = typer.Option(False, "--json", help="with --wait: only the record's JSON on stdout"),
) -> None:
    """Re-run a chain from one of its hops: the hops before it are carried as they were (their
    agents are not called again), and the hop runs again."""

    async def go() -> ChainRecord | None:
        client = await connect()
        new_id = await rerun_chain(
            client, chain_id, from_hop=from_hop, to_agent=to, capability=capability, task_description=task,
            context_data=json_object_arg(context) if context is not None else None,
            policy=json_object_arg(policy_arg, "--policy") if policy_arg is not None else None)
        if not (wait and as_json):
            out.print(f"chain [bold]{new_id}[/bold] started: a re-run of {chain_id} from hop {from_hop}")
            out.print(f"Web UI: {ui_url(str(new_id), client.namespace)}", soft_wrap=True)
        return await _wait_telling_why(client, new_id, None) if wait else None

    record = run(go)
    if record is not None:
        print_record(record, as_json)
        exit_for(record)


@app.command("list")
def list_chains(
    agent: str | None = typer.Option(None, "--agent", help="chains that visited this agent"),
    status: str | None = typer.Option(None, "--status", help="running, completed, failed, ..."),
    since: str | None = typer.Option(None, "--since", help="started within 30m/2h/7d, or since an ISO time"),
    rerun_of: str | None = typer.Option(None, "--rerun-of", help="re-runs of this chain"),
    min_cost: float | None = typer.Option(None, "--min-cost", help="chains with a budget that spent at least this"),
    limit: int = typer.Option(20, "--limit", min=1, max=1000),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Find chains through search attributes (newest first)."""

    async def go() -> list[dict[str, Any]]:
        query = chain_query(agent=agent, status=status, rerun_of=rerun_of, min_cost=min_cost,
                            since=parse_since(since) if since is not None else None)
        return await find_chains(await connect(), query, limit=limit)

    rows = run(go)
    if as_json:
        print(json.dumps(rows, default=str, indent=2))
        return
    out.print(chains_table(rows))

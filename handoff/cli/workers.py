"""The CLI's fleet commands: run an agent's (or the chain) worker, list the agents, roll out a
version."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import structlog
import typer
from temporalio.client import Client

from handoff.agents.agent import Agent
from handoff.cli.common import (
    LogFormatOption,
    MetricsHostOption,
    MetricsPortOption,
    OtelOption,
    Usage,
    app,
    fail,
    one_line_errors,
    out,
    run,
)
from handoff.cli.render import agents_table
from handoff.client import capability_of, connect
from handoff.client.versioning import routing_of, set_current_build_id
from handoff.errors import HandoffError, ServerUnreachable
from handoff.models import check_agent_id
from handoff.observability.log import configure_logging
from handoff.observability.telemetry import Telemetry
from handoff.registry import agent_statuses
from handoff.workers.main import run_workers, stop_on_signals


@app.command()
def agents(as_json: bool = typer.Option(False, "--json")) -> None:
    """Registered agents: capabilities, live/down, load, and for versioned agents the version hops
    go to (current, and ramping)."""

    async def go():
        client = await connect()
        statuses = await agent_statuses(client)
        routings = await asyncio.gather(*(routing_of(client, s.card.agent_id) for s in statuses))
        return statuses, dict(zip((s.card.agent_id for s in statuses), routings))

    statuses, routings = run(go)
    if as_json:
        print(json.dumps([{**s.card.model_dump(mode="json"), **s.stats.model_dump(mode="json"), "load": s.load,
                           "routing": dataclasses.asdict(r) if (r := routings[s.card.agent_id]) else None}
                          for s in statuses], indent=2))
    else:
        out.print(agents_table(statuses, routings))


async def _connect_patiently(timeout_s: float, **options: Any) -> Client:
    """`connect`, retried with backoff while the server cannot be reached (a worker may start
    before its server), saying so; `ServerUnreachable` (exit 1) after `timeout_s`."""
    log = structlog.get_logger("handoff.worker")
    deadline, delay = time.monotonic() + timeout_s, 0.5
    while True:
        try:
            return await connect(**options)
        except ServerUnreachable as err:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("server_unreachable", error=str(err), retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def load_agents(spec: str, app_dir: str = ".") -> list[Agent]:
    """Import `module:object`, an Agent or a list of Agents, with `app_dir` (by default the
    current directory) first on the import path, as uvicorn, gunicorn and celery do."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise Usage(f"--agent takes MODULE:OBJECT, got {spec!r}")
    directory = str(Path(app_dir).resolve())
    if not Path(directory).is_dir():
        raise Usage(f"--app-dir {app_dir} is not a directory")
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any error while importing the user's module is bad input here
        raise Usage(f"cannot import {module_name!r}: {type(err).__name__}: {err}") from None
    obj = getattr(module, attr, None)
    found = obj if isinstance(obj, (list, tuple)) else [obj]
    if not found or not all(isinstance(a, Agent) for a in found):
        raise Usage(f"{spec} is not an Agent (or a list of Agents)")
    return list(found)


def _remote(url: str, agent_id: str | None, capabilities: list[str], then: str | None,
            token_env: str | None) -> Agent:
    from handoff.agents.remote import remote_agent

    if not url.startswith(("http://", "https://")):
        raise Usage(f"--a2a takes the A2A agent's http(s) URL, got {url!r}")
    if not agent_id or not capabilities:
        raise Usage("--a2a needs --a2a-id (its id in handoff) and at least one --capability")
    if then is not None:
        try:
            capability_of(then)
        except HandoffError:
            check_agent_id(then)
    return remote_agent(url, id=check_agent_id(agent_id), capabilities=[capability_of(c) for c in capabilities],
                        then=then, token_env=token_env)


@app.command()
def worker(
    agent: list[str] = typer.Option(
        [], "--agent", help="MODULE:OBJECT of an Agent (or a list of them), imported with --app-dir "
                            "first on the import path; repeatable"),
    app_dir: str = typer.Option(".", "--app-dir",
                                help="directory to import --agent modules from (default: the current one)"),
    chains: bool = typer.Option(False, "--chains", help="run the chain and registry worker"),
    log_format: str = LogFormatOption,
    metrics_port: int | None = MetricsPortOption,
    metrics_host: str = MetricsHostOption,
    otel: bool = OtelOption,
    versioned: bool = typer.Option(
        False, "--versioned", help="serve as a Worker Deployment version (see `handoff rollout`)"),
    build_id: str | None = typer.Option(
        None, "--build-id", help="with --versioned: the version (default: the agent's `version`)"),
    connect_timeout: float = typer.Option(
        60.0, "--connect-timeout", min=0, help="keep trying to reach the server this many seconds (then exit 1)"),
    a2a: str | None = typer.Option(
        None, "--a2a", help="URL of an A2A agent (where its card is) to serve as a handoff agent: its hops are "
                            "sent to it (with --a2a-id and --capability)"),
    a2a_id: str | None = typer.Option(None, "--a2a-id", help="with --a2a: the agent id it has in handoff"),
    capability: list[str] = typer.Option([], "--capability", help="with --a2a: a capability it serves; repeatable"),
    then: str | None = typer.Option(
        None, "--then", help="with --a2a: the agent id or capability the chain goes to after it (default: ends)"),
    a2a_token_env: str | None = typer.Option(
        None, "--a2a-token-env", help="with --a2a: environment variable with a bearer token for the A2A agent"),
) -> None:
    """Run one agent's worker (or the chain worker) until SIGTERM/SIGINT."""
    if not agent and not chains and not a2a:
        fail("give --agent MODULE:OBJECT, --a2a URL or --chains")
    if build_id is not None and not versioned:
        fail("--build-id goes with --versioned")
    if (a2a_id or capability or then or a2a_token_env) and not a2a:
        fail("--a2a-id, --capability, --then and --a2a-token-env go with --a2a")
    configure_logging("console" if log_format == "console" else "json")
    with one_line_errors():
        loaded = [a for spec in agent for a in load_agents(spec, app_dir)]
        if a2a:
            loaded.append(_remote(a2a, a2a_id, capability, then, a2a_token_env))
    if build_id is not None:
        loaded = [dataclasses.replace(a, version=build_id) for a in loaded]

    async def go() -> None:
        telemetry = Telemetry.start(metrics_port=metrics_port, metrics_host=metrics_host, tracing=otel)
        client = await _connect_patiently(connect_timeout, runtime=telemetry.runtime, tracing=telemetry.tracing)
        if telemetry.metrics_url:
            structlog.get_logger("handoff.worker").info("metrics_serving", url=telemetry.metrics_url)
        stop = asyncio.Event()
        stop_on_signals(stop)
        try:
            await run_workers(client, loaded, chains=chains, stop=stop, versioned=versioned)
        finally:
            telemetry.flush()

    run(go)


@app.command()
def rollout(
    agent_id: str = typer.Argument(..., help="the agent whose new version takes over"),
    build_id: str = typer.Argument(..., help="the version (build id) of its versioned workers"),
) -> None:
    """Route every later hop to AGENT (running chains included) to its workers of BUILD_ID."""

    async def go() -> None:
        await set_current_build_id(await connect(), agent_id, build_id)

    run(go)
    out.print(f"{agent_id}: hops now go to version {build_id}")

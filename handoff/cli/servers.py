"""The CLI's server commands: the embedded Temporal server, `handoff dev` (everything in one
process), the A2A server and the codec server. Each runs until SIGTERM or SIGINT. The credentials
of every HTTP server of the CLI (`handoff mcp --http` too) are built by `server_auth`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import typer

from handoff.cli.common import (
    CodecEndpointOption,
    MetricsHostOption,
    MetricsPortOption,
    OtelOption,
    app,
    fail,
    one_line_errors,
    out,
    run,
    run_loop,
)
from handoff.client import connect
from handoff.constants import DEFAULT_UI_ORIGINS
from handoff.observability.log import configure_logging
from handoff.observability.telemetry import Telemetry
from handoff.servers.embedded import EmbeddedServer
from handoff.servers.http import BearerAuth
from handoff.settings import settings, token_list
from handoff.workers.main import stop_on_signals


@app.command()
def server(
    port: int = typer.Option(7233, "--port"),
    ui_port: int = typer.Option(8233, "--ui-port"),
    db: str | None = typer.Option(".handoff/temporal.db", "--db", help="database file ('' for memory)"),
    ip: str = typer.Option("127.0.0.1", "--ip"),
    codec_endpoint: str | None = CodecEndpointOption,
) -> None:
    """The embedded Temporal server alone (tuned, search attributes registered)."""
    embedded = EmbeddedServer(port=port, ui_port=ui_port, db=db or None, ip=ip, codec_endpoint=codec_endpoint)

    async def go() -> None:
        stop = _stop_on_signals()
        embedded.start()
        out.print(f"Temporal server on {embedded.address}, Web UI {embedded.ui_url}")
        exited = asyncio.ensure_future(asyncio.to_thread(embedded.process.wait))
        try:
            await asyncio.wait({exited, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await asyncio.to_thread(embedded.stop)

    run(go)


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
    mcp_port: int = typer.Option(
        8400, "--mcp-port", min=0, max=65535, help="serve MCP (streamable HTTP at /mcp) on this loopback port; 0: not"),
    console_port: int = typer.Option(
        8300, "--console-port", min=0, max=65535, help="serve the console on this loopback port; 0: not"),
    metrics_port: int | None = MetricsPortOption,
    metrics_host: str = MetricsHostOption,
    otel: bool = OtelOption,
    codec_endpoint: str | None = CodecEndpointOption,
) -> None:
    """Embedded server + chain worker + every example agent + the A2A and MCP servers and the console
    in one process (Ctrl-C stops)."""
    from handoff.cli.dev import run_dev
    from handoff.payloads.codec import CodecSettings

    configure_logging("console" if log_format == "console" else "json", level="WARNING")
    embedded = EmbeddedServer(port=port, ui_port=ui_port, db=db or None, codec_endpoint=codec_endpoint)
    model = None
    with one_line_errors():
        CodecSettings.from_env()  # bad codec settings: one line, before anything starts
        if llm:
            from handoff.servers.local_model import LocalModel

            model = LocalModel().start()
            os.environ["OPENAI_BASE_URL"], os.environ["OPENAI_API_KEY"] = model.url, "local"
        telemetry = Telemetry.start(metrics_port=metrics_port, metrics_host=metrics_host, tracing=otel)
        embedded.start()
    try:
        code = run_loop(run_dev(embedded, out, demo=demo, exit_after_demo=exit_after_demo,
                                telemetry=telemetry, approve=approve, llm_url=model.url if model else None,
                                a2a_port=a2a_port or None, mcp_port=mcp_port or None,
                                console_port=console_port or None))
    except KeyboardInterrupt:
        code = 0
    except OSError as err:  # a port of the A2A or MCP server or the console in use, or not ours to bind
        asked = [f"{what} on port {p}" for what, p in (("A2A", a2a_port), ("MCP", mcp_port), ("the console", console_port))
                 if p]
        fail(f"handoff dev cannot serve {', '.join(asked[:-1])}{' or ' if len(asked) > 1 else ''}{asked[-1]}: "
             f"{err.strerror or err} (--a2a-port 0, --mcp-port 0 or --console-port 0 turns one off)")
    finally:
        telemetry.flush()
        embedded.stop()
        if model is not None:
            model.stop()
    raise typer.Exit(code)


JwksOption = typer.Option(None, "--jwks-url", help="accept JWTs signed by a key of this JWKS")
IssuerOption = typer.Option(None, "--jwt-issuer", help="with --jwks-url: the issuer (iss) required")
AudienceOption = typer.Option(None, "--jwt-audience", help="with --jwks-url: the audience (aud) required")
HostOption = typer.Option("127.0.0.1", "--host",
                          help="address to listen on (beyond loopback: authentication required)")


def server_auth(tokens: str, operator_tokens: str = "", *, jwks_url: str | None, jwt_issuer: str | None,
                jwt_audience: str | None) -> BearerAuth:
    """A server's credentials: the bearer tokens of its settings (comma separated), its operators'
    tokens, and the JWTs `--jwks-url`, `--jwt-issuer` and `--jwt-audience` say it accepts."""
    return BearerAuth(tokens=token_list(tokens), operator_tokens=token_list(operator_tokens), jwks_url=jwks_url,
                      issuer=jwt_issuer, audience=jwt_audience)


def credential_checks(auth: BearerAuth) -> str:
    """What a server says it asks of its callers, as it starts."""
    return "bearer credential required" if auth.configured else "no credential (loopback only)"


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, from now on (before the server can answer a request)."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    return stop


def _serve_until_signalled(start: Callable[[], Awaitable[Callable[[], Awaitable[None]]]], host: str,
                           port: int) -> None:
    """Start a server (`start` returns how to stop it) and serve until SIGTERM or SIGINT; a port in
    use, or not ours to bind, is one line and exit 2."""

    async def go() -> None:
        stop = _stop_on_signals()
        close = await start()
        try:
            await stop.wait()
        finally:
            await close()

    try:
        run(go)
    except OSError as err:
        fail(f"cannot serve on {host}:{port}: {err.strerror or err}")


@app.command("a2a-server")
def a2a_server(
    port: int = typer.Option(8090, "--port", min=1, max=65535),
    host: str = HostOption,
    public_url: str | None = typer.Option(
        None, "--public-url", help="the URL clients reach it at, for the cards (default http://HOST:PORT)"),
    jwks_url: str | None = JwksOption,
    jwt_issuer: str | None = IssuerOption,
    jwt_audience: str | None = AudienceOption,
    allowed_host: list[str] = typer.Option(
        [], "--allowed-host", help="another Host header to answer (e.g. a2a.example.com:443); repeatable"),
    allowed_origin: list[str] = typer.Option(
        [], "--allowed-origin", help="a web page origin allowed to call it from a browser (CORS); repeatable"),
    grpc_port: int | None = typer.Option(
        None, "--grpc-port", min=0, max=65535, help="also serve the gRPC binding on this port of --host (0: any free "
                                                    "port); off unless given"),
    grpc_public_url: str | None = typer.Option(
        None, "--grpc-public-url", help="the gRPC target clients reach, for the cards (default HOST:GRPC-PORT)"),
) -> None:
    """Serve A2A: agent cards from the registry, and chains as A2A tasks, over JSON-RPC and REST
    (and gRPC with --grpc-port). Bearer tokens it accepts: HANDOFF_A2A_TOKENS (each caller sees its
    own tasks) and HANDOFF_A2A_OPERATOR_TOKENS (every chain); push notifications to the hosts in
    HANDOFF_A2A_PUSH_HOSTS."""
    from handoff.a2a.push import PushPolicy
    from handoff.a2a.server import A2AServer

    async def start():
        env = settings()
        auth = server_auth(env.a2a_tokens, env.a2a_operator_tokens, jwks_url=jwks_url, jwt_issuer=jwt_issuer,
                           jwt_audience=jwt_audience)
        server = await A2AServer(await connect(), host=host, port=port, auth=auth, public_url=public_url,
                                 allowed_hosts=allowed_host, allowed_origins=allowed_origin, grpc_port=grpc_port,
                                 grpc_public_url=grpc_public_url, push=PushPolicy.from_settings(env)).start()
        grpc = f"; gRPC on {server.grpc_url}" if server.grpc_url else ""
        out.print(f"A2A server on {server.url}: card {server.url}/.well-known/agent-card.json{grpc}; "
                  f"{credential_checks(auth)}", soft_wrap=True)
        return server.stop

    _serve_until_signalled(start, host, port)


@app.command("codec-server")
def codec_server(
    port: int = typer.Option(8081, "--port", min=1, max=65535),
    host: str = HostOption,
    ui_origin: list[str] = typer.Option(
        list(DEFAULT_UI_ORIGINS), "--ui-origin", help="Web UI origin allowed to call it; repeatable"),
    allowed_host: list[str] = typer.Option(
        [], "--allowed-host", help="another Host header to answer (e.g. codec.example.com:443); repeatable"),
    jwks_url: str | None = JwksOption,
    jwt_issuer: str | None = IssuerOption,
    jwt_audience: str | None = AudienceOption,
    allow_encode: bool = typer.Option(
        False, "--allow-encode", help="also serve POST /encode (ciphertext under the deployment's key)"),
) -> None:
    """Decode payloads for the Web UI and `temporal --codec-endpoint`, with the codec the HANDOFF_*
    variables configure. Bearer tokens it accepts: HANDOFF_CODEC_TOKENS (comma separated)."""
    from handoff.payloads.codec import codec_from_env
    from handoff.servers.codec import start_codec_server

    async def start():
        auth = server_auth(settings().codec_tokens, jwks_url=jwks_url, jwt_issuer=jwt_issuer,
                           jwt_audience=jwt_audience)
        runner = await start_codec_server(codec_from_env(strict=False), host=host, port=port, ui_origins=ui_origin,
                                          allowed_hosts=allowed_host, auth=auth, allow_encode=allow_encode)
        out.print(f"codec server on http://{host}:{port} for {', '.join(ui_origin)}; {credential_checks(auth)}")
        return runner.cleanup

    _serve_until_signalled(start, host, port)


@app.command()
def console(
    port: int = typer.Option(8300, "--port", min=1, max=65535),
    host: str = HostOption,
    public_url: str | None = typer.Option(
        None, "--public-url", help="the URL people reach it at (behind a proxy, say); its host is answered too"),
    allowed_host: list[str] = typer.Option(
        [], "--allowed-host", help="another Host header to answer (e.g. console.example.com:443); repeatable"),
    jwks_url: str | None = JwksOption,
    jwt_issuer: str | None = IssuerOption,
    jwt_audience: str | None = AudienceOption,
) -> None:
    """The console: the approvals inbox, chains as live trees, the fleet, for people in a browser.
    Who may use it: HANDOFF_CONSOLE_PROXY_HEADER (from HANDOFF_CONSOLE_PROXY_ADDRESSES),
    HANDOFF_CONSOLE_TOKENS, JWTs; what they may do: HANDOFF_CONSOLE_ROLES. Without any, loopback only."""
    from handoff.console import ConsoleAuth, ConsoleServer

    async def start():
        auth = ConsoleAuth.from_settings(settings(), server_auth("", jwks_url=jwks_url, jwt_issuer=jwt_issuer,
                                                                 jwt_audience=jwt_audience))
        server = await ConsoleServer(await connect(), host=host, port=port, auth=auth, public_url=public_url,
                                     allowed_hosts_extra=allowed_host).start()
        who = "people sign in" if auth.configured else "no sign-in (loopback only): you are an operator"
        out.print(f"console on {server.url}/; {who}", soft_wrap=True)
        return server.stop

    _serve_until_signalled(start, host, port)

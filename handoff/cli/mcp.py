"""`handoff mcp`: handoff as an MCP server, over stdio (for a client that starts it) or, with
`--http`, over streamable HTTP until SIGTERM or SIGINT (docs/mcp.md)."""

from __future__ import annotations

import typer

from handoff.cli.common import app, fail, out, run
from handoff.cli.servers import (
    AudienceOption,
    HostOption,
    IssuerOption,
    JwksOption,
    _serve_until_signalled,
    credential_checks,
    server_auth,
)
from handoff.client import connect
from handoff.settings import settings


@app.command()
def mcp(
    http: bool = typer.Option(False, "--http", help="serve streamable HTTP on --host:--port (default: stdio)"),
    host: str = HostOption,
    port: int = typer.Option(8400, "--port", min=1, max=65535, help="with --http: the port"),
    jwks_url: str | None = JwksOption,
    jwt_issuer: str | None = IssuerOption,
    jwt_audience: str | None = AudienceOption,
    allowed_host: list[str] = typer.Option(
        [], "--allowed-host", help="with --http: another Host header to answer (e.g. mcp.example.com:443); repeatable"),
    allowed_origin: list[str] = typer.Option(
        [], "--allowed-origin", help="with --http: a web page origin allowed to call it from a browser; repeatable"),
) -> None:
    """Serve handoff's chains and agents as MCP tools and resources: over stdio, or with --http over
    streamable HTTP. Bearer tokens it accepts: HANDOFF_MCP_TOKENS (each caller sees its own chains)
    and HANDOFF_MCP_OPERATOR_TOKENS (every chain)."""
    try:
        from handoff.mcp import McpHttpServer, handoff_mcp
    except ImportError as err:
        fail(f"handoff mcp needs the MCP SDK ({err.name}): pip install 'handoff[mcp]'")
    if not http:
        if jwks_url or allowed_host or allowed_origin:
            fail("--jwks-url, --allowed-host and --allowed-origin are for --http: over stdio the caller is "
                 "the process that started the server")

        async def over_stdio() -> None:
            await handoff_mcp(await connect()).run_stdio_async()

        run(over_stdio)
        return

    async def start():
        env = settings()
        auth = server_auth(env.mcp_tokens, env.mcp_operator_tokens, jwks_url=jwks_url, jwt_issuer=jwt_issuer,
                           jwt_audience=jwt_audience)
        server = await McpHttpServer(await connect(), host=host, port=port, auth=auth, allowed_hosts=allowed_host,
                                     allowed_origins=allowed_origin).start()
        out.print(f"MCP server on {server.url}; {credential_checks(auth)}", soft_wrap=True, markup=False)
        return server.stop

    _serve_until_signalled(start, host, port)

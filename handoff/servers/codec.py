"""The codec server (`handoff codec-server`): lets the Temporal Web UI and
`temporal workflow show --codec-endpoint` show compressed and encrypted payloads in the clear.

POST /decode (and, when enabled, POST /encode) take and return JSON `Payloads` (protobuf JSON, as
the UI and the CLI send it) and run them through the same codec chain as `handoff.client.chains.connect`.
It holds the decryption keys, so every request is checked before anything is decoded, as
Temporal's guidance for codec servers asks:

- its `Host` must be one this server answers to (no DNS rebinding), else 403;
- its `Origin`, when it has one (a browser's request), must be an allowed Web UI origin, else 403;
- with authentication configured, its `Authorization: Bearer` credential must be one of the
  configured tokens or a JWT signed by a key of the configured JWKS, with the configured issuer
  and audience (the Web UI can pass its signed-in user's access token), else 401.

Without authentication it serves loopback only: `start_codec_server` refuses any other address.
`/encode` produces ciphertext under the deployment's key and is off unless asked for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.converter import PayloadCodec

from handoff.payloads.codec import PayloadDecodeError
from handoff.constants import DEFAULT_UI_ORIGINS
from handoff.servers.http import BearerAuth, BearerVerifier, host_refusal, origin_refusal
from handoff.servers.http import allowed_hosts as allowed_hosts_of
from handoff.settings import Settings

DEFAULT_PORT = 8081
ALLOWED_HEADERS = "content-type, x-namespace, authorization"
ENV_TOKENS = Settings.env_name("codec_tokens")
MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""Temporal's largest inline payload is 2 MB; as base64 in JSON it is about 2.7 MB."""

Transform = Callable[[Sequence[Payload]], Awaitable[list[Payload]]]




def codec_app(
    codec: PayloadCodec | None,
    ui_origins: Sequence[str] = DEFAULT_UI_ORIGINS,
    *,
    allowed_hosts: Sequence[str] | None = None,
    auth: BearerAuth = BearerAuth(),
    allow_encode: bool = False,
) -> web.Application:
    """The aiohttp application; `codec` None passes payloads through unchanged. `allowed_hosts`:
    the `Host` values to answer (None: any, for an application mounted elsewhere)."""
    origins = {o.rstrip("/") for o in ui_origins}
    hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
    verifier = BearerVerifier(auth) if auth.configured else None

    def cors(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        origin = request.headers.get("Origin", "")
        if origin.rstrip("/") in origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Access-Control-Max-Age"] = "600"
            response.headers["Vary"] = "Origin"
        return response

    def refusal(request: web.Request, status: int, reason: str) -> web.StreamResponse:
        return cors(request, web.json_response({"error": reason}, status=status))

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        refused = host_refusal(request.headers.get("Host", ""), hosts) if hosts is not None else None
        if refused:
            return web.json_response({"error": refused}, status=403)
        origin = request.headers.get("Origin")
        if origin_refusal(origin, sorted(origins)):
            return web.json_response({"error": f"origin {origin} is not an allowed Web UI origin"}, status=403)
        if request.method == "OPTIONS":  # a preflight carries no credential
            return await handler(request)
        if verifier is not None and await verifier.identity(request.headers.get("Authorization")) is None:
            return refusal(request, 401, "a valid bearer credential is required")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return refusal(request, 413, f"the request is over {MAX_REQUEST_BYTES:,} bytes")

    def handler(transform: Transform | None) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                payloads = json_format.Parse(await request.read(), Payloads())
            except (json_format.ParseError, UnicodeDecodeError, ValueError) as err:
                return refusal(request, 400, f"not JSON Payloads: {err}")
            try:
                result = list(payloads.payloads) if transform is None else await transform(payloads.payloads)
            except PayloadDecodeError as err:
                return refusal(request, 400, str(err))
            body = json_format.MessageToJson(Payloads(payloads=result))
            return cors(request, web.Response(text=body, content_type="application/json"))

        return handle

    async def preflight(request: web.Request) -> web.StreamResponse:
        return cors(request, web.Response(status=204))

    app = web.Application(middlewares=[guard], client_max_size=MAX_REQUEST_BYTES)
    app.router.add_post("/decode", handler(codec.decode if codec else None))
    app.router.add_route("OPTIONS", "/decode", preflight)
    if allow_encode:
        app.router.add_post("/encode", handler(codec.encode if codec else None))
        app.router.add_route("OPTIONS", "/encode", preflight)
    return app


async def start_codec_server(
    codec: PayloadCodec | None, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
    ui_origins: Sequence[str] = DEFAULT_UI_ORIGINS, allowed_hosts: Sequence[str] = (),
    auth: BearerAuth = BearerAuth(), allow_encode: bool = False,
) -> web.AppRunner:
    """Serve `codec_app` on host:port until the returned runner's `cleanup()`. Beyond loopback
    only with authentication; `allowed_hosts` adds `Host` values (e.g. a DNS name and port)."""
    auth.require_on(host, "the codec server holds the decryption keys",
                    f"{ENV_TOKENS}, or --jwks-url with --jwt-issuer and --jwt-audience")
    app = codec_app(codec, ui_origins, allowed_hosts=sorted(allowed_hosts_of(host, port, allowed_hosts)),
                    auth=auth, allow_encode=allow_encode)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner

"""The codec server (`handoff codec-server`): lets the Temporal Web UI and
`temporal workflow show --codec-endpoint` show compressed and encrypted payloads in the clear.

POST /encode and POST /decode take and return JSON `Payloads` (protobuf JSON, as the UI and the
CLI send it) and run them through the same codec chain as `handoff.client.connect`. The Web UI
calls it from the browser, so it answers CORS for the UI's origin. It holds the decryption keys:
serve it only where the people who may read chain contexts can reach it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.converter import PayloadCodec

from handoff.codec import PayloadDecodeError

DEFAULT_PORT = 8081
DEFAULT_UI_ORIGIN = "http://localhost:8233"
ALLOWED_HEADERS = "content-type, x-namespace, authorization"

Transform = Callable[[Sequence[Payload]], Awaitable[list[Payload]]]


def codec_app(codec: PayloadCodec | None, ui_origins: Sequence[str] = (DEFAULT_UI_ORIGIN,)) -> web.Application:
    """The aiohttp application; `codec` None passes payloads through unchanged."""
    origins = {o.rstrip("/") for o in ui_origins}

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

    def handler(transform: Transform | None) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                payloads = json_format.Parse(await request.read(), Payloads())
            except json_format.ParseError as err:
                return cors(request, web.json_response({"error": f"not JSON Payloads: {err}"}, status=400))
            try:
                result = list(payloads.payloads) if transform is None else await transform(payloads.payloads)
            except PayloadDecodeError as err:
                return cors(request, web.json_response({"error": str(err)}, status=400))
            body = json_format.MessageToJson(Payloads(payloads=result))
            return cors(request, web.Response(text=body, content_type="application/json"))

        return handle

    async def preflight(request: web.Request) -> web.StreamResponse:
        return cors(request, web.Response(status=204))

    app = web.Application()
    app.router.add_post("/encode", handler(codec.encode if codec else None))
    app.router.add_post("/decode", handler(codec.decode if codec else None))
    app.router.add_route("OPTIONS", "/encode", preflight)
    app.router.add_route("OPTIONS", "/decode", preflight)
    return app


async def start_codec_server(
    codec: PayloadCodec | None, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
    ui_origins: Sequence[str] = (DEFAULT_UI_ORIGIN,),
) -> web.AppRunner:
    """Serve `codec_app` on host:port until the returned runner's `cleanup()`."""
    runner = web.AppRunner(codec_app(codec, ui_origins), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner

"""What every HTTP server of handoff checks before it does anything (the codec server, the A2A
server, and any added later):

- the `Host` header must be one the server answers to (its own address on loopback, the public
  URL it was told, and the hosts it was given): a web page reached by DNS rebinding gets 403;
- a browser's `Origin`, when there is one, must be an origin the server was told to answer
  (none by default), else 403; CORS headers only for those;
- who calls: bearer tokens and/or JWTs checked against a JWKS URL with a required issuer and
  audience; with neither configured a server listens on loopback only, and its callers are one
  local principal;
- how much: a request body over the server's bound is refused (413) before it is kept whole,
  and each caller has at most so many requests in flight (429).

`HttpGuard` is the ASGI middleware that does all of it; the codec server (aiohttp) applies the
same functions in its own middleware."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from handoff.errors import InvalidRequest

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
JWT_ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA"]
OPERATOR_SCOPE = "handoff:operator"
"""The JWT scope (in `scope` or `scp`) of a caller who may see and decide every chain."""
LOCAL = "local"
"""The one caller of a server without authentication (it listens on loopback only)."""
MAX_IN_FLIGHT = 16
"""Requests one caller may have in flight at once (streams and waits included)."""


class AuthRefused(InvalidRequest):
    """A server cannot be started as asked (e.g. beyond loopback without authentication)."""


@dataclass(frozen=True)
class Principal:
    """Who calls: a name (a JWT's subject, `token-N` for the Nth configured token, or `local`),
    and whether it is an operator: one that may see and decide every chain, not only its own."""

    name: str
    operator: bool = False
    scopes: frozenset[str] = frozenset()
    """A JWT's scopes (none for a token)."""


@dataclass(frozen=True)
class BearerAuth:
    """Bearer tokens and/or JWTs signed by a key of a JWKS (with their issuer and audience).
    `operator_tokens` are tokens of operators; a JWT carrying `operator_scope` is an operator's."""

    tokens: tuple[str, ...] = field(default=(), repr=False)
    jwks_url: str | None = None
    issuer: str | None = None
    audience: str | None = None
    operator_tokens: tuple[str, ...] = field(default=(), repr=False)
    operator_scope: str = OPERATOR_SCOPE

    @property
    def configured(self) -> bool:
        return bool(self.tokens or self.operator_tokens or self.jwks_url)

    def __post_init__(self) -> None:
        if self.jwks_url and not (self.issuer and self.audience):
            raise AuthRefused("a JWKS URL needs the JWT issuer and audience it must check")

    def require_on(self, host: str, what: str, how: str) -> None:
        """Refuse to serve `what` on `host` beyond loopback without authentication (`how`: how to
        configure it)."""
        if not is_loopback(host) and not self.configured:
            raise AuthRefused(f"{what}: to listen on {host} beyond loopback, configure authentication ({how})")


class BearerVerifier:
    """Checks an `Authorization` header against a `BearerAuth`."""

    def __init__(self, auth: BearerAuth) -> None:
        self._auth = auth
        self._jwks = None
        if auth.jwks_url:
            import jwt  # PyJWT: only a deployment that checks JWTs needs it loaded

            self._jwt = jwt
            self._jwks = jwt.PyJWKClient(auth.jwks_url, cache_keys=True, lifespan=300, timeout=5)

    async def identity(self, header: str | None) -> str | None:
        """Who the credential in `header` is; None when it is missing or not valid."""
        principal = await self.principal(header)
        return principal.name if principal is not None else None

    async def principal(self, header: str | None) -> Principal | None:
        """The caller the credential in `header` names (a JWT's subject, or `token-N` /
        `operator-N` for a configured token); None when it is missing or not valid."""
        scheme, _, credential = (header or "").partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return None
        for kind, tokens, operator in (("token", self._auth.tokens, False),
                                       ("operator", self._auth.operator_tokens, True)):
            for index, token in enumerate(tokens):
                if hmac.compare_digest(credential.encode(), token.encode()):
                    return Principal(f"{kind}-{index + 1}", operator)
        if self._jwks is None:
            return None
        return await asyncio.to_thread(self._jwt_principal, credential)

    def _jwt_principal(self, token: str) -> Principal | None:
        try:
            key = self._jwks.get_signing_key_from_jwt(token)
            claims = self._jwt.decode(token, key.key, algorithms=JWT_ALGORITHMS, issuer=self._auth.issuer,
                                      audience=self._auth.audience, options={"require": ["exp", "iss", "aud"]})
        except (self._jwt.PyJWTError, ValueError, KeyError):
            return None
        scopes = claims.get("scope") or claims.get("scp") or ""
        scopes = scopes.split() if isinstance(scopes, str) else [str(s) for s in scopes]
        return Principal(f"jwt:{claims.get('sub') or 'anonymous'}", self._auth.operator_scope in scopes,
                         frozenset(scopes))


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, for a server to listen on; the `OSError` of a port in use
    (or not ours to bind) is raised here, as the system says it, before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class AsgiServer:
    """An ASGI application served by uvicorn in this process's event loop on host:port, until
    `stop()` (the A2A and MCP servers' and the console's). `start()` binds the socket first, so a
    port in use, or not ours to bind, is the system's `OSError`, raised before anything serves."""

    def __init__(self, app: Any, host: str, port: int, *, what: str, lifespan: str = "off") -> None:
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     lifespan=lifespan, access_log=False))
        self._address, self._what = (host, port), what
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = bound_socket(*self._address)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                sock.close()
                self._task.result()
                raise OSError(f"{self._what} stopped before it started")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task


def allowed_hosts(host: str, port: int, extra: Iterable[str] = ()) -> set[str]:
    """The `Host` header values a server on host:port answers to: its loopback names (and its own
    address when it listens on one), plus `extra` (`name:port`, e.g. a public URL's)."""
    names = {*LOOPBACK_NAMES, *([] if host in ("0.0.0.0", "::", "") else [host])}
    hosts = {f"[{n}]:{port}" if ":" in n else f"{n}:{port}" for n in names}
    return {h.lower() for h in (*hosts, *extra)}


def host_of_url(url: str) -> str:
    """A URL's `Host` header value (`name:port`, the default port spelled out)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 80)
    name = parts.hostname or ""
    return (f"[{name}]:{port}" if ":" in name else f"{name}:{port}").lower()


def host_refusal(host_header: str, allowed: set[str]) -> str | None:
    """Why a request with this `Host` is refused, or None. A header without a port means the
    scheme's default port."""
    given = host_header.strip().lower()
    if given in allowed or (":" not in given.rsplit("]", 1)[-1] and f"{given}:80" in allowed):
        return None
    return "this server does not answer to that host"


def origin_refusal(origin: str | None, allowed: Sequence[str]) -> str | None:
    """Why a request with this `Origin` is refused (a browser's request from a page of another
    origin), or None (no origin: not a browser's cross-site request)."""
    if origin is None or origin.rstrip("/") in {o.rstrip("/") for o in allowed}:
        return None
    return f"origin {origin} is not allowed"


class HttpGuard:
    """ASGI middleware applying the checks above to every HTTP request, in order: Host, Origin
    (and CORS preflights for allowed origins), the body bound, the caller (`scope["user"]` and
    `scope["auth"]` for the application: a Starlette user named after the principal, whose scopes
    say `operator` for an operator), and its requests in flight (`in_flight`: a counter shared
    with another binding of the same server). `public`: paths served to anyone who passes the
    Host and Origin checks (a server's public card)."""

    def __init__(self, app: Any, *, hosts: set[str], origins: Sequence[str] = (), auth: BearerAuth = BearerAuth(),
                 max_body_bytes: int, public: Sequence[str] = (), max_in_flight: int = MAX_IN_FLIGHT,
                 in_flight: Counter[str] | None = None) -> None:
        self.app, self._hosts, self._origins = app, hosts, tuple(o.rstrip("/") for o in origins)
        self._verifier = BearerVerifier(auth) if auth.configured else None
        self._max_body, self._public, self._max_in_flight = max_body_bytes, tuple(public), max_in_flight
        # requests in flight per caller; a server with another binding (A2A's gRPC) shares it
        self._in_flight: Counter[str] = in_flight if in_flight is not None else Counter()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        refusal = host_refusal(headers.get("host", ""), self._hosts) or origin_refusal(origin, self._origins)
        if refusal:
            await _answer(send, 403, refusal)
            return
        cors = self._cors(origin)
        if scope["method"] == "OPTIONS" and origin is not None:  # a preflight carries no credential
            await _answer(send, 204, None, cors)
            return
        principal = await self._principal(headers.get("authorization"))
        if principal is None and scope["path"] not in self._public:
            await _answer(send, 401, "a valid bearer credential is required", {**cors, "www-authenticate": "Bearer"})
            return
        body, refused = await _bounded_body(receive, headers, self._max_body)
        if refused:
            await _answer(send, 413, refused, cors)
            return
        who = principal.name if principal is not None else ""
        if self._in_flight[who] >= self._max_in_flight:
            await _answer(send, 429, f"more than {self._max_in_flight} requests in flight", {**cors, "retry-after": "1"})
            return
        if principal is not None:
            from starlette.authentication import AuthCredentials, SimpleUser

            scope = {**scope, "user": SimpleUser(principal.name),
                     "auth": AuthCredentials(["authenticated", *(["operator"] if principal.operator else [])])}
        self._in_flight[who] += 1
        try:
            await _until_disconnected(self.app(scope, _replay(body, receive), _with_headers(send, cors)), receive)
        finally:
            self._in_flight[who] -= 1
            if not self._in_flight[who]:
                del self._in_flight[who]

    async def _principal(self, header: str | None) -> Principal | None:
        if self._verifier is None:
            return Principal(LOCAL, operator=True)
        return await self._verifier.principal(header)

    def _cors(self, origin: str | None) -> dict[str, str]:
        if origin is None or origin.rstrip("/") not in self._origins:
            return {}
        return {"access-control-allow-origin": origin, "vary": "Origin",
                "access-control-allow-methods": "GET, POST, OPTIONS",
                "access-control-allow-headers": "authorization, content-type, a2a-version, a2a-extensions",
                "access-control-max-age": "600"}


async def _bounded_body(receive: Any, headers: dict[str, str], limit: int) -> tuple[bytes, str | None]:
    """The request's body, read up to `limit` bytes; past it (declared or as it arrives) nothing
    is kept and the reason is returned."""
    declared = headers.get("content-length", "")
    too_large = f"the request body is over {limit:,} bytes"
    if declared.isdigit() and int(declared) > limit:
        return b"", too_large
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", "the client went away"
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return b"", too_large
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts), None


async def _until_disconnected(handling: Any, receive: Any) -> None:
    """Handle a request until it is answered, or until its client goes away: then the handling
    is cancelled (a caller that stopped waiting for a chain stops its following too)."""
    task = asyncio.ensure_future(handling)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await task
    except asyncio.CancelledError:
        if not watcher.done() or watcher.cancelled():
            raise  # cancelled from outside, not by the client going away
    finally:
        watcher.cancel()


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that gives the application the body already read, then the connection's own
    messages (a disconnect)."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _with_headers(send: Any, extra: dict[str, str]) -> Any:
    if not extra:
        return send

    async def sending(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []),
                                              *((k.encode(), v.encode()) for k, v in extra.items())]}
        await send(message)

    return sending


async def _answer(send: Any, status: int, error: str | None, headers: dict[str, str] | None = None) -> None:
    body = b"" if error is None else json.dumps({"error": error}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *((k.encode(), v.encode()) for k, v in (headers or {}).items())]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})

"""handoff's console: pages for the people around the agents, served by `handoff console` (and
`handoff dev`) at `http://HOST:PORT/`.

- `/`: the approvals inbox, every hop waiting for a person, oldest first;
- `/chains`: chains by status, agent, start time and cost, newest first;
- `/chains/<id>`: one chain as a tree that grows as the chain runs (its `/events`, Server-Sent
  Events from `watch_chain`, tell the page to fetch its `/tree` again), with the actions a
  person's role allows, each behind a confirmation page;
- `/agents`: the fleet.

Pages are rendered on the server by jinja2 templates with autoescaping on: nothing from a chain
(a task, a result, a reason) is ever markup. The console reads only through the client API and
the chain's stream; payloads are decoded by the client's data converter, so a deployment that
encrypts them (`HANDOFF_ENCRYPTION_KEYS`) shows them to the console's users as the codec server
would.

`ConsoleGuard` makes the checks every request passes: its `Host`, a browser's `Origin` (the
console's own only), the body bound, the person (`handoff.console.auth`), and for every request
that changes something the cross-site request forgery token of the person's forms."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode
from uuid import UUID

import structlog
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from temporalio.client import Client

from handoff.cli.render import ui_url
from handoff.client import approve_chain, cancel_chain, reject_chain, rerun_chain, steer_chain, stop_chain
from handoff.client.changes import short
from handoff.client.search import parse_since
from handoff.console.auth import SESSION_COOKIE, SESSION_S, ConsoleAuth, People, Person, Role
from handoff.console.views import ChainView, chain_view, chains, fleet, hop_of, inbox, why_of
from handoff.errors import ChainNotFound, HandoffError, InvalidRequest
from handoff.models import HopRecord, HopStatus
from handoff.servers.events import chain_events_route
from handoff.servers.http import AsgiServer, allowed_hosts, host_of_url, host_refusal

log = structlog.get_logger("handoff.console")
HERE = Path(__file__).parent
DEFAULT_PORT = 8300
MAX_FORM_BYTES = 64 * 1024
"""A form's body at most (a comment, a steering message, a token)."""
MAX_TEXT_CHARS = 2000
MAX_RESULT_CHARS = 4000
ACTIONS = {
    "approve": Role.APPROVER, "reject": Role.APPROVER,
    "steer": Role.OPERATOR, "cancel": Role.OPERATOR, "stop": Role.OPERATOR, "rerun": Role.OPERATOR,
}
"""What a person may ask of a chain, and the least role that may."""
PUBLIC_PATHS = ("/signin", "/static/")


class ConsoleGuard:
    """ASGI middleware: Host, Origin, body bound, person, and the forgery check of every POST.
    The person is `scope["person"]` for the pages."""

    def __init__(self, app: Any, *, hosts: set[str], origins: set[str], people: People) -> None:
        self.app, self._hosts, self._origins, self._people = app, hosts, origins, people

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        if host_refusal(headers.get("host", ""), self._hosts):
            await _plain(send, 403, "this console does not answer to that host")
            return
        if origin is not None and origin.rstrip("/").lower() not in self._origins:
            await _plain(send, 403, f"a page of {origin[:100]} may not use this console")
            return
        if scope["method"] not in ("GET", "HEAD", "POST"):
            await _plain(send, 405, "the console takes GET and POST only")
            return
        declared = headers.get("content-length", "")
        if scope["method"] == "POST" and not (declared.isdigit() and int(declared) <= MAX_FORM_BYTES):
            await _plain(send, 413, f"a form is at most {MAX_FORM_BYTES:,} bytes, with its length said")
            return
        peer = scope["client"][0] if scope.get("client") else None
        person = await self._people.person(headers, peer, _cookie(headers.get("cookie", "")))
        public = scope["path"] == "/signin" or scope["path"].startswith("/static/")
        if person is None and not public:
            if scope["method"] == "GET" and "text/html" in headers.get("accept", ""):
                await _redirect(send, f"/signin?next={quote(scope['path'])}")
            else:
                await _plain(send, 401, "sign in to use the console", {"www-authenticate": "Bearer"})
            return
        await self.app({**scope, "person": person}, receive, send)


def _cookie(header: str) -> str | None:
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == SESSION_COOKIE:
            return value.strip('"')
    return None


async def _plain(send: Any, status: int, text: str, headers: dict[str, str] | None = None) -> None:
    body = (text + "\n").encode()
    head = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
            *((k.encode(), v.encode()) for k, v in (headers or {}).items())]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Any, location: str) -> None:
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", location.encode()), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


class Console:
    """The console's pages over `client`, for the people `auth` knows."""

    def __init__(self, client: Client, auth: ConsoleAuth, *, ui_base: str | None = None) -> None:
        self.client, self.auth, self.ui_base = client, auth, ui_base
        self.people = People(auth)
        self.templates = Environment(loader=FileSystemLoader(HERE / "templates"),
                                     autoescape=select_autoescape(default=True, default_for_string=True))
        self.templates.globals.update(ui_url=self._ui_url, why_of=why_of, HopStatus=HopStatus)
        self.templates.filters.update(when=_when, ms=_ms, status=_status_label, pretty=_pretty,
                                      brief=lambda value: short(value, 100))

    def app(self) -> Starlette:
        routes = [
            Route("/", self.inbox_page),
            Route("/chains", self.chains_page),
            Route("/chains/{chain_id}", self.chain_page),
            Route("/chains/{chain_id}/tree", self.tree_part),
            chain_events_route("/chains/{chain_id}/events", self.client, self._may_watch),
            Route("/chains/{chain_id}/confirm/{action}", self.confirm_page),
            Route("/chains/{chain_id}/do/{action}", self.act, methods=["POST"]),
            Route("/agents", self.agents_page),
            Route("/signin", self.signin_page, methods=["GET", "POST"]),
            Route("/signout", self.signout, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        return Starlette(routes=routes, exception_handlers={HandoffError: self._failed})

    # pages

    async def inbox_page(self, request: Request) -> Response:
        page = _whole(request.query_params.get("page"), 1)
        return self._page(request, "inbox.html", box=await inbox(self.client, page))

    async def chains_page(self, request: Request) -> Response:
        params = request.query_params
        status, agent = params.get("status") or None, params.get("agent") or None
        since_text, cost_text, before_text = params.get("since", ""), params.get("min_cost", ""), params.get("before")
        try:
            since = parse_since(since_text) if since_text else None
            min_cost = float(cost_text) if cost_text else None
            before = datetime.fromisoformat(before_text) if before_text else None
        except ValueError:
            raise InvalidRequest("a filter is malformed: since takes 30m, 2h, 7d or a time, min_cost a number")
        found = await chains(self.client, status=status, agent=agent, since=since, min_cost=min_cost, before=before)
        filters = {"status": status or "", "agent": agent or "", "since": since_text, "min_cost": cost_text}
        following = urlencode({**{k: v for k, v in filters.items() if v}, "before": found.before}) \
            if found.before else None
        return self._page(request, "chains.html", found=found, filters=filters, following=following)

    async def chain_page(self, request: Request) -> Response:
        view = await self._view(request)
        return self._page(request, "chain.html", view=view, notice=request.query_params.get("done", "")[:200])

    async def tree_part(self, request: Request) -> Response:
        view = await self._view(request)
        return self._page(request, "tree.html", view=view, headers={"cache-control": "no-store"})

    async def agents_page(self, request: Request) -> Response:
        return self._page(request, "agents.html", fleet=await fleet(self.client))

    async def confirm_page(self, request: Request) -> Response:
        action = self._action(request)
        view = await self._view(request)
        hop = self._hop(request, view, action)
        return self._page(request, "confirm.html", view=view, action=action, hop=hop,
                          decided=hop if hop is not None and hop.status is not HopStatus.AWAITING_APPROVAL else None)

    async def act(self, request: Request) -> Response:
        """Carry out a confirmed action; a decision someone else made first is shown, not repeated."""
        action = self._action(request)
        person: Person = request.scope["person"]
        form = await request.form(max_files=0, max_fields=16)
        if not self.people.csrf_valid(person, str(form.get("csrf", ""))):
            return self._page(request, "error.html", status=403,
                              message="this form did not come from the console (its forgery token is missing "
                                      "or wrong): open the page again and confirm there")
        text = {k: str(form.get(k, ""))[:MAX_TEXT_CHARS].strip() for k in ("comment", "message", "redirect", "hop")}
        view = await self._view(request)
        chain_id = view.record.chain_id
        hop = self._hop(request, view, action, text["hop"])
        if action in ("approve", "reject"):
            assert hop is not None
            if hop.status is not HopStatus.AWAITING_APPROVAL:
                return self._page(request, "confirm.html", view=view, action=action, hop=hop, decided=hop)
            if not person.may_decide(hop):
                return self._page(request, "error.html", status=403,
                                  message=f"{person.name} may not decide hops to {hop.to_agent}")
        try:
            done = await self._carry_out(action, chain_id, person, text, hop)
        except InvalidRequest:
            if hop is None or action not in ("approve", "reject"):
                raise
            view = await self._view(request)  # decided by someone else since the page was read?
            now = hop_of(view.record, hop.handoff_id) if hop.handoff_id else None
            if now is None or now.status is HopStatus.AWAITING_APPROVAL:
                raise
            return self._page(request, "confirm.html", view=view, action=action, hop=now, decided=now)
        log.info("console_action", action=action, chain_id=str(chain_id), by=person.name)
        return RedirectResponse(f"/chains/{chain_id}?{urlencode({'done': done})}", status_code=303)

    async def _carry_out(self, action: str, chain_id: UUID, person: Person, text: dict[str, str],
                         hop: HopRecord | None) -> str:
        handoff_id = hop.handoff_id if hop is not None else None
        if action == "approve":
            await approve_chain(self.client, chain_id, by=person.name, comment=text["comment"], handoff_id=handoff_id)
            return f"approved by {person.name}"
        if action == "reject":
            if not text["comment"]:
                raise InvalidRequest("a rejection needs a reason")
            await reject_chain(self.client, chain_id, by=person.name, reason=text["comment"], handoff_id=handoff_id)
            return f"rejected by {person.name}"
        if action == "steer":
            await steer_chain(self.client, chain_id, message=text["message"], by=person.name,
                              redirect=text["redirect"] or None)
            return f"steered by {person.name}"
        if action == "cancel":
            await cancel_chain(self.client, chain_id)
            return f"cancel asked by {person.name}"
        if action == "stop":
            await stop_chain(self.client, chain_id, by=person.name, reason=text["comment"])
            return f"stop after the running hops asked by {person.name}"
        assert hop is not None  # rerun
        new_id = await rerun_chain(self.client, chain_id, from_hop=hop.hop,
                                   memo={"console": {"by": person.name}})
        return f"re-run from hop {hop.hop} as chain {new_id}"

    async def signin_page(self, request: Request) -> Response:
        target = request.query_params.get("next", "/")
        target = target if target.startswith("/") and not target.startswith(("//", "/\\")) else "/"
        if request.method == "GET":
            return self._page(request, "signin.html", target=target)
        form = await request.form(max_files=0, max_fields=4)
        person = await self.people.from_credential(str(form.get("token", "")).strip())
        if person is None:
            return self._page(request, "signin.html", status=401, target=target, message="that token is not valid")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, self.people.session_cookie(person), max_age=SESSION_S, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        return response

    async def signout(self, request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=4)
        person = request.scope["person"]
        if not self.people.csrf_valid(person, str(form.get("csrf", ""))):
            return self._page(request, "error.html", status=403, message="this form did not come from the console")
        response = RedirectResponse("/signin", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # helpers

    async def _may_watch(self, request: Request, chain_id: str) -> bool:
        return request.scope.get("person") is not None  # every role may see every chain

    async def _view(self, request: Request) -> ChainView:
        chain_id = request.path_params["chain_id"]
        try:
            UUID(chain_id)
        except ValueError:
            raise ChainNotFound(chain_id[:64]) from None
        return await chain_view(self.client, chain_id)

    def _action(self, request: Request) -> str:
        action = request.path_params["action"]
        least = ACTIONS.get(action)
        if least is None:
            raise InvalidRequest(f"the console does not {action[:40]!r} chains")
        person: Person = request.scope["person"]
        if person.role < least:
            raise Refused(f"{person.name} ({person.role.name.lower()}) may not {action} chains")
        return action

    def _hop(self, request: Request, view: ChainView, action: str, given: str = "") -> HopRecord | None:
        """The hop an action is about (approve, reject and rerun name one)."""
        if action not in ("approve", "reject", "rerun"):
            return None
        text = given or request.query_params.get("hop", "")
        try:
            hop = hop_of(view.record, UUID(text))
        except ValueError:
            hop = None
        if hop is None:
            raise InvalidRequest(f"chain {view.record.chain_id} has no hop {text[:64]!r}")
        return hop

    def _page(self, request: Request, name: str, *, status: int = 200, headers: dict[str, str] | None = None,
              **values: Any) -> Response:
        person: Person | None = request.scope.get("person")
        values = {"person": person, "csrf": self.people.csrf_token(person) if person else "",
                  "signin": self.auth.configured, "path": request.url.path, "Role": Role, **values}
        body = self.templates.get_template(name).render(**values)
        return HTMLResponse(body, status, headers={"content-security-policy": CSP, "x-frame-options": "DENY",
                                                   "referrer-policy": "same-origin", **(headers or {})})

    async def _failed(self, request: Request, err: Exception) -> Response:
        status = 404 if isinstance(err, ChainNotFound) else 403 if isinstance(err, Refused) else 400
        message = " ".join(str(err).split())[:300]
        return self._page(request, "error.html", status=status, message=message)

    def _ui_url(self, view: ChainView, hop: HopRecord | None = None) -> str:
        """The chain's page in the Web UI, or the event that scheduled `hop`'s activity."""
        event_id = view.events.get(hop.handoff_id) if hop is not None and hop.handoff_id else None
        return ui_url(str(view.record.chain_id), self.client.namespace, self.ui_base, view.run_id, event_id)


class Refused(InvalidRequest):
    """A person asked for what their role does not allow."""


CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
"""Only the console's own script and style run on its pages: markup that got into a page could
not run even if it were not escaped."""


def _whole(text: str | None, default: int) -> int:
    return int(text) if text and text.isdigit() and len(text) < 7 else default


def _when(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(timezone.utc).isoformat(timespec="seconds")


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f} ms" if value < 10_000 else f"{value / 1000:,.1f} s"


def _pretty(value: Any) -> str:
    """A result as indented JSON, cut at `MAX_RESULT_CHARS` (the page is for reading, `handoff show
    --json` for the whole)."""
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return text if len(text) <= MAX_RESULT_CHARS else text[:MAX_RESULT_CHARS] + "\n…"


STATUS_MARKS = {"completed": "✓", "failed": "✗", "timed_out": "✗", "unreachable": "✗", "refused": "⊘",
                "cancelled": "⊘", "rejected": "⊘", "budget_exceeded": "⊘", "running": "▶",
                "awaiting_approval": "‖"}


def _status_label(value: Any) -> str:
    """A status as a mark and words (the page never says it by colour alone)."""
    text = str(getattr(value, "value", value) or "")
    return f"{STATUS_MARKS.get(text, '•')} {text.replace('_', ' ')}"


class ConsoleServer:
    """The console at `http://HOST:PORT/`, served by uvicorn in this event loop until `stop()`."""

    def __init__(self, client: Client, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 auth: ConsoleAuth | None = None, public_url: str | None = None,
                 allowed_hosts_extra: Sequence[str] = (), ui_base: str | None = None) -> None:
        auth = auth or ConsoleAuth()
        auth.require_on(host)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.url = public_url.rstrip("/") if public_url else f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"
        extra = [h.lower() for h in allowed_hosts_extra] + ([host_of_url(public_url)] if public_url else [])
        self._hosts = allowed_hosts(host, port, extra)
        origins = {f"http://{h}" for h in self._hosts} | {f"https://{h}" for h in self._hosts}
        origins |= {o.removesuffix(":80") for o in origins if o.startswith("http://")}
        origins |= {o.removesuffix(":443") for o in origins if o.startswith("https://")}
        console = Console(client, auth, ui_base=ui_base)
        guarded = ConsoleGuard(console.app(), hosts=self._hosts, origins=origins, people=console.people)
        self._served = AsgiServer(guarded, host, port, what="the console")

    async def start(self) -> ConsoleServer:
        """Serve; an `OSError` when the port is in use or not ours to bind."""
        await self._served.start()
        return self

    async def stop(self) -> None:
        await self._served.stop()

"""The console (`handoff console`), over HTTP: the inbox shows a hop that waits, with what its
approver needs; a decision is made by the signed-in person, once; who may not decide is refused;
forged, foreign and malformed requests are refused; nothing from a chain is rendered as markup.
The browser's view of the same pages is tests/test_console_browser.py."""

from __future__ import annotations

import asyncio
import json
import re
from html import unescape

import httpx
import pytest

from handoff import ChainStatus, cancel_chain, start_chain, wait_chain
from handoff.console import ConsoleAuth, ConsoleServer, Role
from handoff.console.auth import People, parse_roles
from handoff.constants import HOP_ACTIVITY
from handoff.errors import InvalidRequest, PermanentError
from handoff.servers.embedded import free_port
from handoff.settings import settings
from tests.support import cli, make_agent, running
from tests.test_codec_server import jwks  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("chains", "one_inbox_page")

PROXY = "X-Forwarded-User"
ROLES = "alice=approver, carol=approver:DEPLOYMENT, ops=operator, victor=viewer"


def proxied(**extra: str) -> ConsoleAuth:
    """People signed in by a proxy on loopback, with the roles above, and one console token."""
    env = settings({"HANDOFF_CONSOLE_PROXY_HEADER": PROXY, "HANDOFF_CONSOLE_PROXY_ADDRESSES": "127.0.0.1",
                    "HANDOFF_CONSOLE_ROLES": ROLES, "HANDOFF_CONSOLE_TOKENS": "bob=bob-token-1", **extra})
    return ConsoleAuth.from_settings(env)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page[:500]
    return match[1]


def as_person(name: str) -> dict[str, str]:
    return {PROXY: name}


async def test_an_approver_decides_a_waiting_hop_from_the_inbox_once_and_others_are_refused(client, uid):
    lead, release = f"lead-{uid}", f"release-{uid}"

    async def hand(ctx):
        return ctx.handoff(to_agent=release, task_description="ship <b>v2</b>", require_approval=True,
                           result_data={"tests": "<script>alert(1)</script> all green"})

    async def ship(ctx):
        return ctx.complete({"shipped": True})

    server = await ConsoleServer(client, port=free_port(), auth=proxied()).start()
    try:
        async with running(client, make_agent(lead, hand), make_agent(release, ship)), \
                httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            chain_id = await start_chain(client, to_agent=lead, task_description="release v2")
            inbox = ""
            for _ in range(100):
                inbox = (await http.get("/", headers=as_person("victor"))).text
                if str(chain_id) in inbox:
                    break
                await asyncio.sleep(0.2)
            assert str(chain_id) in inbox
            # what the approver needs, as text: the task, the earlier hop's result, no markup
            assert "ship &lt;b&gt;v2&lt;/b&gt;" in inbox and "<b>v2</b>" not in inbox
            assert "&lt;script&gt;alert(1)&lt;/script&gt; all green" in inbox and "<script>alert" not in inbox
            assert f"{lead} handed it to {release}" in inbox
            assert "Approve…" not in inbox  # a viewer is offered no decision
            hop_id = re.search(rf'/chains/{chain_id}/confirm/approve\?hop=([0-9a-f-]+)',
                               (await http.get("/", headers=as_person("alice"))).text)[1]

            confirm = await http.get(f"/chains/{chain_id}/confirm/approve?hop={hop_id}", headers=as_person("alice"))
            assert confirm.status_code == 200 and "Recorded as <strong>alice</strong>" in confirm.text
            token = csrf_of(confirm.text)
            do = f"/chains/{chain_id}/do/approve"
            origin = {"Origin": server.url}

            refused = await http.post(do, data={"hop": hop_id}, headers={**as_person("alice"), **origin})
            assert refused.status_code == 403 and "forgery token" in refused.text  # no token
            refused = await http.post(do, data={"hop": hop_id, "csrf": token},
                                      headers={**as_person("alice"), "Origin": "https://evil.example"})
            assert refused.status_code == 403  # a foreign page
            refused = await http.post(do, data={"hop": hop_id, "csrf": token},
                                      headers={**as_person("alice"), **origin, "Host": "evil.example"})
            assert refused.status_code == 403  # DNS rebinding
            viewer = await http.get(f"/chains/{chain_id}/confirm/approve?hop={hop_id}", headers=as_person("victor"))
            assert viewer.status_code == 403
            refused = await http.post(do, data={"hop": hop_id, "csrf": csrf_of(confirm.text)},
                                      headers={**as_person("victor"), **origin})
            assert refused.status_code == 403  # alice's token is not victor's, and victor is a viewer
            scoped = await http.get(f"/chains/{chain_id}/confirm/approve?hop={hop_id}", headers=as_person("carol"))
            carol_token = csrf_of(scoped.text)
            refused = await http.post(do, data={"hop": hop_id, "csrf": carol_token},
                                      headers={**as_person("carol"), **origin})
            assert refused.status_code == 403 and "may not decide hops to" in refused.text  # not her capability
            spoofed = await http.post(do, data={"hop": hop_id, "comment": "me", "csrf": token},
                                      headers={"X-Forwarded-For": "alice", **origin})
            assert spoofed.status_code == 401  # nobody signed in

            done = await http.post(do, data={"hop": hop_id, "comment": "looks good", "csrf": token},
                                   headers={**as_person("alice"), **origin})
            assert done.status_code == 303 and "approved+by+alice" in done.headers["location"]
            record = await asyncio.wait_for(wait_chain(client, chain_id), 30)
            assert record.status is ChainStatus.COMPLETED
            entry = next(h for h in record.all_hops() if h.approval is not None)
            assert (entry.approval.by, entry.approval.comment) == ("alice", "looks good")

            again = await http.post(do, data={"hop": hop_id, "comment": "me too", "csrf": csrf_of(
                (await http.get(f"/chains/{chain_id}", headers=as_person("ops"))).text)},
                headers={**as_person("ops"), **origin})
            assert again.status_code == 200 and "no longer waiting" in again.text and "alice" in again.text
            entry = next(h for h in (await wait_chain(client, chain_id)).all_hops() if h.approval is not None)
            assert (entry.approval.by, entry.approval.comment) == ("alice", "looks good")
            page = await http.get(f"/chains/{chain_id}", headers=as_person("victor"))
            assert "by <strong class=\"decider\">alice</strong>" in page.text
            assert "<script>alert" not in page.text and "&lt;script&gt;" in page.text
            assert "script-src 'self'" in page.headers["content-security-policy"]
            await links_go_to_the_events_that_scheduled_the_hops(client, chain_id, page.text)
    finally:
        await server.stop()


async def links_go_to_the_events_that_scheduled_the_hops(client, chain_id, page: str) -> None:
    """Each hop's Web UI link names the chain's run and the event whose activity input is the hop's."""
    history = await client.get_workflow_handle(str(chain_id)).fetch_history()
    scheduled = {event.event_id: json.loads(attrs.input.payloads[0].data) for event in history.events
                 if (attrs := event.activity_task_scheduled_event_attributes).activity_type.name == HOP_ACTIVITY}
    links = re.findall(r'id="hop-([0-9a-f-]+)".*?href="[^"]*/workflows/([^"/]+)/([^"/]+)/history/events/(\d+)"',
                       page, re.S)
    assert len(links) == len(scheduled) == 2
    for hop_id, workflow_id, run_id, event_id in links:
        assert (workflow_id, run_id) == (str(chain_id), history.run_id)
        assert scheduled[int(event_id)]["context"]["handoff_id"] == hop_id


async def test_sign_in_with_a_token_gives_a_session_and_bad_requests_get_one_clear_answer(client):
    server = await ConsoleServer(client, port=free_port(), auth=proxied()).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            first = await http.get("/", headers={"Accept": "text/html"})
            assert first.status_code == 303 and first.headers["location"].startswith("/signin")
            assert (await http.get("/chains")).status_code == 401
            bad = await http.post("/signin", data={"token": "nope"})
            assert bad.status_code == 401 and "not valid" in bad.text
            signed = await http.post("/signin?next=/agents", data={"token": "bob-token-1"})
            assert signed.status_code == 303 and signed.headers["location"] == "/agents"
            cookie = signed.headers["set-cookie"]
            assert "HttpOnly" in cookie and "SameSite=strict" in cookie
            page = await http.get("/agents")
            assert page.status_code == 200 and ">bob<" in page.text and "(viewer)" in page.text
            elsewhere = await http.post("/signin?next=//evil.example", data={"token": "bob-token-1"})
            assert elsewhere.headers["location"] == "/"  # no open redirect
            backslash = await http.post("/signin?next=/%5Cevil.example", data={"token": "bob-token-1"})
            assert backslash.headers["location"] == "/"
            http.cookies.clear()
            http.cookies.set("handoff_console", "forged.value")
            assert (await http.get("/chains")).status_code == 401
            headers = as_person("ops")
            assert (await http.get("/chains/not-a-uuid", headers=headers)).status_code == 404
            assert (await http.get("/chains/00000000-0000-4000-8000-000000000000", headers=headers)).status_code == 404
            assert (await http.get("/chains?status=bogus", headers=headers)).status_code == 400
            assert (await http.get("/chains?since=yesterday", headers=headers)).status_code == 400
            assert (await http.get("/chains/00000000-0000-4000-8000-000000000000/confirm/explode",
                                   headers=headers)).status_code == 400
            huge = await http.post("/signin", content=b"token=" + b"x" * 70_000,
                                   headers={"Content-Type": "application/x-www-form-urlencoded"})
            assert huge.status_code == 413
            assert (await http.request("DELETE", "/", headers=headers)).status_code == 405
            assert (await http.get("/", headers={**headers, "Host": "evil.example:80"})).status_code == 403
    finally:
        await server.stop()


def test_roles_and_the_people_behind_requests():
    roles = parse_roles(ROLES)
    assert roles["carol"] == (Role.APPROVER, frozenset({"DEPLOYMENT"}))
    for bad in ("alice", "alice=boss", "=viewer", "ops=operator:DEPLOYMENT"):
        with pytest.raises(InvalidRequest):
            parse_roles(bad)
    with pytest.raises(InvalidRequest, match="PROXY_ADDRESSES"):
        ConsoleAuth.from_settings(settings({"HANDOFF_CONSOLE_PROXY_HEADER": PROXY}))
    with pytest.raises(InvalidRequest, match="NAME=TOKEN"):
        ConsoleAuth.from_settings(settings({"HANDOFF_CONSOLE_TOKENS": "just-a-token"}))
    with pytest.raises(InvalidRequest, match="beyond loopback"):
        ConsoleAuth().require_on("0.0.0.0")
    proxied().require_on("0.0.0.0")  # a proxy's header is enough to listen beyond loopback
    people = People(proxied())

    async def who(headers, peer):
        return await people.person({k.lower(): v for k, v in headers.items()}, peer, None)

    assert asyncio.run(who(as_person("alice"), "127.0.0.1")).role is Role.APPROVER
    assert asyncio.run(who(as_person("alice"), "10.0.0.9")) is None  # the header from anyone but the proxy
    assert asyncio.run(who(as_person("x" * 500), "127.0.0.1")) is None
    assert asyncio.run(who({"Authorization": "Bearer bob-token-1"}, "10.0.0.9")).name == "bob"
    local = asyncio.run(People(ConsoleAuth()).person({}, "127.0.0.1", None))
    assert local.role is Role.OPERATOR and local.name
    alice = asyncio.run(who(as_person("alice"), "127.0.0.1"))
    other = People(proxied())  # another process with its own secret
    assert people.csrf_valid(alice, people.csrf_token(alice)) and not other.csrf_valid(alice, people.csrf_token(alice))
    assert people._from_session(people.session_cookie(alice)).name == "alice"
    assert people._from_session(people.session_cookie(alice, now=0)) is None  # expired
    from handoff.console import Person
    signed = people._from_session(people.session_cookie(Person("jwt-operator", Role.OPERATOR)))
    assert signed.role is Role.OPERATOR  # the role it signed in with (a JWT's scope), not the setting's viewer
    assert people._from_session("garbage") is None and people._from_session("a.b.c") is None


async def test_the_console_command_refuses_what_it_cannot_serve_in_one_line(cli_env):
    proc = await cli(cli_env, "console", "--host", "0.0.0.0", "--port", str(free_port()))
    assert proc.returncode == 2 and "beyond loopback" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = await cli({**cli_env, "HANDOFF_CONSOLE_ROLES": "alice=boss"}, "console", "--port", str(free_port()))
    assert proc.returncode == 2 and "roles:" in unescape(proc.stderr)


async def _confirmed(http, chain_id, action, person, query="", **fields):
    """Open an action's confirmation page as `person`, and post its form with `fields`."""
    page = await http.get(f"/chains/{chain_id}/confirm/{action}{query}", headers=as_person(person))
    assert page.status_code == 200, page.text[:300]
    return await http.post(f"/chains/{chain_id}/do/{action}", data={"csrf": csrf_of(page.text), **fields},
                           headers={**as_person(person), "Origin": str(http.base_url).rstrip("/")})


async def test_an_operator_steers_stops_cancels_and_re_runs_and_an_approver_may_not(client, uid):
    first, second = f"first-{uid}", f"second-{uid}"
    holding = asyncio.Event()
    seen = []

    async def lead(ctx):
        await holding.wait()
        return ctx.handoff(to_agent=second, task_description="carry on")

    async def follow(ctx):
        seen.append([s.message for s in ctx.steering])
        return ctx.complete({"steered_by": [s.by for s in ctx.steering]})

    async def slow(ctx):
        await asyncio.sleep(60)
        return ctx.complete({})

    server = await ConsoleServer(client, port=free_port(), auth=proxied()).start()
    try:
        async with running(client, make_agent(first, lead), make_agent(second, follow)), \
                httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            chain_id = await start_chain(client, to_agent=first, task_description="steer me")
            page = (await http.get(f"/chains/{chain_id}", headers=as_person("alice"))).text
            assert "Steer…" not in page and "Cancel now…" not in page  # an approver does not operate
            assert (await http.get(f"/chains/{chain_id}/confirm/steer", headers=as_person("alice"))).status_code == 403
            assert "Steer…" in (await http.get(f"/chains/{chain_id}", headers=as_person("ops"))).text
            done = await _confirmed(http, chain_id, "steer", "ops", message="mind the <cache>")
            assert done.status_code == 303 and "steered+by+ops" in done.headers["location"]
            holding.set()
            record = await asyncio.wait_for(wait_chain(client, chain_id), 30)
            assert record.status is ChainStatus.COMPLETED and seen == [["mind the <cache>"]]
            assert record.final_result == {"steered_by": ["ops"]}

            ended = await http.get(f"/chains/{chain_id}", headers=as_person("ops"))
            hop_id = re.search(r'/confirm/rerun\?hop=([0-9a-f-]+)', ended.text)[1]
            rerun = await _confirmed(http, chain_id, "rerun", "ops", query=f"?hop={hop_id}", hop=hop_id)
            assert rerun.status_code == 303 and "re-run+from+hop+0" in rerun.headers["location"]
            new_id = re.search(r"as\+chain\+([0-9a-f-]+)", rerun.headers["location"])[1]
            again = await asyncio.wait_for(wait_chain(client, new_id), 30)
            assert again.rerun_of is not None and str(again.rerun_of.chain_id) == str(chain_id)

        async with running(client, make_agent(first, slow)), \
                httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            stopped = await start_chain(client, to_agent=first, task_description="stop me")
            cancelled = await start_chain(client, to_agent=first, task_description="cancel me")
            done = await _confirmed(http, cancelled, "cancel", "ops")
            assert done.status_code == 303
            assert (await asyncio.wait_for(wait_chain(client, cancelled), 30)).status is ChainStatus.CANCELLED
            done = await _confirmed(http, stopped, "stop", "ops", comment="enough")
            assert done.status_code == 303 and "stop+after" in done.headers["location"]
            late = await _confirmed(http, cancelled, "cancel", "ops")  # it has ended: one clear line
            assert late.status_code == 400 and "not running" in late.text
    finally:
        await server.stop()


async def test_chains_are_found_by_status_and_agent_newest_first_a_page_at_a_time(client, uid, monkeypatch):
    import handoff.console.views as views

    monkeypatch.setattr(views, "CHAINS_PAGE", 3)
    worker, failing, refuser = f"lister-{uid}", f"failer-{uid}", f"refuser-{uid}"

    async def done(ctx):
        return ctx.complete({"ok": True})

    async def broken(ctx):
        return ctx.fail("no disk")

    async def refuse(ctx):
        raise PermanentError("not mine")

    server = await ConsoleServer(client, port=free_port(), auth=proxied()).start()
    try:
        async with running(client, make_agent(worker, done), make_agent(failing, broken), make_agent(refuser, refuse),
                           register=True), \
                httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            refused = await start_chain(client, to_agent=refuser, task_description="not for it",
                                        policy={"allowed_handoffs": {"starter": [refuser]}})  # no fallback
            assert (await wait_chain(client, refused)).status is ChainStatus.FAILED
            bad = await start_chain(client, to_agent=failing, task_description="doomed")
            await wait_chain(client, bad)  # first: its fallback (to a TESTING agent) may visit the worker
            ids = []
            for n in range(5):
                ids.append(str(await start_chain(client, to_agent=worker, task_description=f"job {n}")))
                await wait_chain(client, ids[-1])
            found = []
            for _ in range(50):  # visibility catches up
                page = (await http.get(f"/chains?agent={worker}", headers=as_person("victor"))).text
                found = re.findall(r'href="/chains/([0-9a-f-]{36})"', page)
                if found == ids[::-1][:3]:
                    break
                await asyncio.sleep(0.2)
            assert found == ids[::-1][:3]  # newest first, a page of three
            following = re.search(r'href="/chains\?([^"]+)">Older', page)[1].replace("&amp;", "&")
            rest = re.findall(r'href="/chains/([0-9a-f-]{36})"',
                              (await http.get(f"/chains?{following}", headers=as_person("victor"))).text)
            assert rest[:2] == ids[::-1][3:]
            # the failing agent's chain completed by its fallback: found as completed, not as failed
            failed = (await http.get(f"/chains?agent={failing}&status=failed", headers=as_person("victor"))).text
            completed = (await http.get(f"/chains?agent={failing}&status=completed", headers=as_person("victor"))).text
            assert str(bad) not in failed and str(bad) in completed and "✓ completed" in completed
            fleet = (await http.get("/agents", headers=as_person("victor"))).text
            assert worker in fleet and "● live" in fleet and f"/chains?agent={failing}&amp;status=failed" in fleet
            # what each agent did lately (the newest chains), linked to those chains
            lately = {agent: " ".join(re.sub(r"<[^>]+>", "", cell).split()) for agent, cell in re.findall(
                r'<tr>\s*<td><strong>([^<]+)</strong>.*?<td class="lately">(.*?)</td>', fleet, re.S)}
            visited = 5 + (worker in {hop.to_agent for hop in (await wait_chain(client, bad)).all_hops()})
            assert lately[worker] == f"{visited} chains, 0 failed"
            assert lately[failing] == "1 chain, 0 failed"
            assert lately[refuser] == "1 chain, 1 failed"
    finally:
        await server.stop()


async def test_encrypted_chains_are_shown_to_a_console_with_the_keys_and_said_unreadable_without(
        client, address, uid, monkeypatch):
    from handoff.client import build_request, connect
    from temporalio.common import SearchAttributePair, TypedSearchAttributes

    from handoff.constants import CHAIN_WORKFLOW, SA_STATUS
    from handoff.testing import chain_worker
    from tests.test_codec import keys_env, new_key

    secret = f"SEALED-{uid}"
    for name, value in keys_env("k1", k1=new_key()).items():
        monkeypatch.setenv(name, value)
    keyed = await connect(address=address)
    lead, release = f"sealed-lead-{uid}", f"sealed-release-{uid}"

    async def hand(ctx):
        return ctx.handoff(to_agent=release, task_description="ship it", require_approval=True,
                           result_data={"found": ctx.context_data["secret"]})

    async def ship(ctx):
        return ctx.complete({})

    request = build_request(to_agent=lead, task_description="sealed release", context_data={"secret": secret})
    queue = f"sealed-console-{uid}"  # the session's chain worker has no keys
    with_keys = await ConsoleServer(keyed, port=free_port(), auth=proxied()).start()
    without = await ConsoleServer(client, port=free_port(), auth=proxied()).start()
    try:
        async with chain_worker(keyed, task_queue=queue), running(keyed, make_agent(lead, hand),
                                                                   make_agent(release, ship)):
            await keyed.start_workflow(CHAIN_WORKFLOW, request, id=str(request.chain_id), task_queue=queue,
                                       search_attributes=TypedSearchAttributes([SearchAttributePair(SA_STATUS,
                                                                                                    "running")]))
            async with httpx.AsyncClient(timeout=30) as http:
                page = ""
                for _ in range(100):
                    page = (await http.get(f"{with_keys.url}/", headers=as_person("victor"))).text
                    if secret in page:
                        break
                    await asyncio.sleep(0.2)
                assert secret in page  # the earlier hop's result, decrypted
                blind = (await http.get(f"{without.url}/", headers=as_person("victor"))).text
                assert str(request.chain_id) in blind and "cannot read it" in blind and secret not in blind
                chain = await http.get(f"{without.url}/chains/{request.chain_id}", headers=as_person("victor"))
                assert chain.status_code == 400 and secret not in chain.text
            await cancel_chain(keyed, request.chain_id)
    finally:
        await with_keys.stop()
        await without.stop()


async def test_a_jwt_names_its_person_and_its_scopes_give_roles_over_a_session_too(client, jwks):
    from handoff.console.auth import APPROVER_SCOPE
    from handoff.servers.http import OPERATOR_SCOPE, BearerAuth
    from tests.test_codec_server import AUDIENCE, ISSUER, token

    key, url = jwks
    auth = ConsoleAuth.from_settings(settings({"HANDOFF_CONSOLE_ROLES": "dana=operator"}),
                                     BearerAuth(jwks_url=url, issuer=ISSUER, audience=AUDIENCE))
    server = await ConsoleServer(client, port=free_port(), auth=auth).start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            async def who(credential):
                page = await http.get("/agents", headers={"Authorization": f"Bearer {credential}"})
                return page.status_code, re.search(r'id="person">([^<]+)</span> <span class="role">\((\w+)\)',
                                                   page.text)
            status, found = await who(token(key, sub="erin"))
            assert status == 200 and found.groups() == ("erin", "viewer")
            assert (await who(token(key, sub="erin", scope=APPROVER_SCOPE)))[1].groups() == ("erin", "approver")
            assert (await who(token(key, sub="erin", scope=OPERATOR_SCOPE)))[1].groups() == ("erin", "operator")
            assert (await who(token(key, sub="dana")))[1].groups() == ("dana", "operator")  # the setting's role
            assert (await who(token(key, sub="erin", aud="elsewhere")))[0] == 401
            signed = await http.post("/signin", data={"token": token(key, sub="erin", scope=APPROVER_SCOPE)})
            assert signed.status_code == 303
            page = await http.get("/agents")
            assert ">erin<" in page.text and "(approver)" in page.text
    finally:
        await server.stop()

"""The Temporal Web UI shows a chain's hops by agent name: a real headless Chromium loads the
workflow's Timeline page from the embedded server's UI, and the timeline names every hop's
agents ("hop 1: scout -> guard"), from the `summary` each hop activity carries, a branch's hops
with their place in the tree of a fan-out ("hop 2 [b0.0]: ..."), and an approval's deadline; a
hop's link on the console opens the event that scheduled it.

Opt-in: skipped where no Chromium binary is installed (`apt-get install chromium`) or when
HANDOFF_SKIP_BROWSER is set. The page's rendered DOM is checked, and a screenshot is taken.
"""

from __future__ import annotations

import asyncio
import base64
import html
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from handoff import Branch, ChainRecord, ChainStatus, Join, approve_chain, run_chain, start_chain, wait_chain
from handoff.client import connect
from handoff.servers.embedded import EmbeddedServer, free_port
from handoff.workers.chain_worker import chain_worker
from tests.support import make_agent, running

BROWSER = next(
    (found for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
     if (found := shutil.which(name))),
    None,
)

pytestmark = [
    pytest.mark.skipif(bool(os.environ.get("HANDOFF_SKIP_BROWSER")),
                       reason="HANDOFF_SKIP_BROWSER is set"),
    pytest.mark.skipif(BROWSER is None,
                       reason="no Chromium found (chromium, chromium-browser or google-chrome): "
                              "apt-get install chromium to run the Web UI check"),
    pytest.mark.timeout(90),
]

# Offline-safe headless flags: without the network ones Chromium tries to reach Google's services.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--window-size=1600,1200",
)
# Virtual time waits for the SPA's API calls; real time is bounded by BROWSER_TIMEOUT_S.
VIRTUAL_TIME_MS = 10_000
BROWSER_TIMEOUT_S = 20
TIMELINE_MARK = 'id="event-history-timeline-graph"'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def wait_http_ok(url: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the Web UI did not answer on {url} within {timeout_s:g}s")
        time.sleep(0.2)


def render(url: str, work: Path, screenshot: Path) -> str:
    """The page's DOM after its scripts ran, with a screenshot taken in the same browser run.
    Chromium runs in its own process group, killed whole afterwards."""
    profile = work / "profile"
    dom_file = work / "dom.html"
    log_file = work / "chromium.log"
    argv = [BROWSER, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
            f"--virtual-time-budget={VIRTUAL_TIME_MS}", f"--screenshot={screenshot}",
            "--dump-dom", url]
    with dom_file.open("wb") as out, log_file.open("wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=log,
                                start_new_session=True)
        try:
            proc.wait(timeout=BROWSER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"Chromium did not finish within {BROWSER_TIMEOUT_S}s") from None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    assert proc.returncode == 0, log_file.read_text(errors="replace")[-2000:]
    return dom_file.read_text(errors="replace")


def visible_text(fragment: str) -> str:
    fragment = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", fragment)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", fragment)))


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def two_agents(uid: object, name: str) -> tuple[str, str, list]:
    """Two agents: the first hands on to the second, which completes."""
    first, second = f"ui-{name}-first-{uid}", f"ui-{name}-second-{uid}"

    async def hand_on(ctx):
        return ctx.handoff(to_agent=second, task_description="finish it")

    async def finish(ctx):
        return ctx.complete({"done": True})

    return first, second, [make_agent(first, hand_on), make_agent(second, finish)]


async def page_text(url: str, tmp_path: Path, name: str, wanted: list[str]) -> str:
    """The page's visible text; loaded a second time only if the first caught the SPA mid-fetch
    (not all of `wanted` on it)."""
    page = ""
    for attempt in range(2):
        work = tmp_path / f"{name}-{attempt}"
        work.mkdir()
        page = visible_text(await asyncio.to_thread(render, url, work, work / "page.png"))
        if all(fragment in page for fragment in wanted):
            break
    return page


async def test_timeline_names_each_hops_agents(tmp_path, uid):
    scout, guard, ship = f"ui-scout-{uid}", f"ui-guard-{uid}", f"ui-ship-{uid}"

    async def scouting(ctx):
        return ctx.handoff(to_agent=guard, task_description="guard the release")

    async def guarding(ctx):
        return ctx.handoff(to_agent=ship, task_description="ship the release")

    async def shipping(ctx):
        return ctx.complete({"shipped": True})

    with EmbeddedServer(port=free_port(), ui_port=free_port()) as server:
        wait_http_ok(server.ui_url)
        client = await connect(address=server.address)
        async with chain_worker(client), running(
                client, make_agent(scout, scouting), make_agent(guard, guarding),
                make_agent(ship, shipping)):
            record = await run_chain(client, to_agent=scout, task_description="scout the release")
        assert record.status is ChainStatus.COMPLETED
        assert [(h.from_agent, h.to_agent) for h in record.hops] == [
            ("starter", scout), (scout, guard), (guard, ship)]
        run_id = (await client.get_workflow_handle(str(record.chain_id)).describe()).run_id

        url = f"{server.ui_url}/namespaces/default/workflows/{record.chain_id}/{run_id}/timeline"
        hops = [f"hop 0: starter -> {scout}", f"hop 1: {scout} -> {guard}",
                f"hop 2: {guard} -> {ship}"]
        screenshot = tmp_path / "timeline.png"
        timeline = ""
        for attempt in range(2):  # a second load only if the first caught the SPA mid-fetch
            work = tmp_path / f"chromium-{attempt}"
            work.mkdir()
            dom = await asyncio.to_thread(render, url, work, screenshot)
            at = dom.find(TIMELINE_MARK)
            timeline = visible_text(dom[at:]) if at >= 0 else ""
            if all(hop in timeline for hop in hops):
                break

    assert timeline, f"no timeline graph ({TIMELINE_MARK}) on {url}"
    for hop in hops:
        assert hop in timeline, f"{hop!r} not in the timeline: {timeline[:1500]}"
    for agent in (scout, guard, ship):
        assert agent in timeline

    data = screenshot.read_bytes()
    assert png_size(data) == (1600, 1200)
    assert len(data) > 50_000, f"the screenshot is nearly blank ({len(data)} bytes)"


async def test_ui_shows_encrypted_context_decoded_through_the_codec_server(tmp_path, uid, monkeypatch):
    """With encryption on, history holds ciphertext; the UI, pointed at `handoff codec-server`,
    shows the chain's input in the clear."""
    from handoff.payloads.codec import ENV_KEY_ID, ENV_KEYS, codec_from_env
    from handoff.servers.codec import start_codec_server

    monkeypatch.setenv(ENV_KEYS, f"k1:{base64.b64encode(os.urandom(32)).decode()}")
    monkeypatch.setenv(ENV_KEY_ID, "k1")
    secret = f"launch-code-{uid}"
    agent = f"ui-vault-{uid}"

    async def keep(ctx):
        return ctx.complete({"kept": ctx.context_data["secret"] == secret})

    codec_port, ui_port = free_port(), free_port()
    ui_origin = f"http://127.0.0.1:{ui_port}"
    codec = await start_codec_server(codec_from_env(), port=codec_port, ui_origins=[ui_origin])
    try:
        with EmbeddedServer(port=free_port(), ui_port=ui_port,
                            codec_endpoint=f"http://127.0.0.1:{codec_port}") as server:
            wait_http_ok(server.ui_url)
            client = await connect(address=server.address)
            async with chain_worker(client), running(client, make_agent(agent, keep)):
                record = await run_chain(client, to_agent=agent, task_description="keep it safe",
                                         context_data={"secret": secret})
            assert record.final_result == {"kept": True}
            history = (await client.get_workflow_handle(str(record.chain_id)).fetch_history()).to_json()
            assert secret not in history, "the server holds ciphertext only"
            run_id = (await client.get_workflow_handle(str(record.chain_id)).describe()).run_id
            url = f"{server.ui_url}/namespaces/default/workflows/{record.chain_id}/{run_id}/history"
            page = ""
            for attempt in range(2):  # a second load only if the first caught the SPA mid-fetch
                work = tmp_path / f"codec-{attempt}"
                work.mkdir()
                page = visible_text(await asyncio.to_thread(render, url, work, work / "page.png"))
                if secret in page:
                    break
            assert secret in page, "the UI decoded the input through the codec server"
            await codec.cleanup()
            codec = None
            work = tmp_path / "no-codec"
            work.mkdir()
            page = visible_text(await asyncio.to_thread(render, url, work, work / "page.png"))
            assert secret not in page, "without the codec server the UI has only ciphertext"
    finally:
        if codec is not None:
            await codec.cleanup()


async def test_timeline_shows_a_fan_outs_branches_its_join_and_the_approval(tmp_path, uid):
    """Each hop of a branch is labelled with its place in the tree ("hop 2 [b0.0]: ..."), the
    join says how many branches it joins, and the approval's deadline and decision are there."""
    lead, audit, dba, tests, gate = (f"ui-lead-{uid}", f"ui-audit-{uid}", f"ui-dba-{uid}", f"ui-tests-{uid}",
                                     f"ui-gate-{uid}")

    async def fan(ctx):
        return ctx.fan_out([Branch(to_agent=audit, task_description="audit the code"),
                            Branch(to_agent=tests, task_description="plan the tests")],
                           join=Join(to_agent=gate, task_description="decide the release"))

    async def auditing(ctx):
        return ctx.handoff(to_agent=dba, task_description="check the SQL")

    async def done(ctx):
        return ctx.complete({"by": ctx.to_agent})

    with EmbeddedServer(port=free_port(), ui_port=free_port()) as server:
        wait_http_ok(server.ui_url)
        client = await connect(address=server.address)
        agents = [make_agent(lead, fan), make_agent(audit, auditing), make_agent(dba, done),
                  make_agent(tests, done), make_agent(gate, done)]
        async with chain_worker(client), running(client, *agents):
            chain_id = await start_chain(client, to_agent=lead, task_description="review",
                                         policy={"approval_required": [gate]})
            for _ in range(200):
                state = await client.get_workflow_handle(str(chain_id)).query("chain_state", result_type=ChainRecord)
                if state.status is ChainStatus.AWAITING_APPROVAL:
                    break
                await asyncio.sleep(0.05)
            await approve_chain(client, chain_id, by="ui-test")
            record = await wait_chain(client, chain_id)
        assert record.status is ChainStatus.COMPLETED
        run_id = (await client.get_workflow_handle(str(chain_id)).describe()).run_id
        url = f"{server.ui_url}/namespaces/default/workflows/{chain_id}/{run_id}/timeline"
        expected = [f"hop 0: starter -> {lead}", f"hop 1 [b0.0]: {lead} -> {audit}",
                    f"hop 2 [b0.0]: {audit} -> {dba}", f"hop 1 [b0.1]: {lead} -> {tests}",
                    f"hop 3: {lead} -> {gate} (join of 2 branches)", f"approval deadline: hop 3 to {gate}",
                    "decide_approval"]
        timeline = ""
        for attempt in range(2):  # a second load only if the first caught the SPA mid-fetch
            work = tmp_path / f"fan-{attempt}"
            work.mkdir()
            dom = await asyncio.to_thread(render, url, work, work / "timeline.png")
            at = dom.find(TIMELINE_MARK)
            timeline = visible_text(dom[at:]) if at >= 0 else ""
            if all(line in timeline for line in expected):
                break
    for line in expected:
        assert line in timeline, f"{line!r} not in the timeline: {timeline[:2000]}"


async def test_a_chain_started_through_a2a_is_the_web_uis_workflow_of_that_id(tmp_path, uid):
    """The A2A SDK's client starts a chain on handoff's A2A server; the Web UI shows the
    workflow whose id is the A2A task id, with its hops."""
    from a2a.client import ClientConfig, create_client
    from a2a.types import Message, Part, Role, SendMessageRequest

    from handoff.a2a.server import A2AServer

    first, second, agents = two_agents(uid, "a2a")

    with EmbeddedServer(port=free_port(), ui_port=free_port()) as server:
        wait_http_ok(server.ui_url)
        client = await connect(address=server.address)
        a2a = await A2AServer(client, port=free_port()).start()
        try:
            async with chain_worker(client), running(client, *agents):
                peer = await create_client(a2a.url, ClientConfig())
                msg = Message(role=Role.ROLE_USER, message_id=str(uid), parts=[Part(text="start here")])
                msg.metadata.update({"agent": first})
                events = [e async for e in peer.send_message(request=SendMessageRequest(message=msg))]
        finally:
            await a2a.stop()
        task_id = next(e.task.id for e in events if e.HasField("task"))
        run_id = (await client.get_workflow_handle(task_id).describe()).run_id
        url = f"{server.ui_url}/namespaces/default/workflows/{task_id}/{run_id}/timeline"
        expected = [task_id, f"hop 0: starter -> {first}", f"hop 1: {first} -> {second}"]
        page = await page_text(url, tmp_path, "a2a", expected)
    for fragment in expected:
        assert fragment in page, f"{fragment!r} not on the page: {page[:1500]}"


async def test_a_hops_link_on_the_console_opens_the_event_that_scheduled_it(tmp_path, uid):
    """The console's chain page links each hop to its own event in the Web UI: the page the link
    opens shows the activity's scheduling, with the hop's handoff id in its input."""
    import httpx

    from handoff.console import ConsoleServer

    first, _, agents = two_agents(uid, "link")

    with EmbeddedServer(port=free_port(), ui_port=free_port()) as server:
        wait_http_ok(server.ui_url)
        client = await connect(address=server.address)
        async with chain_worker(client), running(client, *agents):
            record = await run_chain(client, to_agent=first, task_description="start here")
        console = await ConsoleServer(client, port=free_port(), ui_base=server.ui_url).start()
        try:
            async with httpx.AsyncClient(base_url=console.url, timeout=30) as http:
                page = (await http.get(f"/chains/{record.chain_id}")).text
        finally:
            await console.stop()
        hop = record.hops[1]
        node = page[page.index(f'id="hop-{hop.handoff_id}"'):]
        url = html.unescape(re.search(r'href="([^"]+/history/events/\d+)"', node)[1])
        assert url.startswith(server.ui_url)
        seen = await page_text(url, tmp_path, "link", [str(hop.handoff_id)])
    assert "Activity Task Scheduled" in seen and str(hop.handoff_id) in seen, seen[:2000]

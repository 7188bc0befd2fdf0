"""The console in a real browser (Debian's Chromium, driven by Playwright): an approver signed in
by the reverse proxy approves from the inbox with the keyboard alone on a 390 px screen, and the
chain completes with that person recorded; a viewer is offered no decision and refused one; a
chain page grows a three-way fan-out hop by hop without a reload, showing a result's markup as
text. HANDOFF_SCREENSHOTS=DIR keeps the pages' screenshots there (the README's)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from handoff import Branch, ChainStatus, Join, start_chain, wait_chain
from handoff.console import ConsoleServer
from handoff.servers.embedded import free_port
from tests.support import make_agent, running
from tests.test_console import PROXY, proxied

playwright = pytest.importorskip("playwright.async_api", reason="the console's browser tests need playwright")
CHROMIUM = next((found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None)
pytestmark = [
    pytest.mark.usefixtures("chains", "one_inbox_page"),
    pytest.mark.skipif(bool(os.environ.get("HANDOFF_SKIP_BROWSER")), reason="HANDOFF_SKIP_BROWSER is set"),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found: apt-get install chromium (.ci/run does)"),
]
WAIT_MS = 20_000


@pytest.fixture
async def browser():
    async with playwright.async_playwright() as p:
        launched = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def console(client):
    server = await ConsoleServer(client, port=free_port(), auth=proxied()).start()
    try:
        yield server
    finally:
        await server.stop()


def screenshots() -> Path | None:
    where = os.environ.get("HANDOFF_SCREENSHOTS")
    return Path(where) if where else None


async def page_as(browser, person: str, width: int = 1280, height: int = 900):
    context = await browser.new_context(viewport={"width": width, "height": height},
                                        extra_http_headers={PROXY: person}, timezone_id="Asia/Tokyo")
    return await context.new_page()


async def waiting_chain(client, lead: str, release: str):
    chain_id = await start_chain(client, to_agent=lead, task_description="release inventory v2")
    for _ in range(100):
        record = await wait_for_status(client, chain_id)
        if record:
            return chain_id
    raise AssertionError("the chain never waited for approval")


async def wait_for_status(client, chain_id) -> bool:
    from handoff import get_chain

    record = await get_chain(client, chain_id)
    if record.status is ChainStatus.AWAITING_APPROVAL:
        return True
    await asyncio.sleep(0.1)
    return False


def release_agents(lead: str, release: str):
    async def hand(ctx):
        return ctx.handoff(to_agent=release, task_description="deploy inventory v2 to production",
                           require_approval=True, result_data={"tests": "412 passed", "risk": "low"})

    async def ship(ctx):
        return ctx.complete({"deployed": "v2"})

    return make_agent(lead, hand), make_agent(release, ship)


async def test_an_approver_approves_by_keyboard_alone_on_a_narrow_screen(client, browser, console, uid):
    lead, release = f"builder-{uid}", f"deployer-{uid}"
    async with running(client, *release_agents(lead, release)):
        chain_id = await waiting_chain(client, lead, release)
        page = await page_as(browser, "alice", width=390, height=844)
        await page.goto(f"{console.url}/")
        card = page.locator(f'li.waiting[data-chain="{chain_id}"]')
        await card.wait_for(timeout=WAIT_MS)
        assert "deploy inventory v2 to production" in await card.inner_text()
        assert "412 passed" in await card.inner_text()
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scroll
        assert await page.evaluate("""[...document.querySelectorAll('time')].every(t => t.textContent ===
            new Date(t.getAttribute('datetime')).toLocaleString(undefined,
                {dateStyle: 'medium', timeStyle: 'medium', timeZone: 'Asia/Tokyo'}))""")  # the viewer's zone
        if where := screenshots():
            await page.screenshot(path=str(where / "console-inbox-390.png"), full_page=True)
        # keyboard alone: Tab to this chain's Approve, Enter, type a comment, Tab to the button, Enter
        for _ in range(500):
            await page.keyboard.press("Tab")
            focused = await page.evaluate("[document.activeElement.textContent, document.activeElement.href || '']")
            if focused[0].strip() == "Approve…" and str(chain_id) in focused[1]:
                break
        else:
            raise AssertionError("Tab never reached the Approve link")
        await page.keyboard.press("Enter")
        await page.wait_for_url(f"**/chains/{chain_id}/confirm/approve*", timeout=WAIT_MS)
        assert "Recorded as alice" in await page.locator("form.confirm").inner_text()
        for _ in range(20):
            await page.keyboard.press("Tab")
            if await page.evaluate("document.activeElement.name") == "comment":
                break
        await page.keyboard.type("tests green, risk low")
        for _ in range(20):
            await page.keyboard.press("Tab")
            if await page.evaluate("document.activeElement.id") == "confirm":
                break
        await page.keyboard.press("Enter")
        await page.wait_for_url(f"**/chains/{chain_id}?done=*", timeout=WAIT_MS)
        assert "approved by alice" in await page.locator("#notice").inner_text()
        record = await asyncio.wait_for(wait_chain(client, chain_id), 30)
        assert record.status is ChainStatus.COMPLETED
        entry = next(h for h in record.all_hops() if h.approval is not None)
        assert (entry.approval.by, entry.approval.comment) == ("alice", "tests green, risk low")


async def test_a_viewer_is_offered_no_decision_and_refused_one(client, browser, console, uid):
    lead, release = f"builder-{uid}", f"deployer-{uid}"
    async with running(client, *release_agents(lead, release)):
        chain_id = await waiting_chain(client, lead, release)
        page = await page_as(browser, "victor")
        await page.goto(f"{console.url}/")
        card = page.locator(f'li.waiting[data-chain="{chain_id}"]')
        await card.wait_for(timeout=WAIT_MS)
        assert await card.locator("text=Approve…").count() == 0
        if where := screenshots():
            await page.screenshot(path=str(where / "console-inbox.png"), full_page=True)
        hop = await card.get_attribute("data-hop")
        answer = await page.goto(f"{console.url}/chains/{chain_id}/confirm/approve?hop={hop}")
        assert answer.status == 403 and "may not approve" in await page.locator("#message").inner_text()
        assert (await wait_for_status(client, chain_id)) is True  # still waiting


async def test_the_chain_page_grows_a_fan_out_hop_by_hop_without_a_reload(client, browser, console, uid):
    lead, joiner = f"lead-{uid}", f"join-{uid}"
    workers = [f"w{i}-{uid}" for i in range(3)]
    go = [asyncio.Event() for _ in workers]
    markup = '<img src=x onerror="alert(1)"><script>alert(2)</script>'

    async def fan(ctx):
        return ctx.fan_out([Branch(to_agent=w, task_description=f"part {i}") for i, w in enumerate(workers)],
                           join=Join(to_agent=joiner, task_description="merge the parts"))

    def part(i):
        async def work(ctx):
            await go[i].wait()
            return ctx.complete({"part": i, **({"note": markup} if i == 1 else {})})
        return work

    async def merge(ctx):
        return ctx.complete({"merged": len(ctx.branches)})

    agents = [make_agent(lead, fan), make_agent(joiner, merge), *(make_agent(w, part(i)) for i, w in enumerate(workers))]
    async with running(client, *agents):
        chain_id = await start_chain(client, to_agent=lead, task_description="build in three parts")
        page = await page_as(browser, "ops")
        dialogs = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), asyncio.ensure_future(dialog.dismiss())))
        await page.goto(f"{console.url}/chains/{chain_id}")
        await page.evaluate("window.__samePage = 'yes'")
        branch = 'li.branch[data-branch="{}"] li.hop[data-status="{}"]'
        await page.locator(branch.format(2, "running")).wait_for(timeout=WAIT_MS)
        if where := screenshots():
            await page.screenshot(path=str(where / "console-chain.png"), full_page=True)
        for i in range(3):
            go[i].set()
            await page.locator(branch.format(i, "completed")).wait_for(timeout=WAIT_MS)
            for later in range(i + 1, 3):
                assert await page.locator(branch.format(later, "running")).count() == 1
        await page.wait_for_function("document.getElementById('live').textContent === 'ended'", timeout=WAIT_MS)
        await page.locator(f'#tree li.hop[data-status="completed"] >> text={joiner}').first.wait_for(timeout=WAIT_MS)
        assert await page.evaluate("window.__samePage") == "yes"  # grown in place, never reloaded
        assert int(await page.locator("#tree").get_attribute("data-updates")) >= 3
        tree = page.locator("#tree")
        assert markup.replace('"', '\\"') in await tree.text_content()  # shown as text (in the JSON)
        assert await tree.locator("img, script").count() == 0 and dialogs == []
        assert (await asyncio.wait_for(wait_chain(client, chain_id), 30)).status is ChainStatus.COMPLETED

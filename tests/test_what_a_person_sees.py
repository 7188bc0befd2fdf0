"""What a person sees: an unsuccessful chain stands out in the Web UI's list, the README's own
agent example starts as written, a deliberate failure logs one line, and tables keep ids whole
at 80 columns."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import urllib.parse

import pytest

from handoff import ChainStatus, HopStatus, PermanentError, run_chain
from handoff.client import connect
from handoff.models import AgentCapability
from handoff.servers.embedded import EmbeddedServer, free_port
from handoff.workers.chain_worker import chain_worker
from tests.support import HANDOFF, ROOT, cli, make_agent, running, wait_live
from tests.test_web_ui import BROWSER, render, visible_text, wait_http_ok

pytestmark = pytest.mark.usefixtures("chains")


def only_cli_env(cli_env: dict[str, str]) -> dict[str, str]:
    """The CLI's environment without this repository on the import path: as a user has it."""
    return {k: v for k, v in cli_env.items() if k != "PYTHONPATH"}


@pytest.mark.skipif(BROWSER is None, reason="no Chromium found: apt-get install chromium to run the Web UI check")
@pytest.mark.timeout(120)
async def test_the_web_ui_lists_a_failed_chain_as_failed_and_its_filter_finds_it(tmp_path, uid):
    good, bad = f"ui-good-{uid}", f"ui-bad-{uid}"

    async def fine(ctx):
        return ctx.complete({"ok": True})

    async def refuse(ctx):
        raise PermanentError("cannot do that")

    with EmbeddedServer(port=free_port(), ui_port=free_port()) as server:
        wait_http_ok(server.ui_url)
        client = await connect(address=server.address)
        async with chain_worker(client), running(client, make_agent(good, fine), make_agent(bad, refuse)):
            completed = await run_chain(client, to_agent=good, task_description="works")
            failed = await run_chain(client, to_agent=bad, task_description="breaks")
        assert (completed.status, failed.status) == (ChainStatus.COMPLETED, ChainStatus.FAILED)
        assert failed.hops[0].status is HopStatus.FAILED, "the record still reads back whole"

        def page(query: str | None, name: str) -> str:
            url = f"{server.ui_url}/namespaces/default/workflows"
            if query:
                url += "?" + urllib.parse.urlencode({"query": query})
            for attempt in range(3):  # a later load only if one caught the SPA mid-fetch
                work = tmp_path / f"{name}-{attempt}"
                work.mkdir()
                text = visible_text(render(url, work, work / "page.png"))
                if str(completed.chain_id) in text or str(failed.chain_id) in text:
                    return text
            return text

        listing = await asyncio.to_thread(page, None, "all")
        failures = await asyncio.to_thread(page, 'ExecutionStatus="Failed"', "failures")
    assert re.search(r"Failed\s+" + str(failed.chain_id), listing), listing[:3000]
    assert re.search(r"Completed\s+" + str(completed.chain_id), listing), listing[:3000]
    assert str(failed.chain_id) in failures and str(completed.chain_id) not in failures, failures[:3000]


def readme_agent_example() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(# reviewer\.py\n.*?)```", readme, re.S)
    assert match, "the README's agent example"
    return match.group(1)


async def test_the_readmes_agent_example_runs_as_written_from_its_own_directory(client, cli_env, tmp_path):
    (tmp_path / "reviewer.py").write_text(readme_agent_example())
    worker = subprocess.Popen([HANDOFF, "worker", "--agent", "reviewer:reviewer"], cwd=tmp_path,
                              env=only_cli_env(cli_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await wait_live(client, {"reviewer"}, timeout_s=30)
        record = await run_chain(client, to_agent="reviewer", task_description="Review PR 42",
                                 context_data={"code": "print('hello')"})
    finally:
        worker.send_signal(signal.SIGTERM)
        out, err = worker.communicate(timeout=20)
    assert record.status is ChainStatus.COMPLETED, (record.error, err[-2000:])
    assert record.final_result == {"ok": True}
    elsewhere = subprocess.run([HANDOFF, "worker", "--agent", "reviewer:reviewer", "--app-dir", str(tmp_path),
                                "--connect-timeout", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                               env={**only_cli_env(cli_env), "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert "No module named" not in elsewhere.stderr, "--app-dir found the module"
    assert "--app-dir" in subprocess.run([HANDOFF, "worker", "--help"], capture_output=True, text=True,
                                         timeout=60).stdout


async def test_a_permanent_error_logs_one_line_and_a_bug_its_traceback(client, cli_env, uid):
    env = {**cli_env, "HANDOFF_TEST_SUFFIX": uid}
    worker = subprocess.Popen([HANDOFF, "worker", "--agent", "tests.procagents:failing"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        await wait_live(client, {f"refuser-{uid}", f"buggy-{uid}"}, timeout_s=30)
        alone = {"max_attempts": 1}  # and no fallback to the other agent: one hop each
        refused = await run_chain(client, to_agent=f"refuser-{uid}", task_description="t",
                                  policy={**alone, "allowed_handoffs": {"starter": [f"refuser-{uid}"]}})
        buggy = await run_chain(client, to_agent=f"buggy-{uid}", task_description="t",
                                policy={**alone, "allowed_handoffs": {"starter": [f"buggy-{uid}"]}})
    finally:
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=20)
    assert refused.status is buggy.status is ChainStatus.FAILED
    assert len(refused.hops) == len(buggy.hops) == 1
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    refusal = [line for line in lines if line.get("chain_id") == str(refused.chain_id)
               or str(refused.chain_id) in json.dumps(line)]
    assert [line["event"] for line in refusal if line["event"].startswith("hop_")] == ["hop_started", "hop_failed"]
    assert not any("Traceback" in json.dumps(line) or line.get("exception") for line in refusal), refusal
    bug = [line for line in lines if str(buggy.chain_id) in json.dumps(line)]
    assert any("Traceback" in json.dumps(line) and "ZeroDivisionError" in json.dumps(line) for line in bug), bug


async def test_tables_keep_ids_and_capabilities_whole_at_80_columns(client, cli_env, uid):
    agent_id = f"narrow-terminal-agent-{uid}"

    async def work(ctx):
        return ctx.complete({"ok": True})

    agent = make_agent(agent_id, work, capabilities=[AgentCapability.PERFORMANCE_OPTIMIZATION,
                                                    AgentCapability.DATABASE_OPERATIONS])
    env = {**cli_env, "COLUMNS": "80"}
    async with running(client, agent, register=True):
        record = await run_chain(client, to_agent=agent_id, task_description="t")
        agents = await cli(env, "agents")
    for _ in range(100):
        listing = await cli(env, "list", "--agent", agent_id)
        if str(record.chain_id) in listing.stdout:
            break
        await asyncio.sleep(0.1)
    for text, whole in ((agents.stdout, [agent_id, "PERFORMANCE_OPTIMIZATION", "DATABASE_OPERATIONS"]),
                        (listing.stdout, [str(record.chain_id), agent_id, "completed"])):
        assert all(len(line) <= 80 for line in text.splitlines()), text
        for fragment in whole:
            assert fragment in text, (fragment, text)

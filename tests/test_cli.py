"""The `handoff` command line of the design (docs/design.md), run as a real subprocess against the session's
server: exit codes (0 ok, 1 chain ended unsuccessfully, 2 bad input), one-line errors, JSON output."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
from uuid import uuid4

import pytest
import typer

from handoff import (
    AgentCapability,
    ChainNotFound,
    ChainRecord,
    ChainStatus,
    HandoffContext,
    HopStatus,
    PermanentError,
    get_chain,
    run_chain,
    start_chain,
)
from handoff.constants import MAX_EXTERNAL_CONTEXT_BYTES
from handoff.cli import app
from handoff.servers.embedded import temporal_binary
from tests.support import HANDOFF, ROOT, assert_usage_error, cli, make_agent, running

pytestmark = pytest.mark.usefixtures("chains")

UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"

def record_of(proc: subprocess.CompletedProcess[str]) -> ChainRecord:
    """stdout must be nothing but the record's JSON."""
    data = json.loads(proc.stdout)
    assert isinstance(data, dict), proc.stdout
    return ChainRecord.model_validate(data)


async def assert_no_chain(client, chain_id: str) -> None:
    with pytest.raises(ChainNotFound):
        await get_chain(client, chain_id)


async def show_until_done(
    env: dict[str, str], chain_id: str, timeout_s: float = 20
) -> subprocess.CompletedProcess[str]:
    """`show --json` until the chain is no longer running (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        proc = await cli(env, "show", chain_id, "--json")
        assert "Traceback" not in proc.stderr, proc.stderr
        if record_of(proc).status is not ChainStatus.RUNNING:
            return proc
        assert asyncio.get_running_loop().time() < deadline, f"chain {chain_id} still running"
        await asyncio.sleep(0.3)


def echo_context(seen: list[dict]):
    async def handle(ctx: HandoffContext):
        seen.append(dict(ctx.context_data))
        return ctx.complete({"by": ctx.to_agent, "context": dict(ctx.context_data)})

    return handle


async def test_start_wait_json_prints_only_the_record(client, cli_env, uid):
    first, second = f"cli-a-{uid}", f"cli-b-{uid}"
    seen: list[dict] = []

    async def handle_first(ctx: HandoffContext):
        seen.append(dict(ctx.context_data))
        return ctx.handoff(to_agent=second, task_description="finish", result_data={"step": 1})

    async def handle_second(ctx: HandoffContext):
        return ctx.complete({"by": ctx.to_agent, "k": ctx.context_data["k"], "from": ctx.from_agent})

    async with running(client, make_agent(first, handle_first), make_agent(second, handle_second)):
        proc = await cli(cli_env, "start", "--to", first, "--task", "review it",
                         "--context", '{"k": 1}', "--wait", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.lstrip().startswith("{")
    record = record_of(proc)
    assert record.status is ChainStatus.COMPLETED
    assert [(h.to_agent, h.status) for h in record.hops] == [
        (first, HopStatus.COMPLETED), (second, HopStatus.COMPLETED)]
    assert record.task_description == "review it"
    assert record.final_result == {"by": second, "k": 1, "from": first}
    assert seen == [{"k": 1}]
    assert await get_chain(client, record.chain_id) == record


async def test_start_prints_id_and_link_then_show_returns_the_record(client, cli_env, uid):
    agent = make_agent(f"cli-s-{uid}", echo_context([]))
    async with running(client, agent):
        proc = await cli(cli_env, "start", "--to", agent.id, "--task", "t")
        assert proc.returncode == 0, proc.stderr
        assert "warning" not in proc.stderr, "its worker polls: nothing to warn of"
        lines = proc.stdout.splitlines()
        assert len(lines) == 2, proc.stdout
        match = re.fullmatch(rf"chain ({UUID_RE}) started", lines[0])
        assert match, lines[0]
        chain_id = match.group(1)
        assert lines[1].startswith("Web UI: http")
        assert lines[1].endswith(f"/namespaces/default/workflows/{chain_id}")
        shown = await show_until_done(cli_env, chain_id)
    assert shown.returncode == 0, shown.stderr
    record = record_of(shown)
    assert str(record.chain_id) == chain_id
    assert record.status is ChainStatus.COMPLETED
    assert record.final_result == {"by": agent.id, "context": {}}
    human = await cli(cli_env, "show", chain_id)
    assert human.returncode == 0, human.stderr
    assert chain_id in human.stdout and "completed" in human.stdout


async def test_start_at_an_agent_nobody_serves_warns_at_once_and_still_starts(cli_env, uid):
    nobody = f"nobody-{uid}"
    proc = await cli(cli_env, "start", "--to", nobody, "--task", "t")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("chain "), "the chain is started: its agent may start later"
    warning, = proc.stderr.splitlines()
    assert warning.startswith(f"warning: agent '{nobody}' is not registered and no worker of it is polling")
    waited = await cli(cli_env, "start", "--to", nobody, "--task", "t", "--schedule-to-start", "1", "--wait")
    assert waited.returncode == 1, "with --wait, the failure"
    assert "warning: agent" in waited.stderr and "unreachable" in waited.stdout


async def test_start_reads_context_from_a_file(client, cli_env, uid, tmp_path):
    context = {"repo": "x", "files": ["a.py", "b.py"], "nested": {"n": 2}}
    path = tmp_path / "context.json"
    path.write_text(json.dumps(context))
    seen: list[dict] = []
    agent = make_agent(f"cli-f-{uid}", echo_context(seen))
    async with running(client, agent):
        proc = await cli(cli_env, "start", "--to", agent.id, "--task", "t",
                         "--context", f"@{path}", "--wait", "--json")
    assert proc.returncode == 0, proc.stderr
    record = record_of(proc)
    assert record.status is ChainStatus.COMPLETED
    assert seen == [context]
    assert record.final_result["context"] == context


async def test_unsuccessful_chain_exits_1_for_start_wait_and_show(client, cli_env, uid):
    async def refuse(ctx: HandoffContext):
        raise PermanentError("source is not Python")

    agent = make_agent(f"cli-p-{uid}", refuse)
    async with running(client, agent):
        proc = await cli(cli_env, "start", "--to", agent.id, "--task", "t", "--wait", "--json")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    record = record_of(proc)
    assert record.status is ChainStatus.FAILED
    assert record.hops[0].status is HopStatus.FAILED
    assert record.hops[0].error == "source is not Python"

    shown = await cli(cli_env, "show", str(record.chain_id), "--json")
    assert shown.returncode == 1, shown.stderr
    assert record_of(shown) == record
    human = await cli(cli_env, "show", str(record.chain_id))
    assert human.returncode == 1, human.stderr
    assert "source is not Python" in human.stdout


TO = ["start", "--to", "cli-x", "--task", "t", "--id", "{id}"]

BAD_INPUT = [
    pytest.param([*TO, "--context", "{bad"], "not valid JSON", id="malformed-context"),
    pytest.param([*TO, "--context", "[1, 2]"], "must be a JSON object", id="context-list"),
    pytest.param([*TO, "--context", "@{tmp}/missing.json"], "cannot read --context file", id="missing-file"),
    pytest.param([*TO, "--context", "@{big}"], "limit", id="oversized-context"),
    pytest.param([*TO, "--max-depth", "9"], "max_depth", id="max-depth-9"),
    pytest.param([*TO, "--hop-timeout", "-1"], "hop_timeout_s", id="negative-hop-timeout"),
    pytest.param([*TO, "--capability", "TESTING"], "exactly one", id="to-and-capability"),
    pytest.param(["start", "--task", "t", "--id", "{id}"], "exactly one", id="no-target"),
    pytest.param(["start", "--capability", "WIZARDRY", "--task", "t", "--id", "{id}"],
                 "unknown capability", id="unknown-capability"),
    pytest.param(["start", "--to", "Bad Id", "--task", "t", "--id", "{id}"], "invalid agent id",
                 id="bad-agent-id"),
    pytest.param(["start", "--to", "cli-x", "--task", "t", "--id", "not-a-uuid"], "UUID", id="bad-chain-id"),
    pytest.param(["show", "not-a-uuid"], "UUID", id="show-bad-id"),
    pytest.param(["show", "{id}"], "no chain", id="show-unknown"),
    pytest.param(["cancel", "{id}"], "no chain", id="cancel-unknown"),
    pytest.param(["cancel", "not-a-uuid"], "UUID", id="cancel-bad-id"),
    pytest.param(["list", "--status", "bogus"], "unknown status", id="list-bad-status"),
    pytest.param(["list", "--agent", "Bad Id"], "invalid agent id", id="list-bad-agent"),
    pytest.param(["worker"], "--agent", id="worker-nothing"),
    pytest.param(["worker", "--agent", "nosuchmodule:x"], "cannot import", id="worker-no-module"),
    pytest.param(["worker", "--agent", "json:dumps"], "not an Agent", id="worker-not-agent"),
    pytest.param(["worker", "--agent", "json"], "MODULE:OBJECT", id="worker-no-colon"),
]


@pytest.mark.parametrize("template, fragment", BAD_INPUT)
async def test_bad_input_is_one_line_exit_2_and_starts_nothing(client, cli_env, tmp_path, template, fragment):
    chain_id = str(uuid4())
    big = tmp_path / "big.json"
    if any("{big}" in arg for arg in template):
        big.write_text(json.dumps({"blob": "x" * (MAX_EXTERNAL_CONTEXT_BYTES + 1000)}))  # on loopback: stored
    args = [arg.replace("{id}", chain_id).replace("{tmp}", str(tmp_path)).replace("{big}", str(big))
            for arg in template]
    proc = await cli(cli_env, *args)
    assert_usage_error(proc, fragment)
    await assert_no_chain(client, chain_id)


@pytest.mark.parametrize("args", [
    pytest.param(["start", "--to", "cli-x"], id="missing-task"),
    pytest.param(["start", "--to", "cli-x", "--task", "t", "--max-depth", "abc"], id="max-depth-not-int"),
    pytest.param(["list", "--limit", "0"], id="limit-0"),
    pytest.param(["nosuchcommand"], id="unknown-command"),
])
async def test_parser_errors_are_one_line_too(cli_env, args):
    proc = await cli(cli_env, *args)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


BAD_AGENT_MODULE = '''
from handoff import Agent, AgentCapability


async def handle(ctx):
    return ctx.complete({})


agent = Agent(id="Bad Id", name="bad", capabilities=[AgentCapability.TESTING], handler=handle)
'''


async def test_worker_with_an_invalid_agent_in_the_module_is_a_usage_error(cli_env, uid, tmp_path):
    module = f"badagent_{uid}"
    (tmp_path / f"{module}.py").write_text(BAD_AGENT_MODULE)
    env = {**cli_env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{cli_env['PYTHONPATH']}"}
    proc = await cli(env, "worker", "--agent", f"{module}:agent")
    assert_usage_error(proc, "invalid agent id")


async def test_cancel_a_running_chain(client, cli_env, uid):
    started = asyncio.Event()

    async def long_task(ctx: HandoffContext):
        started.set()
        await asyncio.sleep(60)
        return ctx.complete({})

    agent = make_agent(f"cli-c-{uid}", long_task)
    async with running(client, agent):
        chain_id = str(await start_chain(client, to_agent=agent.id, task_description="t",
                                         policy={"heartbeat_timeout_s": 1}))
        await asyncio.wait_for(started.wait(), 10)
        proc = await cli(cli_env, "cancel", chain_id)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"chain {chain_id}: cancellation requested"
        shown = await show_until_done(cli_env, chain_id)
    assert shown.returncode == 1, shown.stderr
    record = record_of(shown)
    assert record.status is ChainStatus.CANCELLED
    assert record.hops[0].status is HopStatus.CANCELLED
    again = await cli(cli_env, "cancel", chain_id)
    assert_usage_error(again, "not running")


async def test_agents_lists_a_registered_live_agent(client, cli_env, uid):
    agent = make_agent(f"cli-r-{uid}", echo_context([]),
                       [AgentCapability.SECURITY_AUDIT, AgentCapability.TESTING], max_concurrent=3)
    async with running(client, agent, register=True):
        proc = await cli(cli_env, "agents", "--json")
        human = await cli({**cli_env, "COLUMNS": "400"}, "agents")  # wide, so ids are not folded
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    mine = [row for row in rows if row["agent_id"] == agent.id]
    assert len(mine) == 1, rows
    row = mine[0]
    assert row["capabilities"] == ["SECURITY_AUDIT", "TESTING"]
    assert row["live"] is True
    assert row["max_concurrent"] == 3
    assert row["task_queue"] == f"agent.{agent.id}"
    assert isinstance(row["load"], (int, float))
    assert human.returncode == 0, human.stderr
    assert agent.id in human.stdout


async def test_list_finds_a_completed_chain_by_agent(client, cli_env, uid):
    agent = make_agent(f"cli-l-{uid}", echo_context([]))
    async with running(client, agent):
        record = await run_chain(client, to_agent=agent.id, task_description="listed")
    assert record.status is ChainStatus.COMPLETED
    chain_id = str(record.chain_id)
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # visibility is eventually consistent
        proc = await cli(cli_env, "list", "--agent", agent.id, "--json")
        assert proc.returncode == 0, proc.stderr
        rows = json.loads(proc.stdout)
        found = [r for r in rows if r["chain_id"] == chain_id]
        if found and found[0]["status"] == "completed":
            break
        assert asyncio.get_running_loop().time() < deadline, rows
        await asyncio.sleep(0.3)
    assert [r["chain_id"] for r in rows] == [chain_id]
    assert found[0]["agents"] == [agent.id]
    assert found[0]["depth"] == 0  # the chain_depth of its last hop
    completed = await cli(cli_env, "list", "--agent", agent.id, "--status", "completed", "--json")
    assert completed.returncode == 0, completed.stderr
    assert [r["chain_id"] for r in json.loads(completed.stdout)] == [chain_id]
    failed = await cli(cli_env, "list", "--agent", agent.id, "--status", "failed", "--json")
    assert failed.returncode == 0, failed.stderr
    assert json.loads(failed.stdout) == []


AGENT_MODULE = '''
from handoff import Agent, AgentCapability


async def handle(ctx):
    return ctx.complete({{"by": ctx.to_agent, "task": ctx.task_description}})


agent = Agent(id="{agent_id}", name="CLI agent", capabilities=[AgentCapability.TESTING], handler=handle)
'''


async def test_worker_runs_an_agent_in_its_own_process(client, cli_env, uid, tmp_path):
    agent_id = f"cli-w-{uid}"
    module = f"cliagent_{uid}"
    (tmp_path / f"{module}.py").write_text(AGENT_MODULE.format(agent_id=agent_id))
    env = {**cli_env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{cli_env['PYTHONPATH']}"}
    out_path, err_path = tmp_path / "worker.out", tmp_path / "worker.err"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen([HANDOFF, "worker", "--agent", f"{module}:agent"],
                                env=env, stdout=out, stderr=err)
    try:
        record = await asyncio.wait_for(
            run_chain(client, to_agent=agent_id, task_description="remote",
                      policy={"schedule_to_start_s": 20}),
            timeout=40,
        )
        assert record.status is ChainStatus.COMPLETED, record
        assert record.final_result == {"by": agent_id, "task": "remote"}
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err_path.read_text()
    assert code == 0, stderr
    assert "Traceback" not in stderr
    lines = [line for line in out_path.read_text().splitlines() if line.strip()]
    assert lines, stderr
    events = [json.loads(line) for line in lines]  # every stdout line is one JSON object
    assert all(isinstance(e, dict) for e in events)
    started = [e for e in events if e.get("event") == "hop_started"]
    assert len(started) == 1, events
    hop = started[0]
    assert hop["chain_id"] == str(record.chain_id)
    assert hop["handoff_id"] == str(record.hops[0].handoff_id)
    assert hop["hop"] == 0
    assert hop["to_agent"] == agent_id
    assert any(e.get("event") == "hop_completed" and e.get("chain_id") == str(record.chain_id)
               for e in events)


async def test_a_call_the_server_refuses_is_one_line_and_exit_1(cli_env):
    """A namespace the server does not have: the server's answer in one line, no traceback."""
    for args in (["list"], ["list", "--status", "failed"]):
        proc = await cli({**cli_env, "TEMPORAL_NAMESPACE": "no-such-namespace"}, *args)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.splitlines() == [
            "error: the Temporal server answered NOT_FOUND: Namespace no-such-namespace is not found."]


async def test_approve_and_reject_refuse_bad_input_in_one_line(cli_env):
    chain_id = "00000000-0000-4000-8000-000000000000"
    assert_usage_error(await cli(cli_env, "approve", chain_id, "--by", "x" * 500), "by")
    assert_usage_error(await cli(cli_env, "approve", chain_id, "--by", "a", "--comment", "c" * 5000), "comment")
    assert_usage_error(await cli(cli_env, "approve", "not-a-uuid", "--by", "a"), "UUID")
    assert_usage_error(await cli(cli_env, "reject", chain_id, "--by", "a"), "--reason")
    assert_usage_error(await cli(cli_env, "reject", chain_id, "--by", "a", "--reason", " "), "needs a reason")
    assert_usage_error(await cli(cli_env, "approve", chain_id, "--by", "a"), "no chain")
    assert_usage_error(await cli(cli_env, "approve", chain_id, "--by", "a", "--hop", "nope"), "UUID")


def test_the_cli_reference_names_every_command_and_flag_and_no_other():
    """The CLI reference's table (docs/cli.md) cannot drift from the CLI: each command has a row,
    and each row names exactly the flags its command takes."""
    group = typer.main.get_command(app)
    rows: dict[str, set[str]] = {}
    for line in (ROOT / "docs" / "cli.md").read_text().splitlines():
        found = re.match(r"\| `handoff ([a-z0-9-]+)", line)
        if found:
            usage = line.split("` |")[0]
            rows.setdefault(found.group(1), set()).update(re.findall(r"--[a-z0-9-]+", usage))
    assert set(rows) == set(group.commands), "one row per command"
    for name, command in group.commands.items():
        flags = {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} - {"--help"}
        assert rows[name] == flags, (name, sorted(flags - rows[name]), sorted(rows[name] - flags))


def readme_session() -> list[str]:
    """The operator's session the README shows (the first code block after its introduction),
    line by line."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("An operator's session"):].split("```")[1]
    return [line for line in block.splitlines() if line.strip()]


async def test_the_readme_operator_session_runs_as_written(client, cli_env, uid):
    agent = make_agent(f"readme-{uid}", echo_context([]))
    lines = readme_session()
    assert len(lines) >= 5 and lines[0] == "handoff agents"
    chain_id = None
    async with running(client, agent):
        for line in lines:
            argv = shlex.split(line.replace("AGENT", agent.id).replace("CHAIN_ID", str(chain_id)))
            if argv[0] == "temporal":
                proc = await asyncio.to_thread(subprocess.run, [temporal_binary(), *argv[1:]], env=cli_env,
                                               capture_output=True, text=True, timeout=60)
            elif argv[1] == "list":  # visibility catches up with a chain that just ended
                for _ in range(50):
                    proc = await cli(cli_env, *argv[1:])
                    if str(chain_id) in proc.stdout:
                        break
                    await asyncio.sleep(0.2)
            else:
                proc = await cli(cli_env, *argv[1:])
            assert proc.returncode == 0, (line, proc.stdout[-500:], proc.stderr[-500:])
            if argv[1] == "start":
                chain_id = re.search(rf"chain ({UUID_RE}) started", proc.stdout).group(1)
            if chain_id is not None and argv[1] in ("list", "show"):
                assert chain_id in proc.stdout, line
            if argv[0] == "temporal":
                assert "handoff.hop" in proc.stdout and "ActivityTaskCompleted" in proc.stdout.replace(" ", ""), line
    assert chain_id is not None

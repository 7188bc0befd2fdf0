"""`handoff follow`: a chain's events as they happen, to its end; on a terminal (tmux here) the
chain's table grows in place, hop by hop."""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import subprocess

import pytest

from handoff import start_chain, wait_chain
from handoff.models import ChainEvent, EventKind
from tests.support import HANDOFF, assert_usage_error, cli, make_agent, running


def _relay(ids: list[str], gates: dict[str, asyncio.Event] | None = None):
    async def handle(ctx):
        if gates is not None:
            await gates[ctx.to_agent].wait()
        i = ids.index(ctx.to_agent)
        if i + 1 < len(ids):
            return ctx.handoff(to_agent=ids[i + 1], task_description=f"step {i + 1}", result_data={"i": i})
        return ctx.complete({"i": i})

    return handle


async def test_follow_prints_every_event_then_exits_with_the_chain(client, chains, cli_env, uid):
    ids = [f"fo{i}-{uid}" for i in range(3)]
    async with running(client, *[make_agent(i, _relay(ids)) for i in ids]):
        chain_id = await start_chain(client, to_agent=ids[0], task_description="relay", search_attributes=False)
        await wait_chain(client, chain_id)
        lines = await cli(cli_env, "follow", str(chain_id), "--from-start")
        as_json = await cli(cli_env, "follow", str(chain_id), "--json", "--after", "3")
        nothing_new = await cli(cli_env, "follow", str(chain_id))
    assert lines.returncode == 0, lines.stderr
    printed = lines.stdout.splitlines()
    assert [line.split()[0] for line in printed] == [str(n) for n in range(1, len(printed) + 1)]
    assert "chain.started" in printed[0] and "chain.ended: completed" in printed[-1]
    assert sum("hop.completed" in line for line in printed) == 3
    events = [ChainEvent.model_validate(json.loads(line)) for line in as_json.stdout.splitlines()]
    assert [e.cursor for e in events] == list(range(4, len(printed) + 1))
    assert events[-1].kind is EventKind.CHAIN_ENDED
    assert nothing_new.returncode == 0 and nothing_new.stdout == "", "without a flag: only what happens from now"


async def test_follow_refuses_bad_input_in_one_line(cli_env):
    assert_usage_error(await cli(cli_env, "follow", "not-a-uuid"), "not-a-uuid")
    assert_usage_error(await cli(cli_env, "follow", "00000000-0000-0000-0000-00000000000f"), "no chain")
    assert_usage_error(await cli(cli_env, "follow", "00000000-0000-0000-0000-00000000000f", "--after", "-1"),
                       "--after")
    assert_usage_error(await cli(cli_env, "follow", "00000000-0000-0000-0000-00000000000f", "--after", "2",
                                 "--from-start"), "do not go together")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
async def test_follow_on_a_terminal_grows_the_chain_in_place(client, chains, cli_env, uid, tmp_path):
    ids = [f"ft{i}-{uid}" for i in range(3)]
    gates = {i: asyncio.Event() for i in ids}
    session = f"follow-{uid}"
    env = " ".join(f"{k}={shlex.quote(cli_env[k])}" for k in ("TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "PYTHONPATH"))

    def screen() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout

    async def shows(*wanted: str) -> str:
        text = ""
        for _ in range(100):
            text = screen()
            if all(w in text for w in wanted):
                return text
            await asyncio.sleep(0.1)
        raise AssertionError(f"the terminal never showed {wanted}:\n{text}")

    async with running(client, *[make_agent(i, _relay(ids, gates)) for i in ids]):
        chain_id = await start_chain(client, to_agent=ids[0], task_description="relay on a terminal",
                                     search_attributes=False)
        done = tmp_path / "exit"
        command = f"env {env} {HANDOFF} follow {chain_id} --from-start; echo $? > {done}; sleep 60"
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", command], check=True)
        try:
            first = await shows("relay on a terminal", ids[0], "running")
            assert ids[1] not in first
            for i, agent in enumerate(ids):
                gates[agent].set()
                text = await shows(f"hop.completed: {agent}")
                assert text.count("completed") >= i + 1
                if i + 1 < len(ids):
                    assert ids[i + 1] in text, "the next hop appears as it is scheduled"
            final = await shows("chain.ended: completed")
            for _ in range(50):
                if done.exists():
                    break
                await asyncio.sleep(0.1)
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert done.read_text().strip() == "0"
    assert final.count("chain ") >= 1 and all(agent in final for agent in ids)
    assert "step 2" in final, "the table shows each hop's task"

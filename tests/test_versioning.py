"""Agent rollouts with Worker Deployments: a new version takes the next hops, also in chains
that are already running."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess

import pytest
from temporalio.service import RPCError

from rich.console import Console

from handoff import AgentCapability, ChainStatus, InvalidRequest, rerun_chain, run_chain, wait_chain
from handoff.models import AgentCard
from handoff.registry import AgentStatus, QueueStats
from handoff.cli.render import agents_table
from handoff.client.versioning import Routing, current_build_id, routing_of, set_current_build_id
from handoff.workers.agent_worker import run_agent
from tests.support import HANDOFF, make_agent

pytestmark = pytest.mark.usefixtures("chains")



async def test_rollout_moves_later_hops_of_a_running_chain_to_the_new_version(client, cli_env, uid):
    agent_id = f"rollout-{uid}"
    first_hop_running = asyncio.Event()
    proceed = asyncio.Event()  # the first hop of the chain under test ends only after the rollout
    proceed.set()

    def build(version: str):
        async def handle(ctx):
            if ctx.chain_depth == 0:
                first_hop_running.set()
                await asyncio.wait_for(proceed.wait(), 30)
                return ctx.handoff(to_agent=agent_id, task_description="second look",
                                   result_data={"version": version})
            return ctx.complete({"version": version})

        return dataclasses.replace(make_agent(agent_id, handle), version=version)

    stop = asyncio.Event()
    v1 = asyncio.create_task(run_agent(client, build("v1"), stop, register=False, versioned=True))
    for _ in range(100):  # the first version makes itself current
        if await current_build_id(client, agent_id) == "v1":
            break
        await asyncio.sleep(0.1)
    assert await current_build_id(client, agent_id) == "v1"
    before = await run_chain(client, to_agent=agent_id, task_description="look", policy={"max_depth": 1})
    assert before.hops[0].result_data == {"version": "v1"}

    v2 = asyncio.create_task(run_agent(client, build("v2"), stop, register=False, versioned=True))
    first_hop_running.clear()
    proceed.clear()
    chain = asyncio.create_task(run_chain(client, to_agent=agent_id, task_description="look"))
    await asyncio.wait_for(first_hop_running.wait(), 10)
    rollout = await asyncio.to_thread(
        subprocess.run, [HANDOFF, "rollout", agent_id, "v2"], env=cli_env,
        capture_output=True, text=True, timeout=30)
    assert rollout.returncode == 0, rollout.stderr
    await asyncio.sleep(1)  # the new routing reaches the agent's task queue asynchronously
    proceed.set()
    record = await asyncio.wait_for(chain, 30)
    stop.set()
    await asyncio.gather(v1, v2)

    assert record.status is ChainStatus.COMPLETED
    assert [h.result_data["version"] for h in record.hops] == ["v1", "v2"]
    assert [h.build_id for h in record.hops] == ["v1", "v2"], "the record names the version that ran each hop"
    assert await current_build_id(client, agent_id) == "v2"
    routing = await routing_of(client, agent_id)
    assert routing.current == "v2" and set(routing.versions) == {"v1", "v2"} and routing.ramping is None

    # a rollout that cannot apply is refused, and changes nothing
    for args, fragment in (([agent_id, "v9"], "no worker of that version has polled"),
                           ([f"never-versioned-{uid}", "v2"], "has no versioned workers")):
        refused = await asyncio.to_thread(subprocess.run, [HANDOFF, "rollout", *args], env=cli_env,
                                          capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2 and fragment in refused.stderr, refused.stderr
        assert len(refused.stderr.splitlines()) == 1
    assert await current_build_id(client, agent_id) == "v2"
    assert await routing_of(client, f"never-versioned-{uid}") is None


async def test_rollout_of_a_bad_agent_id_is_a_usage_error(cli_env):
    result = await asyncio.to_thread(
        subprocess.run, [HANDOFF, "rollout", "Bad Id", "v2"], env=cli_env,
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and len(result.stderr.splitlines()) == 1


def test_handoff_agents_shows_the_version_hops_go_to_and_a_ramping_one():
    card = AgentCard(agent_id="reviewer", name="Reviewer", capabilities=[AgentCapability.TESTING],
                     task_queue="agent.reviewer", version="v3")
    status = AgentStatus(card=card, stats=QueueStats(pollers=2, live=True, backlog=0))
    console = Console(width=80, record=True)
    console.print(agents_table([status], {"reviewer": Routing(current="v2", ramping="v3", ramping_percentage=20,
                                                               versions=("v2", "v3"))}))
    shown = console.export_text()
    assert "current v2, ramping v3 20%" in shown
    console.print(agents_table([status], {"reviewer": None}))
    assert console.export_text().count("current") == 0, "an unversioned agent shows no routing"


async def test_a_rerun_after_a_rollout_runs_the_hop_on_the_fixed_version(client, uid):
    """The use of a re-run: a chain failed at an agent's hop; a fixed version is rolled out; the
    chain re-run from that hop runs it on the new version, and calls no earlier agent again."""
    lead, agent_id = f"rr-lead-{uid}", f"rr-fixed-{uid}"
    calls: list[tuple[str, str]] = []

    async def first(ctx):
        calls.append((ctx.to_agent, ""))
        return ctx.handoff(to_agent=agent_id, task_description="convert it", result_data={"by": lead})

    def build(version: str):
        async def handle(ctx):
            calls.append((ctx.to_agent, version))
            if version == "v1":
                return ctx.fail("v1 cannot convert it")
            return ctx.complete({"version": version})
        return dataclasses.replace(make_agent(agent_id, handle), version=version)

    stop = asyncio.Event()
    workers = [asyncio.create_task(run_agent(client, make_agent(lead, first), stop, register=False)),
               asyncio.create_task(run_agent(client, build("v1"), stop, register=False, versioned=True))]
    try:
        for _ in range(40):  # slowly: a Worker Deployment limits how often it is asked
            if await current_build_id(client, agent_id) == "v1":
                break
            await asyncio.sleep(0.5)
        original = await run_chain(client, to_agent=lead, task_description="convert")
        assert original.status is ChainStatus.FAILED and original.hops[1].build_id == "v1"
        await asyncio.sleep(1)
        workers.append(asyncio.create_task(run_agent(client, build("v2"), stop, register=False, versioned=True)))
        await asyncio.sleep(1)
        for _ in range(30):  # once the new version's worker has polled, it can be made current
            try:
                await set_current_build_id(client, agent_id, "v2")
                break
            except (InvalidRequest, RPCError):  # not polled yet; or the deployment's rate limit
                await asyncio.sleep(1)
        await asyncio.sleep(1)  # the new routing reaches the agent's task queue asynchronously
        calls.clear()
        record = await wait_chain(client, await rerun_chain(client, original.chain_id, from_hop=1))
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert record.status is ChainStatus.COMPLETED, record.error
    assert calls == [(agent_id, "v2")], "the lead was not called again; the hop ran on v2"
    assert [(h.to_agent, h.build_id) for h in record.hops] == [(lead, original.hops[0].build_id), (agent_id, "v2")]
    assert record.hops[0].carried_from == original.chain_id

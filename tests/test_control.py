"""People controlling a running chain: steering its next hop (`steer_chain`, `handoff steer`), a
redirect of its next handoff under the same rules, and a stop once its running hops end
(`stop_chain`, `handoff cancel --after-hop`). Against the real server and chain worker."""

from __future__ import annotations

import asyncio
import json

import pytest

from handoff import (
    ChainStatus,
    HopStatus,
    InvalidRequest,
    get_chain,
    rerun_chain,
    run_chain,
    start_chain,
    steer_chain,
    stop_chain,
    wait_chain,
)
from handoff.agents.llm import llm_agent
from handoff.client.search import chain_query, find_chains
from handoff.models import AgentCapability
from handoff.testing import ScriptedModel, call
from tests.support import assert_usage_error, cli, make_agent, running

pytestmark = pytest.mark.usefixtures("chains")


def held(to: str | None, release: asyncio.Event, started: asyncio.Event | None = None):
    """A handler that waits for `release`, then hands on to `to` (or completes)."""
    async def handle(ctx):
        if started is not None:
            started.set()
        await release.wait()
        if to is None:
            return ctx.complete({"by": ctx.to_agent})
        return ctx.handoff(to_agent=to, task_description=f"after {ctx.to_agent}", result_data={"by": ctx.to_agent})
    return handle


def recording(seen: list):
    async def handle(ctx):
        seen.append(ctx)
        return ctx.complete({"by": ctx.to_agent})
    return handle


async def test_steering_reaches_the_next_hops_handler_and_an_llm_agents_prompt(client, uid):
    a, b, c = f"steer-a-{uid}", f"steer-b-{uid}", f"steer-c-{uid}"
    release, started = asyncio.Event(), asyncio.Event()
    seen: list = []
    async with ScriptedModel(lambda request, n: call(f"transfer_to_{c.replace('-', '_')}", task="finish it")) as model:
        chooser = llm_agent(id=b, name="B", capabilities=[AgentCapability.CODE_ANALYSIS], model="scripted",
                            instructions="Route the work.", base_url=model.url, api_key="test")
        policy = {"allowed_handoffs": {"starter": [a], a: [b], b: [c], c: []}}
        async with running(client, make_agent(a, held(b, release, started)), chooser,
                           make_agent(c, recording(seen)), register=True):
            chain_id = await start_chain(client, to_agent=a, task_description="steered", policy=policy)
            await asyncio.wait_for(started.wait(), 10)
            sent = await steer_chain(client, chain_id, message="prefer the staging cluster", by="ops@example")
            release.set()
            record = await wait_chain(client, chain_id)
    assert record.status is ChainStatus.COMPLETED, record.error
    assert sent.message == "prefer the staging cluster" and sent.by == "ops@example"
    assert [h.to_agent for h in record.hops] == [a, b, c]
    assert [s.message for s in record.hops[1].steering] == ["prefer the staging cluster"]
    assert record.hops[0].steering == [] and record.hops[2].steering == [], "delivered once, to the next hop"
    system = model.requests[0]["messages"][0]["content"]
    assert "prefer the staging cluster (from ops@example)" in system
    assert seen[0].steering == []
    assert await get_chain(client, chain_id) == record


async def test_a_redirect_is_obeyed_and_one_the_policy_forbids_is_refused(client, uid):
    a, b, c, d = (f"redir-{x}-{uid}" for x in "abcd")
    release, started = asyncio.Event(), asyncio.Event()
    seen: list = []
    policy = {"allowed_handoffs": {"starter": [a], a: [b, c], b: [], c: []}}
    async with running(client, make_agent(a, held(b, release, started)), make_agent(b, recording(seen)),
                       make_agent(c, recording(seen)), make_agent(d, recording(seen))):
        chain_id = await start_chain(client, to_agent=a, task_description="redirected", policy=policy)
        await asyncio.wait_for(started.wait(), 10)
        with pytest.raises(InvalidRequest, match=f"does not let {a} hand off to {d}"):
            await steer_chain(client, chain_id, message="go to d", by="ops", redirect=d)
        await steer_chain(client, chain_id, message="c knows better", by="ops", redirect=c)
        release.set()
        record = await wait_chain(client, chain_id)
    assert record.status is ChainStatus.COMPLETED, record.error
    assert [h.to_agent for h in record.hops] == [a, c], "c ran instead of b"
    assert [ctx.to_agent for ctx in seen] == [c] and seen[0].steering[0].redirect == c
    with pytest.raises(InvalidRequest, match="is not running"):
        await steer_chain(client, chain_id, message="too late", by="ops")


async def test_cancel_after_hop_keeps_the_running_hops_result_and_starts_no_other(client, uid):
    a, b = f"stop-a-{uid}", f"stop-b-{uid}"
    release, started = asyncio.Event(), asyncio.Event()
    seen: list = []
    async with running(client, make_agent(a, held(b, release, started)), make_agent(b, recording(seen))):
        chain_id = await start_chain(client, to_agent=a, task_description="stopped")
        await asyncio.wait_for(started.wait(), 10)
        await stop_chain(client, chain_id, by="ops", reason="enough for today")
        with pytest.raises(InvalidRequest, match="is stopping"):
            await stop_chain(client, chain_id, by="ops")
        release.set()
        record = await wait_chain(client, chain_id)
    assert record.status is ChainStatus.CANCELLED
    assert [(h.to_agent, h.status) for h in record.hops] == [(a, HopStatus.COMPLETED)]
    assert record.hops[0].result_data == {"by": a}, "the running hop's result is kept"
    assert seen == [], "no new hop started"
    assert record.error == "stopped by ops after its running hops: enough for today"


async def test_a_stop_ends_a_wait_for_approval(client, uid):
    a, b = f"wait-a-{uid}", f"wait-b-{uid}"
    seen: list = []

    async def asks(ctx):
        return ctx.handoff(to_agent=b, task_description="gated", require_approval=True)

    async with running(client, make_agent(a, asks), make_agent(b, recording(seen))):
        chain_id = await start_chain(client, to_agent=a, task_description="gated")
        for _ in range(100):
            if (await get_chain(client, chain_id)).status is ChainStatus.AWAITING_APPROVAL:
                break
            await asyncio.sleep(0.1)
        await stop_chain(client, chain_id, by="ops")
        record = await wait_chain(client, chain_id)
    assert record.status is ChainStatus.CANCELLED and seen == []
    assert [(h.to_agent, h.status) for h in record.hops] == [(a, HopStatus.COMPLETED), (b, HopStatus.CANCELLED)]


async def test_the_cli_steers_and_stops_and_refuses_bad_input_in_one_line(client, uid, cli_env):
    a, b = f"cli-a-{uid}", f"cli-b-{uid}"
    release, started = asyncio.Event(), asyncio.Event()
    seen: list = []
    async with running(client, make_agent(a, held(b, release, started)), make_agent(b, recording(seen))):
        chain_id = await start_chain(client, to_agent=a, task_description="by the cli")
        await asyncio.wait_for(started.wait(), 10)
        proc = await cli(cli_env, "steer", str(chain_id), "--message", "be brief", "--by", "ann")
        assert proc.returncode == 0 and "the next hop will hear it" in proc.stdout, proc.stderr
        assert_usage_error(await cli(cli_env, "steer", str(chain_id), "--message", "x", "--redirect", "not an id!"),
                           "redirect")
        assert_usage_error(await cli(cli_env, "steer", str(chain_id), "--message", " ", "--by", "ann"), "message")
        proc = await cli(cli_env, "cancel", str(chain_id), "--after-hop", "--by", "ann")
        assert proc.returncode == 0 and "stops once its running hops end" in proc.stdout, proc.stderr
        release.set()
        record = await wait_chain(client, chain_id)
    assert record.status is ChainStatus.CANCELLED and seen == []
    assert_usage_error(await cli(cli_env, "steer", str(chain_id), "--message", "late", "--by", "ann"), "is not running")


async def test_a_chain_without_steering_runs_as_before(client, uid):
    a = f"plain-{uid}"
    seen: list = []
    async with running(client, make_agent(a, recording(seen))):
        record = await run_chain(client, to_agent=a, task_description="t")
    assert record.status is ChainStatus.COMPLETED and seen[0].steering == [] and record.hops[0].steering == []


# -- re-running a chain from a hop -----------------------------------------------------------------


async def test_a_rerun_from_hop_2_calls_the_earlier_agents_zero_times_and_runs_hop_2_on_a_new_version(client, uid):
    ids = [f"rerun{i}-{uid}" for i in range(4)]
    calls: list[str] = []
    broken = {"on": True}

    def relay(index: int):
        async def handle(ctx):
            calls.append(ctx.to_agent)
            if index == 2 and broken["on"]:
                return ctx.fail("hop 2 got it wrong", {"seen": len(ctx.previous_results)})
            if index + 1 < len(ids):
                return ctx.handoff(to_agent=ids[index + 1], task_description=f"step {index + 1}",
                                   result_data={"by": ctx.to_agent}, context_data={f"k{index}": index})
            return ctx.complete({"by": ctx.to_agent, "seen": ctx.previous_results, "context": ctx.context_data})
        return handle

    async with running(client, *(make_agent(a, relay(n)) for n, a in enumerate(ids))):
        original = await run_chain(client, to_agent=ids[0], task_description="original")
        assert original.status is ChainStatus.FAILED
        broken["on"] = False  # a fixed version of hop 2's agent
        calls.clear()
        new_id = await rerun_chain(client, original.chain_id, from_hop=2)
        record = await wait_chain(client, new_id)
        for _ in range(50):  # visibility is eventually consistent
            found = await find_chains(client, chain_query(rerun_of=original.chain_id))
            if found:
                break
            await asyncio.sleep(0.1)
    assert calls == [ids[2], ids[3]], "hops 0-1's agents were called zero times"
    assert record.status is ChainStatus.COMPLETED, record.error
    assert record.rerun_of.chain_id == original.chain_id and record.rerun_of.hop == 2
    assert [(h.to_agent, h.carried_from) for h in record.hops] == [
        (ids[0], original.chain_id), (ids[1], original.chain_id), (ids[2], None), (ids[3], None)]
    assert record.hops[:2] == [h.model_copy(update={"carried_from": original.chain_id}) for h in original.hops[:2]]
    assert record.final_result["seen"] == [{"by": ids[0]}, {"by": ids[1]}, {"by": ids[2]}]
    assert record.final_result["context"] == {"k0": 0, "k1": 1, "k2": 2}, "hop 2 had the context it had"
    assert record.hops[2].from_agent == ids[1] and record.hops[2].task_description == "step 2"
    assert [row["chain_id"] for row in found] == [str(new_id)]
    assert await get_chain(client, new_id) == record


async def test_a_rerun_may_go_elsewhere_and_refuses_what_the_original_never_ran(client, uid, cli_env):
    a, b, c = f"re-a-{uid}", f"re-b-{uid}", f"re-c-{uid}"
    seen: list = []

    async def first(ctx):
        return ctx.handoff(to_agent=b, task_description="second", result_data={"by": a})

    async with running(client, make_agent(a, first), make_agent(b, recording(seen)), make_agent(c, recording(seen))):
        original = await run_chain(client, to_agent=a, task_description="t")
        new_id = await rerun_chain(client, original.chain_id, from_hop=1, to_agent=c, task_description="try c")
        record = await wait_chain(client, new_id)
        with pytest.raises(InvalidRequest, match="has no hop 3"):
            await rerun_chain(client, original.chain_id, from_hop=3)
        proc = await cli(cli_env, "rerun", str(original.chain_id), "--from-hop", "1", "--wait", "--json")
        assert proc.returncode == 0, proc.stderr
        shown = await cli(cli_env, "show", json.loads(proc.stdout)["chain_id"])
        assert f"a re-run of chain {original.chain_id} from hop 1" in " ".join(shown.stdout.split())
        for _ in range(50):  # visibility is eventually consistent
            listed = await cli(cli_env, "list", "--rerun-of", str(original.chain_id), "--json")
            if len(json.loads(listed.stdout)) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(json.loads(listed.stdout)) == 2
        assert_usage_error(await cli(cli_env, "rerun", str(original.chain_id), "--from-hop", "4"), "has no hop 4")
        assert_usage_error(await cli(cli_env, "rerun", str(original.chain_id), "--from-hop", "1", "--to", c,
                                     "--capability", "TESTING"), "not both")
    assert record.status is ChainStatus.COMPLETED
    assert [h.to_agent for h in record.hops] == [a, c] and record.hops[1].task_description == "try c"
    assert [ctx.to_agent for ctx in seen] == [b, c, b]

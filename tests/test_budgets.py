"""A chain's budget (`ChainPolicy.budget`) holds across every agent's deployment: each hop's usage
(an LLM agent's model calls, what a handler reports) is added up by the chain workflow and priced
at the budget's own table, and a hop that would start with a limit reached is refused, the chain
(or its branch) ending `budget_exceeded` with every earlier result kept."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from handoff import AgentCapability, Branch, ChainStatus, HopStatus, Join, get_chain, run_chain
from handoff.agents.llm import llm_agent
from handoff.testing import ScriptedModel, call, offered
from tests.support import assert_usage_error, cli, make_agent, running

pytestmark = pytest.mark.usefixtures("chains")

PRICES = {"scripted": {"prompt": 1000.0, "completion": 2000.0}}
"""Per million tokens: each scripted call (11 prompt, 7 completion tokens) costs 0.025."""
CALL_COST = (11 * 1000.0 + 7 * 2000.0) / 1e6


def router(agent_id: str, url: str):
    return llm_agent(id=agent_id, name=agent_id, capabilities=[AgentCapability.CODE_ANALYSIS],
                     instructions="Hand the work on.", model="scripted", base_url=url, api_key="test",
                     max_tokens=500)


async def test_a_token_budget_running_out_refuses_the_next_hop_before_its_model_is_called(client, uid):
    ids = [f"llm{i}-{uid}" for i in range(4)]

    def answer(request, n):  # each agent has one target: hand on to it
        transfers = [t for t in offered(request) if t.startswith("transfer_to_")]
        return call(transfers[0], task=f"step {n}") if transfers else call("finish", answer="done")

    async with ScriptedModel(answer) as model:
        agents = [router(i, model.url) for i in ids]
        policy = {"allowed_handoffs": {"starter": [ids[0]], **{a: [b] for a, b in zip(ids, ids[1:])}, ids[3]: []},
                  "budget": {"max_tokens": 50, "prices": PRICES, "currency": "EUR"}}
        async with running(client, *agents, register=True):
            record = await run_chain(client, to_agent=ids[0], task_description="spend", policy=policy)
    assert record.status is ChainStatus.BUDGET_EXCEEDED, record.error
    assert len(model.requests) == 3, "hop 3's model was never called"
    assert [(h.to_agent, h.status) for h in record.hops] == [
        (ids[0], HopStatus.COMPLETED), (ids[1], HopStatus.COMPLETED), (ids[2], HopStatus.COMPLETED),
        (ids[3], HopStatus.REFUSED)]
    assert "50 tokens is used up (54 spent)" in record.hops[3].error and record.error == record.hops[3].error
    assert all(h.usage.tokens == 18 and h.usage.model_calls == 1 for h in record.hops[:3])
    assert all(h.usage.cost == pytest.approx(CALL_COST) for h in record.hops[:3])
    assert record.usage.tokens == sum(h.usage.tokens for h in record.hops[:3]) == 54
    assert record.usage.cost == pytest.approx(3 * CALL_COST) and record.currency == "EUR"
    assert record.usage.by_model["scripted"].model_calls == 3
    assert {a: u.tokens for a, u in record.usage_by_agent.items()} == {ids[0]: 18, ids[1]: 18, ids[2]: 18}
    # each hop was told what was left, and its model call's max_tokens fitted to it
    assert [r["max_tokens"] for r in model.requests] == [50, 32, 14]
    assert await get_chain(client, record.chain_id) == record


async def test_branches_share_the_chains_cost_budget(client, uid):
    lead, join = f"lead-{uid}", f"join-{uid}"
    firsts = [f"first{i}-{uid}" for i in range(3)]
    seconds = {f: f"second{i}-{uid}" for i, f in enumerate(firsts)}
    told: dict[str, float] = {}

    async def handle(ctx):
        told[ctx.to_agent] = ctx.limits.budget.cost
        if ctx.to_agent == lead:
            return ctx.fan_out([Branch(to_agent=f, task_description="part") for f in firsts],
                               join=Join(to_agent=join, task_description="join"))
        ctx.report_usage(cost=0.5)
        if ctx.to_agent in seconds:
            return ctx.handoff(to_agent=seconds[ctx.to_agent], task_description="more")
        return ctx.complete({"by": ctx.to_agent})

    agents = [make_agent(a, handle) for a in [lead, join, *firsts, *seconds.values()]]
    async with running(client, *agents):
        record = await run_chain(client, to_agent=lead, task_description="fan out",
                                 policy={"budget": {"max_cost": 1.0}})
    assert record.status is ChainStatus.BUDGET_EXCEEDED, record.error
    branches = record.hops[0].fan_out.branches
    spent_hops = [h for b in branches for h in b.hops if h.usage is not None]
    assert record.usage.cost == pytest.approx(sum(h.usage.cost for h in spent_hops))
    assert record.usage.cost >= 1.0 and len(spent_hops) >= 2
    assert any(b.status is ChainStatus.BUDGET_EXCEEDED for b in branches), "a branch was refused its next hop"
    assert all(h.status is HopStatus.COMPLETED for h in spent_hops)
    assert told[lead] == 1.0
    assert record.hops[-1].status is HopStatus.REFUSED and "1 USD is used up" in record.error


async def test_the_time_budget_cuts_a_hop_still_running(client, uid):
    slow = f"slow-{uid}"
    cancelled = asyncio.Event()

    async def sleeps(ctx):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return ctx.complete({})

    async with running(client, make_agent(slow, sleeps)):
        started = time.monotonic()
        record = await asyncio.wait_for(run_chain(client, to_agent=slow, task_description="t",
                                                  policy={"budget": {"max_duration_s": 2}}), 30)
        await asyncio.wait_for(cancelled.wait(), 10)
    assert record.status is ChainStatus.BUDGET_EXCEEDED, record.error
    assert time.monotonic() - started < 10
    assert [h.status for h in record.hops] == [HopStatus.TIMED_OUT, HopStatus.REFUSED]
    assert "time budget of 2 s is used up" in record.error


async def test_a_handler_reports_what_it_spent_and_a_chain_without_a_budget_still_adds_it_up(client, uid):
    agent = f"reports-{uid}"

    async def handle(ctx):
        ctx.report_usage(model="my-model", prompt_tokens=100, completion_tokens=20, model_calls=2)
        ctx.report_usage(model="my-model", prompt_tokens=1, completion_tokens=1, model_calls=1)
        assert ctx.limits.budget is None
        return ctx.complete({})

    async with running(client, make_agent(agent, handle)):
        record = await run_chain(client, to_agent=agent, task_description="t")
    assert record.status is ChainStatus.COMPLETED
    assert (record.usage.tokens, record.usage.model_calls, record.usage.cost) == (122, 3, 0.0)
    assert record.usage.by_model["my-model"].prompt_tokens == 101 and record.currency is None


async def test_handoff_start_takes_the_whole_policy_and_refuses_a_bad_one_in_one_line(client, uid, cli_env, tmp_path):
    agent = f"cli-{uid}"

    async def handle(ctx):
        ctx.report_usage(model="m", prompt_tokens=5, completion_tokens=5, model_calls=1)
        return ctx.complete({"ok": True})

    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"budget": {"max_tokens": 1000, "prices": {"m": {"prompt": 1e5}}},
                                  "max_attempts": 2}))
    async with running(client, make_agent(agent, handle)):
        proc = await cli(cli_env, "start", "--to", agent, "--task", "t", "--policy", f"@{policy}",
                         "--wait", "--json")
        assert proc.returncode == 0, proc.stderr
        record = json.loads(proc.stdout)
        assert (record["usage"]["prompt_tokens"], record["usage"]["completion_tokens"]) == (5, 5)
        assert record["usage"]["cost"] == pytest.approx(0.5)
        shown = await cli(cli_env, "show", record["chain_id"])
        assert "spent: 10 tokens (5 prompt, 5 completion), 1 model call, 0.5 USD" in " ".join(shown.stdout.split())
        for _ in range(50):  # the cost is written at the chain's end; visibility follows
            listed = json.loads((await cli(cli_env, "list", "--min-cost", "0.4", "--json")).stdout)
            if any(row["chain_id"] == record["chain_id"] for row in listed):
                break
            await asyncio.sleep(0.1)
        assert [row["cost"] for row in listed if row["chain_id"] == record["chain_id"]] == [pytest.approx(0.5)]
        above = json.loads((await cli(cli_env, "list", "--min-cost", "0.6", "--json")).stdout)
        assert record["chain_id"] not in [row["chain_id"] for row in above]
    assert_usage_error(await cli(cli_env, "start", "--to", agent, "--task", "t", "--policy",
                                 '{"budget": {"max_tokens": 0}}'), "budget.max_tokens")
    assert_usage_error(await cli(cli_env, "start", "--to", agent, "--task", "t", "--policy",
                                 '{"fallback_agent": "a"}', "--fallback-agent", "b"), "given twice")
    assert_usage_error(await cli(cli_env, "start", "--to", agent, "--task", "t", "--policy",
                                 '{"budget": {"max_cost": 1, "surprise": 1}}'), "surprise")

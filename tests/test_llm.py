"""LLM agents (`handoff.agents.llm`) against a deterministic OpenAI-compatible server on loopback: which
transfer tools are offered (from the live registry, never what the chain would refuse), how the
model's call becomes the chain's next handoff, how unusable answers and model errors are handled,
and what the audit records. The real model is in tests/test_llm_model.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from handoff import AgentCapability, ChainStatus, HandoffContext, HopStatus, get_chain, run_chain, watch_chain
from handoff.agents.llm import fit_prompt, llm_agent, transfers
from handoff.models import AgentCard, EventKind, HopLimits
from handoff.testing import Reply, ScriptedModel, call, offered
from tests.support import cli, make_agent, running

pytestmark = pytest.mark.usefixtures("chains")

FAST = {"retry_initial_s": 0.1}


def triage(uid: str, url: str, **options) -> object:
    return llm_agent(id=f"triage-{uid}", name="Triage", capabilities=[AgentCapability.CODE_ANALYSIS],
                     instructions="Route the work to the right specialist.", model="scripted",
                     base_url=url, api_key="test", **options)


def completing(seen: list[HandoffContext] | None = None):
    async def handle(ctx):
        if seen is not None:
            seen.append(ctx)
        return ctx.complete({"by": ctx.to_agent})
    return handle


def card(agent_id: str, *capabilities: AgentCapability, description: str = "") -> AgentCard:
    return AgentCard(agent_id=agent_id, name=agent_id.title(), capabilities=list(capabilities),
                     task_queue=f"agent.{agent_id}", description=description)


# -- what is offered ----------------------------------------------------------------------------


def test_transfers_leave_out_what_the_chain_would_refuse():
    cards = [card("me", AgentCapability.CODE_ANALYSIS), card("audit", AgentCapability.SECURITY_AUDIT),
             card("dba", AgentCapability.DATABASE_OPERATIONS), card("tired", AgentCapability.SECURITY_AUDIT),
             card("tests", AgentCapability.TESTING)]
    limits = HopLimits(allowed_targets=["audit", "tired", "SECURITY_AUDIT", "tests"], excluded_agents=["tired"])
    names = [t.name for t in transfers(cards, limits, "me")]
    # not me, not dba (the policy), not tired (visited enough); capabilities the policy allows
    assert names == ["transfer_to_audit", "transfer_to_tests", "transfer_to_any_security_audit"]
    assert transfers(cards, HopLimits(can_hand_off=False), "me") == []
    everything = [t.name for t in transfers(cards, None, "me")]
    assert "transfer_to_dba" in everything and "transfer_to_any_testing" in everything
    assert "transfer_to_me" not in everything


def test_the_prompt_fits_its_budget_and_names_what_it_left_out():
    ctx = HandoffContext(to_agent="a", task_description="review", context_data={"source": "x" * 9000, "pr": 42},
                         previous_results=[{"old": "y" * 3000}, {"new": 1}])
    prompt = fit_prompt(ctx, budget_tokens=300)
    assert len(prompt.text) <= 1200
    assert prompt.trimmed == ["previous_results[0]", "context_data.source"]
    assert '"pr": 42' in prompt.text and '{"new": 1}' in prompt.text and "review" in prompt.text
    assert fit_prompt(ctx, budget_tokens=100_000).trimmed == []


async def test_offered_tools_come_from_the_live_registry_and_the_policy(client, uid):
    audit, dba, forbidden = f"audit-{uid}", f"dba-{uid}", f"forbidden-{uid}"
    seen: list[HandoffContext] = []

    def answer(request, n):
        return call(f"transfer_to_{audit.replace('-', '_')}", task="audit the diff", reason="it touches auth")

    async with ScriptedModel(answer) as model:
        lead = triage(uid, model.url)
        agents = [lead, make_agent(audit, completing(seen), [AgentCapability.SECURITY_AUDIT]),
                  make_agent(dba, completing(), [AgentCapability.DATABASE_OPERATIONS]),
                  make_agent(forbidden, completing(), [AgentCapability.DEPLOYMENT])]
        policy = {"allowed_handoffs": {"starter": [lead.id], lead.id: [audit, dba, "SECURITY_AUDIT"]}}
        async with running(client, *agents, register=True):
            record = await run_chain(client, to_agent=lead.id, task_description="review PR 7", policy=policy)
    assert record.status is ChainStatus.COMPLETED, record.error
    tools = set(offered(model.requests[0]))
    assert {f"transfer_to_{audit.replace('-', '_')}", f"transfer_to_{dba.replace('-', '_')}",
            "transfer_to_any_security_audit", "finish"} <= tools
    assert not any(forbidden.replace("-", "_") in t for t in tools), "the policy forbids it"
    assert "transfer_to_any_deployment" not in tools
    assert not any(lead.id.replace("-", "_") in t for t in tools), "never itself"
    hop = record.hops[0]
    assert hop.decision.tool == f"transfer_to_{audit.replace('-', '_')}"
    assert hop.decision.arguments == {"task": "audit the diff", "reason": "it touches auth"}
    assert (hop.decision.reason, hop.decision.model, hop.decision.model_calls) == ("it touches auth", "scripted", 1)
    assert (hop.decision.prompt_tokens, hop.decision.completion_tokens) == (11, 7)
    assert [h.to_agent for h in record.hops] == [lead.id, audit]
    assert seen[0].task_description == "audit the diff" and seen[0].from_agent == lead.id
    assert await get_chain(client, record.chain_id) == record


async def test_no_transfer_is_offered_past_the_depth_limit(client, uid):
    async with ScriptedModel(lambda request, n: call("finish", answer="done", reason="last hop")) as model:
        lead = triage(uid, model.url)
        async with running(client, lead):
            record = await run_chain(client, to_agent=lead.id, task_description="t", max_depth=1)
    assert offered(model.requests[0]) == ["finish"]
    assert record.status is ChainStatus.COMPLETED and record.final_result == {"answer": "done"}


# -- answers that cannot be followed, and model errors ---------------------------------------------


async def test_an_unknown_tool_is_asked_about_once_then_the_transfer_goes_through(client, uid):
    target = f"tests-{uid}"

    def answer(request, n):
        if n == 1:
            return call("transfer_to_nobody", task="x")
        assert "no tool 'transfer_to_nobody'" in request["messages"][-1]["content"]
        return call(f"transfer_to_{target.replace('-', '_')}", task="write tests")

    async with ScriptedModel(answer) as model:
        lead = triage(uid, model.url)
        async with running(client, lead, make_agent(target, completing()), register=True):
            record = await run_chain(client, to_agent=lead.id, task_description="t")
    assert record.status is ChainStatus.COMPLETED
    assert record.hops[0].decision.model_calls == 2 and record.hops[1].to_agent == target
    assert all(m.get("content") is not None for r in model.requests for m in r["messages"]), \
        "no message with null content (some servers refuse them)"


async def test_malformed_arguments_twice_fail_the_hop_and_the_chain_falls_back(client, uid):
    spare = f"spare-{uid}"
    async with ScriptedModel(lambda request, n: Reply(tool="finish", arguments="{not json")) as model:
        lead = triage(uid, model.url)
        backup = make_agent(spare, completing(), [AgentCapability.CODE_ANALYSIS])
        async with running(client, lead, backup, register=True):
            record = await run_chain(client, to_agent=lead.id, task_description="t", policy=FAST)
    assert record.status is ChainStatus.COMPLETED
    failed, fallback = record.hops
    assert (failed.status, failed.attempts) == (HopStatus.FAILED, 1)
    assert "could not be followed twice" in failed.error and "not JSON" in failed.error
    assert failed.decision.model_calls == 2
    assert (fallback.to_agent, fallback.fallback_for) == (spare, lead.id)


async def test_a_text_that_only_says_it_will_hand_off_is_asked_about(client, uid):
    target = f"audit-{uid}"

    def answer(request, n):
        if n == 1:
            return Reply(text="I will transfer this to the auditor.")
        return call(f"transfer_to_{target.replace('-', '_')}", task="audit it")

    async with ScriptedModel(answer) as model:
        lead = triage(uid, model.url)
        async with running(client, lead, make_agent(target, completing()), register=True):
            record = await run_chain(client, to_agent=lead.id, task_description="t")
    assert [h.to_agent for h in record.hops] == [lead.id, target]
    assert "calls no transfer tool" in model.requests[1]["messages"][-1]["content"]


async def test_a_plain_answer_completes_the_chain(client, uid):
    async with ScriptedModel(lambda request, n: Reply(text="The answer is 42.")) as model:
        lead = triage(uid, model.url)
        async with running(client, lead):
            record = await run_chain(client, to_agent=lead.id, task_description="what is it?")
    assert record.final_result == {"answer": "The answer is 42."}
    assert record.hops[0].decision.tool is None


async def test_a_finish_without_an_answer_takes_the_text_beside_it_or_is_asked_about(client, uid):
    def answer(request, n):
        if n == 1:
            return Reply(tool="finish", arguments={"reason": "done"})  # no answer, no text: asked again
        return Reply(tool="finish", arguments={"reason": "done"}, text="All 3 tests pass.")
    async with ScriptedModel(answer) as model:
        lead = triage(uid, model.url)
        async with running(client, lead):
            record = await run_chain(client, to_agent=lead.id, task_description="run the tests")
    assert record.status is ChainStatus.COMPLETED, record.error
    assert record.final_result == {"answer": "All 3 tests pass."}
    assert "finish needs an answer" in model.requests[1]["messages"][-1]["content"]


@pytest.mark.parametrize("status, retried", [(429, True), (503, True), (400, False), (401, False)])
async def test_model_errors_are_retried_by_the_hops_policy_only_when_worth_it(client, uid, status, retried):
    def answer(request, n):
        return Reply(status=status, error="scripted") if n == 1 else call("finish", answer="ok")

    async with ScriptedModel(answer) as model:
        lead = triage(uid, model.url)
        async with running(client, lead):
            record = await run_chain(client, to_agent=lead.id, task_description="t", policy=FAST)
    if retried:
        assert record.status is ChainStatus.COMPLETED and record.hops[0].attempts == 2
    else:
        assert record.status is ChainStatus.FAILED and record.hops[0].attempts == 1
        assert f"({status})" in record.hops[0].error
    assert len(model.requests) == (2 if retried else 1)


async def test_the_hop_heartbeats_while_the_model_thinks_and_its_timeout_holds(client, uid):
    slow = {"delay": 3.0}

    def answer(request, n):
        return Reply(tool="finish", arguments={"answer": "slow"}, delay_s=slow["delay"])

    async with ScriptedModel(answer) as model:
        lead = triage(uid, model.url)
        async with running(client, lead):
            # 3 s of thinking, heartbeat timeout 1 s: the hop's heartbeats keep it alive
            record = await run_chain(client, to_agent=lead.id, task_description="t",
                                     policy={"heartbeat_timeout_s": 1, **FAST})
            assert record.status is ChainStatus.COMPLETED and record.hops[0].attempts == 1
            slow["delay"] = 30.0
            timed_out = await asyncio.wait_for(
                run_chain(client, to_agent=lead.id, task_description="t2", hop_timeout=2,
                          policy={"heartbeat_timeout_s": 1, "max_attempts": 1}), 20)
    assert timed_out.status is ChainStatus.FAILED and timed_out.hops[0].status is HopStatus.TIMED_OUT


async def test_own_tools_run_before_the_decision_and_the_trim_is_recorded(client, uid):
    stock = {"A1": 3}

    async def lookup(sku: str) -> dict:
        """The stock of a SKU."""
        return {"sku": sku, "stock": stock.get(sku, 0)}

    def answer(request, n):
        if n == 1:
            assert "lookup" in offered(request)
            return call("lookup", sku="A1")
        result = json.loads(request["messages"][-1]["content"])
        return call("finish", answer=f"{result['stock']} left", reason="looked it up")

    async with ScriptedModel(answer) as model:
        lead = triage(uid, model.url, tools=[lookup], context_tokens=200)
        async with running(client, lead):
            record = await run_chain(client, to_agent=lead.id, task_description="how many A1?",
                                     context_data={"catalogue": "z" * 5000})
    decision = record.hops[0].decision
    assert record.final_result == {"answer": "3 left"}
    assert decision.tool_calls == ["lookup"] and decision.model_calls == 2
    assert decision.trimmed == ["context_data.catalogue"]
    assert len(model.requests[0]["messages"][1]["content"]) <= 800
    notes = [e async for e in watch_chain(client, record.chain_id) if e.kind is EventKind.HOP_PROGRESS]
    assert [(n.summary, n.data["data"]) for n in notes] == [("calling lookup", {"tool": "lookup"})], \
        "each tool call is a progress note of the hop"


async def test_handoff_show_says_what_the_model_chose(client, uid, cli_env):
    target = f"audit-{uid}"

    async with ScriptedModel(lambda r, n: call(f"transfer_to_{target.replace('-', '_')}", task="audit",
                                               reason="risky")) as model:
        lead = triage(uid, model.url)
        async with running(client, lead, make_agent(target, completing()), register=True):
            record = await run_chain(client, to_agent=lead.id, task_description="t")
    shown = await cli(cli_env, "show", str(record.chain_id))
    assert "scripted chose" in shown.stdout and "risky" in shown.stdout
    history = await client.get_workflow_handle(str(record.chain_id)).fetch_history()
    summaries = [e.user_metadata.summary.data.decode() for e in history.events
                 if e.HasField("activity_task_scheduled_event_attributes") and e.user_metadata.HasField("summary")]
    assert any("[scripted chose" in s and "risky" in s for s in summaries), summaries


async def test_each_hop_is_told_what_the_rules_leave_it(client, uid):
    """`ctx.limits`, set by the workflow: the policy's targets for this agent, the agents the
    visit rule excludes once this hop has run, the (agent, task) pairs asked, and no room for
    another hop at the depth limit."""
    a, b = f"a-{uid}", f"b-{uid}"
    seen: list[HandoffContext] = []

    async def ping(ctx):
        seen.append(ctx)
        if ctx.chain_depth < 2:
            return ctx.handoff(to_agent=b if ctx.to_agent == a else a, task_description=f"step {ctx.chain_depth}")
        return ctx.complete({})

    policy = {"allowed_handoffs": {"starter": [a], a: [b], b: [a, "TESTING"]}, "max_depth": 3}
    async with running(client, make_agent(a, ping), make_agent(b, ping)):
        record = await run_chain(client, to_agent=a, task_description="start", policy=policy)
    assert record.status is ChainStatus.COMPLETED
    first, second, third = (ctx.limits for ctx in seen)
    assert first.allowed_targets == [b] and second.allowed_targets == [a, "TESTING"]
    assert (first.can_hand_off, second.can_hand_off, third.can_hand_off) == (True, True, False)
    assert first.excluded_agents == [] and third.excluded_agents == [a], "a has had its 2 visits"
    assert [tuple(p) for p in third.asked] == [(a, "start"), (a, "step 1"), (b, "step 0")]
    assert second.permits(a) and second.permits("TESTING") and not first.permits(a)

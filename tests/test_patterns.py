"""The handoff patterns: fan-out with a join, delegation with a return to the caller, and a person
approving a hop. Each against the real server and the real chain worker, with real agents' workers."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import pytest

from handoff import (
    AgentCapability,
    Branch,
    ChainRecord,
    ChainStatus,
    HandoffContext,
    HopKind,
    HopStatus,
    InvalidRequest,
    Join,
    approve_chain,
    get_chain,
    reject_chain,
    run_chain,
    start_chain,
    wait_chain,
)
from tests.support import cli, make_agent, running

pytestmark = pytest.mark.usefixtures("chains")

FAST = {"retry_initial_s": 0.1}


async def wait_for_status(client, chain_id, status: ChainStatus, timeout: float = 20) -> ChainRecord:
    """Poll the chain's live record (its `chain_state` query) until it has `status`."""
    handle = client.get_workflow_handle(str(chain_id))
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        record = await handle.query("chain_state", result_type=ChainRecord)
        if record.status is status:
            return record
        assert asyncio.get_running_loop().time() < deadline, f"chain stays {record.status.value}"
        await asyncio.sleep(0.05)


# -- fan-out and join ------------------------------------------------------------------------


async def test_fan_out_with_fallback_and_a_sub_chain_joins_all_three(client, uid):
    lead, flaky, spare, deep, deeper, plain, joiner = (
        f"lead-{uid}", f"aud1-{uid}", f"aud2-{uid}", f"db-{uid}", f"db2-{uid}", f"test-{uid}", f"join-{uid}")
    seen: dict[str, HandoffContext] = {}

    async def fan(ctx):
        return ctx.fan_out(
            [Branch(capability=AgentCapability.SECURITY_AUDIT, task_description="audit"),
             Branch(to_agent=deep, task_description="review the SQL", context_data={"only": "branch 1"}),
             Branch(to_agent=plain, task_description="plan tests", visible_context_keys=["repo"])],
            join=Join(to_agent=joiner, task_description="decide"),
            result_data={"by": lead}, context_data={"fanned": True})

    async def audit_fails(ctx):
        return ctx.fail("auditor one is out of licences")

    async def record_and(next_agent=None):
        async def handle(ctx):
            seen[ctx.to_agent] = ctx
            if next_agent:
                return ctx.handoff(to_agent=next_agent, task_description="go deeper",
                                   result_data={"by": ctx.to_agent})
            return ctx.complete({"by": ctx.to_agent})
        return handle

    async def join(ctx):
        seen[ctx.to_agent] = ctx
        return ctx.complete({"joined": [b.final_result.get("by") for b in ctx.branches]})

    agents = [make_agent(lead, fan, [AgentCapability.CODE_ANALYSIS]),
              make_agent(flaky, audit_fails, [AgentCapability.SECURITY_AUDIT]),
              make_agent(spare, await record_and(), [AgentCapability.SECURITY_AUDIT]),
              make_agent(deep, await record_and(deeper), [AgentCapability.DATABASE_OPERATIONS]),
              make_agent(deeper, await record_and(), [AgentCapability.DATABASE_OPERATIONS]),
              make_agent(plain, await record_and()),
              make_agent(joiner, join, [AgentCapability.DEPLOYMENT])]
    async with running(client, *agents, register=True):
        record = await run_chain(client, to_agent=lead, task_description="review", context_data={"repo": "r"},
                                 policy=FAST)
    assert record.status is ChainStatus.COMPLETED, record.error
    top = record.hops
    assert [(h.to_agent, h.kind) for h in top] == [(lead, HopKind.HANDOFF), (joiner, HopKind.JOIN)]
    branches = top[0].fan_out.branches
    assert [b.status for b in branches] == [ChainStatus.COMPLETED] * 3
    # branch 0 fell over from the failing auditor to the other one with the capability
    # (candidates rank live, least loaded, then by id: the failing auditor comes first)
    assert [(h.to_agent, h.status, h.fallback_for) for h in branches[0].hops] == [
        (flaky, HopStatus.FAILED, None), (spare, HopStatus.COMPLETED, flaky)]
    # branch 1 handed off once more: a sub-chain of two hops, depths 1 and 2
    assert [(h.to_agent, h.hop) for h in branches[1].hops] == [(deep, 1), (deeper, 2)]
    assert branches[2].hops[0].withheld_context_keys == ["fanned"]
    # the join ran one past the deepest branch, and saw every branch, in branch order
    assert top[1].hop == 3 and top[1].from_agent == lead
    j = seen[joiner]
    assert [b.index for b in j.branches] == [0, 1, 2]
    assert [b.status for b in j.branches] == [ChainStatus.COMPLETED] * 3
    assert [b.final_result["by"] for b in j.branches] == [spare, deeper, plain]
    assert j.previous_results[0] == {"by": lead}
    assert {r["by"] for r in j.previous_results[1:]} == {spare, deep, deeper, plain}
    assert j.context_data == {"repo": "r", "fanned": True}, "a branch's context stays in the branch"
    assert seen[deep].context_data["only"] == "branch 1"
    assert seen[deep].branch.index == 1 and seen[deep].branch.of == 3
    assert record.final_result == {"joined": [spare, deeper, plain]}
    assert await get_chain(client, record.chain_id) == record


def completing(seen: dict[str, HandoffContext] | None = None):
    """A handler that records its context and completes with who it is."""

    async def handle(ctx):
        if seen is not None:
            seen[ctx.to_agent] = ctx
        return ctx.complete({"by": ctx.to_agent})

    return handle


def hanging(cancelled: asyncio.Event):
    """A handler that never answers; it notices when its hop is cancelled."""

    async def handle(ctx):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return ctx.complete({})

    return handle


async def test_first_k_join_cuts_the_branch_that_never_answers(client, uid):
    lead, a, b, silent, joiner = (f"lead-{uid}", f"a-{uid}", f"b-{uid}", f"silent-{uid}", f"join-{uid}")
    seen: dict[str, HandoffContext] = {}
    cancelled = asyncio.Event()

    async def fan(ctx):
        return ctx.fan_out([Branch(to_agent=silent, task_description="never answers"),
                            Branch(to_agent=a, task_description="a's part"),
                            Branch(to_agent=b, task_description="b's part")],
                           join=Join(to_agent=joiner, task_description="the first two", wait_for=2))

    agents = [make_agent(lead, fan), make_agent(a, completing()), make_agent(b, completing()),
              make_agent(silent, hanging(cancelled)), make_agent(joiner, completing(seen))]
    async with running(client, *agents):
        record = await asyncio.wait_for(
            run_chain(client, to_agent=lead, task_description="t", policy={"heartbeat_timeout_s": 1}), 30)
        await asyncio.wait_for(cancelled.wait(), 10)  # the cut reached the handler itself
    assert record.status is ChainStatus.COMPLETED, record.error
    branches = record.hops[0].fan_out.branches
    assert [b.status for b in branches] == [ChainStatus.CANCELLED, ChainStatus.COMPLETED, ChainStatus.COMPLETED]
    assert branches[0].cut == "not_needed" and "already had" in branches[0].error
    assert branches[0].hops[0].status is HopStatus.CANCELLED
    assert record.hops[0].fan_out.wait_for == 2
    outcome = seen[joiner].branches
    assert [(o.index, o.status, o.cut) for o in outcome] == [
        (0, ChainStatus.CANCELLED, "not_needed"), (1, ChainStatus.COMPLETED, None), (2, ChainStatus.COMPLETED, None)]
    assert record.hops[1].hop == 2


async def test_join_deadline_cuts_late_branches_and_the_join_decides(client, uid):
    lead, quick, slow, joiner = f"lead-{uid}", f"quick-{uid}", f"slow-{uid}", f"join-{uid}"
    seen: dict[str, HandoffContext] = {}

    async def fan(ctx):
        return ctx.fan_out([Branch(to_agent=quick, task_description="q"), Branch(to_agent=slow, task_description="s")],
                           join=Join(to_agent=joiner, task_description="decide", deadline_s=1.5))

    async def join(ctx):
        seen[ctx.to_agent] = ctx
        late = [b.index for b in ctx.branches if b.cut == "late"]
        return ctx.complete({"late": late, "verdict": "partial"})

    agents = [make_agent(lead, fan), make_agent(quick, completing()), make_agent(slow, hanging(asyncio.Event())),
              make_agent(joiner, join)]
    async with running(client, *agents):
        record = await asyncio.wait_for(run_chain(client, to_agent=lead, task_description="t"), 30)
    assert record.status is ChainStatus.COMPLETED
    late = record.hops[0].fan_out.branches[1]
    assert (late.status, late.cut) == (ChainStatus.CANCELLED, "late")
    assert "deadline" in late.error and late.hops[0].status is HopStatus.CANCELLED
    assert record.final_result == {"late": [1], "verdict": "partial"}
    assert 1400 <= late.duration_ms < 10_000


async def test_a_branch_past_the_depth_limit_is_refused_and_so_is_the_join_past_it(client, uid):
    ids = [f"d{i}-{uid}" for i in range(4)]
    lead, short, joiner = f"lead-{uid}", f"short-{uid}", f"join-{uid}"

    async def fan(ctx):
        return ctx.fan_out([Branch(to_agent=ids[0], task_description="deep"),
                            Branch(to_agent=short, task_description="short")],
                           join=Join(to_agent=joiner, task_description="join"), result_data={"lead": 1})

    async def relay(ctx):
        i = ids.index(ctx.to_agent)
        return ctx.handoff(to_agent=ids[i + 1], task_description=f"deeper {i}", result_data={"i": i})

    agents = [make_agent(lead, fan), make_agent(short, completing()), make_agent(joiner, completing()),
              *[make_agent(i, relay) for i in ids]]
    async with running(client, *agents):
        record = await run_chain(client, to_agent=lead, task_description="t", max_depth=4)
    deep, shallow = record.hops[0].fan_out.branches
    assert [(h.hop, h.status) for h in deep.hops] == [
        (1, HopStatus.COMPLETED), (2, HopStatus.COMPLETED), (3, HopStatus.COMPLETED), (4, HopStatus.REFUSED)]
    assert deep.status is ChainStatus.DEPTH_EXCEEDED and "depth 4" in deep.error
    assert deep.final_result == {"i": 2}
    assert shallow.status is ChainStatus.COMPLETED
    # the join would run at depth 4 along the deep branch's path: refused too
    assert record.status is ChainStatus.DEPTH_EXCEEDED
    assert (record.hops[1].to_agent, record.hops[1].hop, record.hops[1].status, record.hops[1].kind) == (
        joiner, 4, HopStatus.REFUSED, HopKind.JOIN)
    assert record.final_result == {"lead": 1}


async def test_branches_past_the_hop_budget_are_refused_and_recorded(client, uid):
    lead, joiner = f"lead-{uid}", f"join-{uid}"
    workers = [f"w{i}-{uid}" for i in range(4)]
    ran: list[str] = []

    async def fan(ctx):
        return ctx.fan_out([Branch(to_agent=w, task_description=f"part {i}") for i, w in enumerate(workers)],
                           join=Join(to_agent=joiner, task_description="join"))

    async def work(ctx):
        ran.append(ctx.to_agent)
        return ctx.complete({"by": ctx.to_agent})

    agents = [make_agent(lead, fan), make_agent(joiner, completing()), *[make_agent(w, work) for w in workers]]
    async with running(client, *agents):
        record = await run_chain(client, to_agent=lead, task_description="t", policy={"max_total_hops": 4})
    assert record.status is ChainStatus.COMPLETED
    branches = record.hops[0].fan_out.branches
    # 4 hops: the lead, two branches, the join; the last two branches never start
    assert [b.status for b in branches] == [ChainStatus.COMPLETED] * 2 + [ChainStatus.BUDGET_EXCEEDED] * 2
    assert sorted(ran) == sorted(workers[:2])
    assert all(b.hops[0].status is HopStatus.REFUSED and "budget" in b.hops[0].error for b in branches[2:])
    assert sum(1 for h in record.all_hops() if h.status is not HopStatus.REFUSED) == 4


async def test_hop_budget_ends_a_chain_that_would_go_past_it(client, uid):
    ids = [f"h{i}-{uid}" for i in range(3)]

    async def relay(ctx):
        i = ids.index(ctx.to_agent)
        return ctx.handoff(to_agent=ids[(i + 1) % 3], task_description=f"step {ctx.chain_depth}")

    async with running(client, *[make_agent(i, relay) for i in ids]):
        record = await run_chain(client, to_agent=ids[0], task_description="t", policy={"max_total_hops": 2})
    assert record.status is ChainStatus.BUDGET_EXCEEDED
    assert [h.status for h in record.hops] == [HopStatus.COMPLETED, HopStatus.COMPLETED, HopStatus.REFUSED]
    assert "hop budget of 2" in record.error


@pytest.mark.parametrize("branches, policy, message", [
    (3, {"max_branches": 2}, "over the limit of 2"),
    (1, {}, "waits for 2 of only 1"),
])
async def test_a_fan_out_the_chain_cannot_follow_is_refused(client, uid, branches, policy, message):
    lead = f"lead-{uid}"

    async def fan(ctx):
        from handoff.models import FanOut, HandoffResult

        bad = FanOut.model_construct(
            branches=[Branch(to_agent=f"x{i}-{uid}", task_description="t") for i in range(branches)],
            join=Join(to_agent=lead, task_description="j", wait_for=2 if not policy else None), context_data={})
        return HandoffResult(handoff_id=ctx.handoff_id, success=True, result_data={"ok": 1}, fan_out=bad)

    async with running(client, make_agent(lead, fan)):
        record = await run_chain(client, to_agent=lead, task_description="t", policy=policy)
    assert record.status is ChainStatus.REJECTED
    assert record.hops[-1].status is HopStatus.REFUSED and message in record.error
    assert record.final_result == {"ok": 1}


def test_fan_out_and_delegate_refuse_bad_targets_in_the_handler():
    ctx = HandoffContext(to_agent="lead", task_description="t")
    with pytest.raises(InvalidRequest, match="branch 0"):
        ctx.fan_out([{"task_description": "nobody"}], join={"to_agent": "j", "task_description": "j"})
    with pytest.raises(InvalidRequest, match="the join"):
        ctx.fan_out([Branch(to_agent="a", task_description="t")], join=Join(task_description="j"))
    with pytest.raises(InvalidRequest, match="exactly one"):
        ctx.delegate(to_agent="a", capability="TESTING", task_description="t")
    with pytest.raises(InvalidRequest, match="at least one"):
        ctx.fan_out([], join=Join(to_agent="j", task_description="j"))


# -- delegation and return ---------------------------------------------------------------


async def test_delegate_returns_to_the_caller_with_the_delegates_result(client, uid):
    caller, helper, expert = f"caller-{uid}", f"helper-{uid}", f"expert-{uid}"
    seen: list[HandoffContext] = []

    async def call(ctx):
        seen.append(ctx)
        if not ctx.returning:
            return ctx.delegate(to_agent=helper, task_description="look it up", then="write the answer",
                                result_data={"asked": True})
        outcome = ctx.branches[0]
        return ctx.complete({"answer": outcome.final_result["found"], "via": outcome.agents})

    async def help_(ctx):
        return ctx.handoff(to_agent=expert, task_description="ask the expert", result_data={"helper": 1})

    async def know(ctx):
        return ctx.complete({"found": 42})

    agents = [make_agent(caller, call), make_agent(helper, help_), make_agent(expert, know)]
    async with running(client, *agents):
        record = await run_chain(client, to_agent=caller, task_description="answer the question")
    assert record.status is ChainStatus.COMPLETED, record.error
    assert [(h.to_agent, h.kind, h.hop) for h in record.hops] == [
        (caller, HopKind.HANDOFF, 0), (caller, HopKind.RETURN, 3)]
    branch = record.hops[0].fan_out.branches[0]
    assert [h.to_agent for h in branch.hops] == [helper, expert]
    assert record.final_result == {"answer": 42, "via": [helper, expert]}
    back = seen[1]
    assert back.returning and back.task_description == "write the answer"
    assert back.from_agent == caller and back.chain_depth == 3
    assert back.previous_results == [{"asked": True}, {"helper": 1}, {"found": 42}]


async def test_returning_is_not_a_loop_but_ping_pong_is_stopped(client, uid):
    a, b = f"a-{uid}", f"b-{uid}"

    async def handle_a(ctx):
        if ctx.returning:
            return ctx.complete({"a_back": ctx.branches[0].status.value})
        return ctx.delegate(to_agent=b, task_description="help")

    async def handle_b(ctx):
        # b sends the chain straight back to a, which delegates to b with the same task again
        return ctx.handoff(to_agent=a, task_description="over to you")

    async with running(client, make_agent(a, handle_a), make_agent(b, handle_b)):
        record = await run_chain(client, to_agent=a, task_description="start")
    refused = [h for h in record.all_hops() if h.status is HopStatus.REFUSED]
    assert len(refused) == 1 and refused[0].to_agent == b and "already asked" in refused[0].error
    loop_branches = [br for h in record.all_hops() if h.fan_out for br in h.fan_out.branches
                     if br.status is ChainStatus.LOOP_DETECTED]
    assert len(loop_branches) == 1
    # the returns themselves were never judged as loops: a was visited and returned to freely
    assert [h.kind for h in record.all_hops() if h.to_agent == a].count(HopKind.RETURN) == 2
    assert record.status is ChainStatus.COMPLETED
    assert record.final_result == {"a_back": "completed"}


# -- human approval ------------------------------------------------------------------------


async def test_approval_by_policy_waits_visibly_and_runs_once_approved(client, uid, cli_env):
    lead, gate = f"lead-{uid}", f"gate-{uid}"
    ran: list[str] = []

    async def hand_on(ctx):
        return ctx.handoff(to_agent=gate, task_description="ship it", result_data={"lead": 1})

    async def ship(ctx):
        ran.append(ctx.to_agent)
        return ctx.complete({"shipped": True})

    policy = {"approval_required": [gate], "progress_after_s": 30}
    async with running(client, make_agent(lead, hand_on), make_agent(gate, ship)):
        chain_id = await start_chain(client, to_agent=lead, task_description="release", policy=policy)
        waiting = await wait_for_status(client, chain_id, ChainStatus.AWAITING_APPROVAL)
        entry = waiting.hops[1]
        assert (entry.to_agent, entry.status, entry.approval.asked_by) == (
            gate, HopStatus.AWAITING_APPROVAL, "policy")
        assert not ran, "nothing runs before the decision"
        # a person finds it: visibility, the CLI's list, the workflow's current details
        for _ in range(100):
            listed = await cli(cli_env, "list", "--status", "awaiting_approval", "--json")
            if str(chain_id) in listed.stdout:
                break
            await asyncio.sleep(0.2)
        assert str(chain_id) in listed.stdout
        metadata = await client.get_workflow_handle(str(chain_id)).query("__temporal_workflow_metadata")
        assert "awaiting approval" in metadata.current_details and gate in metadata.current_details
        shown = await cli(cli_env, "show", str(chain_id))
        assert shown.returncode == 0 and "awaiting_approval" in shown.stdout
        approved = await cli(cli_env, "approve", str(chain_id), "--comment", "looks good", "--by", "alice")
        assert approved.returncode == 0, approved.stderr
        assert "approved by alice" in approved.stdout
        record = await wait_chain(client, chain_id)
        again = await cli(cli_env, "approve", str(chain_id), "--by", "bob")
    assert record.status is ChainStatus.COMPLETED and ran == [gate]
    hop = record.hops[1]
    assert hop.status is HopStatus.COMPLETED and hop.attempts == 1
    assert (hop.approval.decision, hop.approval.by, hop.approval.comment) == ("approved", "alice", "looks good")
    assert hop.approval.requested_at <= hop.approval.decided_at <= hop.started_at
    assert again.returncode == 2 and "not running" in again.stderr
    assert record == await get_chain(client, chain_id)


async def test_an_agent_asks_for_approval_and_a_rejection_ends_the_chain(client, uid):
    lead, gate = f"lead-{uid}", f"gate-{uid}"

    async def ask(ctx):
        return ctx.handoff(to_agent=gate, task_description="drop the table", require_approval=True,
                           result_data={"asked": 1})

    async def never(ctx):
        raise AssertionError("a rejected hop never runs")

    async with running(client, make_agent(lead, ask), make_agent(gate, never)):
        chain_id = await start_chain(client, to_agent=lead, task_description="clean up")
        await wait_for_status(client, chain_id, ChainStatus.AWAITING_APPROVAL)
        with pytest.raises(InvalidRequest, match="needs a reason"):
            await reject_chain(client, chain_id, by="carol", reason="")
        with pytest.raises(InvalidRequest, match="no hop"):
            await approve_chain(client, chain_id, by="carol", handoff_id=uuid4())
        decided = await reject_chain(client, chain_id, by="carol", reason="not on a Friday")
        with pytest.raises(InvalidRequest):
            await approve_chain(client, chain_id, by="dave")
        record = await wait_chain(client, chain_id)
    assert decided.approval.decision == "rejected" and decided.to_agent == gate
    assert record.status is ChainStatus.REJECTED
    hop = record.hops[1]
    assert hop.status is HopStatus.REFUSED and hop.attempts == 0
    assert hop.approval.asked_by == lead and hop.approval.by == "carol"
    assert "rejected by carol: not on a Friday" in record.error
    assert record.final_result == {"asked": 1}


async def test_approval_of_a_chain_that_does_not_wait_is_refused(client, uid):
    agent = make_agent(f"slow-{uid}", hanging(asyncio.Event()))
    async with running(client, agent):
        chain_id = await start_chain(client, to_agent=agent.id, task_description="t")
        with pytest.raises(InvalidRequest, match="not awaiting approval"):
            await approve_chain(client, chain_id, by="erin")
        await client.get_workflow_handle(str(chain_id)).cancel()
        await wait_chain(client, chain_id)
    with pytest.raises(Exception, match="no chain"):
        await approve_chain(client, uuid4(), by="erin")


async def test_branches_waiting_at_once_are_approved_by_handoff_id(client, uid):
    lead, a, b, joiner = f"lead-{uid}", f"a-{uid}", f"b-{uid}", f"join-{uid}"

    async def fan(ctx):
        return ctx.fan_out([Branch(to_agent=a, task_description="a"), Branch(to_agent=b, task_description="b")],
                           join=Join(to_agent=joiner, task_description="j"))

    policy = {"approval_required": [a, b]}
    agents = [make_agent(lead, fan), make_agent(a, completing()), make_agent(b, completing()),
              make_agent(joiner, completing())]
    async with running(client, *agents):
        chain_id = await start_chain(client, to_agent=lead, task_description="t", policy=policy)
        handle = client.get_workflow_handle(str(chain_id))
        for _ in range(200):
            state = await handle.query("chain_state", result_type=ChainRecord)
            waiting = [h for h in state.all_hops() if h.status is HopStatus.AWAITING_APPROVAL]
            if len(waiting) == 2:
                break
            await asyncio.sleep(0.05)
        assert state.status is ChainStatus.AWAITING_APPROVAL and len(waiting) == 2
        with pytest.raises(InvalidRequest, match="2 hops .* await approval"):
            await approve_chain(client, chain_id, by="frank")
        first = next(h for h in waiting if h.to_agent == a)
        await approve_chain(client, chain_id, by="frank", handoff_id=first.handoff_id)
        await approve_chain(client, chain_id, by="grace")  # the only one left
        record = await wait_chain(client, chain_id)
    assert record.status is ChainStatus.COMPLETED
    approvers = {b.hops[0].to_agent: b.hops[0].approval.by for b in record.hops[0].fan_out.branches}
    assert approvers == {a: "frank", b: "grace"}


async def test_cancelling_a_chain_that_waits_for_approval(client, uid):
    gate = f"gate-{uid}"
    async with running(client, make_agent(gate, completing())):
        chain_id = await start_chain(client, to_agent=gate, task_description="t",
                                     policy={"approval_required": ["*"]})
        await wait_for_status(client, chain_id, ChainStatus.AWAITING_APPROVAL)
        await client.get_workflow_handle(str(chain_id)).cancel()
        record = await wait_chain(client, chain_id)
    assert record.status is ChainStatus.CANCELLED
    assert record.hops[0].status is HopStatus.CANCELLED and record.hops[0].approval.decision is None

"""The audit trail tells the truth: hundreds of random chains, each compared hop by hop with what
the agents actually executed.

Every fake agent writes down each handler invocation (chain, handoff id, agent, attempt, outcome,
result). After all chains end, the record `handoff show --json` prints (`get_chain`, read back from
workflow history) must agree with that ground truth for every chain, and with an independent
model of the chain rules of docs/design.md (depth, loops, retries, fallback, refusals). Some
chains are cancelled or terminated while a hop runs.

One source of truth: for every chain, the record the chain workflow holds (its `chain_state`,
answered by the real chain worker, and its result) equals, field by field, the record
`handoff.client.audit` rebuilds by replaying the same history.

A second run covers the handoff patterns: random fan-outs (joined when every branch ends, at the
first k, or at a deadline), delegations returning to their caller, and joins a person approves,
rejects or leaves to time out. The record is then a tree, and it is checked the same ways.

Reproduce a run with HANDOFF_AUDIT_SEED=<the printed seed>.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timezone
from typing import Any
from uuid import UUID, uuid4

import pytest
from temporalio import activity
from temporalio.client import Client

from handoff import (
    AgentCapability,
    Branch,
    ChainRecord,
    ChainStatus,
    HandoffContext,
    HandoffDirective,
    HandoffResult,
    HopKind,
    HopStatus,
    Join,
    PermanentError,
    approve_chain,
    get_chain,
    reject_chain,
    start_chain,
    wait_chain,
)
from handoff.constants import INLINE_RESULT_BYTES
from handoff.client.audit import record_from_history
from tests.support import HANDOFF, make_agent, running

pytestmark = pytest.mark.usefixtures("chains")

CHAINS = 200
CONCURRENCY = 20
CLI_SAMPLE = 10
POOL = 6
MAX_ATTEMPTS = 3  # the default policy
MAX_VISITS = 2  # the default policy
MAX_DEPTH = 5

# What the planned agent does at its hop (the fallback agent always does "ok").
BEHAVIOURS = {
    "ok": 0.62,
    "flaky": 0.12,  # raises an ordinary error on attempt 1, succeeds on attempt 2
    "permanent": 0.08,  # raises PermanentError: one attempt
    "fail": 0.08,  # returns ctx.fail(...): one attempt, the hop failed
    "exhaust": 0.04,  # raises an ordinary error on every attempt
    "down": 0.06,  # the hop goes to an agent with no worker: unreachable
    "hang": 0.05,  # runs until the test cancels or terminates the chain
    "both": 0.03,  # hands off naming an agent and a capability at once: refused, rejected
}
STOPS = ("cancel", "terminate")  # what the test does to a chain whose hop hangs
LOOP_BACK = 0.10  # a hop hands back to an earlier (agent, task) of the chain
LARGE = 0.3
"""Of the chains, the share whose results are large (each carried once, in history)."""
FALLBACK = 0.5  # chains with a configured fallback agent
SUCCESS = ("handoff", "complete")


@dataclass
class Step:
    agent: str
    behaviour: str
    next_agent: str | None  # None: complete the chain
    next_task: str | None


@dataclass
class Plan:
    chain_id: UUID
    task: str
    steps: list[Step]
    fallback: str | None
    has_down: bool
    stop: str = "cancel"
    large: bool = False
    """Every result over `INLINE_RESULT_BYTES`: carried once in history, named by later hops."""

    def policy(self) -> dict[str, Any]:
        policy: dict[str, Any] = {"retry_initial_s": 0.05, "fallback_agent": self.fallback}
        if self.has_down:
            policy["schedule_to_start_s"] = 1.5
        return policy


@dataclass
class Agents:
    pool: list[str]
    fallback: str
    down: str


def make_plan(rng: random.Random, index: int, agents: Agents) -> Plan:
    """A chain of 1..6 requested hops with random agents, failures and loop-backs."""
    hops = rng.randint(1, 6)
    task = f"chain {index} task"
    names = list(BEHAVIOURS)
    planned = [rng.choice(agents.pool) for _ in range(hops)]
    behaviours = rng.choices(names, weights=list(BEHAVIOURS.values()), k=hops)
    planned = [agents.down if b == "down" else a for a, b in zip(planned, behaviours)]
    tasks = [task] + [f"step {d}" for d in range(1, hops)]
    steps = []
    for depth in range(hops):
        if rng.random() < LOOP_BACK:
            back = rng.randint(0, depth)  # the same agent with the same task as an earlier hop
            steps.append(Step(planned[depth], behaviours[depth], planned[back], tasks[back]))
            break
        last = depth == hops - 1
        steps.append(Step(planned[depth], behaviours[depth],
                          None if last else planned[depth + 1], None if last else tasks[depth + 1]))
    return Plan(
        chain_id=uuid4(),
        task=task,
        steps=steps,
        fallback=agents.fallback if rng.random() < FALLBACK else None,
        has_down=agents.down in (s.agent for s in steps),
        stop=rng.choice(STOPS),
        large=rng.random() < LARGE,
    )


# -- the expected record, from the plan and the rules alone ---------------------------------

Signature = tuple[ChainStatus, list[tuple[str, HopStatus, int, str | None]]]


def expected_signature(plan: Plan) -> Signature:
    """(chain status, [(to_agent, status, attempts, fallback_for)]) per the chain rules (docs/design.md, section 4).

    The pool agents are not registered, so a failed hop can only fall back to the configured
    fallback agent."""
    hops: list[tuple[str, HopStatus, int, str | None]] = []
    visits: Counter[str] = Counter()
    asked: set[tuple[str, str]] = set()
    failed: set[str] = set()

    def loops(agent: str, task: str) -> bool:
        return (agent, task) in asked or visits[agent] >= MAX_VISITS

    agent, task = plan.steps[0].agent, plan.task
    for depth in range(MAX_DEPTH + 1):
        if depth >= MAX_DEPTH:
            hops.append((agent, HopStatus.REFUSED, 0, None))
            return ChainStatus.DEPTH_EXCEEDED, hops
        if loops(agent, task):
            hops.append((agent, HopStatus.REFUSED, 0, None))
            return ChainStatus.LOOP_DETECTED, hops
        step = plan.steps[depth]
        assert step.agent == agent, "plans hand off to the next step's agent"
        fallback_for = None
        while True:
            visits[agent] += 1
            asked.add((agent, task))
            behaviour = "ok" if agent == plan.fallback else step.behaviour
            if behaviour == "hang" and plan.stop == "cancel":
                hops.append((agent, HopStatus.CANCELLED, 1, fallback_for))
                return ChainStatus.CANCELLED, hops
            if behaviour == "hang":  # the workflow never learns how many attempts ran
                hops.append((agent, HopStatus.FAILED, 0, fallback_for))
                return ChainStatus.FAILED, hops
            if behaviour == "both":  # it names itself and a capability
                hops.append((agent, HopStatus.COMPLETED, 1, fallback_for))
                hops.append((agent, HopStatus.REFUSED, 0, None))
                return ChainStatus.REJECTED, hops
            status, attempts = {
                "ok": (HopStatus.COMPLETED, 1),
                "flaky": (HopStatus.COMPLETED, 2),
                "permanent": (HopStatus.FAILED, 1),
                "fail": (HopStatus.FAILED, 1),
                "exhaust": (HopStatus.FAILED, MAX_ATTEMPTS),
                "down": (HopStatus.UNREACHABLE, 0),
            }[behaviour]
            hops.append((agent, status, attempts, fallback_for))
            if status is HopStatus.COMPLETED:
                break
            failed.add(agent)
            fallback_for = fallback_for or agent
            if plan.fallback and plan.fallback not in failed and not loops(plan.fallback, task):
                agent = plan.fallback
                continue
            return ChainStatus.FAILED, hops
        if step.next_agent is None:
            return ChainStatus.COMPLETED, hops
        agent, task = step.next_agent, step.next_task
    raise AssertionError("unreachable")


# -- the fake agents and their ground truth ------------------------------------------------


@dataclass
class Truth:
    plans: dict[str, Plan] = field(default_factory=dict)
    calls: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    hanging: dict[str, asyncio.Event] = field(default_factory=lambda: defaultdict(asyncio.Event))
    release: asyncio.Event = field(default_factory=asyncio.Event)


async def misbehave(behaviour: str, agent_id: str, ctx: HandoffContext, call: dict[str, Any],
                    truth: Truth) -> HandoffResult | None:
    """What a fake agent does unless it succeeds: raise (retryable once for `flaky`, always for
    `exhaust`; `permanent`), report a failure (`fail`), or hang until released (`hang`, the chain
    being cancelled, terminated or its branch cut meanwhile). None: it goes on to succeed."""
    attempt = call["attempt"]
    if (behaviour == "flaky" and attempt == 1) or behaviour == "exhaust":
        call["outcome"] = "raise_retryable"
        raise ConnectionError(f"{agent_id} is flaky (attempt {attempt})")
    if behaviour == "permanent":
        call["outcome"] = "raise_permanent"
        raise PermanentError(f"{agent_id} cannot do {ctx.task_description!r}")
    if behaviour == "fail":
        result = ctx.fail(f"{agent_id} refused", {"by": agent_id})
        call["outcome"], call["result_data"] = "fail", result.result_data
        return result
    if behaviour == "hang":
        call["outcome"] = "hang"
        truth.hanging[call["chain_id"]].set()
        await truth.release.wait()
        return ctx.complete({"too": "late"})
    return None


def take_step(step: Step, ctx: HandoffContext, call: dict[str, Any], data: dict[str, Any]) -> HandoffResult:
    """A fake agent's success: hand on to the step's next agent, or complete."""
    if step.next_agent is None:
        call["outcome"] = "complete"
        return ctx.complete(data)
    call["outcome"] = "handoff"
    return ctx.handoff(to_agent=step.next_agent, task_description=step.next_task, result_data=data)


def by_handoff_id(calls: list[dict[str, Any]]) -> dict[UUID, list[dict[str, Any]]]:
    """The handler invocations of each hop (its attempts), in order."""
    grouped: dict[UUID, list[dict[str, Any]]] = defaultdict(list)
    for call in calls:
        grouped[call["handoff_id"]].append(call)
    return grouped


def scripted(agent_id: str, truth: Truth):
    """The handler of one fake agent: does what the chain's plan says, and writes it down."""

    async def handle(ctx: HandoffContext):
        chain = str(ctx.chain_id)
        plan = truth.plans[chain]
        step = plan.steps[ctx.chain_depth]
        attempt = activity.info().attempt
        behaviour = "ok" if agent_id == plan.fallback else step.behaviour
        call = {"chain_id": chain, "handoff_id": ctx.handoff_id, "agent": agent_id,
                "to_agent": ctx.to_agent, "depth": ctx.chain_depth, "attempt": attempt}
        truth.calls[chain].append(call)
        failed = await misbehave(behaviour, agent_id, ctx, call, truth)
        if failed is not None:
            return failed
        data = {"by": agent_id, "depth": ctx.chain_depth, "token": f"{ctx.handoff_id}/{attempt}"}
        if plan.large:
            data["pad"] = "p" * 2 * INLINE_RESULT_BYTES
        call["result_data"] = data
        call["seen"] = list(ctx.previous_results)
        if behaviour == "both":
            call["outcome"] = "handoff"
            both = HandoffDirective(to_agent=agent_id, to_capability=AgentCapability.DEPLOYMENT,
                                    task_description="either way")
            return HandoffResult(handoff_id=ctx.handoff_id, success=True, result_data=data,
                                 next_handoff=both)
        return take_step(step, ctx, call, data)

    return handle


def mismatches(plan: Plan, record: ChainRecord, calls: list[dict[str, Any]]) -> list[str]:
    """Every way the record disagrees with the ground truth and the model; empty if none."""
    problems: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    by_handoff = by_handoff_id(calls)
    executed_truth = [(c[0]["agent"], h) for h, c in by_handoff.items()]
    executed_record = [(h.to_agent, h.handoff_id) for h in record.hops if h.handoff_id in by_handoff]
    check(executed_record == executed_truth,
          f"executed hops: record {executed_record} != truth {executed_truth}")
    check(all(c["agent"] == c["to_agent"] for c in calls), "a hop ran on another agent's queue")

    for index, hop in enumerate(record.hops):
        runs = by_handoff.get(hop.handoff_id, [])
        if not runs:  # never executed: refused, or nobody picked it up
            check(hop.status in (HopStatus.REFUSED, HopStatus.UNREACHABLE),
                  f"hop {hop.hop} {hop.to_agent}: {hop.status.value} but its handler never ran")
            check(hop.attempts == 0, f"hop {hop.hop} {hop.to_agent}: {hop.attempts} attempts, none ran")
            continue
        last = runs[-1]
        if last["outcome"] == "hang":  # the chain was stopped while this hop ran
            stopped = HopStatus.CANCELLED if plan.stop == "cancel" else HopStatus.FAILED
            check(hop.status is stopped, f"hop {hop.hop}: {hop.status.value} after a {plan.stop}")
            # a terminated workflow never hears how many attempts its hop had begun
            check(hop.attempts == (len(runs) if plan.stop == "cancel" else 0),
                  f"hop {hop.hop}: attempts {hop.attempts} after a {plan.stop}")
            continue
        check([c["attempt"] for c in runs] == list(range(1, len(runs) + 1)),
              f"hop {hop.hop}: attempts seen {[c['attempt'] for c in runs]}")
        check(hop.attempts == len(runs), f"hop {hop.hop} {hop.to_agent}: attempts {hop.attempts}, "
                                         f"handler ran {len(runs)} times")
        expected = HopStatus.COMPLETED if last["outcome"] in SUCCESS else HopStatus.FAILED
        check(hop.status is expected, f"hop {hop.hop} {hop.to_agent}: {hop.status.value}, "
                                      f"last invocation {last['outcome']}")
        if "result_data" in last:
            check(hop.result_data == last["result_data"], f"hop {hop.hop}: result_data differs")
        check(hop.hop == last["depth"], f"hop {hop.hop}: the handler saw depth {last['depth']}")
        if "seen" in last:  # every earlier hop's result that completed, whole, in order
            earlier = [h.result_data for h in record.hops[:index] if h.status is HopStatus.COMPLETED]
            check(last["seen"] == earlier, f"hop {hop.hop}: the handler saw other earlier results")

    refused = [h for h in record.hops if h.status is HopStatus.REFUSED]
    check(not refused or (len(refused) == 1 and record.hops[-1] is refused[0]),
          "a refused hop is only ever the chain's last")
    check(bool(refused) == (record.status in (ChainStatus.LOOP_DETECTED, ChainStatus.DEPTH_EXCEEDED,
                                              ChainStatus.REJECTED)),
          f"status {record.status.value} with {len(refused)} refused hop(s)")
    successes = [c for c in calls if c["outcome"] in SUCCESS]
    check(record.final_result == (successes[-1]["result_data"] if successes else {}),
          "final_result is not the last successful hop's result_data")
    check((record.status is ChainStatus.COMPLETED) == bool(calls and calls[-1]["outcome"] == "complete"),
          f"status {record.status.value}, last invocation {calls[-1]['outcome'] if calls else None}")

    status, hops = expected_signature(plan)
    actual = [(h.to_agent, h.status, h.attempts, h.fallback_for) for h in record.hops]
    check((record.status, actual) == (status, hops),
          f"model: {status.value} {hops}\n      record: {record.status.value} {actual}")
    return problems


async def held_and_replayed(client: Client, chain_id: UUID) -> tuple[ChainRecord, ChainRecord]:
    """The record the chain workflow holds (its `chain_state`, answered by the real chain worker
    after the chain ended) and the one `handoff.client.audit` rebuilds by replaying the same history."""
    handle = client.get_workflow_handle(str(chain_id))
    held = await handle.query("chain_state", result_type=ChainRecord)
    history = await handle.fetch_history()
    replayed = await record_from_history(history, client.data_converter, replay=True)
    last = history.events[-1]
    if last.HasField("workflow_execution_terminated_event_attributes"):
        # The workflow never sees its termination; the rebuild applies it from the closing event.
        when = last.event_time.ToDatetime(tzinfo=timezone.utc)
        error = f"terminated: {last.workflow_execution_terminated_event_attributes.reason}"
        held.close_running(HopStatus.FAILED, error, when)
        held.end(ChainStatus.FAILED, error, when)
    return held, replayed


def tampered(record: ChainRecord) -> list[ChainRecord]:
    """Copies of a record, each with one lie in it that the comparison must catch."""
    executed = [i for i, h in enumerate(record.hops) if h.attempts]
    lies = []
    for i in executed[-1:]:
        for update in ({"attempts": record.hops[i].attempts + 1}, {"handoff_id": uuid4()},
                       {"status": HopStatus.REFUSED}, {"to_agent": "someone-else"}):
            copy = record.model_copy(deep=True)
            copy.hops[i] = copy.hops[i].model_copy(update=update)
            lies.append(copy)
    lies.append(record.model_copy(update={"final_result": {"forged": True}}))
    lies.append(record.model_copy(update={"hops": record.hops[:-1]}))
    return lies


async def show_json(chain_id: UUID, env: dict[str, str]) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(
        subprocess.run, [str(HANDOFF), "show", str(chain_id), "--json"],
        capture_output=True, text=True, env=env, timeout=60,
    )


async def test_audit_record_matches_what_agents_executed(client, uid, cli_env):
    seed = int(os.environ.get("HANDOFF_AUDIT_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nHANDOFF_AUDIT_SEED={seed}")
    rng = random.Random(seed)
    agents = Agents(pool=[f"r{i}-{uid}" for i in range(POOL)], fallback=f"rfb-{uid}", down=f"rdown-{uid}")
    truth = Truth()
    plans = [make_plan(rng, i, agents) for i in range(CHAINS)]
    truth.plans.update({str(p.chain_id): p for p in plans})
    workers = [make_agent(a, scripted(a, truth), max_concurrent=CONCURRENCY)
               for a in [*agents.pool, agents.fallback]]
    gate = asyncio.Semaphore(CONCURRENCY)

    async def run(plan: Plan) -> ChainRecord:
        """The chain, to its end; a chain whose hop hangs is cancelled or terminated."""
        async with gate:
            chain_id = await start_chain(client, chain_id=plan.chain_id, to_agent=plan.steps[0].agent,
                                         task_description=plan.task, policy=plan.policy())
            ended = asyncio.ensure_future(wait_chain(client, chain_id))
            hanging = asyncio.ensure_future(truth.hanging[str(chain_id)].wait())
            await asyncio.wait([ended, hanging], timeout=60, return_when=asyncio.FIRST_COMPLETED)
            if hanging.done() and not ended.done():
                handle = client.get_workflow_handle(str(chain_id))
                if plan.stop == "cancel":
                    await handle.cancel()
                else:
                    await handle.terminate(reason="stopped by the audit test")
            hanging.cancel()
            return await asyncio.wait_for(ended, 60)

    async def show(plan: Plan) -> ChainRecord:
        async with gate:
            return await get_chain(client, plan.chain_id)

    async def compare(plan: Plan) -> tuple[ChainRecord, ChainRecord]:
        async with gate:
            return await held_and_replayed(client, plan.chain_id)

    started = time.monotonic()
    async with running(client, *workers):
        try:
            finished = await asyncio.gather(*(run(p) for p in plans))
        finally:
            truth.release.set()
        ran_s = time.monotonic() - started
        records = await asyncio.gather(*(show(p) for p in plans))
        pairs = await asyncio.gather(*(compare(p) for p in plans))

    assert [r.chain_id for r in finished] == [p.chain_id for p in plans]
    failures = {}
    for plan, record, ended, (held, replayed) in zip(plans, records, finished, pairs):
        problems = mismatches(plan, record, truth.calls[str(plan.chain_id)])
        for name, other in (("held by the workflow", held), ("returned when it ended", ended)):
            if other != replayed:
                problems.append(f"record {name} != replayed:\n      {other.model_dump_json()}\n"
                                f"      {replayed.model_dump_json()}")
        if record != replayed:
            problems.append("get_chain differs from the replayed record")
        if problems:
            failures[plan.chain_id] = problems
    matched = CHAINS - len(failures)
    statuses = Counter(r.status.value for r in records)
    hop_statuses = Counter(h.status.value for r in records for h in r.hops)
    invocations = sum(len(c) for c in truth.calls.values())
    print(f"chains={CHAINS} matched={matched} ({100 * matched / CHAINS:.1f} %) in {ran_s:.1f}s; "
          f"statuses={dict(statuses)}; hops={dict(hop_statuses)}; handler invocations={invocations}; "
          f"with fallback agent={sum(bool(p.fallback) for p in plans)}")
    details = "\n".join(f"{cid}: " + "\n  ".join(p) for cid, p in list(failures.items())[:5])
    assert not failures, f"seed {seed}: {len(failures)} of {CHAINS} chains disagree:\n{details}"
    # The run exercised every ending and every kind of hop it was built to.
    assert {"completed", "failed", "depth_exceeded", "loop_detected", "rejected", "cancelled"} <= set(statuses)
    assert {"completed", "failed", "refused", "unreachable", "cancelled"} <= set(hop_statuses)
    assert any(r.error and r.error.startswith("terminated") for r in records)
    assert any(h.fallback_for for r in records for h in r.hops)
    assert any(h.attempts == 2 for r in records for h in r.hops)
    # ... and the comparison is not vacuous: a record with one lie in it is caught.
    lies = [(p, lie) for p, r in zip(plans, records) if r.hops for lie in tampered(r)][:200]
    uncaught = [p.chain_id for p, lie in lies if not mismatches(p, lie, truth.calls[str(p.chain_id)])]
    assert not uncaught, f"tampered records passed the comparison: {uncaught[:5]}"

    # `handoff show ID --json` through the real CLI prints the same record.
    sample = rng.sample(plans, CLI_SAMPLE)
    shown = await asyncio.gather(*(show_json(p.chain_id, cli_env) for p in sample))
    by_id = {r.chain_id: r for r in records}
    for plan, proc in zip(sample, shown):
        record = by_id[plan.chain_id]
        assert proc.returncode == (0 if record.status is ChainStatus.COMPLETED else 1), proc.stderr
        assert json.loads(proc.stdout) == json.loads(record.model_dump_json()), plan.chain_id
    print(f"cli: {CLI_SAMPLE} of {CHAINS} chains shown identically by `handoff show --json`; "
          f"total {time.monotonic() - started:.1f}s")


# == the handoff patterns: fan-out and join, delegation, approval ==========================
#
# A second run of random chains, each the root agent fanning out (the join waiting for every
# branch, for the first k, or until a deadline) or delegating (the chain coming back to it), with
# a person approving, rejecting or ignoring the join's hop. The record, a tree, must agree with
# what every agent did and with a model of the rules, and the three records must be equal.

PATTERN_CHAINS = 80
PATTERN_CONCURRENCY = 10
BRANCH_BEHAVIOURS = {"ok": 0.6, "flaky": 0.15, "permanent": 0.15, "fail": 0.1}
DECISIONS = {"approve": 0.6, "reject": 0.25, "ignore": 0.15}
APPROVAL_TIMEOUT_S = 1.5
JOIN_DEADLINE_S = 4.0


@dataclass
class BranchPlan:
    steps: list[Step]  # each step hands off to the next one's agent; the last completes


@dataclass
class PatternPlan:
    chain_id: UUID
    task: str
    root: str
    kind: str  # "fan" or "delegate"
    branches: list[BranchPlan]
    join_agent: str  # the root itself for "delegate"
    wait: str  # "all", "first_k" or "deadline"
    wait_for: int | None
    fallback: str | None
    decision: str | None  # None: the join needs no approval

    def policy(self) -> dict[str, Any]:
        policy: dict[str, Any] = {"retry_initial_s": 0.05, "fallback_agent": self.fallback,
                                  "heartbeat_timeout_s": 1, "approval_timeout_s": APPROVAL_TIMEOUT_S}
        if self.decision is not None:
            policy["approval_required"] = [self.join_agent]
        return policy


def make_pattern_plan(rng: random.Random, index: int, pool: list[str], joiners: list[str],
                      fallback: str) -> PatternPlan:
    root = rng.choice(pool)
    others = [a for a in pool if a != root]
    kind = rng.choices(["fan", "delegate"], weights=[0.7, 0.3])[0]
    count = rng.randint(2, 4) if kind == "fan" else 1
    wait = rng.choices(["all", "first_k", "deadline"], weights=[0.6, 0.25, 0.15])[0] if kind == "fan" else "all"
    wait_for = rng.randint(1, count - 1) if wait == "first_k" else None
    # branches from this index on never answer (the join cuts them)
    hanging_from = wait_for if wait == "first_k" else rng.randint(1, count - 1) if wait == "deadline" else count
    names, weights = list(BRANCH_BEHAVIOURS), list(BRANCH_BEHAVIOURS.values())
    branches = []
    for b in range(count):
        agents = rng.sample(others, rng.randint(1, 2))
        if b >= hanging_from:  # never answers: cut by the join
            behaviours = ["hang"] * len(agents)
        elif wait == "all":
            behaviours = rng.choices(names, weights=weights, k=len(agents))
        else:  # branches a first-k or deadline join waits for do complete
            behaviours = rng.choices(["ok", "flaky"], k=len(agents))
        steps = [Step(a, beh, agents[i + 1] if i + 1 < len(agents) else None,
                      f"branch {b} step {i + 1}" if i + 1 < len(agents) else None)
                 for i, (a, beh) in enumerate(zip(agents, behaviours))]
        branches.append(BranchPlan(steps))
    decision = rng.choices(list(DECISIONS), weights=list(DECISIONS.values()))[0] if rng.random() < 0.4 else None
    return PatternPlan(
        chain_id=uuid4(), task=f"pattern chain {index}", root=root, kind=kind, branches=branches,
        join_agent=root if kind == "delegate" else rng.choice(joiners), wait=wait, wait_for=wait_for,
        fallback=fallback if rng.random() < FALLBACK else None,
        decision=None if kind == "delegate" else decision,
    )


HopSig = tuple[str, HopStatus, int, str | None]
BranchSig = tuple[ChainStatus, str | None, list[HopSig]]


def expected_tree(plan: PatternPlan) -> tuple[ChainStatus, list[HopSig], list[BranchSig]]:
    """(chain status, top-level hops, branches) per the rules of docs/design.md, sections 4 and 5."""
    cut = {"first_k": "not_needed", "deadline": "late"}.get(plan.wait)
    branches: list[BranchSig] = []
    for branch in plan.branches:
        hops: list[HopSig] = []
        status = ChainStatus.COMPLETED
        failed: set[str] = set()
        for step in branch.steps:
            if step.behaviour == "hang":
                hops.append((step.agent, HopStatus.CANCELLED, 1, None))
                status = ChainStatus.CANCELLED
                break
            outcome = {"ok": (HopStatus.COMPLETED, 1), "flaky": (HopStatus.COMPLETED, 2),
                       "permanent": (HopStatus.FAILED, 1), "fail": (HopStatus.FAILED, 1)}[step.behaviour]
            hops.append((step.agent, *outcome, None))
            if outcome[0] is HopStatus.FAILED:
                failed.add(step.agent)
                if not plan.fallback:
                    status = ChainStatus.FAILED
                    break
                hops.append((plan.fallback, HopStatus.COMPLETED, 1, step.agent))
        branches.append((status, cut if status is ChainStatus.CANCELLED else None, hops))
    top: list[HopSig] = [(plan.root, HopStatus.COMPLETED, 1, None)]
    if plan.decision in ("reject", "ignore"):
        top.append((plan.join_agent, HopStatus.REFUSED, 0, None))
        return ChainStatus.REJECTED, top, branches
    top.append((plan.join_agent, HopStatus.COMPLETED, 1, None))
    return ChainStatus.COMPLETED, top, branches


def pattern_handler(agent_id: str, truth: Truth, plans: dict[str, PatternPlan]):
    """What the planned agent does at its hop (the fallback agent always succeeds), written down."""

    async def handle(ctx: HandoffContext):
        chain = str(ctx.chain_id)
        plan = plans[chain]
        attempt = activity.info().attempt
        call = {"chain_id": chain, "handoff_id": ctx.handoff_id, "agent": agent_id,
                "to_agent": ctx.to_agent, "depth": ctx.chain_depth, "attempt": attempt}
        truth.calls[chain].append(call)
        data = {"by": agent_id, "depth": ctx.chain_depth, "token": f"{ctx.handoff_id}/{attempt}"}
        call["result_data"] = data
        if ctx.branches:  # the join, or the return to the delegating root
            data["branches"] = [b.status.value for b in ctx.branches]
            call["outcome"] = "complete"
            return ctx.complete(data)
        if ctx.branch is None:  # the root: fan out, or delegate
            call["outcome"] = "handoff"
            branches = [Branch(to_agent=b.steps[0].agent, task_description=f"branch {i} step 0")
                        for i, b in enumerate(plan.branches)]
            if plan.kind == "delegate":
                return ctx.delegate(to_agent=branches[0].to_agent, task_description=branches[0].task_description,
                                    result_data=data)
            join = Join(to_agent=plan.join_agent, task_description="join", wait_for=plan.wait_for,
                        deadline_s=JOIN_DEADLINE_S if plan.wait == "deadline" else None)
            return ctx.fan_out(branches, join=join, result_data=data)
        step = plan.branches[ctx.branch.index].steps[ctx.chain_depth - 1]
        failed = await misbehave("ok" if agent_id == plan.fallback else step.behaviour, agent_id, ctx, call, truth)
        if failed is not None:  # (a hanging branch is cut by the join meanwhile)
            return failed
        return take_step(step, ctx, call, data)

    return handle


def tree_mismatches(plan: PatternPlan, record: ChainRecord, calls: list[dict[str, Any]]) -> list[str]:
    """Every way the tree record disagrees with the ground truth and the model; empty if none."""
    problems: list[str] = []

    def check(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    by_handoff = by_handoff_id(calls)
    entries = list(record.all_hops())
    check(sorted(str(h.handoff_id) for h in entries if h.handoff_id in by_handoff) == sorted(map(str, by_handoff)),
          "the record's executed hops are not exactly the handlers' invocations")
    for hop in entries:
        runs = by_handoff.get(hop.handoff_id, [])
        if not runs:
            check(hop.status is HopStatus.REFUSED and hop.attempts == 0,
                  f"hop {hop.hop} {hop.to_agent}: {hop.status.value}/{hop.attempts} but its handler never ran")
            continue
        check(all(c["agent"] == hop.to_agent == c["to_agent"] for c in runs), f"hop {hop.hop}: wrong agent")
        check([c["attempt"] for c in runs] == list(range(1, len(runs) + 1)), f"hop {hop.hop}: attempts seen")
        check(hop.attempts == len(runs), f"hop {hop.hop} {hop.to_agent}: attempts {hop.attempts}, ran {len(runs)}")
        check(hop.hop == runs[-1]["depth"], f"hop {hop.hop}: the handler saw depth {runs[-1]['depth']}")
        last = runs[-1]["outcome"]
        if last == "hang":
            check(hop.status is HopStatus.CANCELLED, f"hop {hop.hop}: {hop.status.value} after a cut")
            continue
        expected = HopStatus.COMPLETED if last in SUCCESS else HopStatus.FAILED
        check(hop.status is expected, f"hop {hop.hop} {hop.to_agent}: {hop.status.value}, last {last}")
        if hop.status is HopStatus.COMPLETED:
            check(hop.result_data == runs[-1]["result_data"], f"hop {hop.hop}: result_data differs")
    status, top, branches = expected_tree(plan)
    actual_top = [(h.to_agent, h.status, h.attempts, h.fallback_for) for h in record.hops]
    fan = record.hops[0].fan_out if record.hops else None
    actual_branches = [(b.status, b.cut, [(h.to_agent, h.status, h.attempts, h.fallback_for) for h in b.hops])
                       for b in (fan.branches if fan else [])]
    check((record.status, actual_top, actual_branches) == (status, top, branches),
          f"model: {status.value} {top} {branches}\n      record: {record.status.value} {actual_top} "
          f"{actual_branches}")
    if len(record.hops) == 2:
        join = record.hops[1]
        check(join.kind is (HopKind.RETURN if plan.kind == "delegate" else HopKind.JOIN), f"join kind {join.kind}")
        check(join.hop == 1 + max(h.hop for b in fan.branches for h in b.hops if h.status is not HopStatus.REFUSED),
              "the join runs one past the deepest branch")
        decision = {"approve": "approved", "reject": "rejected", "ignore": "timed_out"}.get(plan.decision or "")
        check((join.approval.decision if join.approval else None) == decision,
              f"approval {join.approval} for a plan that {plan.decision}s")
        if join.status is HopStatus.COMPLETED:
            seen = next(c for c in calls if c["handoff_id"] == join.handoff_id)["result_data"]["branches"]
            check(seen == [b.status.value for b in fan.branches], f"the join saw {seen}")
    completed = [h for h in record.hops if h.status is HopStatus.COMPLETED]
    check(record.final_result == (completed[-1].result_data if completed else {}), "final_result")
    return problems


async def test_audit_record_of_fan_outs_delegations_and_approvals(client, uid, cli_env):
    seed = int(os.environ.get("HANDOFF_AUDIT_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nHANDOFF_AUDIT_SEED={seed}")
    rng = random.Random(seed)
    pool = [f"q{i}-{uid}" for i in range(POOL)]
    joiners = [f"qj{i}-{uid}" for i in range(2)]
    fallback = f"qfb-{uid}"
    plans = [make_pattern_plan(rng, i, pool, joiners, fallback) for i in range(PATTERN_CHAINS)]
    by_id = {str(p.chain_id): p for p in plans}
    truth = Truth()
    workers = [make_agent(a, pattern_handler(a, truth, by_id), max_concurrent=40)
               for a in [*pool, *joiners, fallback]]
    gate = asyncio.Semaphore(PATTERN_CONCURRENCY)

    async def run(plan: PatternPlan) -> ChainRecord:
        async with gate:
            chain_id = await start_chain(client, chain_id=plan.chain_id, to_agent=plan.root,
                                         task_description=plan.task, policy=plan.policy())
            if plan.decision in ("approve", "reject"):
                handle = client.get_workflow_handle(str(chain_id))
                for _ in range(600):
                    state = await handle.query("chain_state", result_type=ChainRecord)
                    if state.status is ChainStatus.AWAITING_APPROVAL:
                        break
                    await asyncio.sleep(0.05)
                if plan.decision == "approve":
                    await approve_chain(client, chain_id, by="auditor-bot", comment=plan.task)
                else:
                    await reject_chain(client, chain_id, by="auditor-bot", reason=plan.task)
            return await asyncio.wait_for(wait_chain(client, chain_id), 90)

    started = time.monotonic()
    async with running(client, *workers):
        try:
            finished = await asyncio.gather(*(run(p) for p in plans))
        finally:
            truth.release.set()
        records = await asyncio.gather(*(get_chain(client, p.chain_id) for p in plans))
        pairs = await asyncio.gather(*(held_and_replayed(client, p.chain_id) for p in plans))
    failures = {}
    for plan, record, ended, (held, replayed) in zip(plans, records, finished, pairs):
        problems = tree_mismatches(plan, record, truth.calls[str(plan.chain_id)])
        for name, other in (("held by the workflow", held), ("returned when it ended", ended),
                            ("read back by get_chain", record)):
            if other != replayed:
                problems.append(f"record {name} != replayed:\n      {other.model_dump_json()}\n"
                                f"      {replayed.model_dump_json()}")
        if problems:
            failures[plan.chain_id] = problems
    kinds = Counter((p.kind, p.wait, p.decision) for p in plans)
    statuses = Counter(r.status.value for r in records)
    branch_statuses = Counter(b.status.value for r in records for h in r.hops if h.fan_out for b in h.fan_out.branches)
    print(f"pattern chains={PATTERN_CHAINS} matched={PATTERN_CHAINS - len(failures)} in "
          f"{time.monotonic() - started:.1f}s; statuses={dict(statuses)}; branches={dict(branch_statuses)}")
    details = "\n".join(f"{cid}: " + "\n  ".join(p) for cid, p in list(failures.items())[:5])
    assert not failures, f"seed {seed}: {len(failures)} of {PATTERN_CHAINS} chains disagree:\n{details}"
    # the run exercised what it was built to
    assert {k for k, _, _ in kinds} == {"fan", "delegate"} and {w for _, w, _ in kinds} >= {"all", "first_k"}
    assert {"completed", "failed", "cancelled"} <= set(branch_statuses)
    assert {"completed", "rejected"} <= set(statuses)
    assert any(h.fallback_for for r in records for h in r.all_hops())
    # `handoff show --json` prints the same tree
    sample = rng.sample(plans, 5)
    shown = await asyncio.gather(*(show_json(p.chain_id, cli_env) for p in sample))
    by_chain = {r.chain_id: r for r in records}
    for plan, proc in zip(sample, shown):
        assert json.loads(proc.stdout) == json.loads(by_chain[plan.chain_id].model_dump_json()), plan.chain_id

"""The audit trail tells the truth about controlled chains too: random chains with token budgets,
steering, stops after the running hop and re-runs, each compared hop by hop with what the agents
did and with an independent model of the rules (a budget is checked before each hop; a steering
message reaches the next hop that starts, once; a stop lets the running hop end and starts no other;
a re-run carries the original's earlier entries and calls none of their agents).

Reproduce a run with HANDOFF_AUDIT_SEED=<the printed seed>."""

from __future__ import annotations

import asyncio
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4

import pytest

from handoff import ChainStatus, HopStatus, get_chain, start_chain, steer_chain, stop_chain, wait_chain
from handoff.client.chains import start_request
from handoff.client.rerun import rerun_request
from tests.support import make_agent, running

pytestmark = [pytest.mark.usefixtures("chains"), pytest.mark.timeout(300)]

CHAINS = 60
AGENTS = 6
BATCH = 10


@dataclass
class Plan:
    chain_id: UUID
    agents: list[str]
    tokens: list[int]
    max_tokens: int | None
    action: str  # "none", "steer" or "stop", while the hop at `at` runs
    at: int
    held: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Truth:
    plans: dict[str, Plan] = field(default_factory=dict)
    calls: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    origin: dict[str, str] = field(default_factory=dict)  # a re-run's id -> its original's


def make_plan(rng: random.Random, pool: list[str]) -> Plan:
    hops = rng.randint(1, 5)
    agents = rng.sample(pool, hops)  # distinct: no loop rule in play
    tokens = [rng.randint(1, 20) for _ in range(hops)]
    max_tokens = rng.choice([None, rng.randint(5, 60)])
    action = rng.choices(["none", "steer", "stop"], weights=[2, 1, 1])[0]
    return Plan(uuid4(), agents, tokens, max_tokens, action, rng.randrange(hops))


def expected(plan: Plan, start: int = 0, rerun: bool = False) -> tuple[ChainStatus, list[tuple[int, HopStatus]]]:
    """What the rules make of `plan` from hop `start` on (a re-run, neither steered nor stopped,
    spends from zero)."""
    spent, hops, stopping = 0, [], False
    for depth in range(start, len(plan.agents)):
        if plan.max_tokens is not None and spent >= plan.max_tokens:  # the budget is checked first
            return ChainStatus.BUDGET_EXCEEDED, hops + [(depth, HopStatus.REFUSED)]
        if stopping:
            return ChainStatus.CANCELLED, hops
        hops.append((depth, HopStatus.COMPLETED))
        spent += plan.tokens[depth]
        stopping = not rerun and plan.action == "stop" and depth == plan.at
    return ChainStatus.COMPLETED, hops


def agent_handler(truth: Truth):
    async def handle(ctx):
        chain = str(ctx.chain_id)
        plan = truth.plans[truth.origin.get(chain, chain)]
        depth = ctx.chain_depth
        truth.calls[chain].append({"agent": ctx.to_agent, "depth": depth, "handoff_id": ctx.handoff_id,
                                   "steering": [s.message for s in ctx.steering]})
        ctx.report_usage(model="audit-model", prompt_tokens=plan.tokens[depth], model_calls=1)
        if chain not in truth.origin and plan.action != "none" and depth == plan.at:
            plan.held.set()
            await plan.release.wait()
        if depth + 1 < len(plan.agents):
            return ctx.handoff(to_agent=plan.agents[depth + 1], task_description=f"step {depth + 1}",
                               result_data={"depth": depth})
        return ctx.complete({"depth": depth})
    return handle


async def drive(client, plan: Plan) -> None:
    """Start the chain; steer or stop it while its hop at `at` runs; wait for its end."""
    policy = {"max_depth": 5}
    if plan.max_tokens is not None:
        policy["budget"] = {"max_tokens": plan.max_tokens}
    await start_chain(client, chain_id=plan.chain_id, to_agent=plan.agents[0], task_description="audit",
                      policy=policy)
    if plan.action != "none":
        reached = asyncio.create_task(plan.held.wait())
        ended = asyncio.create_task(wait_chain(client, plan.chain_id))
        done, _ = await asyncio.wait({reached, ended}, return_when=asyncio.FIRST_COMPLETED)
        if reached in done:  # the held hop runs (a budget may refuse the chain before it)
            if plan.action == "steer":
                await steer_chain(client, plan.chain_id, message=f"note for {plan.chain_id}", by="auditor")
            else:
                await stop_chain(client, plan.chain_id, by="auditor")
        else:
            reached.cancel()
        plan.release.set()
        await ended
    await wait_chain(client, plan.chain_id)


def mismatches(plan: Plan, record, calls: list[dict[str, Any]], start: int = 0, rerun: bool = False) -> list[str]:
    problems = []
    status, hops = expected(plan, start, rerun)
    own = [h for h in record.hops if h.carried_from is None]
    if record.status is not status:
        problems.append(f"status {record.status.value}, expected {status.value}")
    if [(h.hop, h.status) for h in own] != hops:
        problems.append(f"hops {[(h.hop, h.status.value) for h in own]}, expected {[(d, s.value) for d, s in hops]}")
    ran = [h for h in own if h.status is HopStatus.COMPLETED]
    if [(c["agent"], c["depth"]) for c in calls] != [(h.to_agent, h.hop) for h in ran]:
        problems.append(f"calls {[(c['agent'], c['depth']) for c in calls]} != the record's completed hops")
    if any(h.usage is None or h.usage.tokens != plan.tokens[h.hop] for h in ran):
        problems.append("a hop's usage is not what its agent reported")
    total = sum(plan.tokens[h.hop] for h in ran)
    if (record.usage.tokens if record.usage else 0) != total:
        problems.append(f"the chain's usage {record.usage and record.usage.tokens} != {total}")
    steered = [(c["depth"], c["steering"]) for c in calls if c["steering"]]
    wanted = ([(plan.at + 1, [f"note for {plan.chain_id}"])]
              if not rerun and plan.action == "steer" and (plan.at + 1, HopStatus.COMPLETED) in hops else [])
    if steered != wanted:
        problems.append(f"steering delivered {steered}, expected {wanted}")
    return problems


async def test_random_controlled_chains_and_their_reruns_are_recorded_as_they_ran(client, uid):
    seed = int(os.environ.get("HANDOFF_AUDIT_SEED", random.randrange(2**32)))
    print(f"HANDOFF_AUDIT_SEED={seed}")
    rng = random.Random(seed)
    pool = [f"ac{i}-{uid}" for i in range(AGENTS)]
    truth = Truth()
    plans = [make_plan(rng, pool) for _ in range(CHAINS)]
    for plan in plans:
        truth.plans[str(plan.chain_id)] = plan
    problems: list[str] = []
    async with running(client, *(make_agent(a, agent_handler(truth), max_concurrent=20) for a in pool)):
        for start in range(0, CHAINS, BATCH):
            await asyncio.gather(*(drive(client, p) for p in plans[start:start + BATCH]))
        records = {str(p.chain_id): await get_chain(client, p.chain_id) for p in plans}
        reruns = []
        for plan in plans:
            record = records[str(plan.chain_id)]
            problems += [f"{plan.chain_id} (seed {seed}): {p}"
                         for p in mismatches(plan, record, truth.calls[str(plan.chain_id)])]
            ran = [h.hop for h in record.hops]
            if ran and rng.random() < 0.4:
                reruns.append((plan, rng.choice(sorted(set(ran)))))
        for plan, hop in reruns:
            original = records[str(plan.chain_id)]
            if all(h.hop != hop or h.handoff_id is None or h.status is HopStatus.REFUSED for h in original.hops):
                continue  # a refused hop never ran: nothing to re-run from
            new_id = str(uuid4())
            truth.origin[new_id] = str(plan.chain_id)
            request = await rerun_request(client, plan.chain_id, from_hop=hop)
            await start_request(client, request.model_copy(update={"chain_id": UUID(new_id)}))
            record = await wait_chain(client, new_id)
            carried = [h for h in record.hops if h.carried_from is not None]
            if [h.model_copy(update={"carried_from": None}) for h in carried] != [h for h in original.hops if h.hop < hop]:
                problems.append(f"re-run {new_id} of {plan.chain_id} from hop {hop}: carried entries differ")
            if any(c["depth"] < hop for c in truth.calls[new_id]):
                problems.append(f"re-run {new_id}: an agent before hop {hop} was called again")
            problems += [f"re-run {new_id} of {plan.chain_id} from hop {hop} (seed {seed}): {p}"
                         for p in mismatches(plan, record, truth.calls[new_id], start=hop, rerun=True)]
    assert not problems, "\n".join(problems[:20])
    assert {p.action for p in plans} == {"none", "steer", "stop"}
    assert any(r.status is ChainStatus.BUDGET_EXCEEDED for r in records.values())

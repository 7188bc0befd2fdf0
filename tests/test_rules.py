"""The chain's rules as pure functions (`handoff.workflows.rules`), checked with property tests
and no server: whatever the policy and the path, a hop never goes where the policy, the loop rules,
the depth limit or the budget forbid, and what an agent is told it may do agrees with what the
workflow would then allow."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from handoff.models import (
    AgentCapability,
    BranchRecord,
    Candidate,
    ChainPolicy,
    ChainRecord,
    ChainStatus,
    FanOutRecord,
    HopKind,
    HopRecord,
    HopStatus,
)
from handoff.workflows import rules
from handoff.workflows.paths import Path, Target

AGENTS = ["a", "b", "c", "d", "e"]
TASKS = ["review", "audit", "ship"]
CAPABILITIES = [AgentCapability.TESTING, AgentCapability.SECURITY_AUDIT]

agents = st.sampled_from(AGENTS)
tasks = st.sampled_from(TASKS)
targets_of = st.lists(st.sampled_from([*AGENTS, *(c.value for c in CAPABILITIES), "*"]), max_size=4, unique=True)

policies = st.builds(
    ChainPolicy,
    max_depth=st.integers(1, 5),
    max_visits_per_agent=st.integers(1, 3),
    fallback_agent=st.one_of(st.none(), agents),
    allowed_handoffs=st.one_of(st.none(), st.dictionaries(st.sampled_from([*AGENTS, "starter", "*"]), targets_of,
                                                          max_size=4)),
    approval_required=st.one_of(st.none(), targets_of),
    max_total_hops=st.integers(1, 30),
)


@st.composite
def paths(draw) -> Path:
    visits = Counter(draw(st.dictionaries(agents, st.integers(0, 3), max_size=5)))
    asked = set(draw(st.lists(st.tuples(agents, tasks), max_size=6)))
    failed = set(draw(st.lists(agents, max_size=3)))
    context = draw(st.dictionaries(st.sampled_from(["x", "y", "z", "diff"]), st.integers(), max_size=4))
    results = draw(st.lists(st.dictionaries(st.just("r"), st.integers(), max_size=1), max_size=5))
    return Path(hops=[], context=context, results=results, visits=visits, asked=asked, failed=failed)


@st.composite
def targets(draw, by_capability: bool | None = None) -> Target:
    capability = by_capability if by_capability is not None else draw(st.booleans())
    kind = draw(st.sampled_from(list(HopKind)))
    return Target(
        to_agent="" if capability else draw(agents),
        capability=draw(st.sampled_from(CAPABILITIES)) if capability else None,
        task=draw(tasks), from_agent=draw(st.sampled_from([*AGENTS, "starter"])),
        visible_keys=draw(st.one_of(st.none(), st.lists(st.sampled_from(["x", "y", "diff", "w"]), max_size=3)
                                    .map(tuple))),
        visible_previous=draw(st.one_of(st.none(), st.integers(0, 6))),
        kind=HopKind.HANDOFF if capability else kind, require_approval=draw(st.booleans()),
    )


candidate_lists = st.lists(st.builds(Candidate, agent_id=agents, live=st.booleans(),
                                     backlog=st.integers(0, 5), max_concurrent=st.integers(1, 5)),
                           max_size=5, unique_by=lambda c: c.agent_id)


def allowed(policy: ChainPolicy, path: Path, target: Target, agent: str) -> bool:
    """What the rules promise of any agent a hop goes to."""
    return target.returns_to(agent) or (rules.permits(policy, target, agent)
                                        and rules.loop_violation(policy, path, agent, target.task) is None)


@settings(max_examples=300)
@given(policy=policies, path=paths(), target=targets(by_capability=False))
def test_a_hop_by_name_goes_to_its_agent_only_if_the_policy_and_the_loop_rules_allow(policy, path, target):
    choice = rules.choose_by_name(policy, path, target)
    if isinstance(choice, rules.Chosen):
        assert choice.agent == target.to_agent and allowed(policy, path, target, choice.agent)
    else:
        assert not allowed(policy, path, target, target.to_agent)
        expected = ChainStatus.REJECTED if not rules.permits(policy, target, target.to_agent) \
            else ChainStatus.LOOP_DETECTED
        assert choice.status is expected and choice.reason


@settings(max_examples=300)
@given(policy=policies, path=paths(), target=targets(by_capability=True), candidates=candidate_lists)
def test_a_capability_hop_goes_to_a_live_allowed_candidate_first_else_the_fallback(policy, path, target,
                                                                                     candidates):
    choice = rules.choose_by_capability(policy, path, target, candidates)
    usable = [c for c in candidates if c.live and allowed(policy, path, target, c.agent_id)]
    if usable:
        assert isinstance(choice, rules.Chosen) and choice.agent == usable[0].agent_id
        assert choice.considered == [c.agent_id for c in candidates]
    elif isinstance(choice, rules.Chosen):  # the fallback agent, which the rules allow too
        assert choice.agent == policy.fallback_agent and allowed(policy, path, target, choice.agent)
        assert choice.agent not in path.failed and choice.considered[-1] == choice.agent
    elif isinstance(choice, rules.Refused):
        assert choice.status in (ChainStatus.REJECTED, ChainStatus.LOOP_DETECTED)
    else:
        assert isinstance(choice, rules.Unreachable) and rules.usable_fallback(policy, path, target) is None
        assert choice.considered == [c.agent_id for c in candidates]


@settings(max_examples=300)
@given(policy=policies, path=paths(), target=targets(), candidates=candidate_lists)
def test_a_fallback_is_never_an_agent_the_rules_exclude(policy, path, target, candidates):
    chosen = rules.choose_fallback(policy, path, target, candidates)
    if chosen is not None:
        assert rules.permits(policy, target, chosen.agent)
        assert rules.loop_violation(policy, path, chosen.agent, target.task) is None
        is_candidate = any(c.agent_id == chosen.agent and c.live for c in candidates)
        assert is_candidate or (chosen.agent == policy.fallback_agent and chosen.agent not in path.failed)


@settings(max_examples=300)
@given(policy=policies, path=paths(), target=targets(), agent=agents, depth=st.integers(0, 4),
       room=st.integers(-2, 30))
def test_what_a_hop_is_told_it_may_do_is_what_the_workflow_then_allows(policy, path, target, agent, depth, room):
    limits = rules.limits_for(policy, path, depth, target, agent, room)
    after = Path(hops=[], context=path.context, results=path.results, visits=Counter(path.visits),
                 asked=set(path.asked), failed=set(path.failed))
    after.visit(target, agent)  # the hop ran
    assert limits.can_hand_off == (rules.depth_refusal(policy, depth + 1) is None and room > 1)
    for other in AGENTS:
        # an agent the limits exclude would be refused by the visit rule, and only those
        excluded = other in limits.excluded_agents
        assert excluded == (after.visits[other] >= policy.max_visits_per_agent)
        nxt = Target(to_agent=other, capability=None, task="a new task", from_agent=agent)
        assert limits.permits(other) == rules.permits(policy, nxt, other)
    for pair in limits.asked:
        assert tuple(pair) in after.asked


@given(path=paths(), target=targets())
def test_the_next_agent_is_shown_what_the_filter_lets_it_see_and_the_rest_is_named(path, target):
    view = rules.view_of(path, target)
    assert set(view.context) | set(view.withheld) == set(path.context)
    assert not set(view.context) & set(view.withheld)
    if target.visible_keys is not None:
        assert set(view.context) <= set(target.visible_keys)
    assert view.results == path.results[len(path.results) - len(view.results):]
    if target.visible_previous is None:
        assert view.results == path.results and view.results_shown is None
    else:
        assert view.results_shown == len(view.results) == min(target.visible_previous, len(path.results))


@given(policy=policies, depth=st.integers(0, 7))
def test_the_depth_limit_refuses_exactly_the_handoffs_past_it(policy, depth):
    assert (rules.depth_refusal(policy, depth) is None) == (depth < policy.max_depth)


@given(policy=policies, used=st.integers(0, 40), reserved=st.integers(0, 5), budgeted=st.booleans())
def test_the_budget_leaves_room_for_what_is_neither_used_nor_reserved(policy, used, reserved, budgeted):
    room = rules.budget_room(policy, budgeted=budgeted, used=used, reserved=reserved)
    if budgeted:
        assert room == policy.max_total_hops - used - reserved
    else:
        assert room > 200  # requests recorded before budgets: no bound a chain can reach


@given(policy=policies, path=paths(), target=targets(), agent=agents)
def test_a_hop_asks_for_approval_when_its_sender_or_the_policy_says(policy, path, target, agent):
    listed = policy.approval_required or []
    by_policy = "*" in listed or agent in listed or (target.capability is not None and target.capability.value in listed)
    expected = target.require_approval or (by_policy and not target.returns_to(agent))
    assert rules.needs_approval(policy, target, agent) == expected


branch_statuses = st.lists(st.sampled_from([ChainStatus.RUNNING, ChainStatus.COMPLETED, ChainStatus.FAILED,
                                             ChainStatus.CANCELLED]), min_size=1, max_size=6)


@given(statuses=branch_statuses, wait_for=st.one_of(st.none(), st.integers(1, 6)))
def test_a_join_waits_for_every_branch_or_its_first_k(statuses, wait_for):
    record = FanOutRecord(wait_for=wait_for, branches=[
        BranchRecord(index=i, task_description="t", status=s) for i, s in enumerate(statuses)])
    everyone = all(s.ended for s in statuses)
    completed = sum(s is ChainStatus.COMPLETED for s in statuses)
    assert rules.join_ready(record) == (everyone or (wait_for is not None and completed >= wait_for))


@given(hops=st.lists(st.tuples(st.integers(0, 4), st.sampled_from(list(HopStatus))), max_size=5),
       depth=st.integers(0, 3))
def test_a_join_runs_one_past_the_deepest_hop_of_any_branch(hops, depth):
    branch = BranchRecord(index=0, task_description="t", hops=[
        HopRecord(hop=h, from_agent="a", to_agent="b", task_description="t", status=s) for h, s in hops])
    record = FanOutRecord(branches=[branch])
    ran = [h for h, s in hops if s is not HopStatus.REFUSED]
    assert rules.join_depth(record, depth) == max([depth, *ran]) + 1


@settings(max_examples=50)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6), limit=st.integers(400, 6000))
def test_a_record_is_fitted_under_its_limit_by_eliding_the_largest_results(sizes, limit):
    from datetime import datetime, timezone
    from uuid import uuid4

    record = ChainRecord(chain_id=uuid4(), status=ChainStatus.COMPLETED, task_description="t",
                         started_at=datetime.now(timezone.utc), hops=[
                             HopRecord(hop=i, from_agent="a", to_agent="b", task_description="t",
                                       status=HopStatus.COMPLETED, result_data={"blob": "x" * n})
                             for i, n in enumerate(sizes)])
    record.final_result = record.hops[-1].result_data
    before = len(record.model_dump_json())
    why = rules.fit_record(record, limit)
    after = len(record.model_dump_json())
    if before <= limit:
        assert why is None and after == before
    else:
        assert why and "over the" in why
        elided = [h for h in record.hops if "elided" in h.result_data]
        kept = [h for h in record.hops if "elided" not in h.result_data]
        # what was elided was at least as large as anything kept
        if elided and kept:
            assert min(sizes[h.hop] for h in elided) >= max(len(h.result_data.get("blob", "")) for h in kept)
        assert after <= limit or not kept

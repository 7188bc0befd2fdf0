"""The chain's rules as pure functions of its policy and its path: who a hop may go to, what is a
loop, when the depth or the hop budget stops a handoff, what the next agent is shown and what it
may still do, how a failed hop is classified, and what the record may hold. The chain workflow
calls them; `tests/test_rules.py` checks them with property tests, with no server."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, RetryState, TimeoutError, TimeoutType

with workflow.unsafe.imports_passed_through():
    from pydantic_core import to_json

    from handoff.constants import BEAT_SHARE
    from handoff.models import (
        Budget,
        BudgetLeft,
        SteeringMessage,
        Usage,
        Candidate,
        ChainPolicy,
        ChainRecord,
        ChainStatus,
        FanOut,
        FanOutRecord,
        HandoffContext,
        HandoffResult,
        HopInput,
        HopKind,
        HopLimits,
        HopRecord,
        HopStatus,
        walk_hops,
    )
    from handoff.models.usage import model_usage

    from handoff.workflows.paths import Path, Target

MAX_ASKED_TASK_CHARS = 1000
"""`HopLimits.asked` carries the tasks up to this long: what an agent writes as a next task is
shorter, and longer ones would be copied into every later hop's input."""

UNBOUNDED_BUDGET = 1000
"""A chain whose request carries no hop budget (recorded before budgets) has this many times the
default: no budget at all, in practice."""


# -- where a hop may go ------------------------------------------------------------------------


def depth_refusal(policy: ChainPolicy, depth: int) -> str | None:
    """Why a handoff to `depth` is refused (the depth limit), or None."""
    if depth >= policy.max_depth:
        return f"a handoff to depth {depth} exceeds the limit of {policy.max_depth} hops"
    return None


def loop_violation(policy: ChainPolicy, path: Path, agent: str, task: str) -> str | None:
    """Why asking `agent` to do `task` on `path` is a loop (the same agent and task again, or one
    visit too many), or None."""
    if (agent, task) in path.asked:
        return f"{agent!r} was already asked to {task!r} in this chain"
    if path.visits[agent] >= policy.max_visits_per_agent:
        return (f"{agent!r} was already visited {path.visits[agent]} times "
                f"(limit {policy.max_visits_per_agent} per chain)")
    return None


def permits(policy: ChainPolicy, target: Target, agent: str) -> bool:
    """Whether the handoff policy lets the target's sender hand off to `agent`."""
    return policy.permits(target.from_agent, agent, target.capability)


def needs_approval(policy: ChainPolicy, target: Target, agent: str) -> bool:
    """Whether the hop to `agent` waits for a person: its sender asked, or the policy names the
    agent or the capability (a return to the agent that delegated is not judged by the policy)."""
    return target.require_approval or (
        not target.returns_to(agent) and policy.requires_approval(agent, target.capability))


@dataclass(frozen=True)
class Chosen:
    """The agent a handoff goes to, and the agents considered."""

    agent: str
    considered: list[str]


@dataclass(frozen=True)
class Refused:
    """A handoff the rules refuse: the chain (or its branch) ends with `status`."""

    status: ChainStatus
    reason: str


@dataclass(frozen=True)
class Unreachable:
    """A capability hop with no usable candidate and no fallback."""

    considered: list[str]
    reason: str


Choice = Chosen | Refused | Unreachable


def choose_by_name(policy: ChainPolicy, path: Path, target: Target) -> Chosen | Refused:
    """The first choice of a hop addressed to an agent: that agent, unless the policy or the
    loop rules refuse it (a return comes back unjudged)."""
    agent = target.to_agent
    if target.returns_to(agent):
        return Chosen(agent, [agent])
    if not permits(policy, target, agent):
        return Refused(ChainStatus.REJECTED,
                       f"the handoff policy does not let {target.from_agent!r} hand off to {agent!r}")
    violation = loop_violation(policy, path, agent, target.task)
    if violation:
        return Refused(ChainStatus.LOOP_DETECTED, violation)
    return Chosen(agent, [agent])


def choose_by_capability(policy: ChainPolicy, path: Path, target: Target, candidates: list[Candidate]) -> Choice:
    """The first choice of a hop addressed to a capability, among the ranked `candidates`: the
    best live, permitted agent that would not loop; a refusal when the policy or the loop rules
    exclude every candidate; else the policy's fallback agent, or unreachable."""
    considered = [c.agent_id for c in candidates]
    permitted = [c for c in candidates if permits(policy, target, c.agent_id)]
    if candidates and not permitted:
        return Refused(ChainStatus.REJECTED,
                       f"the handoff policy does not let {target.from_agent!r} hand off to {target.addressed}")
    live = [c for c in permitted if c.live]
    allowed = [c for c in live if not loop_violation(policy, path, c.agent_id, target.task)]
    if allowed:
        return Chosen(allowed[0].agent_id, considered)
    if live:
        return Refused(ChainStatus.LOOP_DETECTED, loop_violation(policy, path, live[0].agent_id, target.task) or "loop")
    fallback = usable_fallback(policy, path, target)
    if fallback:
        return Chosen(fallback, [*considered, fallback])
    return Unreachable(considered, f"no live agent with capability {target.addressed} "
                                   f"(considered: {considered or 'none'})")


def choose_fallback(policy: ChainPolicy, path: Path, target: Target, candidates: list[Candidate]) -> Chosen | None:
    """After a failed try: the best live agent among `candidates` the rules allow, else the
    policy's fallback agent; None when there is neither."""
    considered = [c.agent_id for c in candidates]
    allowed = [c for c in candidates if c.live and permits(policy, target, c.agent_id)
               and not loop_violation(policy, path, c.agent_id, target.task)]
    if allowed:
        return Chosen(allowed[0].agent_id, considered)
    fallback = usable_fallback(policy, path, target)
    return Chosen(fallback, [*considered, fallback]) if fallback else None


def usable_fallback(policy: ChainPolicy, path: Path, target: Target) -> str | None:
    """The policy's fallback agent, if it has not failed on this path, would not loop and is
    permitted."""
    fallback = policy.fallback_agent
    if (fallback and fallback not in path.failed and not loop_violation(policy, path, fallback, target.task)
            and permits(policy, target, fallback)):
        return fallback
    return None


# -- what a hop's agent sends and is shown ------------------------------------------------------


def next_problem(result: HandoffResult, agent: str) -> str | None:
    """Why the handoff `agent`'s result asks for must be refused whatever the policy, or None."""
    assert result.next_handoff is not None
    problem = result.next_handoff.problem()
    if result.fan_out is not None:
        problem = "a result either hands off or fans out, not both"
    return f"{agent!r} handed off badly: {problem}" if problem else None


def fan_out_problem(policy: ChainPolicy, fan: FanOut, agent: str) -> str | None:
    """Why `agent`'s fan-out must be refused, or None."""
    problem = fan.problem()
    if not problem and len(fan.branches) > policy.max_branches:
        problem = f"{len(fan.branches)} branches, over the limit of {policy.max_branches}"
    return f"{agent!r} fanned out badly: {problem}" if problem else None


@dataclass(frozen=True)
class View:
    """What a hop's agent is shown of its path, as the sender's filter lets it see: the context
    and the earlier results, with what was withheld."""

    context: dict[str, Any]
    withheld: list[str]
    results: list[dict[str, Any]]
    results_shown: int | None
    """How many results were shown, when the sender limited them (None: all)."""
    refs: list[UUID | None] = field(default_factory=list)
    """For each of `results`, the hop whose activity result holds it, when carried by reference."""


def view_of(path: Path, target: Target) -> View:
    context, withheld = path.context, []
    if target.visible_keys is not None:
        context = {k: v for k, v in path.context.items() if k in target.visible_keys}
        withheld = sorted(k for k in path.context if k not in target.visible_keys)
    results, refs, shown = path.results, path.ref_list(), None
    if target.visible_previous is not None:
        results = results[-target.visible_previous:] if target.visible_previous else []
        refs = refs[len(refs) - len(results):]
        shown = len(results)
    return View(context, withheld, results, shown, list(refs))


def limits_for(policy: ChainPolicy, path: Path, depth: int, target: Target, agent: str,
               budget_room: int, budget_left: BudgetLeft | None = None) -> HopLimits:
    """What the rules leave `agent` for its next step, once this hop (at `depth`) has run, with
    `budget_room` hops left in the chain's budget."""
    visits = Counter(path.visits)
    asked = set(path.asked)
    if not target.returns_to(agent):
        visits[agent] += 1
        asked.add((agent, target.task))
    rules = None
    if policy.allowed_handoffs is not None:
        rules = policy.allowed_handoffs.get(agent, policy.allowed_handoffs.get("*", []))
    return HopLimits(
        can_hand_off=depth + 1 < policy.max_depth and budget_room > 1, budget=budget_left,
        allowed_targets=rules,
        excluded_agents=sorted(a for a, n in visits.items() if n >= policy.max_visits_per_agent),
        asked=sorted((a, t) for a, t in asked if len(t) <= MAX_ASKED_TASK_CHARS),
    )


def hop_input(policy: ChainPolicy, path: Path, depth: int, target: Target, agent: str, *, chain_id: UUID,
              now: datetime, handoff_id: UUID, fallback_for: str | None, budget_room: int,
              budget_left: BudgetLeft | None = None, steering: list[SteeringMessage] | None = None) -> HopInput:
    """The hop activity's input for `agent`: the path's context and earlier results, as far as
    the sender's filter lets it see them, and what the rules leave it for its next step."""
    view = view_of(path, target)
    refs = view.refs or [None] * len(view.results)
    context = HandoffContext(
        handoff_id=handoff_id, chain_id=chain_id, from_agent=target.from_agent, to_agent=agent,
        to_capability=target.capability, task_description=target.task, context_data=view.context,
        previous_results=[{} if ref else result for result, ref in zip(view.results, refs)],
        chain_depth=depth, created_at=now, branch=path.position,
        branches=list(target.branches), returning=target.returns_to(agent),
        limits=limits_for(policy, path, depth, target, agent, budget_room, budget_left),
        steering=list(steering or []),
    )
    return HopInput(
        hop=depth, context=context, fallback_for=fallback_for,
        heartbeat_interval_s=policy.heartbeat_timeout_s * BEAT_SHARE, max_result_bytes=policy.max_context_bytes,
        withheld_context_keys=view.withheld, previous_results_shown=view.results_shown,
        result_refs=view.refs if any(view.refs) else [],
    )


def carry(path: Path, carried: list[HopRecord]) -> None:
    """A re-run's path starts as its original's did at the re-run hop: the carried entries'
    agents visited and their tasks asked (the loop and visit rules count them)."""
    for hop in walk_hops(carried):
        if hop.status is HopStatus.COMPLETED and hop.kind is not HopKind.RETURN:
            path.visits[hop.to_agent] += 1
            path.asked.add((hop.to_agent, hop.task_description))


def hop_usage(budget: Budget | None, result: HandoffResult) -> Usage | None:
    """What a hop spent: its model calls (`result.decision`) and what its handler reported
    (`result.usage`), priced at the budget's prices; None when it spent nothing."""
    spent = Usage()
    decision = result.decision
    if decision is not None and (decision.prompt_tokens or decision.completion_tokens or decision.model_calls):
        spent = spent.plus(model_usage(decision.model, decision.prompt_tokens, decision.completion_tokens,
                                       decision.model_calls))
    if result.usage is not None:
        spent = spent.plus(result.usage)
    if budget is not None:
        spent = budget.priced(spent)
    return None if spent.empty else spent


def budget_room(policy: ChainPolicy, *, budgeted: bool, used: int, reserved: int) -> int:
    """How many more hops the chain's budget allows: `used` hops scheduled, `reserved` kept for
    joins of fan-outs still running (unbounded for requests recorded before budgets)."""
    if not budgeted:
        return policy.max_total_hops * UNBOUNDED_BUDGET
    return policy.max_total_hops - used - reserved


# -- fan-outs ------------------------------------------------------------------------------


def join_ready(record: FanOutRecord) -> bool:
    """Whether a fan-out's join may run: every branch ended, or its first `wait_for` completed."""
    ended = [b for b in record.branches if b.status.ended]
    if len(ended) == len(record.branches):
        return True
    completed = sum(b.status is ChainStatus.COMPLETED for b in ended)
    return record.wait_for is not None and completed >= record.wait_for


def join_depth(record: FanOutRecord, depth: int) -> int:
    """The depth of a fan-out's join: one past the deepest hop any branch ran (refused entries
    aside), at least one past the fan-out, so the depth limit holds along every path."""
    deepest = max((h.hop for b in record.branches for h in walk_hops(b.hops) if h.status is not HopStatus.REFUSED),
                  default=depth)
    return max(deepest, depth) + 1


# -- how a hop failed ----------------------------------------------------------------------------


def attempts_in(details: Any) -> int | None:
    """The attempt number the hop activity put in its failure or heartbeat details."""
    for item in details or ():
        if isinstance(item, dict) and isinstance(item.get("attempt"), int):
            return item["attempt"]
    return None


def classify(policy: ChainPolicy, err: ActivityError, agent: str) -> tuple[HopStatus, str, int]:
    """A failed hop's status, error and attempts used."""
    cause = err.cause
    exhausted = err.retry_state == RetryState.MAXIMUM_ATTEMPTS_REACHED
    if isinstance(cause, TimeoutError):
        if cause.type == TimeoutType.SCHEDULE_TO_START:
            return (HopStatus.UNREACHABLE,
                    f"no worker of {agent!r} picked up the hop within {policy.schedule_to_start_s:g}s", 0)
        attempts = policy.max_attempts if exhausted else (attempts_in(cause.last_heartbeat_details) or 1)
        kind = cause.type.name.lower() if cause.type else "timeout"
        return HopStatus.TIMED_OUT, f"hop timed out ({kind}) after {attempts} attempt(s)", attempts
    if isinstance(cause, ApplicationError):
        attempts = policy.max_attempts if exhausted else (attempts_in(cause.details) or 1)
        return HopStatus.FAILED, cause.message, attempts
    return HopStatus.FAILED, str(cause or err), 1


SILENT_ATTEMPTS = 3
"""A hop whose attempts all went silent is scheduled again, up to this many times `max_attempts`
attempts in all (and while its timeout lasts)."""


def went_silent(policy: ChainPolicy, err: ActivityError, attempts: int, elapsed_s: float) -> bool:
    """Whether to schedule a hop again after every attempt went silent (heartbeat timeouts): its
    worker died or lost the network mid-hop, or the server handed the retry to a poll of a worker
    it could no longer reach (a partitioned host's polls outlive it on the server until its
    connection is found dead). Another worker of the agent, a replica on another host, may take
    it: again while the hop's timeout lasts (`elapsed_s` since its first schedule), up to
    `SILENT_ATTEMPTS` times `max_attempts` in all. A handler that fails, or runs out its time
    while heartbeating, is not silent."""
    cause = err.cause
    if not (isinstance(cause, TimeoutError) and cause.type == TimeoutType.HEARTBEAT
            and err.retry_state == RetryState.MAXIMUM_ATTEMPTS_REACHED):
        return False
    return elapsed_s < policy.hop_timeout_s and attempts < SILENT_ATTEMPTS * policy.max_attempts


def context_refusal(policy: ChainPolicy, size: int) -> str | None:
    """Why a hop input of `size` bytes is refused (the chain's payload limit), or None."""
    if size > policy.max_context_bytes:
        return f"hop input is {size:,} bytes, over the {policy.max_context_bytes:,}-byte limit"
    return None


# -- what the record may hold ----------------------------------------------------------------


def fit_record(record: ChainRecord, limit: int) -> str | None:
    """Keep `record` (the workflow's result and query answer) within `limit` bytes, or the chain
    could never complete: the largest hop results leave the record first (each stays in the
    hop's activity result in history). Why it had to, or None."""
    size = len(to_json(record))
    if size <= limit:
        return None
    record.final_result = {}  # a copy of the last result: the first to go
    for hop in record.all_hops():  # branches' final results: copies of their last hops' results
        for branch in hop.fan_out.branches if hop.fan_out else ():
            branch.final_result = {}
    for hop in sorted(record.all_hops(), key=lambda h: len(to_json(h.result_data)), reverse=True):
        if len(to_json(record)) <= limit:
            break
        hop.result_data = {"elided": f"{len(to_json(hop.result_data)):,} bytes; in the hop's "
                                     "activity result in the chain's history"}
    return (f"the chain's record is {size:,} bytes, over the {limit:,}-byte limit: its largest hop "
            "results are left out of it (each is in its hop's activity result in history)")

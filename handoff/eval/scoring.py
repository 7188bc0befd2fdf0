"""Scores from chain records: pure functions, a case and its chain's record in, scores out.

A chain's top-level hops form its path; each hop from 1 on is a routing choice, made by the agent
of the hop before (a fallback's agent, when the first one failed). A choice is right when the hop
went to the expected agent, or was addressed by the expected capability, or went to an agent
that has it. When the chain has no hop k, what the agent at hop k-1 did stands as its choice: it
ended the chain (`(end)`), its model gave up (`(invalid)`), or its hop failed (`(failed)`, ...).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from uuid import UUID

from pydantic import BaseModel, Field

from handoff.eval.cases import ANY_HOP, CAPABILITIES, Case
from handoff.eval.stats import Cluster, paired_bootstrap, percentile, ratio, wilson
from handoff.models import AgentCapability, ChainRecord, ChainStatus, HopRecord, HopStatus

END = "(end)"
"""Chosen when the agent ended the chain instead of handing it on."""
INVALID = "(invalid)"
"""Chosen when the agent's model gave no usable answer (its hop failed with the reason)."""
NOT_REACHED = "(not reached)"
"""The chain ended before the hop that would have chosen."""
GAVE_UP = "gave up"
"""How an LLM agent's decision reason starts when its model's answers could not be followed
(`handoff.agents.llm`): the hop failed on the model's account."""
NOT_VISITED = (HopStatus.REFUSED, HopStatus.UNREACHABLE)
"""Hop statuses whose agent never ran the hop."""

Capabilities = Mapping[str, Collection[AgentCapability | str]]
"""Each agent's capabilities (from the registry): an agent that has the expected capability is
a right choice even when it was addressed by id."""
NO_CAPABILITIES: Capabilities = MappingProxyType({})


class Choice(BaseModel):
    """One routing choice: hop `position`'s target as chosen by `chooser`, against the case."""

    position: int
    chooser: str
    expected: str
    chosen: str
    """The expected target when the choice is right; else what was chosen (an agent id, a
    capability the hop was addressed by, or `(end)`, `(invalid)`, `(failed)`, `(not reached)`)."""
    correct: bool
    refused: bool = False
    """The chain refused the handoff the agent chose (a rule or the policy)."""


class RunScore(BaseModel):
    """One run of one case: what its chain did against what the case expects. A check is None
    when the case does not ask for it."""

    case: str
    repeat: int = 0
    build: str | None = None
    chain_id: UUID | None = None
    status: ChainStatus | None = None
    path: list[str] = Field(default_factory=list)
    """The agents of the chain's top-level hops, in order (`CAPABILITY` for a hop no agent took)."""
    choices: list[Choice] = Field(default_factory=list)
    trajectory: bool | None = None
    """The path fits `expect.hops` and the agents visited fit `expect.visits`."""
    status_ok: bool | None = None
    result_keys_ok: bool | None = None
    duration_ok: bool | None = None
    tokens_ok: bool | None = None
    passed: bool = False
    """Every check the case asks for holds."""
    tokens: int = 0
    duration_ms: float | None = None
    invalid_choices: int = 0
    refused_choices: int = 0
    reused: bool = False
    """The chain was found recorded by an earlier run of the same evaluation, not run again."""
    problem: str | None = None
    """Why this run has no score (its chain could not start, or ran on another build)."""

    @property
    def scored(self) -> bool:
        return self.problem is None


@dataclass
class Position:
    """The entries of one depth of a chain's path: the hop chosen, and its fallbacks."""

    entries: list[HopRecord] = field(default_factory=list)

    @property
    def chosen(self) -> HopRecord:
        return self.entries[0]

    @property
    def ran(self) -> HopRecord:
        """The entry whose agent chose the next hop: the last one that completed, else the last."""
        return next((h for h in reversed(self.entries) if h.status is HopStatus.COMPLETED), self.entries[-1])


def positions(record: ChainRecord) -> list[Position]:
    """The chain's top-level path, one `Position` per depth (a fallback joins its hop's)."""
    found: list[Position] = []
    for hop in record.hops:
        if hop.fallback_for is not None and found:
            found[-1].entries.append(hop)
        else:
            found.append(Position([hop]))
    return found


def label(hop: HopRecord) -> str:
    """What a hop was addressed by: its capability, or its agent."""
    return hop.capability.value if hop.capability is not None else (hop.to_agent or "?")


def matches(expected: str, hop: HopRecord, capabilities: Capabilities) -> bool:
    if expected == ANY_HOP:
        return True
    if expected in CAPABILITIES:
        if hop.capability is not None and hop.capability.value == expected:
            return True
        return expected in {getattr(c, "value", c) for c in capabilities.get(hop.to_agent, ())}
    return hop.to_agent == expected


def gave_up(hop: HopRecord) -> bool:
    return hop.decision is not None and hop.decision.reason.startswith(GAVE_UP)


def _choice(path: list[Position], k: int, expected: str, capabilities: Capabilities) -> Choice:
    chooser = path[k - 1].ran.to_agent if k - 1 < len(path) else NOT_REACHED
    if k < len(path):
        hop = path[k].chosen
        right = matches(expected, hop, capabilities)
        return Choice(position=k, chooser=chooser, expected=expected, chosen=expected if right else label(hop),
                      correct=right, refused=hop.status is HopStatus.REFUSED)
    if k - 1 < len(path):
        before = path[k - 1].ran
        chosen = (END if before.status is HopStatus.COMPLETED else INVALID if gave_up(before)
                  else f"({before.status.value})")
    else:
        chosen = NOT_REACHED
    return Choice(position=k, chooser=chooser, expected=expected, chosen=chosen, correct=False)


def choices(case: Case, record: ChainRecord, capabilities: Capabilities = NO_CAPABILITIES) -> list[Choice]:
    """Every routing choice the case's `expect.hops` scores (hop 1 on; `*` hops are not)."""
    expected = case.expect.exact_hops or []
    path = positions(record)
    return [_choice(path, k, target, capabilities) for k, target in enumerate(expected)
            if k >= 1 and target != ANY_HOP]


def visited(record: ChainRecord) -> list[str]:
    """The agents that ran a hop of the chain, branches included, in the record's order."""
    return [h.to_agent for h in record.all_hops() if h.to_agent and h.status not in NOT_VISITED]


def trajectory_ok(case: Case, record: ChainRecord, capabilities: Capabilities = NO_CAPABILITIES) -> bool | None:
    """Whether the path fits `expect.hops` (every hop, and no more unless it ends with `...`) and
    the agents visited fit `expect.visits`; None when the case expects neither."""
    expect = case.expect
    verdicts = []
    exact = expect.exact_hops
    if exact is not None:
        path = positions(record)
        long_enough = len(path) >= len(exact) if expect.open_ended else len(path) == len(exact)
        verdicts.append(long_enough and all(matches(e, p.chosen, capabilities) for e, p in zip(exact, path)))
    if expect.visits is not None:
        agents = visited(record)
        want = expect.visits.agents
        verdicts.append(agents == want if expect.visits.ordered else set(agents) == set(want))
    return all(verdicts) if verdicts else None


def tokens_of(record: ChainRecord) -> int:
    """Prompt plus completion tokens of every model decision in the chain."""
    return sum(h.decision.prompt_tokens + h.decision.completion_tokens
               for h in record.all_hops() if h.decision is not None)


def score_run(case: Case, record: ChainRecord, *, name: str, repeat: int = 0, build: str | None = None,
              capabilities: Capabilities = NO_CAPABILITIES, reused: bool = False) -> RunScore:
    """The score of one run of `case`, from its chain's record."""
    expect = case.expect
    tokens = tokens_of(record)
    duration_s = record.duration_ms / 1000 if record.duration_ms is not None else None
    score = RunScore(
        case=name, repeat=repeat, build=build, chain_id=record.chain_id, status=record.status,
        path=[p.chosen.to_agent or label(p.chosen) for p in positions(record)],
        choices=choices(case, record, capabilities),
        trajectory=trajectory_ok(case, record, capabilities),
        status_ok=None if expect.status is None else record.status is expect.status,
        result_keys_ok=None if expect.result_keys is None else set(expect.result_keys) <= set(record.final_result),
        duration_ok=(None if expect.max_duration_s is None
                     else duration_s is not None and duration_s <= expect.max_duration_s),
        tokens_ok=None if expect.max_tokens is None else tokens <= expect.max_tokens,
        tokens=tokens, duration_ms=record.duration_ms,
        invalid_choices=sum(1 for h in record.all_hops() if gave_up(h)),
        refused_choices=sum(1 for h in record.all_hops() if h.status is HopStatus.REFUSED),
        reused=reused,
    )
    checks = [score.trajectory, score.status_ok, score.result_keys_ok, score.duration_ok, score.tokens_ok]
    score.passed = all(c for c in checks if c is not None)
    return score


def unscored(name: str, problem: str, *, repeat: int = 0, build: str | None = None,
             chain_id: UUID | None = None) -> RunScore:
    """A run that has no score, and why."""
    return RunScore(case=name, repeat=repeat, build=build, chain_id=chain_id, problem=problem)


# -- over many runs -----------------------------------------------------------------------------


class Rate(BaseModel):
    """`hits` of `total`, with Wilson's 95 % interval; `value` is None when nothing was counted."""

    hits: int = 0
    total: int = 0
    value: float | None = None
    low: float | None = None
    high: float | None = None

    @classmethod
    def of(cls, hits: int, total: int) -> Rate:
        interval = wilson(hits, total)
        return cls(hits=hits, total=total, value=hits / total if total else None,
                   low=interval[0] if interval else None, high=interval[1] if interval else None)


class Spread(BaseModel):
    """Mean, median and 95th percentile of a measure over runs (None with no runs)."""

    mean: float | None = None
    p50: float | None = None
    p95: float | None = None
    total: float = 0.0

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            return cls()
        return cls(mean=sum(values) / len(values), p50=percentile(values, 0.5), p95=percentile(values, 0.95),
                   total=float(sum(values)))


class Summary(BaseModel):
    """Every score over a set of runs (one build's)."""

    runs: int
    unscored: int
    routing: Rate
    """Right choices of all scored choices."""
    by_position: dict[int, Rate]
    by_agent: dict[str, Rate]
    """By the agent that chose."""
    confusion: dict[str, dict[str, int]]
    """Expected target -> chosen target -> how many times."""
    trajectory: Rate
    status: Rate
    result_keys: Rate
    duration: Rate
    tokens_within: Rate
    passed: Rate
    invalid_choices: int
    refused_choices: int
    tokens: Spread
    """Per run: prompt plus completion tokens of its model decisions."""
    latency_ms: Spread
    """Per run: the chain's duration."""


def _rate(values: Sequence[bool | None]) -> Rate:
    counted = [v for v in values if v is not None]
    return Rate.of(sum(counted), len(counted))


def _rates(pairs: Sequence[tuple[object, bool]]) -> dict:
    tallies: dict = {}
    for key, right in pairs:
        hits, total = tallies.get(key, (0, 0))
        tallies[key] = (hits + right, total + 1)
    return {key: Rate.of(*tally) for key, tally in sorted(tallies.items(), key=lambda kv: str(kv[0]))}


def confusion_matrix(runs: Sequence[RunScore]) -> dict[str, dict[str, int]]:
    matrix: dict[str, dict[str, int]] = {}
    for choice in (c for r in runs if r.scored for c in r.choices):
        row = matrix.setdefault(choice.expected, {})
        row[choice.chosen] = row.get(choice.chosen, 0) + 1
    return {expected: dict(sorted(row.items())) for expected, row in sorted(matrix.items())}


def summarize(runs: Sequence[RunScore]) -> Summary:
    """The scores of `runs` taken together (runs with a `problem` are counted, not scored)."""
    scored = [r for r in runs if r.scored]
    every = [c for r in scored for c in r.choices]
    return Summary(
        runs=len(runs), unscored=len(runs) - len(scored),
        routing=Rate.of(sum(c.correct for c in every), len(every)),
        by_position=_rates([(c.position, c.correct) for c in every]),
        by_agent=_rates([(c.chooser, c.correct) for c in every]),
        confusion=confusion_matrix(scored),
        trajectory=_rate([r.trajectory for r in scored]),
        status=_rate([r.status_ok for r in scored]),
        result_keys=_rate([r.result_keys_ok for r in scored]),
        duration=_rate([r.duration_ok for r in scored]),
        tokens_within=_rate([r.tokens_ok for r in scored]),
        passed=_rate([r.passed for r in scored]),
        invalid_choices=sum(r.invalid_choices for r in scored),
        refused_choices=sum(r.refused_choices for r in scored),
        tokens=Spread.of([r.tokens for r in scored]),
        latency_ms=Spread.of([r.duration_ms for r in scored if r.duration_ms is not None]),
    )


# -- two builds, side by side ---------------------------------------------------------------------


class Difference(BaseModel):
    """One measure on build A and on build B, B minus A, and a 95 % interval of that difference
    (a paired bootstrap over cases); None where there is not enough to say."""

    measure: str
    a: float | None
    b: float | None
    diff: float | None
    low: float | None
    high: float | None
    cases: int
    """Cases with a scored run on both builds."""


def _fraction(value: bool | None) -> tuple[float, float]:
    return (0.0, 0.0) if value is None else (float(value), 1.0)


MEASURES = {
    "routing accuracy": lambda r: (float(sum(c.correct for c in r.choices)), float(len(r.choices))),
    "trajectory match": lambda r: _fraction(r.trajectory),
    "status match": lambda r: _fraction(r.status_ok),
    "cases passed": lambda r: _fraction(r.passed),
    "invalid choices per run": lambda r: (float(r.invalid_choices), 1.0),
    "refused choices per run": lambda r: (float(r.refused_choices), 1.0),
    "tokens per run": lambda r: (float(r.tokens), 1.0),
    "latency ms per run": lambda r: (r.duration_ms or 0.0, 1.0 if r.duration_ms is not None else 0.0),
}
"""What `compare` sets side by side: each a (numerator, denominator) of one run, summed over runs."""


def compare(a: Sequence[RunScore], b: Sequence[RunScore]) -> list[Difference]:
    """Each measure of `MEASURES` on A and B over the runs scored on both (paired by case and
    repeat), B minus A, with a paired bootstrap interval that resamples whole cases."""
    b_runs = {(r.case, r.repeat): r for r in b if r.scored}
    pairs = [(r, b_runs[(r.case, r.repeat)]) for r in a if r.scored and (r.case, r.repeat) in b_runs]
    by_case: dict[str, list[tuple[RunScore, RunScore]]] = {}
    for pair in pairs:
        by_case.setdefault(pair[0].case, []).append(pair)
    differences = []
    for measure, part in MEASURES.items():
        clusters: list[Cluster] = []
        for case_pairs in by_case.values():
            sums = [0.0, 0.0, 0.0, 0.0]
            for run_a, run_b in case_pairs:
                (na, da), (nb, db) = part(run_a), part(run_b)
                sums[0] += na
                sums[1] += da
                sums[2] += nb
                sums[3] += db
            clusters.append((sums[0], sums[1], sums[2], sums[3]))
        value_a, value_b = ratio(clusters, 0), ratio(clusters, 1)
        interval = paired_bootstrap(clusters)
        differences.append(Difference(
            measure=measure, a=value_a, b=value_b,
            diff=value_b - value_a if value_a is not None and value_b is not None else None,
            low=interval[0] if interval else None, high=interval[1] if interval else None,
            cases=len(clusters)))
    return differences

"""An evaluation's report: every run's score, a summary per build, and the two builds compared
(`report.json` is this model; `handoff.eval.html` draws `report.html` from it)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from pydantic import BaseModel, Field

from handoff.eval.runner import EvalSettings
from handoff.eval.scoring import Difference, RunScore, Summary, compare, summarize

CURRENT = "current"
"""The summary key of an evaluation on the routing as it is (no build chosen)."""


class EvalReport(BaseModel):
    run_id: str
    cases_file: str | None = None
    cases: int
    repeat: int
    agent: str | None = None
    builds: list[str] = Field(default_factory=list)
    """The builds evaluated: none (the routing as it was), one, or A and B."""
    restored_build: str | None = None
    """The agent's current build before the evaluation, set back after it."""
    started_at: datetime
    completed_at: datetime
    summaries: dict[str, Summary]
    """By build (`current` when none was chosen)."""
    comparison: list[Difference] = Field(default_factory=list)
    """With two builds: each measure on A and B, B minus A, and its 95 % interval."""
    runs: list[RunScore]

    @property
    def arms(self) -> list[str]:
        return list(self.summaries)


def arm_of(run: RunScore) -> str:
    return run.build or CURRENT


def build_report(runs: Sequence[RunScore], settings: EvalSettings, *, cases: Sequence[str], started_at: datetime,
                 completed_at: datetime, cases_file: str | None = None,
                 restored_build: str | None = None) -> EvalReport:
    """The report of an evaluation's runs (a pure function of the scores); `cases`: the case
    names, in the order the runs are listed."""
    arms = list(settings.builds) or [CURRENT]
    summaries = {arm: summarize([r for r in runs if arm_of(r) == arm]) for arm in arms}
    comparison = []
    if len(settings.builds) == 2:
        a, b = settings.builds
        comparison = compare([r for r in runs if r.build == a], [r for r in runs if r.build == b])
    order = {name: index for index, name in enumerate(cases)}
    ordered = sorted(runs, key=lambda r: (order.get(r.case, len(order)), r.repeat,
                                          arms.index(arm_of(r)) if arm_of(r) in arms else 0))
    return EvalReport(run_id=settings.run_id, cases_file=cases_file, cases=len(cases), repeat=settings.repeat,
                      agent=settings.agent, builds=list(settings.builds), restored_build=restored_build,
                      started_at=started_at, completed_at=completed_at, summaries=summaries,
                      comparison=comparison, runs=ordered)

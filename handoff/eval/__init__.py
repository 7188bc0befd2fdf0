"""Evaluating agents' routing and chains' trajectories from the chains' own records (`handoff eval`).

- `cases`: a case file (JSON Lines), validated whole before anything runs;
- `scoring`: pure functions, a case and its chain's record in, scores out; summaries and two
  builds compared;
- `runner`: every case as a real chain, on the current routing or on chosen builds of one agent,
  each run under a chain id derived from the evaluation's run id (run again, nothing counts twice);
- `report`: the report's model (`report.json`); `html`: `report.html` (the `eval` extra);
- `production`: cases from recorded chains.
"""

from handoff.eval.cases import Case, Expect, InvalidCases, NamedCase, Visits, load_cases, parse_cases
from handoff.eval.production import case_from_chain, cases_from_chains
from handoff.eval.report import EvalReport, build_report
from handoff.eval.runner import EvalSettings, Evaluation, chain_id_of, default_run_id, run_eval
from handoff.eval.scoring import Choice, Difference, RunScore, Summary, compare, score_run, summarize

__all__ = [
    "Case",
    "Choice",
    "Difference",
    "EvalReport",
    "EvalSettings",
    "Evaluation",
    "Expect",
    "InvalidCases",
    "NamedCase",
    "RunScore",
    "Summary",
    "Visits",
    "build_report",
    "case_from_chain",
    "cases_from_chains",
    "chain_id_of",
    "compare",
    "default_run_id",
    "load_cases",
    "parse_cases",
    "run_eval",
    "score_run",
    "summarize",
]

"""Test planner: names the pytest tests a source file needs, then asks for a release decision.

Every public function and method gets a behaviour test, plus one test per exception it
raises itself; every high-severity finding gets a regression test that feeds it hostile input
(the audit's findings, or the analysis's rated here when the audit runs beside it in a fan-out).
The plan (names and counts) goes on to a DEPLOYMENT agent, or, in a fan-out's branch, to its join.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from handoff.agents.agent import Agent
from handoff.examples._source import (
    MAX_ITEMS,
    functions,
    latest,
    parse,
    plural,
    snake,
    source_of,
)
from handoff.examples.auditor import rate
from handoff.models import AgentCapability, HandoffContext, HandoffResult

ATTACK = {
    "CWE-89": "sql_injection",
    "CWE-78": "command_injection",
    "CWE-95": "code_injection",
    "CWE-502": "untrusted_deserialization",
}


def _unique(name: str, taken: set[str], line: Any) -> str:
    """Two findings in one function would share a name: tell them apart by line."""
    if name in taken:
        name = f"{name}_line_{line}"
    taken.add(name)
    return name


def unit_tests(source: str, filename: str) -> list[str]:
    names: list[str] = []
    for func in functions(parse(source, filename)):
        if not func.public:
            continue  # private helpers are covered through the public functions that call them
        base = f"test_{snake(func.qualname)}"
        names.append(base)
        names.extend(f"{base}_raises_{snake(exc.split('.')[-1])}" for exc in func.raises)
    return names


def regression_tests(audit: dict[str, Any] | None) -> list[str]:
    names: list[str] = []
    taken: set[str] = set()
    for finding in (audit or {}).get("findings", []):
        if finding.get("severity") != "high":
            continue
        where = snake(finding.get("function") or "module")
        attack = ATTACK.get(finding.get("cwe", ""), "hostile_input")
        names.append(_unique(f"test_{where}_rejects_{attack}", taken, finding.get("line")))
    return names


async def plan_tests(ctx: HandoffContext) -> HandoffResult:
    source, filename = source_of(ctx)
    unit = unit_tests(source, filename)
    audit = latest(ctx.previous_results, AgentCapability.SECURITY_AUDIT)
    analysis = latest(ctx.previous_results, AgentCapability.CODE_ANALYSIS)
    if audit is None and analysis is not None:  # the audit runs beside us: rate the findings here
        audit = {"findings": [rate(f) for f in analysis.get("findings", [])]}
    regression = regression_tests(audit)
    result = {
        "capability": AgentCapability.TESTING.value,
        "filename": filename,
        "test_module": f"tests/test_{snake(PurePosixPath(filename).stem) or 'source'}.py",
        "counts": {"unit": len(unit), "regression": len(regression), "total": len(unit) + len(regression)},
        "unit_tests": unit[:MAX_ITEMS],
        "regression_tests": regression[:MAX_ITEMS],
        "summary": f"{plural(len(unit), 'unit test')} and {plural(len(regression), 'regression test')} planned",
    }
    if ctx.branch is not None:  # the join decides the release
        return ctx.complete(result)
    return ctx.handoff(
        capability=AgentCapability.DEPLOYMENT,
        task_description=f"Decide release of {filename}",
        result_data=result,
    )


tester = Agent(
    id="tester",
    name="Test Planner",
    capabilities=[AgentCapability.TESTING],
    handler=plan_tests,
    max_concurrent=5,
    description="Plans pytest tests: one per public function, raised exception and high finding.",
)

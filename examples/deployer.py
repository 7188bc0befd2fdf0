"""Release gate: the last hop. Blocks the release if any high-severity finding is open.

It reads every earlier hop's result, lists the reasons for its decision and a short release
checklist, and completes the chain.
"""

from __future__ import annotations

from typing import Any

from handoff.agents.agent import Agent
from handoff.examples._source import latest, parse, source_of
from handoff.examples.analyzer import scan
from handoff.examples.auditor import rate
from handoff.models import AgentCapability, HandoffContext, HandoffResult

Result = dict[str, Any]


def rated_findings(ctx: HandoffContext, analysis: Result | None, audit: Result | None) -> list[Result]:
    """The audited findings; rated here when no audit ran, scanned here when nothing did."""
    if audit is not None:
        return audit.get("findings", [])
    if analysis is not None:
        return [rate(f) for f in analysis.get("findings", [])]
    # Never approve code no hop has looked at: scan it ourselves.
    source, filename = source_of(ctx)
    return [rate(f) for f in scan(parse(source, filename))]


def checklist(ctx: HandoffContext, findings: list[Result], high: list[Result]) -> list[Result]:
    results = ctx.previous_results
    analysis = latest(results, AgentCapability.CODE_ANALYSIS)
    audit = latest(results, AgentCapability.SECURITY_AUDIT)
    dba = latest(results, AgentCapability.DATABASE_OPERATIONS)
    tests = latest(results, AgentCapability.TESTING)
    sql_open = dba["counts"]["dynamic"] if dba else sum(f["kind"] == "sql" for f in findings)
    return [
        {"item": "code analysed", "ok": analysis is not None},
        {"item": "security findings audited", "ok": audit is not None or not findings},
        {"item": "no high-severity findings", "ok": not high},
        {"item": "SQL values bound as parameters", "ok": sql_open == 0},
        {"item": "tests planned", "ok": tests is not None and tests["counts"]["total"] > 0},
        {"item": "regression test for each high finding",
         "ok": (tests["counts"]["regression"] if tests else 0) >= len(high)},
    ]


async def gate(ctx: HandoffContext) -> HandoffResult:
    filename = str(ctx.context_data.get("filename") or "<source>")
    analysis = latest(ctx.previous_results, AgentCapability.CODE_ANALYSIS)
    audit = latest(ctx.previous_results, AgentCapability.SECURITY_AUDIT)
    findings = rated_findings(ctx, analysis, audit)
    high = [f for f in findings if f.get("severity") == "high"]
    reasons = [
        f"{f['cwe']} {f['title']} at line {f['line']}" + (f" in {f['function']}" if f.get("function") else "")
        for f in high
    ] or ["no high-severity findings"]
    return ctx.complete({
        "capability": AgentCapability.DEPLOYMENT.value,
        "filename": filename,
        "decision": "blocked" if high else "approved",
        "high_findings": len(high),
        "reasons": reasons,
        "checklist": checklist(ctx, findings, high),
        "summary": f"release {'blocked' if high else 'approved'}: " + "; ".join(reasons[:2])
                   + (f" (+{len(reasons) - 2} more)" if len(reasons) > 2 else ""),
    })


deployer = Agent(
    id="deployer",
    name="Release Gate",
    capabilities=[AgentCapability.DEPLOYMENT],
    handler=gate,
    max_concurrent=5,
    description="Approves or blocks a release from the chain's findings, with reasons and a checklist.",
)

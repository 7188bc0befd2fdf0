"""Security auditor: rates the analyzer's findings and says how to fix each one.

Each finding gets a severity, a CWE id and a remediation. Code or commands built from
input are high; the rest medium. Dynamic SQL goes on to a DATABASE_OPERATIONS agent for
a statement-by-statement review. Otherwise, in a branch of a fan-out the audit is the branch's
result; in a plain chain the chain moves on to TESTING.
"""

from __future__ import annotations

from typing import Any

from handoff.agents.agent import Agent
from handoff.examples._source import MAX_ITEMS, latest, parse, plural, source_of
from handoff.examples.analyzer import scan
from handoff.models import AgentCapability, HandoffContext, HandoffResult

CWE = {
    "eval": ("CWE-95", "Eval injection"),
    "command": ("CWE-78", "OS command injection"),
    "sql": ("CWE-89", "SQL injection"),
    "deserialization": ("CWE-502", "Deserialization of untrusted data"),
}
REMEDIATION = {
    "eval": "Do not evaluate input as code: parse it (ast.literal_eval, a small expression parser) "
    "or map it to a fixed set of operations.",
    "command": "Pass an argument list without shell=True (subprocess.run([...])), and validate "
    "paths and names taken from input.",
    "sql": "Use placeholders (? or :name) with a parameters argument; check identifiers such as "
    "table names against an allow-list.",
    "deserialization": "Load only trusted data, or switch to a data-only format (json, yaml.safe_load).",
}


def severity(finding: dict[str, Any]) -> str:
    """High when input can become code, a shell command or SQL; medium otherwise."""
    kind = finding.get("kind")
    if kind == "eval":
        return "medium" if finding.get("constant_arg") else "high"
    if kind == "command":
        return "high" if finding.get("shell") else "medium"
    if kind == "sql":
        return "high"
    return "medium"


def rate(finding: dict[str, Any]) -> dict[str, Any]:
    kind = finding.get("kind", "")
    cwe, title = CWE.get(kind, ("CWE-20", "Improper input validation"))
    return {
        "kind": kind,
        "line": finding.get("line"),
        "function": finding.get("function"),
        "detail": finding.get("detail", ""),
        "severity": severity(finding),
        "cwe": cwe,
        "title": title,
        "remediation": REMEDIATION.get(kind, "Validate the input before use."),
    }


async def audit(ctx: HandoffContext) -> HandoffResult:
    source, filename = source_of(ctx)
    analysis = latest(ctx.previous_results, AgentCapability.CODE_ANALYSIS)
    # A chain may start here: without an analysis hop, find the constructs ourselves.
    findings = analysis["findings"] if analysis else scan(parse(source, filename))
    rated = [rate(f) for f in findings]
    counts = {level: sum(r["severity"] == level for r in rated) for level in ("high", "medium")}
    sql = sum(r["kind"] == "sql" for r in rated)
    result = {
        "capability": AgentCapability.SECURITY_AUDIT.value,
        "filename": filename,
        "counts": counts,
        "sql_findings": sql,
        "findings": rated[:MAX_ITEMS],
        "summary": f"{counts['high']} high, {counts['medium']} medium; {plural(sql, 'SQL finding')}",
    }
    if sql:
        return ctx.handoff(
            capability=AgentCapability.DATABASE_OPERATIONS,
            task_description=f"Review {plural(sql, 'dynamic SQL statement')} in {filename}",
            result_data=result,
        )
    if ctx.branch is not None:  # the join takes it from here
        return ctx.complete(result)
    return ctx.handoff(
        capability=AgentCapability.TESTING,
        task_description=(
            f"Write regression tests for {plural(counts['high'], 'high-severity finding')} in {filename}"
        ),
        result_data=result,
    )


auditor = Agent(
    id="auditor",
    name="Security Auditor",
    capabilities=[AgentCapability.SECURITY_AUDIT],
    handler=audit,
    max_concurrent=5,
    description="Rates findings (severity, CWE, remediation); sends dynamic SQL to a DBA.",
)

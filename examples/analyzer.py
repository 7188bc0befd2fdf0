"""Code analyzer: outlines a Python source file and flags risky constructs.

It parses `context_data["source"]` with `ast`, reports functions, classes, imports and line
count, and finds calls to eval/exec/compile, shell commands (subprocess, os.system, os.popen),
unsafe deserialization (pickle, marshal, yaml.load) and SQL built at run time. Risky code fans
out: a SECURITY_AUDIT agent and a TESTING agent work on it at once, and a DEPLOYMENT agent joins
their results. Clean code goes straight to TESTING.
"""

from __future__ import annotations

import ast
from typing import Any

from handoff.agents.agent import Agent
from handoff.examples._source import (
    MAX_ITEMS,
    clip,
    dotted_name,
    functions,
    import_aliases,
    parse,
    plural,
    source_of,
    sql_strings,
    walk_scoped,
)
from handoff.models import AgentCapability, Branch, HandoffContext, HandoffResult, Join

CODE_CALLS = {"eval", "exec", "compile"}
ALWAYS_SHELL = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"}
HOW = {"f-string": "an f-string", "%-format": "% formatting", "concatenation": "string concatenation",
       ".format": "str.format()"}
DESERIALIZERS = {
    "pickle.loads", "pickle.load", "marshal.loads", "marshal.load", "yaml.load", "yaml.unsafe_load",
}


def _keyword_true(call: ast.Call, name: str) -> bool:
    return any(
        kw.arg == name and isinstance(kw.value, ast.Constant) and kw.value.value is True
        for kw in call.keywords
    )


def _call_finding(call: ast.Call, name: str) -> dict[str, Any] | None:
    """The finding for one call, or None if the call is harmless."""
    if name in CODE_CALLS:
        constant = bool(call.args) and isinstance(call.args[0], ast.Constant)
        what = "a constant" if constant else "a non-constant expression"
        return {"kind": "eval", "call": name, "constant_arg": constant,
                "detail": f"{name}() of {what}"}
    if name.startswith("subprocess.") or name in ALWAYS_SHELL:
        # os.system and friends always run /bin/sh; subprocess only with shell=True.
        shell = name in ALWAYS_SHELL or _keyword_true(call, "shell")
        return {"kind": "command", "call": name, "shell": shell,
                "detail": f"{name}()" + (" runs a shell command" if shell else " without a shell")}
    if name in DESERIALIZERS:
        # yaml.load with an explicit SafeLoader/CSafeLoader is the safe form.
        loader = next((kw.value for kw in call.keywords if kw.arg == "Loader"), None)
        if name == "yaml.load" and loader is not None and "Safe" in ast.unparse(loader):
            return None
        return {"kind": "deserialization", "call": name, "detail": f"{name}() of possibly untrusted data"}
    return None


def scan(tree: ast.Module) -> list[dict[str, Any]]:
    """Risky constructs in source order: {"kind", "line", "detail", "function", ...}."""
    aliases = import_aliases(tree)
    findings: list[dict[str, Any]] = []
    for node, scope in walk_scoped(tree):
        if isinstance(node, ast.Call) and (name := dotted_name(node.func, aliases)):
            finding = _call_finding(node, name)
            if finding:
                findings.append({"line": node.lineno, "function": scope, **finding})
    for sql in sql_strings(tree):
        if sql.dynamic:
            findings.append({"kind": "sql", "line": sql.line, "function": sql.scope, "how": sql.how,
                             "detail": clip(f"SQL built with {HOW[sql.how]}: {sql.template}")})
    findings.sort(key=lambda f: (f["line"], f["kind"]))
    # Key order: kind, line, detail first, so the audit trail reads well.
    return [{"kind": f.pop("kind"), "line": f.pop("line"), "detail": f.pop("detail"), **f} for f in findings]


def outline(source: str, filename: str) -> dict[str, Any]:
    tree = parse(source, filename)
    imports: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imports.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imports.add("." * node.level + (node.module or ""))
    imports.discard("__future__")  # a compiler directive, not a dependency
    findings = scan(tree)
    return {
        "filename": filename,
        "lines": len(source.splitlines()),
        "functions": [f.qualname for f in functions(tree)][:MAX_ITEMS],
        "classes": [n.name for n, _ in walk_scoped(tree) if isinstance(n, ast.ClassDef)][:MAX_ITEMS],
        "imports": sorted(imports)[:MAX_ITEMS],
        "finding_count": len(findings),
        "findings": findings[:MAX_ITEMS],
    }


async def analyze(ctx: HandoffContext) -> HandoffResult:
    source, filename = source_of(ctx)
    result = {"capability": AgentCapability.CODE_ANALYSIS.value, **outline(source, filename)}
    count = result["finding_count"]
    result["summary"] = (f"{result['lines']} lines, {plural(len(result['functions']), 'function')}, "
                         f"{plural(count, 'risky construct')}")
    if count:  # the audit and the test plan need only this analysis: both at once
        return ctx.fan_out(
            [Branch(capability=AgentCapability.SECURITY_AUDIT,
                    task_description=f"Audit {plural(count, 'risky construct')} in {filename}"),
             Branch(capability=AgentCapability.TESTING, task_description=f"Plan tests for {filename}")],
            join=Join(capability=AgentCapability.DEPLOYMENT, task_description=f"Decide release of {filename}"),
            result_data=result,
        )
    return ctx.handoff(
        capability=AgentCapability.TESTING,
        task_description=f"Write tests for {filename}",
        result_data=result,
    )


analyzer = Agent(
    id="analyzer",
    name="Code Analyzer",
    capabilities=[AgentCapability.CODE_ANALYSIS],
    handler=analyze,
    max_concurrent=5,
    description="Outlines Python source and flags eval, shell commands, unsafe loads, dynamic SQL.",
)

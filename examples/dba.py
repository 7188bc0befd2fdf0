"""Database reviewer: lists the SQL statements of a source file and rewrites the unsafe ones.

For each statement (string constants and run-time builds that look like SQL) it reports the
tables touched, whether values are bound as parameters (? or :name with a parameters
argument), and for statements built from input a parameterized rewrite. Then TESTING.
"""

from __future__ import annotations

import re
from typing import Any

from handoff.agents.agent import Agent
from handoff.examples._source import (
    MAX_ITEMS,
    PLACEHOLDER_RE,
    SqlString,
    clip,
    has_params,
    parse,
    plural,
    source_of,
    sql_strings,
    tables,
)
from handoff.models import AgentCapability, HandoffContext, HandoffResult

MARK = "\x00{}\x00"
# A quoted SQL literal ('' escapes a quote) or an interpolation marker, in textual order.
TOKEN_RE = re.compile(r"'(?:[^']|'')*'|\x00(\d+)\x00")
MARK_RE = re.compile(r"\x00(\d+)\x00")
# Input right after an operator (or in a VALUES/IN list) is a value, which `?` can stand for.
# Anywhere else it is a name or an SQL fragment (FROM {table}, WHERE {cond}): no placeholder fits.
VALUE_BEFORE_RE = re.compile(
    r"(=|<>|!=|<|>|\(|\+|-|\*|/|\bLIKE|\bIS|\bBETWEEN|\bLIMIT|\bOFFSET|\bTHEN|\bELSE)\s*$", re.IGNORECASE
)
LIST_OPEN_RE = re.compile(r"\b(VALUES|IN)\s*\([^)]*,\s*$|\bBETWEEN\s+\S+\s+AND\s*$", re.IGNORECASE)
TABLE_BEFORE_RE = re.compile(r"\b(FROM|INTO|UPDATE|JOIN|TABLE)\s*$", re.IGNORECASE)


def _is_value_position(sql_before: str) -> bool:
    return bool(VALUE_BEFORE_RE.search(sql_before) or LIST_OPEN_RE.search(sql_before))


def _marked(sql: SqlString) -> tuple[str, list[str]]:
    """The statement with interpolation i shown as MARK(i), and the interpolated expressions."""
    exprs = [text for kind, text in sql.parts if kind == "expr"]
    marks = iter(range(len(exprs)))
    text = "".join(text if kind == "text" else MARK.format(next(marks)) for kind, text in sql.parts)
    return text, exprs


def _bind(marked: str, exprs: list[str]) -> tuple[str, list[str], list[tuple[str, bool]]]:
    """Replace the values in `marked` by `?`: the SQL, its params, and the (name, is_table) left."""
    out, params, names, pos = "", [], [], 0
    for match in TOKEN_RE.finditer(marked):
        out += marked[pos : match.start()]
        pos = match.end()
        token = match.group(0)
        if match.group(1) is not None:  # a bare interpolation: a value, or a name/fragment
            expr = exprs[int(match.group(1))]
            if _is_value_position(out):
                params.append(expr)
                out += "?"
            else:
                names.append((expr, bool(TABLE_BEFORE_RE.search(out))))
                out += "{" + expr + "}"
        elif MARK_RE.search(token):  # a quoted literal with input inside: bind the whole literal
            inner = token[1:-1]
            whole = MARK_RE.fullmatch(inner)
            params.append(exprs[int(whole.group(1))] if whole else
                          'f"' + MARK_RE.sub(lambda m: "{" + exprs[int(m.group(1))] + "}", inner) + '"')
            out += "?"
        else:
            out += token
    return out + marked[pos:], params, names


def rewrite(sql: SqlString, known_tables: list[str]) -> dict[str, Any]:
    """A parameterized form of a dynamic statement: values become `?`, names get an allow-list."""
    text, params, names = _bind(*_marked(sql))
    quote = '"""' if "\n" in text or '"' in text else '"'
    args = ("f" if names else "") + quote + text + quote
    if params:
        args += ", (" + ", ".join(params) + ("," if len(params) == 1 else "") + ")"
    # Names cannot be bound: check a table name against the tables the file's constant SQL
    # uses, and anything else against an allow-list the author has to write.
    allowed = "{" + ", ".join(repr(t) for t in known_tables) + "}" if known_tables else "ALLOWED_TABLES"
    lines = [f"if {name} not in {allowed if is_table else 'ALLOWED_NAMES'}: raise ValueError({name})"
             for name, is_table in names]
    lines.append(f"execute({args})")
    return {"text": "\n".join(lines), "params": params, "identifiers": [name for name, _ in names]}


def review(sql: SqlString) -> dict[str, Any]:
    placeholders = bool(PLACEHOLDER_RE.search(sql.literal_text))
    bound = placeholders and has_params(sql.execute)
    if sql.dynamic:
        status = "dynamic"
    elif bound:
        status = "parameterized"
    elif placeholders:
        status = "placeholders without parameters"
    else:
        status = "constant"  # no values in it: nothing to bind
    return {
        "line": sql.line,
        "function": sql.scope,
        "sql": clip(sql.template),
        "status": status,
        "dynamic": sql.dynamic,
        "how": sql.how,
        "parameterized": bound and not sql.dynamic,
        "tables": tables(sql.template),
    }


async def review_sql(ctx: HandoffContext) -> HandoffResult:
    source, filename = source_of(ctx)
    found = sql_strings(parse(source, filename))
    statements = [review(sql) for sql in found]
    # The tables of the file's own constant SQL make the allow-list for table-name inputs.
    known = sorted({t for s in statements if not s["dynamic"] for t in s["tables"]})
    for sql, statement in zip(found, statements):
        if sql.dynamic:
            statement["rewrite"] = rewrite(sql, known)
    dynamic = sum(s["dynamic"] for s in statements)
    result = {
        "capability": AgentCapability.DATABASE_OPERATIONS.value,
        "filename": filename,
        "counts": {
            "statements": len(statements),
            "dynamic": dynamic,
            "parameterized": sum(s["parameterized"] for s in statements),
        },
        "tables": sorted({t for s in statements for t in s["tables"]}),
        "statements": statements[:MAX_ITEMS],
        "summary": f"{plural(len(statements), 'SQL statement')}, {dynamic} built from input, rewrites proposed",
    }
    if ctx.branch is not None:  # in a fan-out's branch: the join takes it from here
        return ctx.complete(result)
    return ctx.handoff(
        capability=AgentCapability.TESTING,
        task_description=(
            f"Write regression tests for {plural(dynamic, 'dynamic SQL statement')} in {filename}"
        ),
        result_data=result,
    )


dba = Agent(
    id="dba",
    name="Database Reviewer",
    capabilities=[AgentCapability.DATABASE_OPERATIONS],
    handler=review_sql,
    max_concurrent=5,
    description="Lists SQL statements, their tables and parameter binding; rewrites dynamic SQL.",
)

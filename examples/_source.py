"""Helpers the example agents share: reading the chain's source, parsing it, finding SQL in it.

Everything here is pure and deterministic: the same source text always gives the same answer.
"""

from __future__ import annotations

import ast
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from handoff.errors import PermanentError
from handoff.models import AgentCapability, HandoffContext

MAX_ITEMS = 200
"""Longest list an agent puts in its result_data: results stay small whatever the input."""

# Anchored at the start and needing two keywords, so prose such as "select a file" is not SQL.
SQL_RE = re.compile(
    r"^\s*\(?\s*(SELECT\b.*\bFROM\b|INSERT\s+(OR\s+\w+\s+)?INTO\b|REPLACE\s+INTO\b"
    r"|UPDATE\s+\S+\s+SET\b|DELETE\s+FROM\b|CREATE\s+(TABLE|(UNIQUE\s+)?INDEX|VIEW)\b|DROP\s+TABLE\b)",
    re.IGNORECASE | re.DOTALL,
)
TABLE_RE = re.compile(
    r"\b(?:FROM|INTO|UPDATE|JOIN|TABLE(?:\s+IF\s+NOT\s+EXISTS)?)\s+([A-Za-z_][\w.]*)", re.IGNORECASE
)
PLACEHOLDER_RE = re.compile(r"\?|(?<![\w:]):[A-Za-z_]\w*")
PERCENT_RE = re.compile(r"%(?:\((\w+)\))?[-#0 +]*\d*(?:\.\d+)?([a-zA-Z%])")
EXECUTE_METHODS = {"execute", "executemany", "executescript"}
NOT_TABLES = {"SET", "SELECT", "VALUES"}

Parts = list[tuple[str, str]]
"""A string built at run time: ("text", literal) and ("expr", source of an interpolated value)."""


# -- the chain's input -------------------------------------------------------------------


def source_of(ctx: HandoffContext) -> tuple[str, str]:
    """The chain's `source` and `filename`. Missing source is bad input: retrying cannot fix it."""
    source = ctx.context_data.get("source")
    if not isinstance(source, str) or not source.strip():
        raise PermanentError("context_data['source'] must be non-empty Python source text")
    filename = ctx.context_data.get("filename") or "<source>"
    return source, str(filename)


def parse(source: str, filename: str) -> ast.Module:
    """Parse `source`; a syntax error is permanent (the same text never parses on a retry)."""
    try:
        return ast.parse(source, filename=filename)
    except SyntaxError as err:
        raise PermanentError(f"{filename}: syntax error at line {err.lineno}: {err.msg}") from err
    except (ValueError, RecursionError) as err:  # null bytes, absurd nesting
        raise PermanentError(f"{filename}: cannot parse: {err}") from err


def latest(previous_results: list[dict[str, Any]], capability: AgentCapability) -> dict[str, Any] | None:
    """The most recent earlier result of an agent with `capability` (each result names its own)."""
    for result in reversed(previous_results):
        if result.get("capability") == capability.value:
            return result
    return None


# -- structure ---------------------------------------------------------------------------


def walk_scoped(tree: ast.AST) -> Iterator[tuple[ast.AST, str | None]]:
    """Every node in source order, parents before children, with its enclosing def's qualname."""
    stack: list[tuple[ast.AST, str | None]] = [(tree, None)]
    while stack:
        node, scope = stack.pop()
        yield node, scope
        inner = scope
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            inner = f"{scope}.{node.name}" if scope else node.name
        stack.extend((child, inner) for child in reversed(list(ast.iter_child_nodes(node))))


@dataclass
class Function:
    qualname: str
    line: int
    raises: list[str]

    @property
    def public(self) -> bool:
        return not any(part.startswith("_") for part in self.qualname.split("."))


def functions(tree: ast.Module) -> list[Function]:
    """Module-level functions and (nested) class methods, in source order; closures are skipped."""
    found: list[Function] = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append(Function(prefix + node.name, node.lineno, _raised(node)))

    visit(tree.body, "")
    return found


def _raised(func: ast.AST) -> list[str]:
    """Names of the exceptions a function raises itself (not in nested defs)."""
    names: set[str] = set()
    stack = list(ast.iter_child_nodes(func))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, (ast.Name, ast.Attribute)):
                names.add(ast.unparse(exc))
        stack.extend(ast.iter_child_nodes(node))
    return sorted(names)


def import_aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin, so `sp.run` and `from os import system` resolve as the real names."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def dotted_name(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """`subprocess.run` for a call target such as `sp.run`; None for anything not a plain name."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


# -- SQL built in the source -------------------------------------------------------------


@dataclass
class SqlString:
    """One SQL statement in the source: a constant, or text assembled at run time."""

    node: ast.AST
    line: int
    scope: str | None
    parts: Parts
    how: str | None  # None for a constant; else "f-string", "%-format", "concatenation", ".format"
    execute: ast.Call | None = field(default=None)

    @property
    def dynamic(self) -> bool:
        return any(kind == "expr" for kind, _ in self.parts)

    @property
    def template(self) -> str:
        """The statement with each interpolated value shown as `{expr}`."""
        return "".join(text if kind == "text" else "{" + text + "}" for kind, text in self.parts)

    @property
    def literal_text(self) -> str:
        return "".join(text for kind, text in self.parts if kind == "text")


def string_parts(node: ast.AST) -> tuple[Parts, str | None] | None:
    """How `node` builds a string, as parts and the technique; None if it is not a string build."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [("text", node.value)], None
    if isinstance(node, ast.JoinedStr):
        parts: Parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(("text", str(value.value)))
            elif isinstance(value, ast.FormattedValue):
                parts.append(("expr", ast.unparse(value.value)))
        return parts, "f-string"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _operand(node.left), _operand(node.right)
        if all(kind == "expr" for kind, _ in left + right):
            return None  # arithmetic, or joining two unknowns: nothing to read
        return left + right, "concatenation"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and _is_str(node.left):
        return _percent_parts(node.left.value, node.right), "%-format"
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
        and _is_str(node.func.value)
    ):
        return _format_parts(node.func.value.value, node), ".format"
    return None


def _is_str(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def _operand(node: ast.AST) -> Parts:
    built = string_parts(node)
    return built[0] if built else [("expr", ast.unparse(node))]


def _percent_parts(fmt: str, right: ast.AST) -> Parts:
    values = right.elts if isinstance(right, ast.Tuple) else [right]
    parts: Parts = []
    pos, index = 0, 0
    for match in PERCENT_RE.finditer(fmt):
        parts.append(("text", fmt[pos : match.start()]))
        key, conversion = match.groups()
        if conversion == "%":
            parts.append(("text", "%"))
        elif key is not None:  # "%(name)s" % mapping
            parts.append(("expr", f"{ast.unparse(right)}[{key!r}]"))
        else:
            value = values[index] if index < len(values) else right
            parts.append(("expr", ast.unparse(value)))
            index += 1
        pos = match.end()
    parts.append(("text", fmt[pos:]))
    return [p for p in parts if p != ("text", "")]


def _format_parts(fmt: str, call: ast.Call) -> Parts:
    keywords = {kw.arg: kw.value for kw in call.keywords if kw.arg}
    parts: Parts = []
    auto = 0
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:  # a malformed format string: show it as is
        return [("text", fmt)]
    for literal, name, _spec, _conv in fields:
        if literal:
            parts.append(("text", literal))
        if name is None:
            continue
        if name == "":
            name, auto = str(auto), auto + 1
        if name.isdigit() and int(name) < len(call.args):
            parts.append(("expr", ast.unparse(call.args[int(name)])))
        elif name in keywords:
            parts.append(("expr", ast.unparse(keywords[name])))
        else:
            parts.append(("expr", name))
    return parts


def looks_like_sql(text: str) -> bool:
    return bool(SQL_RE.match(text))


def sql_strings(tree: ast.Module) -> list[SqlString]:
    """Every SQL statement in the source, outermost build only, linked to the call executing it."""
    found: list[SqlString] = []
    claimed: set[int] = set()  # nodes inside a statement already found (or inside a docstring)
    calls: list[tuple[ast.Call, str | None]] = []
    for node, scope in walk_scoped(tree):
        if id(node) in claimed:
            continue
        if isinstance(node, ast.Expr) and _is_str(node.value):
            claimed.add(id(node.value))  # a docstring is prose, even when it says "select ... from"
            continue
        if isinstance(node, ast.Call):
            calls.append((node, scope))
        built = string_parts(node)
        if built is None:
            continue
        parts, how = built
        sql = SqlString(node, node.lineno, scope, parts, how)
        if not looks_like_sql(sql.template):
            continue
        found.append(sql)
        claimed.update(id(inner) for inner in ast.walk(node))
    # Link each statement to the call that runs it, directly or through a variable.
    by_node = {id(sql.node): sql for sql in found}
    assigned: dict[tuple[str | None, str], SqlString] = {}
    for node, scope in walk_scoped(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if id(node.value) in by_node:
                assigned[(scope, node.targets[0].id)] = by_node[id(node.value)]
    for call, scope in calls:
        if not (isinstance(call.func, ast.Attribute) and call.func.attr in EXECUTE_METHODS and call.args):
            continue
        first = call.args[0]
        sql = by_node.get(id(first))
        if sql is None and isinstance(first, ast.Name):
            # A name bound in the same function, else a module-level constant such as SCHEMA.
            sql = assigned.get((scope, first.id)) or assigned.get((None, first.id))
        if sql is not None and sql.execute is None:
            sql.execute = call
    return found


def tables(text: str) -> list[str]:
    return sorted({t for t in TABLE_RE.findall(text) if t.upper() not in NOT_TABLES})


def has_params(call: ast.Call | None) -> bool:
    """Whether an execute call passes bound parameters (a second argument)."""
    if call is None:
        return False
    return len(call.args) >= 2 or any(kw.arg in ("parameters", "params") for kw in call.keywords)


def snake(name: str) -> str:
    """`InventoryService.add_item` -> `inventory_service_add_item` (for test names)."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name.replace(".", "_"))
    return re.sub(r"_+", "_", name).strip("_").lower()


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def clip(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"

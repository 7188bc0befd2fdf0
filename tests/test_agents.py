"""The example agents, their handlers called directly (no Temporal server)."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path
from textwrap import dedent

import pytest

import handoff.examples as examples
from handoff.constants import MAX_CHAIN_DEPTH
from handoff.errors import PermanentError
from handoff.examples import ALL_AGENTS, analyzer, auditor, dba, deployer, tester
from handoff.models import (
    AGENT_ID_RE,
    AgentCapability,
    BranchOutcome,
    BranchPosition,
    ChainStatus,
    HandoffContext,
    HandoffResult,
)

SAMPLE_PATH = Path(examples.__file__).parent / "samples" / "inventory_service.py"
SAMPLE = SAMPLE_PATH.read_text(encoding="utf-8")
FILENAME = "inventory_service.py"

CLEAN = dedent(
    '''
    """Select items from a list: prose, not SQL."""
    import re

    WORD = re.compile(r"\\w+")


    class Counter:
        def __init__(self):
            self.counts = {}

        def add(self, text):
            for word in WORD.findall(text):
                self.counts[word] = self.counts.get(word, 0) + 1

        def top(self, n):
            if n < 0:
                raise ValueError(n)
            return sorted(self.counts.items(), key=lambda kv: -kv[1])[:n]


    def _helper():
        return "SELECT name FROM items"
    '''
)


def line_of(fragment: str, source: str = SAMPLE) -> int:
    """The 1-based line of the only line containing `fragment` (checks the AST against the text)."""
    hits = [n for n, line in enumerate(source.splitlines(), 1) if fragment in line]
    assert len(hits) == 1, (fragment, hits)
    return hits[0]


def context(agent_id: str, source: str | None = SAMPLE, previous: list[dict] | None = None,
            filename: str = FILENAME) -> HandoffContext:
    data = {"filename": filename} if source is None else {"source": source, "filename": filename}
    return HandoffContext(to_agent=agent_id, task_description="work", context_data=data,
                          previous_results=previous or [])


async def run_chain(source: str, filename: str = FILENAME) -> tuple[list[str], list[HandoffResult]]:
    """Run the chain as the workflow would: resolve capabilities, merge context, pass results on;
    a fan-out's branches in branch order, then their join with every branch's outcome."""
    ctx = context("analyzer", source, filename=filename)
    hops: list[str] = []
    results: list[HandoffResult] = []
    await follow(analyzer, ctx, hops, results)
    return hops, results


BY_CAPABILITY = {cap: agent for agent in ALL_AGENTS for cap in agent.capabilities}


def next_context(ctx: HandoffContext, agent, capability, task, previous, **fields) -> HandoffContext:
    return HandoffContext(
        chain_id=ctx.chain_id, from_agent=ctx.to_agent, to_agent=agent.id, to_capability=capability,
        task_description=task, context_data=dict(ctx.context_data), previous_results=previous,
        chain_depth=ctx.chain_depth + 1, **fields)


async def follow(agent, ctx: HandoffContext, hops: list[str], results: list[HandoffResult]) -> None:
    """One path of the chain from `agent`, its hops and results appended in the order they ran."""
    for _ in range(MAX_CHAIN_DEPTH):
        hops.append(agent.id)
        result = await agent.handler(ctx)
        results.append(result)
        previous = [*ctx.previous_results, result.result_data]
        if result.fan_out is not None:
            outcomes = []
            for index, branch in enumerate(result.fan_out.branches):
                assert branch.to_capability is not None and not branch.to_agent  # by capability
                sub_results: list[HandoffResult] = []
                sub = next_context(ctx, BY_CAPABILITY[branch.to_capability], branch.to_capability,
                                   branch.task_description, list(previous),
                                   branch=BranchPosition(hop=ctx.chain_depth, index=index,
                                                         of=len(result.fan_out.branches)))
                await follow(BY_CAPABILITY[branch.to_capability], sub, hops, sub_results)
                results.extend(sub_results)
                previous += [r.result_data for r in sub_results]
                outcomes.append(BranchOutcome(index=index, capability=branch.to_capability,
                                              task_description=branch.task_description,
                                              status=ChainStatus.COMPLETED,
                                              final_result=sub_results[-1].result_data))
            join = result.fan_out.join
            agent = BY_CAPABILITY[join.to_capability]
            ctx = next_context(ctx, agent, join.to_capability, join.task_description, previous,
                               branches=outcomes)
            ctx.branch = None
            continue
        if result.next_handoff is None:
            return
        nxt = result.next_handoff
        assert nxt.to_capability is not None and not nxt.to_agent  # handoffs are by capability
        agent = BY_CAPABILITY[nxt.to_capability]
        ctx = next_context(ctx, agent, nxt.to_capability, nxt.task_description, previous,
                           branch=ctx.branch)
        ctx.context_data.update(nxt.context_data)
    raise AssertionError(f"chain did not complete within {MAX_CHAIN_DEPTH} hops: {hops}")


# -- the package -------------------------------------------------------------------------


def test_all_agents_are_valid_and_cover_the_demo_capabilities():
    assert ALL_AGENTS == [analyzer, auditor, dba, tester, deployer]
    ids = [a.id for a in ALL_AGENTS]
    assert ids == ["analyzer", "auditor", "dba", "tester", "deployer"]
    assert all(AGENT_ID_RE.match(i) for i in ids)
    assert [a.capabilities for a in ALL_AGENTS] == [
        (AgentCapability.CODE_ANALYSIS,),
        (AgentCapability.SECURITY_AUDIT,),
        (AgentCapability.DATABASE_OPERATIONS,),
        (AgentCapability.TESTING,),
        (AgentCapability.DEPLOYMENT,),
    ]
    assert all(inspect.iscoroutinefunction(a.handler) for a in ALL_AGENTS)
    assert all(a.task_queue == f"agent.{a.id}" for a in ALL_AGENTS)


def test_sample_is_valid_python_with_the_intended_issues():
    tree = ast.parse(SAMPLE)
    assert 80 <= len(SAMPLE.splitlines()) <= 150
    assert any(isinstance(n, ast.Import) and n.names[0].name == "sqlite3" for n in tree.body)
    for fragment in ("f\"SELECT", "shell=True", "eval(rule", '" % (sku, limit)'):
        assert fragment in SAMPLE


# -- analyzer ----------------------------------------------------------------------------


async def test_analyzer_outlines_the_sample():
    result = await analyzer.handler(context("analyzer"))
    data = result.result_data
    assert data["capability"] == "CODE_ANALYSIS"
    assert data["lines"] == len(SAMPLE.splitlines())
    assert data["classes"] == ["OutOfStock", "Item", "InventoryService"]
    assert data["imports"] == ["dataclasses", "json", "pathlib", "sqlite3", "subprocess"]
    assert data["functions"] == [
        "Item.value_cents",
        "InventoryService.__init__",
        "InventoryService.add_item",
        "InventoryService.get_item",
        "InventoryService.search",
        "InventoryService.adjust",
        "InventoryService.movements",
        "InventoryService.count_rows",
        "InventoryService.total_value_cents",
        "InventoryService.apply_price_rule",
        "InventoryService.backup",
        "InventoryService.close",
        "parse_quantity",
        "load_items",
        "_format_cents",
    ]
    assert "source" not in data and len(json.dumps(data)) < 4000


async def test_analyzer_finds_the_risky_constructs_and_fans_out_to_audit_and_tests():
    result = await analyzer.handler(context("analyzer"))
    findings = result.result_data["findings"]
    assert [(f["kind"], f["line"], f["function"]) for f in findings] == [
        ("sql", line_of("query = f\"SELECT"), "InventoryService.search"),
        ("sql", line_of("% (sku, limit)"), "InventoryService.movements"),
        ("sql", line_of("FROM \" + table"), "InventoryService.count_rows"),
        ("eval", line_of("eval(rule"), "InventoryService.apply_price_rule"),
        ("command", line_of("shell=True"), "InventoryService.backup"),
    ]
    assert [f.get("how") for f in findings[:3]] == ["f-string", "%-format", "concatenation"]
    assert findings[3]["constant_arg"] is False and findings[4]["shell"] is True
    assert "LIKE '%{term}%'" in findings[0]["detail"]
    assert result.result_data["finding_count"] == 5
    fan = result.fan_out
    assert result.next_handoff is None
    assert [(b.to_capability, b.task_description) for b in fan.branches] == [
        (AgentCapability.SECURITY_AUDIT, "Audit 5 risky constructs in inventory_service.py"),
        (AgentCapability.TESTING, "Plan tests for inventory_service.py")]
    assert (fan.join.to_capability, fan.join.task_description, fan.join.wait_for) == (
        AgentCapability.DEPLOYMENT, "Decide release of inventory_service.py", None)
    assert all(not b.to_agent and not b.context_data for b in fan.branches)  # the workflow routes


async def test_clean_source_goes_to_testing_not_security_audit():
    result = await analyzer.handler(context("analyzer", CLEAN, filename="words.py"))
    assert result.result_data["findings"] == [] and result.result_data["finding_count"] == 0
    assert result.result_data["functions"] == ["Counter.__init__", "Counter.add", "Counter.top", "_helper"]
    assert result.next_handoff.to_capability is AgentCapability.TESTING
    assert result.next_handoff.task_description == "Write tests for words.py"


async def test_analyzer_detects_aliases_and_every_kind_of_risk():
    source = dedent(
        '''
        import pickle
        import re
        import subprocess as sp
        import yaml
        from os import system

        def risky(x, data, text):
            """Select rows from the table by id."""
            sp.call(["ls", x])
            system("ls " + x)
            pickle.loads(data)
            yaml.load(text)
            yaml.load(text, Loader=yaml.SafeLoader)
            eval("1 + 1")
            exec(x)
            re.compile(x)
            a = "SELECT * FROM t WHERE id = {}".format(x)
            b = "DELETE FROM t WHERE id = " + str(x)
            c = "UPDATE t SET n = %(n)s" % {"n": x}
            d = "SELECT * FROM t"
            return a, b, c, d
        '''
    )
    result = await analyzer.handler(context("analyzer", source))
    found = [(f["kind"], f["line"], f.get("call") or f.get("how")) for f in result.result_data["findings"]]
    assert found == [
        ("command", line_of("sp.call", source), "subprocess.call"),
        ("command", line_of("system(", source), "os.system"),
        ("deserialization", line_of("pickle.loads", source), "pickle.loads"),
        ("deserialization", line_of("yaml.load(text)", source), "yaml.load"),
        ("eval", line_of("eval(", source), "eval"),
        ("eval", line_of("exec(", source), "exec"),
        ("sql", line_of(".format(x)", source), ".format"),
        ("sql", line_of("DELETE", source), "concatenation"),
        ("sql", line_of("UPDATE", source), "%-format"),
    ]
    by_call = {f.get("call"): f for f in result.result_data["findings"]}
    assert by_call["subprocess.call"]["shell"] is False
    assert by_call["os.system"]["shell"] is True  # os.system always runs a shell
    assert by_call["eval"]["constant_arg"] is True and by_call["exec"]["constant_arg"] is False


@pytest.mark.parametrize("data", [{}, {"source": ""}, {"source": "   \n"}, {"source": 42}])
async def test_analyzer_rejects_missing_source_permanently(data):
    ctx = HandoffContext(to_agent="analyzer", task_description="work", context_data=data)
    with pytest.raises(PermanentError, match="source"):
        await analyzer.handler(ctx)


@pytest.mark.parametrize("agent", [analyzer, auditor, dba, tester], ids=lambda a: a.id)
async def test_every_agent_that_reads_source_rejects_bad_source_permanently(agent):
    with pytest.raises(PermanentError, match="source"):
        await agent.handler(context(agent.id, None))
    with pytest.raises(PermanentError, match="syntax error at line 1"):
        await agent.handler(context(agent.id, "def (:"))


async def test_analyzer_rejects_a_syntax_error_permanently():
    with pytest.raises(PermanentError, match=r"broken\.py: syntax error at line 2"):
        await analyzer.handler(context("analyzer", "x = 1\ndef f(:\n", filename="broken.py"))


# -- auditor -----------------------------------------------------------------------------


async def test_auditor_rates_the_sample_and_sends_sql_to_the_dba():
    analysis = (await analyzer.handler(context("analyzer"))).result_data
    result = await auditor.handler(context("auditor", previous=[analysis]))
    data = result.result_data
    assert [(f["line"], f["severity"], f["cwe"]) for f in data["findings"]] == [
        (line_of("query = f\"SELECT"), "high", "CWE-89"),
        (line_of("% (sku, limit)"), "high", "CWE-89"),
        (line_of("FROM \" + table"), "high", "CWE-89"),
        (line_of("eval(rule"), "high", "CWE-95"),
        (line_of("shell=True"), "high", "CWE-78"),
    ]
    assert all(f["remediation"] for f in data["findings"])
    assert data["counts"] == {"high": 5, "medium": 0} and data["sql_findings"] == 3
    assert result.next_handoff.to_capability is AgentCapability.DATABASE_OPERATIONS
    assert result.next_handoff.task_description == "Review 3 dynamic SQL statements in inventory_service.py"


async def test_auditor_rates_constant_eval_and_shell_free_commands_medium_and_skips_the_dba():
    source = "import pickle, subprocess\neval('2 + 2')\nsubprocess.run(['ls'])\npickle.load(stream)\n"
    analysis = (await analyzer.handler(context("analyzer", source))).result_data
    result = await auditor.handler(context("auditor", source, [analysis]))
    data = result.result_data
    assert [(f["kind"], f["severity"], f["cwe"]) for f in data["findings"]] == [
        ("eval", "medium", "CWE-95"),
        ("command", "medium", "CWE-78"),
        ("deserialization", "medium", "CWE-502"),
    ]
    assert data["counts"] == {"high": 0, "medium": 3}
    assert result.next_handoff.to_capability is AgentCapability.TESTING
    assert result.next_handoff.task_description == (
        "Write regression tests for 0 high-severity findings in inventory_service.py"
    )


async def test_auditor_scans_the_source_itself_when_no_analysis_ran():
    analysis = (await analyzer.handler(context("analyzer"))).result_data
    with_analysis = await auditor.handler(context("auditor", previous=[analysis]))
    alone = await auditor.handler(context("auditor"))
    assert alone.result_data == with_analysis.result_data


# -- dba ---------------------------------------------------------------------------------


async def test_dba_reviews_every_statement_of_the_sample():
    result = await dba.handler(context("dba"))
    data = result.result_data
    statuses = [(s["line"], s["status"]) for s in data["statements"]]
    assert statuses == [
        (line_of("SCHEMA = "), "constant"),
        (line_of('"INSERT INTO items'), "parameterized"),
        (line_of("WHERE sku = :sku"), "parameterized"),
        (line_of("query = f\"SELECT"), "dynamic"),
        (line_of("UPDATE items SET quantity"), "parameterized"),
        (line_of("INSERT INTO movements"), "parameterized"),
        (line_of("% (sku, limit)"), "dynamic"),
        (line_of("FROM \" + table"), "dynamic"),
        (line_of("COALESCE"), "constant"),
        (line_of("UPDATE items SET price_cents"), "parameterized"),
    ]
    assert data["counts"] == {"statements": 10, "dynamic": 3, "parameterized": 5}
    assert data["tables"] == ["items", "movements"]
    assert data["statements"][0]["tables"] == ["items", "movements"]  # both CREATE TABLEs
    assert result.next_handoff.to_capability is AgentCapability.TESTING
    assert result.next_handoff.task_description == (
        "Write regression tests for 3 dynamic SQL statements in inventory_service.py"
    )


async def test_dba_proposes_parameterized_rewrites():
    result = await dba.handler(context("dba"))
    rewrites = {s["function"]: s["rewrite"] for s in result.result_data["statements"] if s["dynamic"]}
    search = rewrites["InventoryService.search"]
    assert search["text"] == (
        'execute("SELECT sku, name, quantity, price_cents FROM items WHERE name LIKE ? ORDER BY name", '
        '(f"%{term}%",))'
    )
    assert rewrites["InventoryService.movements"]["text"] == (
        'execute("SELECT delta FROM movements WHERE sku = ? ORDER BY id DESC LIMIT ?", (sku, limit))'
    )
    # A table name cannot be a parameter: it is checked against the tables the file uses.
    count = rewrites["InventoryService.count_rows"]
    assert count["identifiers"] == ["table"] and count["params"] == []
    assert count["text"] == (
        "if table not in {'items', 'movements'}: raise ValueError(table)\n"
        'execute(f"SELECT COUNT(*) AS n FROM {table}")'
    )
    ast.parse(count["text"].replace("execute(", "print("))  # the proposal is valid Python


async def test_dba_rewrite_binds_values_and_guards_names():
    source = dedent(
        '''
        def f(c, a, b, t):
            c.execute(f"INSERT INTO log (a, b) VALUES ({a}, '{b}')")
            c.execute("SELECT * FROM log WHERE id IN (%s, %s) AND n BETWEEN %d AND %d" % (a, b, a, b))
            c.execute("SELECT {} FROM log WHERE k = {k}".format(a, k=b))
            c.execute(f"DELETE FROM {t} WHERE a = {a}")
        '''
    )
    result = await dba.handler(context("dba", source))
    texts = [s["rewrite"]["text"] for s in result.result_data["statements"]]
    assert texts == [
        'execute("INSERT INTO log (a, b) VALUES (?, ?)", (a, b))',
        'execute("SELECT * FROM log WHERE id IN (?, ?) AND n BETWEEN ? AND ?", (a, b, a, b))',
        'if a not in ALLOWED_NAMES: raise ValueError(a)\nexecute(f"SELECT {a} FROM log WHERE k = ?", (b,))',
        'if t not in ALLOWED_TABLES: raise ValueError(t)\nexecute(f"DELETE FROM {t} WHERE a = ?", (a,))',
    ]
    for text in texts:
        ast.parse(text)


async def test_dba_requires_bound_parameters_for_placeholders():
    source = dedent(
        '''
        def f(conn, a):
            conn.execute("SELECT * FROM t WHERE a = ?")
            q = "SELECT t.a FROM t JOIN u ON u.id = t.id WHERE t.a = :a"
            conn.execute(q, {"a": a})
        '''
    )
    result = await dba.handler(context("dba", source))
    statements = result.result_data["statements"]
    assert [(s["status"], s["parameterized"], s["tables"]) for s in statements] == [
        ("placeholders without parameters", False, ["t"]),
        ("parameterized", True, ["t", "u"]),
    ]


# -- tester ------------------------------------------------------------------------------


async def test_tester_plans_unit_and_regression_tests_for_the_sample():
    analysis = (await analyzer.handler(context("analyzer"))).result_data
    audit = (await auditor.handler(context("auditor", previous=[analysis]))).result_data
    result = await tester.handler(context("tester", previous=[analysis, audit]))
    data = result.result_data
    assert data["test_module"] == "tests/test_inventory_service.py"
    unit = data["unit_tests"]
    assert unit[:3] == [
        "test_item_value_cents",
        "test_inventory_service_add_item",
        "test_inventory_service_add_item_raises_value_error",
    ]
    assert "test_inventory_service_adjust_raises_key_error" in unit
    assert "test_inventory_service_adjust_raises_out_of_stock" in unit
    assert "test_parse_quantity_raises_value_error" in unit
    assert not [n for n in unit if "init" in n or "format_cents" in n]  # private: not planned
    assert data["regression_tests"] == [
        "test_inventory_service_search_rejects_sql_injection",
        "test_inventory_service_movements_rejects_sql_injection",
        "test_inventory_service_count_rows_rejects_sql_injection",
        "test_inventory_service_apply_price_rule_rejects_code_injection",
        "test_inventory_service_backup_rejects_command_injection",
    ]
    assert data["counts"] == {"unit": 18, "regression": 5, "total": 23}
    assert result.next_handoff.to_capability is AgentCapability.DEPLOYMENT
    assert result.next_handoff.task_description == "Decide release of inventory_service.py"


async def test_tester_tells_apart_two_findings_in_one_function():
    audit = {"capability": "SECURITY_AUDIT", "findings": [
        {"line": 3, "function": "run", "severity": "high", "cwe": "CWE-78"},
        {"line": 4, "function": "run", "severity": "high", "cwe": "CWE-78"},
        {"line": 5, "function": None, "severity": "high", "cwe": "CWE-95"},
        {"line": 6, "function": "run", "severity": "medium", "cwe": "CWE-502"},
    ]}
    result = await tester.handler(context("tester", CLEAN, [audit]))
    assert result.result_data["regression_tests"] == [
        "test_run_rejects_command_injection",
        "test_run_rejects_command_injection_line_4",
        "test_module_rejects_code_injection",
    ]
    assert result.result_data["unit_tests"] == ["test_counter_add", "test_counter_top",
                                                "test_counter_top_raises_value_error"]


# -- deployer and whole chains -----------------------------------------------------------


async def test_the_sample_fans_out_to_audit_and_tests_and_is_blocked_at_the_join():
    hops, results = await run_chain(SAMPLE)
    assert hops == ["analyzer", "auditor", "dba", "tester", "deployer"]
    assert results[0].fan_out is not None
    assert results[1].next_handoff.to_capability is AgentCapability.DATABASE_OPERATIONS  # inside its branch
    assert results[2].next_handoff is None and results[3].next_handoff is None  # branches end: the join
    final = results[-1]
    assert final.success and final.next_handoff is None
    data = final.result_data
    assert data["decision"] == "blocked" and data["high_findings"] == 5
    search, backup = line_of('query = f"SELECT'), line_of("shell=True")
    assert data["reasons"][0] == f"CWE-89 SQL injection at line {search} in InventoryService.search"
    assert data["reasons"][-1] == f"CWE-78 OS command injection at line {backup} in InventoryService.backup"
    assert {c["item"]: c["ok"] for c in data["checklist"]} == {
        "code analysed": True,
        "security findings audited": True,
        "no high-severity findings": False,
        "SQL values bound as parameters": False,
        "tests planned": True,
        "regression test for each high finding": True,
    }
    for result in results:  # results travel through Temporal: JSON, small, no source text
        encoded = json.dumps(result.result_data)
        assert len(encoded) < 8000 and "def add_item" not in encoded


async def test_a_clean_source_skips_audit_and_is_approved():
    hops, results = await run_chain(CLEAN, "words.py")
    assert hops == ["analyzer", "tester", "deployer"]
    data = results[-1].result_data
    assert data["decision"] == "approved"
    assert data["reasons"] == ["no high-severity findings"]
    assert all(c["ok"] for c in data["checklist"])


async def test_the_deployer_scans_the_source_when_no_earlier_hop_did():
    result = await deployer.handler(context("deployer", "def f(x):\n    return eval(x)\n", filename="f.py"))
    data = result.result_data
    assert data["decision"] == "blocked"
    assert data["reasons"] == ["CWE-95 Eval injection at line 2 in f"]
    assert result.next_handoff is None


async def test_the_chain_is_deterministic():
    first = [r.result_data for r in (await run_chain(SAMPLE))[1]]
    second = [r.result_data for r in (await run_chain(SAMPLE))[1]]
    assert first == second


async def test_in_a_plain_chain_the_specialists_hand_on_in_a_line():
    """Started at the auditor (no fan-out), each hands on as before: dba, then tester, then deployer."""
    ctx = context("auditor")
    hops: list[str] = []
    await follow(auditor, ctx, hops, [])
    assert hops == ["auditor", "dba", "tester", "deployer"]


async def test_the_tester_in_a_branch_rates_the_analysis_findings_itself():
    analysis = (await analyzer.handler(context("analyzer"))).result_data
    ctx = context("tester", previous=[analysis])
    ctx.branch = BranchPosition(hop=0, index=1, of=2)
    result = await tester.handler(ctx)
    assert result.next_handoff is None and result.fan_out is None
    assert result.result_data["counts"]["regression"] == 5

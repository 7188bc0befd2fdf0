"""`handoff eval` (handoff/eval/): cases validated up front, scores computed from chain records by
pure functions, every case run as a real chain against the session's server (LLM agents on the
scripted model), two builds of an agent compared, re-runs that count nothing twice, the HTML
report, and cases made from recorded chains."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from uuid import uuid4

import pytest

from handoff import AgentCapability, ChainRecord, ChainStatus, HopRecord, HopStatus, wait_chain
from handoff.agents.llm import llm_agent
from handoff.client.versioning import current_build_id, routing_of
from handoff.eval import (
    EvalSettings,
    Evaluation,
    NamedCase,
    chain_id_of,
    compare,
    load_cases,
    parse_cases,
    run_eval,
    score_run,
    summarize,
)
from handoff.eval.cases import Case
from handoff.eval.runner import routed_to
from handoff.eval.stats import paired_bootstrap, wilson
from handoff.models import AgentDecision
from handoff.testing import ScriptedModel, call
from handoff.workers.agent_worker import run_agent
from tests.support import cli, make_agent, running

pytestmark = pytest.mark.usefixtures("chains")

AUDIT, TESTS = AgentCapability.SECURITY_AUDIT, AgentCapability.TESTING


def tool(agent_id: str) -> str:
    return f"transfer_to_{agent_id.replace('-', '_')}"


def triage(agent_id: str, url: str, version: str = "1"):
    return llm_agent(id=agent_id, name="Triage", capabilities=[AgentCapability.CODE_ANALYSIS],
                     instructions="Route the work to the right specialist.", model="scripted",
                     base_url=url, api_key="test", can_finish=False, version=version)


def completing():
    async def handle(ctx):
        return ctx.complete({"by": ctx.to_agent, "verdict": "ok"})
    return handle


def case_number(request: dict) -> int:
    """The N of the task `case N: ...` the model is asked about."""
    return int(re.search(r"case (\d+)", request["messages"][-1]["content"]).group(1))


def write_cases(path, lines: list[dict]) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def routing_cases(lead: str, expected: str, count: int) -> list[dict]:
    return [{"name": f"case {i}", "to_agent": lead, "task": f"case {i}: review the login code",
             "expect": {"hops": [lead, expected], "status": "completed", "result_keys": ["verdict"]}}
            for i in range(count)]


# -- scores from records, no server ---------------------------------------------------------------

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def hop(depth: int, to_agent: str, status: HopStatus = HopStatus.COMPLETED, *, capability=None,
        fallback_for=None, decision=None, result=None) -> HopRecord:
    return HopRecord(hop=depth, from_agent="x", to_agent=to_agent, capability=capability, task_description="t",
                     status=status, fallback_for=fallback_for, decision=decision, result_data=result or {})


def record(*hops: HopRecord, status=ChainStatus.COMPLETED, final=None, ms=100.0) -> ChainRecord:
    return ChainRecord(chain_id=uuid4(), status=status, task_description="t", started_at=T0,
                       completed_at=T0 + timedelta(milliseconds=ms), duration_ms=ms, hops=list(hops),
                       final_result=final or {})


def case(**expect) -> Case:
    return Case(to_agent="lead", task="t", expect=expect)


def test_a_choice_is_right_by_agent_by_capability_addressed_or_had():
    chain = record(hop(0, "lead"), hop(1, "audit", capability=AUDIT), hop(2, "tests"), final={"k": 1})
    scored = score_run(case(hops=["lead", "SECURITY_AUDIT", "TESTING"], status="completed", result_keys=["k"]),
                       chain, name="c", capabilities={"tests": [TESTS]})
    assert [(c.position, c.chooser, c.chosen, c.correct) for c in scored.choices] == [
        (1, "lead", "SECURITY_AUDIT", True), (2, "audit", "TESTING", True)]
    assert scored.trajectory and scored.status_ok and scored.result_keys_ok and scored.passed
    assert scored.path == ["lead", "audit", "tests"]
    wrong = score_run(case(hops=["lead", "dba"]), chain, name="c")
    assert [(c.chosen, c.correct) for c in wrong.choices] == [("SECURITY_AUDIT", False)]
    assert wrong.trajectory is False and not wrong.passed, "the path is longer than expected, too"
    assert score_run(case(hops=["lead", "*", "tests"]), chain, name="c").choices[0].position == 2
    assert score_run(case(hops=["lead", "audit", "..."]), chain, name="c").trajectory is True


def test_a_missing_hop_is_chosen_as_what_the_agent_before_did():
    gave_up = AgentDecision(model="m", reason="gave up after a second unusable answer: no tool 'x'",
                            prompt_tokens=30, completion_tokens=5)
    ended = score_run(case(hops=["lead", "audit"]), record(hop(0, "lead")), name="c")
    assert ended.choices[0].chosen == "(end)"
    failed = record(hop(0, "lead", HopStatus.FAILED, decision=gave_up), status=ChainStatus.FAILED)
    invalid = score_run(case(hops=["lead", "audit"], max_tokens=34), failed, name="c")
    assert (invalid.choices[0].chosen, invalid.invalid_choices) == ("(invalid)", 1)
    assert (invalid.tokens, invalid.tokens_ok) == (35, False)
    unreachable = record(hop(0, "lead", HopStatus.UNREACHABLE), status=ChainStatus.FAILED)
    assert score_run(case(hops=["lead", "audit"]), unreachable, name="c").choices[0].chosen == "(unreachable)"
    never = score_run(case(hops=["lead", "audit", "dba"]), record(hop(0, "lead")), name="c")
    assert [(c.chooser, c.chosen) for c in never.choices] == [("lead", "(end)"), ("(not reached)", "(not reached)")]


def test_a_fallback_is_the_same_choice_and_its_agent_chooses_next():
    chain = record(hop(0, "lead"), hop(1, "audit", HopStatus.FAILED, capability=AUDIT),
                   hop(1, "spare", capability=AUDIT, fallback_for="audit"), hop(2, "tests"))
    scored = score_run(case(hops=["lead", "SECURITY_AUDIT", "tests"], visits={"agents": ["lead", "audit", "spare",
                                                                                         "tests"], "ordered": True}),
                       chain, name="c")
    assert [(c.chooser, c.correct) for c in scored.choices] == [("lead", True), ("spare", True)]
    assert scored.trajectory is True


def test_refused_choices_and_visits_in_any_order():
    chain = record(hop(0, "lead"), hop(1, "dba", HopStatus.REFUSED), status=ChainStatus.REJECTED)
    scored = score_run(case(hops=["lead", "dba"], status="rejected", visits={"agents": ["lead"]}), chain, name="c")
    assert scored.choices[0].refused and scored.refused_choices == 1
    assert scored.trajectory and scored.passed, "a refused hop is the choice made, but not a visit"
    assert score_run(case(visits={"agents": ["dba", "lead"]}), chain, name="c").trajectory is False


def test_summaries_count_rates_by_hop_and_agent_and_the_confusion_matrix():
    right = [score_run(case(hops=["lead", "audit"]), record(hop(0, "lead"), hop(1, "audit")), name=f"c{i}")
             for i in range(7)]
    wrong = [score_run(case(hops=["lead", "audit"]), record(hop(0, "lead"), hop(1, "tests")), name=f"c{i}")
             for i in range(7, 10)]
    summary = summarize(right + wrong)
    assert (summary.routing.hits, summary.routing.total, summary.routing.value) == (7, 10, 0.7)
    assert summary.routing.low < 0.7 < summary.routing.high
    assert summary.confusion == {"audit": {"audit": 7, "tests": 3}}
    assert summary.by_position[1].value == 0.7 and summary.by_agent["lead"].value == 0.7
    assert summary.latency_ms.p50 == 100.0


def test_two_builds_are_compared_per_case_with_a_bootstrap_interval():
    def runs(build: str, right: int) -> list:
        chosen = [("audit" if i < right else "tests") for i in range(10)]
        return [score_run(case(hops=["lead", "audit"]), record(hop(0, "lead"), hop(1, c)), name=f"c{i}",
                          build=build) for i, c in enumerate(chosen)]
    differences = {d.measure: d for d in compare(runs("a", 3), runs("b", 9))}
    accuracy = differences["routing accuracy"]
    assert (accuracy.a, accuracy.b, round(accuracy.diff, 3), accuracy.cases) == (0.3, 0.9, 0.6, 10)
    assert 0 < accuracy.low <= 0.6 <= accuracy.high <= 1
    same = {d.measure: d for d in compare(runs("a", 5), runs("b", 5))}["latency ms per run"]
    assert (same.diff, same.low, same.high) == (0.0, 0.0, 0.0)
    assert paired_bootstrap([(1, 1, 1, 1)]) is None, "one case says nothing about spread"
    assert wilson(0, 0) is None and wilson(10, 10)[1] == 1.0 and wilson(0, 10)[0] == 0.0


def test_chain_ids_are_the_same_for_the_same_run_and_differ_otherwise():
    assert chain_id_of("r", "c", 0, "a") == chain_id_of("r", "c", 0, "a")
    assert len({chain_id_of("r", "c", 0, "a"), chain_id_of("r", "c", 1, "a"), chain_id_of("r", "c", 0, "b"),
                chain_id_of("s", "c", 0, "a"), chain_id_of("r", "d", 0, "a")}) == 5


# -- the case file ----------------------------------------------------------------------------------


async def test_invalid_cases_are_refused_one_line_each_before_anything_runs(cli_env, tmp_path):
    good = {"to_agent": "lead", "task": "t", "expect": {"status": "completed"}}
    lines = [
        json.dumps(good),
        json.dumps({**good, "expected": {"status": "completed"}}),                     # 2: misspelt field
        "",
        json.dumps({"to_agent": "lead", "expect": {"status": "completed"}}),            # 4: no task
        json.dumps({**good, "capability": "TESTING"}),                                   # 5: two starts
        json.dumps({**good, "expect": {"status": "finished"}}),                          # 6: unknown status
        json.dumps({**good, "expect": {"hops": ["lead", "Auditor"]}}),                   # 7: not a target
        json.dumps({**good, "task": "x" * 20_000}),                                      # 8: too long
        "{not json",                                                                     # 9
        json.dumps({**good, "policy": {"max_depth": 9}}),                                # 10: bad policy
        json.dumps({**good, "expect": {}}),                                              # 11: nothing to check
        json.dumps({**good, "name": "line 1"}),                                          # 12: name taken
    ]
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = await cli(cli_env, "eval", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = proc.stderr.splitlines()
    assert [int(re.match(rf"error: {re.escape(str(path))}:(\d+): ", e).group(1)) for e in errors] == \
        [2, 4, 5, 6, 7, 8, 9, 10, 11, 12], proc.stderr
    said = dict(zip([2, 4, 5, 6, 7, 8, 9, 10, 11, 12], errors))
    for number, fragment in [(2, "expected: unknown field"), (4, "task: Field required"),
                             (5, "exactly one of to_agent or capability"), (6, "expect.status"),
                             (7, "'Auditor' is neither an agent id nor a capability"),
                             (8, "task: String should have at most 10000 characters"), (9, "not JSON"),
                             (10, "policy.max_depth"), (11, "nothing to check"), (12, "taken by line 1")]:
        assert fragment in said[number], said[number]
    assert proc.stdout == ""
    with pytest.raises(Exception) as refused:
        load_cases(path)
    assert len(refused.value.problems) == 10, "the API raises the same problems, typed"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = await cli(cli_env, "eval", str(empty))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {empty}: no cases"
    for args, fragment in [(["--against", "b"], "--against goes with --build-id"),
                           (["--build-id", "a"], "--build-id needs --agent"),
                           (["--agent", "lead"], "--agent goes with --build-id"),
                           (["--since", "2h"], "--since goes with --from-chains")]:
        proc = await cli(cli_env, "eval", str(path), *args)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: {fragment}"), proc.stderr


# -- real chains --------------------------------------------------------------------------------------


async def test_seven_right_choices_in_ten_score_0_7_in_the_json_the_tables_and_the_report(
        client, cli_env, uid, tmp_path):
    lead, auditor, tester = f"triage-{uid}", f"auditor-{uid}", f"tester-{uid}"

    def answer(request, n):
        return call(tool(auditor if case_number(request) < 7 else tester), task="look at it", reason="scripted")

    path = write_cases(tmp_path / "cases.jsonl", routing_cases(lead, auditor, 10))
    async with ScriptedModel(answer) as model:
        agents = [triage(lead, model.url), make_agent(auditor, completing(), [AUDIT]),
                  make_agent(tester, completing(), [TESTS])]
        async with running(client, *agents, register=True):
            proc = await cli(cli_env, "eval", path, "--json", "--report", str(tmp_path / "report"), timeout=120)
            assert proc.returncode == 0, proc.stderr
            again = await cli(cli_env, "eval", path, timeout=120)  # the same run: every chain found recorded
    assert len(model.requests) == 10, "the second run started no chain"
    report = json.loads(proc.stdout)
    summary = report["summaries"]["current"]
    assert (summary["routing"]["hits"], summary["routing"]["total"], summary["routing"]["value"]) == (7, 10, 0.7)
    assert summary["confusion"] == {auditor: {auditor: 7, tester: 3}}
    assert summary["by_position"] == {"1": summary["routing"]} and summary["by_agent"][lead]["value"] == 0.7
    assert (summary["trajectory"]["value"], summary["status"]["value"], summary["passed"]["value"]) == (0.7, 1.0, 0.7)
    assert summary["tokens"]["mean"] == 18, "one scripted model call: 11 + 7 tokens"
    runs = report["runs"]
    assert len(runs) == 10 and all(r["chain_id"] and r["duration_ms"] > 0 for r in runs)
    assert {r["case"]: r["passed"] for r in runs} == {f"case {i}": i < 7 for i in range(10)}

    assert again.returncode == 0, again.stderr
    assert "70.0 % (7/10)" in again.stdout and "confusion matrix" in again.stdout
    missed = [line for line in again.stdout.splitlines() if line.startswith("case ") and ": path " in line]
    assert missed == [f"case {i}: path {lead} > {tester}; hop 1 went to {tester}, not {auditor}" for i in (7, 8, 9)]

    html = (tmp_path / "report" / "report.html").read_text()
    assert json.loads((tmp_path / "report" / "report.json").read_text())["run_id"] == report["run_id"]
    picture = re.search(r'<img alt="confusion matrix: current" src="data:image/png;base64,([^"]+)"', html)
    assert picture, "the confusion matrix is drawn inline"
    assert base64.b64decode(picture.group(1)).startswith(b"\x89PNG\r\n\x1a\n")
    assert 'alt="per-case checks, latency and tokens" src="data:image/png;base64,' in html
    assert "http" not in html.replace("http-equiv", ""), "self-contained: nothing fetched"
    assert html.count("<tr>") >= 10 and "case 9" in html


async def test_a_run_interrupted_and_run_again_counts_no_case_twice(client, uid, tmp_path):
    first, second = f"first-{uid}", f"second-{uid}"
    ran: Counter[str] = Counter()

    async def hand_on(ctx):
        ran[ctx.task_description] += 1
        return ctx.handoff(to_agent=second, task_description="finish", result_data={"step": 1})

    cases = load_cases(write_cases(tmp_path / "cases.jsonl", [
        {"name": f"case {i}", "to_agent": first, "task": f"case {i}", "expect": {"hops": [first, second]}}
        for i in range(6)]))
    settings = EvalSettings(run_id=f"interrupted-{uid}", concurrency=1, repeat=2)
    three = asyncio.Event()
    seen = []

    def on_run(score):
        seen.append(score)
        if len(seen) == 3:
            three.set()

    async with running(client, make_agent(first, hand_on), make_agent(second, completing())):
        interrupted = asyncio.create_task(Evaluation(client, cases, settings, on_run).run())
        await asyncio.wait_for(three.wait(), 30)
        interrupted.cancel()
        with pytest.raises(asyncio.CancelledError):
            await interrupted
        scores = await run_eval(client, cases, settings)
    assert len(scores) == 12 and len({s.chain_id for s in scores}) == 12
    assert sum(s.reused for s in scores) >= 3, "the runs of the first try were found, not run again"
    assert ran == {f"case {i}": 2 for i in range(6)}, "each (case, repeat) ran exactly once"
    assert summarize(scores).routing.value == 1.0 and all(s.passed for s in scores)


async def test_two_builds_of_an_llm_agent_side_by_side_and_the_current_build_set_back(
        client, cli_env, uid, tmp_path):
    lead, auditor, tester = f"triage-{uid}", f"auditor-{uid}", f"tester-{uid}"
    holding, held, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def test_it(ctx):
        if holding.is_set():
            held.set()
            await release.wait()
        return ctx.complete({"by": ctx.to_agent, "verdict": "ok"})

    async with ScriptedModel(lambda request, n: call(tool(auditor), task="audit it")) as right, \
            ScriptedModel(lambda request, n: call(tool(tester), task="test it")) as wrong:
        stop = asyncio.Event()
        builds = []
        for model, version in ((right, "right"), (wrong, "wrong")):  # the first version makes itself current
            builds.append(asyncio.create_task(run_agent(client, triage(lead, model.url, version), stop,
                                                        register=False, versioned=True)))
            for _ in range(100):  # gently: the server bounds the calls about one deployment
                routing = await routing_of(client, lead)
                if routing is not None and version in routing.versions and await routed_to(client, lead, "right"):
                    break
                await asyncio.sleep(0.3)
        assert await current_build_id(client, lead) == "right"
        path = write_cases(tmp_path / "cases.jsonl", routing_cases(lead, auditor, 6))
        try:
            async with running(client, make_agent(auditor, completing(), [AUDIT]),
                               make_agent(tester, test_it, [TESTS]), register=True):
                proc = await cli(cli_env, "eval", path, "--agent", lead, "--build-id", "right", "--against", "wrong",
                                 "--block-size", "3", "--concurrency", "3", "--json", timeout=120)
                assert proc.returncode == 0, proc.stderr
                assert await current_build_id(client, lead) == "right", "set back after the evaluation"

                # cancelled while a chain runs on the wrong build: the chain is cancelled and the build set back
                holding.set()
                cases = load_cases(path)
                settings = EvalSettings(run_id=f"cut-{uid}", agent=lead, builds=("wrong",), concurrency=1)
                cut = asyncio.create_task(run_eval(client, cases, settings))
                await asyncio.wait_for(held.wait(), 60)
                assert await current_build_id(client, lead) == "wrong"
                cut.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await cut
                assert await current_build_id(client, lead) == "right"
                first = chain_id_of(settings.run_id, "case 0", 0, "wrong")
                assert (await wait_chain(client, first)).status is ChainStatus.CANCELLED
                holding.clear()
                release.set()
                again = await run_eval(client, cases, settings)  # the cancelled chain runs again, under its id
                assert await current_build_id(client, lead) == "right"
        finally:
            stop.set()
            await asyncio.gather(*builds)
    report = json.loads(proc.stdout)
    assert report["builds"] == ["right", "wrong"] and report["restored_build"] == "right"
    assert report["summaries"]["right"]["routing"]["value"] == 1.0
    assert report["summaries"]["wrong"]["routing"]["value"] == 0.0
    assert report["summaries"]["wrong"]["confusion"] == {auditor: {tester: 6}}
    accuracy = next(d for d in report["comparison"] if d["measure"] == "routing accuracy")
    assert (accuracy["a"], accuracy["b"], accuracy["diff"], accuracy["low"], accuracy["high"], accuracy["cases"]) == \
        (1.0, 0.0, -1.0, -1.0, -1.0, 6)
    assert {(r["build"], r["case"]) for r in report["runs"]} == {(b, f"case {i}") for b in ("right", "wrong")
                                                                  for i in range(6)}
    assert len(right.requests) == 6 and len(wrong.requests) == 6 + 7, "each build's model answered its own runs"
    assert len(again) == 6 and all(s.build == "wrong" and s.scored and not s.passed for s in again)
    assert sum(s.reused for s in again) == 0, "the cancelled chain ran again; the others had not started"


async def test_recorded_chains_become_cases_that_pass_on_the_same_agents(client, cli_env, uid, tmp_path):
    first, second = f"prod-{uid}", f"next-{uid}"

    async def hand_on(ctx):
        return ctx.handoff(to_agent=second, task_description="finish", result_data={"step": 1})

    tasks = {"review PR 1", "review PR 2"}
    async with running(client, make_agent(first, hand_on), make_agent(second, completing())):
        from handoff import run_chain

        for task in sorted(tasks):
            done = await run_chain(client, to_agent=first, task_description=task, context_data={"pr": task[-1]},
                                   policy={"max_visits_per_agent": 1})
            assert done.status is ChainStatus.COMPLETED
        out = tmp_path / "prod.jsonl"
        for _ in range(50):  # visibility catches up with chains that just ended
            proc = await cli(cli_env, "eval", "--from-chains", "--agent", first, "--since", "1h", "--out", str(out))
            assert proc.returncode == 0, proc.stderr
            if len(out.read_text().splitlines()) == 2:
                break
            await asyncio.sleep(0.2)
        cases = load_cases(out)
        stdout = await cli(cli_env, "eval", "--from-chains", "--agent", first, "--since", "1h")
        assert [NamedCase.model_validate(c.model_dump()) for c in parse_cases(stdout.stdout)] == cases
        scores = await run_eval(client, cases, EvalSettings(run_id=f"prod-{uid}"))
    assert {c.case.task for c in cases} == tasks
    for named in cases:
        assert named.case.to_agent == first and named.case.context == {"pr": named.case.task[-1]}
        assert named.case.policy == {"max_visits_per_agent": 1}
        assert named.case.expect.hops == [first, second] and named.case.expect.status is ChainStatus.COMPLETED
        assert named.case.expect.result_keys == ["by", "verdict"]
    assert len(scores) == 2 and all(s.passed and s.trajectory for s in scores)


def test_a_case_keeps_its_fields_through_json():
    text = json.dumps({"name": "n", "capability": "TESTING", "task": "t", "context": {"a": [1]},
                       "policy": {"max_depth": 2}, "expect": {"hops": ["TESTING", "*", "..."],
                                                              "visits": {"agents": ["a", "b"], "ordered": True},
                                                              "max_duration_s": 3, "max_tokens": 10}})
    [named] = parse_cases(text)
    assert parse_cases(named.case.model_dump_json(exclude_none=True)) == [named]

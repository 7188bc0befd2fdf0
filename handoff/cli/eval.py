"""`handoff eval`: run a case file as real chains and score routing and trajectories from their
records, on the current routing or on two builds of an agent side by side; or, with
`--from-chains`, turn recorded chains into cases (docs/eval.md)."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

import typer
from pydantic import ValidationError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from handoff.cli.common import EXIT_USAGE, app, err_console, fail, one_line_errors, out, run, say
from handoff.client import connect
from handoff.client.search import parse_since
from handoff.eval import html
from handoff.eval.cases import Case, InvalidCases, NamedCase, load_cases, validation_line
from handoff.eval.production import cases_from_chains
from handoff.eval.report import EvalReport, build_report
from handoff.eval.runner import RUN_TIMEOUT_S, EvalSettings, Evaluation, default_run_id
from handoff.eval.scoring import Difference, Rate, RunScore, Summary
from handoff.observability.log import configure_logging

FROM_CHAINS_LIMIT = 100


@app.command("eval")
def evaluate(
    cases: str | None = typer.Argument(None, help="the case file: JSON Lines, one case a line"),
    agent: str | None = typer.Option(
        None, "--agent", help="with --build-id: the agent whose builds run the cases; with --from-chains: "
                              "the agent whose chains become cases"),
    build_id: str | None = typer.Option(None, "--build-id", help="run the cases on this build of --agent (A)"),
    against: str | None = typer.Option(None, "--against", help="and on this one (B), side by side with A"),
    repeat: int = typer.Option(1, "--repeat", min=1, max=100, help="run each case this many times"),
    concurrency: int = typer.Option(4, "--concurrency", min=1, max=64, help="chains running at once"),
    block_size: int = typer.Option(
        20, "--block-size", min=1, max=10_000, help="with builds: runs per block; each block runs on every build"),
    run_timeout: float = typer.Option(
        RUN_TIMEOUT_S, "--run-timeout", min=1, help="seconds a run's chain may take before it is left unscored"),
    run_id: str | None = typer.Option(
        None, "--run-id", help="the evaluation's id (default: from the case file, builds and repeats); "
                               "the same id finds the chains a run already recorded"),
    as_json: bool = typer.Option(False, "--json", help="only the report's JSON on stdout"),
    report: str | None = typer.Option(None, "--report", help="write report.json and report.html into DIR"),
    from_chains: bool = typer.Option(
        False, "--from-chains", help="print cases made from recorded chains that visited --agent"),
    since: str | None = typer.Option(None, "--since", help="with --from-chains: chains started within 7d/2h/... "
                                                           "or since an ISO time"),
    limit: int | None = typer.Option(
        None, "--limit", min=1, max=1000, help=f"with --from-chains: at most this many (default {FROM_CHAINS_LIMIT})"),
    out_file: str | None = typer.Option(None, "--out", help="with --from-chains: write the cases here, not stdout"),
) -> None:
    """Score routing and trajectories of a case file's chains, or make cases from recorded chains."""
    if from_chains:
        _refuse_with(from_chains=True, cases=cases, build_id=build_id, against=against, report=report,
                     run_id=run_id, as_json=as_json)
        if agent is None:
            fail("--from-chains needs --agent")
        _from_chains(agent, since, limit or FROM_CHAINS_LIMIT, out_file)
        return
    _refuse_with(from_chains=False, since=since, out=out_file, limit=limit)
    if cases is None:
        fail("give the case file (CASES.jsonl), or --from-chains --agent ID")
    if against is not None and build_id is None:
        fail("--against goes with --build-id")
    if build_id is not None and agent is None:
        fail("--build-id needs --agent, the agent it is a build of")
    if agent is not None and build_id is None:
        fail("--agent goes with --build-id (or with --from-chains)")
    named = _cases(Path(cases))
    builds = tuple(b for b in (build_id, against) if b is not None)
    try:
        settings = EvalSettings(
            run_id=run_id or default_run_id(Path(cases).read_bytes(), agent=agent, builds=builds, repeat=repeat),
            repeat=repeat, concurrency=concurrency, agent=agent, builds=builds, block_size=block_size,
            run_timeout_s=run_timeout)
    except ValidationError as err:
        fail(validation_line(err))
    if report is not None:
        with one_line_errors():
            html.check_extra()  # refused before anything runs
    result = _run(named, settings, cases)
    if as_json:
        print(result.model_dump_json(indent=2))
    else:
        _print(result, named)
    if report is not None:
        with one_line_errors():
            json_path, html_path = html.write_report(result, report)
        say(f"report: {html_path} ({json_path.name} beside it)")


_FLAGS = {"cases": "CASES", "build_id": "--build-id", "against": "--against", "report": "--report",
          "run_id": "--run-id", "as_json": "--json", "since": "--since", "out": "--out", "limit": "--limit"}


def _refuse_with(*, from_chains: bool, **given: object) -> None:
    """Refuse the options of the other mode."""
    wrong = [_FLAGS[name] for name, value in given.items() if value]
    if not wrong:
        return
    one = len(wrong) == 1
    if from_chains:
        fail(f"{', '.join(wrong)} {'does' if one else 'do'} not go with --from-chains")
    fail(f"{', '.join(wrong)} {'goes' if one else 'go'} with --from-chains")


def _cases(path: Path) -> list[NamedCase]:
    """The case file's cases; each bad case one line on stderr, exit 2."""
    try:
        return load_cases(path)
    except InvalidCases as err:
        for problem in [*err.problems, *([f"... and {err.more} more bad cases"] if err.more else [])]:
            say(f"error: {problem}")
        raise typer.Exit(EXIT_USAGE) from None


def _run(cases: list[NamedCase], settings: EvalSettings, source: str) -> EvalReport:
    configure_logging("console", level="WARNING", stream=sys.stderr)  # stdout is the report's

    async def go() -> EvalReport:
        client = await connect()
        started = datetime.now(timezone.utc)
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err_console, transient=not err_console.is_terminal)
        evaluation = Evaluation(client, cases, settings)
        with progress:
            task = progress.add_task(f"eval {settings.run_id}", total=evaluation.total)
            evaluation.on_run = lambda score: progress.advance(task)
            scores = await evaluation.run()
        return build_report(scores, settings, cases=[named.name for named in cases], started_at=started,
                            completed_at=datetime.now(timezone.utc), cases_file=source,
                            restored_build=evaluation.original_build if settings.builds else None)

    try:
        return run(go)
    except KeyboardInterrupt:
        say(f"interrupted: the same command (run id {settings.run_id}) goes on where this one stopped")
        raise typer.Exit(130) from None


def _from_chains(agent: str, since: str | None, limit: int, out_file: str | None) -> None:
    async def go():
        moment = parse_since(since) if since is not None else None
        return await cases_from_chains(await connect(), agent, since=moment, limit=limit)

    cases, left_out = run(go)
    for line in left_out:
        say(f"note: {line}")
    text = "".join(case.model_dump_json(exclude_none=True) + "\n" for case in cases)
    if out_file is None:
        sys.stdout.write(text)
        return
    try:
        Path(out_file).write_text(text, encoding="utf-8")
    except OSError as err:
        fail(f"cannot write {out_file}: {err.strerror}")
    say(f"{len(cases)} cases from chains that visited {agent} written to {out_file}")


# -- tables ---------------------------------------------------------------------------------------


def _rate(rate: Rate) -> str:
    if rate.value is None:
        return "-"
    return f"{100 * rate.value:.1f} % ({rate.hits}/{rate.total})"


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


SCORES = [("routing accuracy", "routing"), ("trajectory match", "trajectory"), ("status match", "status"),
          ("result keys", "result_keys"), ("within duration", "duration"), ("within tokens", "tokens_within"),
          ("cases passed", "passed")]


def scores_table(result: EvalReport) -> Table:
    table = Table(title=f"eval {result.run_id}: {result.cases} cases x {result.repeat}", title_justify="left")
    table.add_column("measure")
    for arm in result.arms:
        table.add_column(arm, justify="right")
    summaries: list[Summary] = [result.summaries[arm] for arm in result.arms]
    for label, key in SCORES:
        table.add_row(label, *(_rate(getattr(s, key)) for s in summaries))
    table.add_row("invalid choices", *(str(s.invalid_choices) for s in summaries))
    table.add_row("refused choices", *(str(s.refused_choices) for s in summaries))
    table.add_row("tokens per run", *(_number(s.tokens.mean) for s in summaries))
    table.add_row("latency p50 ms", *(_number(s.latency_ms.p50) for s in summaries))
    table.add_row("runs (not scored)", *(f"{s.runs} ({s.unscored})" for s in summaries))
    return table


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def comparison_table(result: EvalReport) -> Table:
    a, b = result.builds
    table = Table(title=f"{b} (B) against {a} (A): B - A, 95 % interval over cases", title_justify="left")
    for column, justify in (("measure", "left"), ("A", "right"), ("B", "right"), ("B - A", "right"),
                            ("95 % interval", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for d in result.comparison:
        table.add_row(d.measure, _number(d.a, 3), _number(d.b, 3), _signed(d.diff), _interval(d))
    return table


def _interval(d: Difference) -> str:
    return "-" if d.low is None or d.high is None else f"{d.low:+.3f} .. {d.high:+.3f}"


def routing_table(result: EvalReport) -> Table:
    table = Table(title="routing accuracy, by hop and by who chose", title_justify="left")
    table.add_column("by")
    for arm in result.arms:
        table.add_column(arm, justify="right")
    summaries = [result.summaries[arm] for arm in result.arms]
    for position in sorted({p for s in summaries for p in s.by_position}):
        table.add_row(f"hop {position}", *(_rate(s.by_position[position]) if position in s.by_position else "-"
                                           for s in summaries))
    for agent in sorted({a for s in summaries for a in s.by_agent}):
        table.add_row(agent, *(_rate(s.by_agent[agent]) if agent in s.by_agent else "-" for s in summaries))
    return table


def confusion_table(arm: str, confusion: dict[str, dict[str, int]]) -> Table:
    chosen = sorted({c for row in confusion.values() for c in row}, key=lambda c: (c not in confusion, c))
    table = Table(title=f"confusion matrix, {arm}: expected (rows) against chosen", title_justify="left")
    table.add_column("expected")
    for column in chosen:
        table.add_column(column, justify="right")
    for expected, row in confusion.items():
        table.add_row(expected, *(str(row.get(c, "")) for c in chosen))
    return table


def runs_table(result: EvalReport) -> Table:
    """One row per run: how it ended and which checks held."""
    builds, repeats = bool(result.builds), result.repeat > 1
    table = Table(title="runs", title_justify="left")
    table.add_column("case")
    if builds:
        table.add_column("build")
    if repeats:
        table.add_column("#", justify="right")
    for column in ("status", "routing", "pass", "tokens", "ms"):
        table.add_column(column, justify="left" if column == "status" else "right")
    for r in result.runs:
        where = [r.build or ""] * builds + [str(r.repeat)] * repeats
        if r.problem:
            table.add_row(r.case, *where, "[red]not scored[/red]", "", "", "", "")
            continue
        right = sum(c.correct for c in r.choices)
        table.add_row(r.case, *where, r.status.value if r.status else "",
                      f"{right}/{len(r.choices)}" if r.choices else "-", "yes" if r.passed else "[red]no[/red]",
                      str(r.tokens), _number(r.duration_ms))
    return table


def misses(run: RunScore, case: Case | None) -> str:
    """One line: what a run that did not pass did instead of what its case expects."""
    where = run.case + (f" [{run.build}]" if run.build else "") + (f" #{run.repeat}" if run.repeat else "")
    if run.problem:
        return f"{where}: not scored: {run.problem}"
    expect = case.expect if case is not None else None
    said = [f"path {' > '.join(run.path) or '(none)'}"]
    said += [f"hop {c.position} went to {c.chosen}, not {c.expected}" for c in run.choices if not c.correct]
    if run.trajectory is False and all(c.correct for c in run.choices):
        said.append("the trajectory differs" + (f" (expected {' > '.join(expect.hops)})" if expect and expect.hops
                                                else ""))
    if run.status_ok is False:
        said.append(f"status {run.status.value if run.status else '?'}"
                    + (f", not {expect.status.value}" if expect and expect.status else ""))
    if run.result_keys_ok is False:
        said.append("the final result lacks keys" + (f" of {', '.join(expect.result_keys)}"
                                                      if expect and expect.result_keys else ""))
    if run.duration_ok is False:
        said.append(f"took {_number(run.duration_ms)} ms" + (f", over {expect.max_duration_s:g} s"
                                                            if expect and expect.max_duration_s else ""))
    if run.tokens_ok is False:
        said.append(f"used {run.tokens} tokens" + (f", over {expect.max_tokens}" if expect and expect.max_tokens
                                                   else ""))
    return f"{where}: " + "; ".join(said)


def _print(result: EvalReport, cases: list[NamedCase]) -> None:
    out.print(scores_table(result))
    if result.comparison:
        out.print(comparison_table(result))
    if any(s.by_position for s in result.summaries.values()):
        out.print(routing_table(result))
        for arm, summary in result.summaries.items():
            if summary.confusion:
                out.print(confusion_table(arm, summary.confusion))
    out.print(runs_table(result))
    by_name = {named.name: named.case for named in cases}
    for score in result.runs:
        if not score.passed:
            out.print(misses(score, by_name.get(score.case)), markup=False, highlight=False, soft_wrap=True)


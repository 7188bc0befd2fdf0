"""`report.json` and a self-contained `report.html` of an evaluation: a jinja2 template, and the
confusion matrices and per-case rows drawn by matplotlib as inline PNG pictures. Both libraries
come with the `eval` extra (`pip install 'handoff[eval]'`)."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from handoff.errors import InvalidRequest
from handoff.eval.report import EvalReport, arm_of
from handoff.eval.scoring import RunScore

MAX_CASES_DRAWN = 150
"""The per-case picture draws at most this many cases (the table below it lists every run)."""
CHECKS = [("routing", None), ("trajectory", "trajectory"), ("status", "status_ok"),
          ("result keys", "result_keys_ok"), ("duration", "duration_ok"), ("tokens", "tokens_ok"),
          ("passed", "passed")]
"""The columns of the per-case picture: each the share of a case's runs where the check held."""


class ReportUnavailable(InvalidRequest):
    """The HTML report needs the eval extra."""


def check_extra() -> None:
    """Raise `ReportUnavailable` unless the HTML report can be drawn here."""
    _imports()


def _imports() -> tuple[Any, Any]:
    try:
        import jinja2
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportUnavailable("the HTML report needs jinja2 and matplotlib: pip install 'handoff[eval]'") from None
    return jinja2, Figure


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def confusion_png(confusion: dict[str, dict[str, int]], title: str) -> str | None:
    """The confusion matrix (expected target by row, chosen target by column) as a base64 PNG;
    None when no choice was scored."""
    if not confusion:
        return None
    _, Figure = _imports()
    expected = list(confusion)
    chosen = sorted({c for row in confusion.values() for c in row}, key=lambda c: (c not in expected, c))
    counts = [[confusion[e].get(c, 0) for c in chosen] for e in expected]
    figure = Figure(figsize=(1.6 + 0.9 * len(chosen), 1.2 + 0.55 * len(expected)))
    axes = figure.subplots()
    image = axes.imshow(counts, cmap="Blues", aspect="auto", vmin=0)
    axes.set_xticks(range(len(chosen)), chosen, rotation=35, ha="right")
    axes.set_yticks(range(len(expected)), expected)
    axes.set_xlabel("chosen")
    axes.set_ylabel("expected")
    axes.set_title(title)
    top = max(max(row) for row in counts) or 1
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            if count:
                axes.text(j, i, str(count), ha="center", va="center",
                          color="white" if count > top / 2 else "black", fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.05)
    return _png(figure)


def _share(runs: list[RunScore], check: str | None) -> float:
    """The share of `runs` where `check` held (routing: right choices of all); -1 when not asked."""
    if check is None:
        total = sum(len(r.choices) for r in runs)
        return sum(c.correct for r in runs for c in r.choices) / total if total else -1.0
    values = [getattr(r, check) for r in runs if getattr(r, check) is not None]
    return sum(values) / len(values) if values else -1.0


def cases_png(report: EvalReport) -> str | None:
    """One row per case: the share of its runs where each check held, per build, and its mean
    latency and tokens; a base64 PNG (None with no scored run)."""
    scored = [r for r in report.runs if r.scored]
    if not scored:
        return None
    _, Figure = _imports()
    names = list(dict.fromkeys(r.case for r in scored))[:MAX_CASES_DRAWN]
    arms = report.arms
    columns = [f"{label} [{arm}]" if len(arms) > 1 else label for arm in arms for label, _ in CHECKS]
    grid, latency, tokens = [], {arm: [] for arm in arms}, {arm: [] for arm in arms}
    for name in names:
        row = []
        for arm in arms:
            runs = [r for r in scored if r.case == name and arm_of(r) == arm]
            row += [_share(runs, check) if runs else -1.0 for _, check in CHECKS]
            durations = [r.duration_ms for r in runs if r.duration_ms is not None]
            latency[arm].append(sum(durations) / len(durations) if durations else 0.0)
            tokens[arm].append(sum(r.tokens for r in runs) / len(runs) if runs else 0.0)
        grid.append(row)
    height = 1.5 + 0.28 * len(names)
    figure = Figure(figsize=(4 + 0.5 * len(columns) + 6, height))
    checks, times, used = figure.subplots(1, 3, gridspec_kw={"width_ratios": [len(columns), 4, 4]}, sharey=True)
    masked = [[value if value >= 0 else float("nan") for value in row] for row in grid]
    checks.imshow(masked, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    checks.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    checks.set_yticks(range(len(names)), [n[:40] for n in names], fontsize=8)
    checks.set_title("share of runs where it held (blank: not asked)", fontsize=9)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if 0 < value < 1:
                checks.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=7)
    width = 0.8 / len(arms)
    for index, arm in enumerate(arms):
        offsets = [i - 0.4 + width * (index + 0.5) for i in range(len(names))]
        times.barh(offsets, latency[arm], height=width, label=arm)
        used.barh(offsets, tokens[arm], height=width, label=arm)
    times.set_title("latency, ms (mean)", fontsize=9)
    used.set_title("tokens (mean)", fontsize=9)
    if len(arms) > 1:
        used.legend(fontsize=8)
    checks.set_ylim(len(names) - 0.5, -0.5)
    return _png(figure)


def render_html(report: EvalReport) -> str:
    """The report as one self-contained HTML page (no file or network it needs)."""
    jinja2, _ = _imports()
    environment = jinja2.Environment(loader=jinja2.PackageLoader("handoff.eval", "templates"),
                                     autoescape=jinja2.select_autoescape(["html", "j2"]),
                                     undefined=jinja2.StrictUndefined)
    confusion = {arm: confusion_png(summary.confusion, f"routing: {arm}")
                 for arm, summary in report.summaries.items()}
    return environment.get_template("report.html.j2").render(
        report=report, confusion=confusion, cases_picture=cases_png(report),
        drawn=min(MAX_CASES_DRAWN, len({r.case for r in report.runs})))


def write_report(report: EvalReport, directory: Path | str) -> tuple[Path, Path]:
    """Write `report.json` and `report.html` into `directory` (made if missing); their paths."""
    directory = Path(directory)
    html = render_html(report)  # first: a missing extra leaves no half-written report
    try:
        directory.mkdir(parents=True, exist_ok=True)
        json_path, html_path = directory / "report.json", directory / "report.html"
        json_path.write_text(report.model_dump_json(indent=2), encoding="utf-8")
        html_path.write_text(html, encoding="utf-8")
    except OSError as err:
        raise InvalidRequest(f"cannot write the report to {directory}: {err.strerror}") from None
    return json_path, html_path

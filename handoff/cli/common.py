"""What every command of the `handoff` CLI shares: the Typer app, its consoles, the options several
commands take, and how errors become one line on stderr and an exit code (0 ok; 1 the chain ended
unsuccessfully, the server cannot be reached or refused a call, or a wait timed out; 2 bad input,
nothing started)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from temporalio.service import RPCError

try:
    import uvloop
except ImportError:  # not on Windows
    uvloop = None

from handoff.cli.render import chain_table
from handoff.errors import HandoffError, ServerUnreachable
from handoff.models import ChainRecord, ChainStatus
from handoff.observability.telemetry import DEFAULT_METRICS_HOST

T = TypeVar("T")

app = typer.Typer(
    name="handoff",
    help="Peer-to-peer agent handoff chains as durable Temporal workflows.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console()
err_console = Console(stderr=True)

EXIT_FAILED = 1
EXIT_USAGE = 2


class Usage(HandoffError):
    """Bad command-line input."""


class ChainStillRunning(HandoffError):
    """`--wait-timeout` passed with the chain still running."""


EXIT_CODES: dict[type[HandoffError], int] = {ServerUnreachable: EXIT_FAILED, ChainStillRunning: EXIT_FAILED}
"""The exit code of each error the CLI may meet that is not bad input (2)."""


def exit_code_of(err: HandoffError) -> int:
    return next((EXIT_CODES[cls] for cls in type(err).__mro__ if cls in EXIT_CODES), EXIT_USAGE)


LogFormatOption = typer.Option("json", "--log-format", help="json (one object per line) or console")
MetricsPortOption = typer.Option(
    None, "--metrics-port", min=1, max=65535,
    help="serve Prometheus metrics (temporal_*, handoff_*) on http://HOST:PORT/metrics")
MetricsHostOption = typer.Option(
    DEFAULT_METRICS_HOST, "--metrics-host", help="address for --metrics-port (0.0.0.0: all interfaces)")
OtelOption = typer.Option(
    False, "--otel",
    help="OpenTelemetry tracing, one trace per chain (otel extra): OTLP if "
         "OTEL_EXPORTER_OTLP_ENDPOINT is set, else stderr")
CodecEndpointOption = typer.Option(
    None, "--codec-endpoint",
    help="codec server the Web UI decodes payloads with (e.g. http://localhost:8081, "
         "from `handoff codec-server`); the browser must reach it")


def say(message: str) -> None:
    """A line on stderr, as it is (no markup)."""
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    say(f"error: {message}")
    raise typer.Exit(code)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """The errors handoff raises on purpose become one line on stderr and their exit code, and
    so does a call the Temporal server refused or could not answer (exit 1: a namespace that is
    not there, a server gone mid-wait); anything else is a bug, with its traceback."""
    try:
        yield
    except HandoffError as err:
        fail(str(err), exit_code_of(err))
    except RPCError as err:
        fail(f"the Temporal server answered {err.status.name}: {' '.join(err.message.split())[:300]}", EXIT_FAILED)


def run_loop(coro: Awaitable[T]) -> T:
    """`asyncio.run` on uvloop where there is one: a worker's event loop wakes for every task it
    polls and every result it reports, and uvloop's wake-ups cost less (docs/figures.md)."""
    return uvloop.run(coro) if uvloop is not None else asyncio.run(coro)  # type: ignore[arg-type]


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine, its errors as `one_line_errors` says."""
    with one_line_errors():
        return run_loop(coro_fn())


def json_object_arg(value: str | None, option: str = "--context") -> dict[str, Any]:
    """A JSON object given on the command line, or `@file` holding one; `Usage` saying what is
    wrong with it."""
    if value is None:
        return {}
    text = value
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise Usage(f"cannot read {option} file {path}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise Usage(f"{option} file {path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise Usage(f"{option} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise Usage(f"{option} nests lists or objects too deeply to read") from None
    if not isinstance(data, dict):
        raise Usage(f"{option} must be a JSON object, got {type(data).__name__}")
    return data


def print_record(record: ChainRecord, as_json: bool) -> None:
    if as_json:
        print(record.model_dump_json(indent=2))
    else:
        out.print(chain_table(record))


def exit_for(record: ChainRecord) -> None:
    if record.status.ended and record.status is not ChainStatus.COMPLETED:
        raise typer.Exit(EXIT_FAILED)

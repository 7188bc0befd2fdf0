"""Structured logging: JSON lines for machines by default, colour for people on request.

Workflow code keeps Temporal's replay-safe `workflow.logger` (a stdlib logger); the stdlib
records are rendered through the same structlog processors, so every line has one shape.
structlog's own lines (the hop activity's, on every hop) skip the stdlib machinery and are
written straight to the stream, which costs less per line (docs/figures.md).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Literal, TextIO

import orjson
import structlog
from temporalio import workflow
from temporalio.exceptions import ApplicationError

from handoff.constants import INVALID_RESULT_ERROR, PERMANENT_ERROR, RESULT_TOO_LARGE_ERROR

LogFormat = Literal["json", "console"]

log = structlog.get_logger("handoff")


def _dumps(value: object, **kw) -> str:
    """A log line's JSON by orjson (every hop writes two lines, so their cost is the hop's);
    what orjson refuses (an integer past 64 bits) by `json.dumps`."""
    try:
        return orjson.dumps(value, default=kw.get("default"), option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(value, **kw)


def _flatten_temporal_extra(_, __, event_dict: dict) -> dict:
    """Lift the ids that Temporal's workflow/activity loggers attach onto the top level."""
    record = event_dict.get("_record")
    if record is not None:
        for key in ("chain_id", "handoff_id", "hop", "from_agent", "to_agent", "status", "reason"):
            value = getattr(record, key, None)
            if value is not None:
                event_dict.setdefault(key, value)
        details = getattr(record, "temporal_workflow", None)
        if isinstance(details, dict):
            event_dict.setdefault("workflow_id", details.get("workflow_id"))
            event_dict.setdefault("run_id", details.get("run_id"))
    return event_dict


class _NamedWriteLogger(structlog.WriteLogger):
    """A `WriteLogger` with the name it was got by, for the `logger` field."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class ExpectedHopFailures(logging.Filter):
    """The SDK logs every failed activity attempt with its traceback ("Completing activity as
    failed"). A hop that failed on purpose (the handler raised `PermanentError`, or returned what
    cannot be a result) is no bug: handoff's own `hop_failed` line says it in one line, and the
    SDK's record, traceback included, is kept for DEBUG only."""

    EXPECTED = frozenset({PERMANENT_ERROR, INVALID_RESULT_ERROR, RESULT_TOO_LARGE_ERROR})

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ApplicationError) and error.type in self.EXPECTED:
            if not logging.getLogger().isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def configure_logging(fmt: LogFormat = "json", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to `stream` (stdout) in one format. Safe to call again."""
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer(serializer=_dumps)
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    out = stream or sys.stdout
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        logger_factory=lambda *args: _NamedWriteLogger(out, args[0] if args else "handoff"),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _flatten_temporal_extra],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    # The renderer carries the workflow's details as fields; keep the message itself clean.
    workflow.logger.workflow_info_on_message = False
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(ExpectedHopFailures())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

"""What operators watch: a Prometheus endpoint and, with the `otel` extra, OpenTelemetry traces.

Metrics: one `Runtime` per process serves `/metrics` with the SDK's own metrics (`temporal_*`)
and handoff's (`handoff_*`, recorded through the workflow and activity metric meters). Pass it
to `connect(runtime=...)`; every worker built from that client reports through it.

Tracing: `connect(tracing=True)` attaches Temporal's `TracingInterceptor` to the client, and so
to every worker created from it; a chain started by such a client is one trace: its start, the
workflow run, and each hop's activity. Spans go to the global OpenTelemetry tracer provider;
`start_tracing()` installs one that exports them (OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is
set, else the console on stderr, so JSON logs on stdout stay one object per line).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from handoff.errors import HandoffError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from temporalio.contrib.opentelemetry import TracingInterceptor

DEFAULT_METRICS_HOST = "127.0.0.1"
SERVICE_NAME = "handoff"
OTEL_EXTRA_HINT = "install the otel extra: pip install 'handoff[otel]'"


class TelemetryUnavailable(HandoffError):
    """Telemetry that was asked for cannot be set up (missing extra, port in use, ...)."""


@dataclass(frozen=True)
class Telemetry:
    """One process's telemetry, set up once at the edge (the CLI): connect with
    `connect(runtime=t.runtime, tracing=t.tracing)` and call `flush()` before exiting."""

    runtime: Runtime | None = None
    metrics_url: str | None = None
    tracer_provider: TracerProvider | None = None

    @classmethod
    def start(
        cls, *, metrics_port: int | None = None, metrics_host: str = DEFAULT_METRICS_HOST,
        tracing: bool = False,
    ) -> Telemetry:
        """Raises `TelemetryUnavailable` (one line) when what was asked for cannot be had."""
        provider = start_tracing() if tracing else None
        if metrics_port is None:
            return cls(tracer_provider=provider)
        bind = _bind_address(metrics_host, metrics_port)
        return cls(metrics_runtime(bind), f"http://{bind}/metrics", provider)

    @property
    def tracing(self) -> bool:
        return self.tracer_provider is not None

    def flush(self) -> None:
        """Export the spans still buffered (the CLI ends with `os._exit`, which skips atexit)."""
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()


DURATION_METRICS = ("handoff_hop_duration", "handoff_handler_duration")
DURATION_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 30000, 60000)
"""Buckets (milliseconds) that tell a 15 ms hop from a 40 ms one, up to the 60 s hop timeout (the
SDK's default buckets start at 50)."""


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def metrics_runtime(bind: str) -> Runtime:
    """A runtime serving Prometheus metrics on http://BIND/metrics (BIND is HOST:PORT).
    Create one per process and pass it to `connect(runtime=...)`."""
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=PrometheusConfig(
            bind_address=bind, histogram_bucket_overrides=dict.fromkeys(DURATION_METRICS, DURATION_BUCKETS_MS))))
    except Exception as err:  # the core reports a bad or busy address as a plain runtime error
        raise TelemetryUnavailable(f"cannot serve metrics on {bind}: {err}") from None


def tracing_interceptor() -> TracingInterceptor:
    """Temporal's tracing interceptor. A chain started by a traced client (`connect(tracing=True)`)
    is one trace: the start span, the workflow run, each hop's schedule and run. A chain started
    without tracing (e.g. by `handoff start`) has no workflow spans; each hop's run is then a
    trace of its own, tagged with the chain id (`temporalWorkflowID`)."""
    try:
        from temporalio.contrib.opentelemetry import TracingInterceptor
    except ImportError:
        raise TelemetryUnavailable(f"tracing needs OpenTelemetry: {OTEL_EXTRA_HINT}") from None
    return TracingInterceptor()


def start_tracing(service_name: str = SERVICE_NAME) -> TracerProvider:
    """Install (once) a global tracer provider that exports spans, and return it. A provider
    the application already installed is kept as it is."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise TelemetryUnavailable(f"tracing needs OpenTelemetry: {OTEL_EXTRA_HINT}") from None
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    provider = TracerProvider(
        resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    )
    provider.add_span_processor(BatchSpanProcessor(span_exporter()))
    trace.set_tracer_provider(provider)
    return provider


def span_exporter() -> SpanExporter:
    """OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, else the console (stderr). The OTLP exporter
    reads its endpoint, headers and protocol (`grpc`, the default, or `http/protobuf`) from the
    standard OTEL_* variables."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr)
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                              os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"))
    try:
        if protocol.startswith("http"):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter,
            )
    except ImportError:
        raise TelemetryUnavailable(
            f"OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter ({protocol}) is not "
            "installed: pip install opentelemetry-exporter-otlp"
        ) from None
    return OTLPSpanExporter()

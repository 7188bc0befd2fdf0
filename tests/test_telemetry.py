"""Operator telemetry (handoff.observability.telemetry): Prometheus metrics from a worker's runtime and
OpenTelemetry traces, one per chain, against the session's real server.

Chains here run on this file's own chain worker, on a private task queue: the session's chain
worker polls `handoff.chains` with another runtime and no tracing, so a chain it picked up would
leave nothing to observe.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client

from handoff import ChainRecord, ChainStatus, PermanentError
from handoff.client import build_request, connect, wait_chain
from handoff.constants import CHAIN_WORKFLOW
from handoff.servers.embedded import free_port
from handoff.observability.telemetry import DURATION_BUCKETS_MS, Telemetry, TelemetryUnavailable, span_exporter
from handoff.workers.chain_worker import chain_worker
from tests.support import HANDOFF, ROOT, assert_usage_error, cli, make_agent, running

Sample = tuple[dict[str, str], float]
SAMPLE_RE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@asynccontextmanager
async def own_chain_worker(client: Client, uid: str) -> AsyncIterator[str]:
    """The real chain worker, built from `client`, on a private queue; yields the queue."""
    queue = f"chains-{uid}"
    async with chain_worker(client, task_queue=queue):
        yield queue


async def run_on(client: Client, queue: str, **request: Any) -> ChainRecord:
    """`run_chain`, but on `queue` instead of `handoff.chains`."""
    built = build_request(**request)
    await client.start_workflow(
        CHAIN_WORKFLOW, built, id=str(built.chain_id), task_queue=queue, result_type=ChainRecord
    )
    return await wait_chain(client, built.chain_id)  # an unsuccessful chain fails its workflow


# -- metrics -----------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, list[Sample]]:
    """Prometheus text format -> {metric name: [(labels, value)]}."""
    metrics: dict[str, list[Sample]] = {}
    for line in text.splitlines():
        match = SAMPLE_RE.match(line)
        if match and not line.startswith("#"):
            labels = dict(LABEL_RE.findall(match["labels"] or ""))
            metrics.setdefault(match["name"], []).append((labels, float(match["value"])))
    return metrics


def help_of(url: str, name: str) -> str:
    """The HELP line of metric `name`."""
    return next((line for line in fetch(url).splitlines() if line.startswith(f"# HELP {name} ")), "")


def value(metrics: dict[str, list[Sample]], name: str, **labels: str) -> float | None:
    """The one sample of `name` whose labels include `labels` (None if there is none)."""
    found = [v for have, v in metrics.get(name, []) if labels.items() <= have.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.read().decode()


async def scrape_until(
    url: str, ready: Callable[[dict[str, list[Sample]]], bool], timeout_s: float = 15.0
) -> dict[str, list[Sample]]:
    """Scrape `url` (off the event loop) until `ready` holds; bounded."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            metrics = parse_metrics(await asyncio.to_thread(fetch, url))
            if ready(metrics):
                return metrics
        except (urllib.error.URLError, ConnectionError):
            metrics = {}
        assert asyncio.get_running_loop().time() < deadline, f"{url}: not ready, saw {sorted(metrics)}"
        await asyncio.sleep(0.2)


async def test_worker_metrics_count_hops_fallbacks_and_refusals(address, uid):
    telemetry = Telemetry.start(metrics_port=free_port())
    assert telemetry.metrics_url and telemetry.runtime is not None
    client = await connect(address=address, runtime=telemetry.runtime)
    bad, spare, extra = f"bad-{uid}", f"spare-{uid}", f"extra-{uid}"

    async def broken(ctx):
        raise PermanentError("cannot do it")

    async def to_extra(ctx):
        return ctx.handoff(to_agent=extra, task_description="more", result_data={"by": spare})

    async def back_to_spare(ctx):
        return ctx.handoff(to_agent=spare, task_description="even more", result_data={"by": extra})

    agents = [make_agent(bad, broken), make_agent(spare, to_extra), make_agent(extra, back_to_spare)]
    async with own_chain_worker(client, uid) as queue, running(client, *agents):
        record = await run_on(client, queue, to_agent=bad, task_description="t", max_depth=2,
                              policy={"fallback_agent": spare})
    assert record.status is ChainStatus.DEPTH_EXCEEDED
    assert [(h.to_agent, h.status.value) for h in record.hops] == [
        (bad, "failed"), (spare, "completed"), (extra, "completed"), (spare, "refused")]

    m = await scrape_until(telemetry.metrics_url, lambda m: "handoff_chains" in m)
    chain = {"task_queue": queue, "workflow_type": "HandoffChain", "namespace": "default"}
    # the workflow's metrics (counters carry no `_total` suffix)
    assert value(m, "handoff_hops", from_agent="starter", to_agent=bad, outcome="failed", **chain) == 1
    assert value(m, "handoff_hops", from_agent="starter", to_agent=spare, outcome="completed", **chain) == 1
    assert value(m, "handoff_hops", from_agent=spare, to_agent=extra, outcome="completed", **chain) == 1
    assert value(m, "handoff_fallbacks", failed_agent=bad, to_agent=spare, **chain) == 1
    assert value(m, "handoff_refusals", reason="depth_exceeded", **chain) == 1
    assert value(m, "handoff_chains", status="depth_exceeded", **chain) == 1
    hop = {"from_agent": "starter", "to_agent": spare, "outcome": "completed", **chain}
    buckets = [labels["le"] for labels, _ in m["handoff_hop_duration_bucket"]
               if hop.items() <= labels.items()]
    assert buckets[-1] == "+Inf" and len(buckets) > 1
    # buckets that resolve hops of milliseconds, up to the 60 s hop timeout
    assert [float(b) for b in buckets[:-1]] == list(DURATION_BUCKETS_MS)
    handler_buckets = [labels["le"] for labels, _ in m["handoff_handler_duration_bucket"] if labels.get("agent") == spare]
    assert [float(b) for b in handler_buckets[:-1]] == list(DURATION_BUCKETS_MS)
    for name in ("handoff_hop_duration", "handoff_handler_duration"):
        assert "milliseconds" in await asyncio.to_thread(help_of, telemetry.metrics_url, name)
    assert value(m, "handoff_hop_duration_bucket", le="+Inf", **hop) == 1
    assert value(m, "handoff_hop_duration_count", **hop) == 1
    assert value(m, "handoff_hop_duration_sum", **hop) > 0
    # the hop activity's view, one point per handler run, on the agent's queue
    for agent, outcome in ((bad, "failed"), (spare, "handed_off"), (extra, "handed_off")):
        assert value(m, "handoff_handler_duration_count", agent=agent, outcome=outcome,
                     task_queue=f"agent.{agent}", activity_type="handoff.hop") == 1
    # and the SDK's own
    assert value(m, "temporal_activity_execution_latency_count", task_queue=f"agent.{spare}",
                 activity_type="handoff.hop", workflow_type="HandoffChain") == 1
    # a chain that ended unsuccessfully is a failed workflow for the SDK's metrics too
    assert value(m, "temporal_workflow_failed", task_queue=queue, workflow_type="HandoffChain") == 1
    assert not value(m, "temporal_workflow_completed", task_queue=queue, workflow_type="HandoffChain")


# -- tracing -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    """Finished spans of this process; the global tracer provider can be set only once."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def spans_of(exporter: InMemorySpanExporter, chain_id: object) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans()
            if (s.attributes or {}).get("temporalWorkflowID") == str(chain_id)]


async def test_each_chain_is_one_trace_from_start_through_every_hop(spans, client, address, uid):
    telemetry = Telemetry.start(tracing=True)
    assert telemetry.tracer_provider is trace.get_tracer_provider(), "the installed provider is kept"
    traced = await connect(address=address, tracing=telemetry.tracing)
    first, second = f"first-{uid}", f"second-{uid}"

    async def hand_on(ctx):
        return ctx.handoff(to_agent=second, task_description="next")

    async def finish(ctx):
        return ctx.complete({"done": True})

    async with own_chain_worker(traced, uid) as queue, \
            running(traced, make_agent(first, hand_on), make_agent(second, finish)):
        record = await run_on(traced, queue, to_agent=first, task_description="traced start")
        # started by a client without tracing, like `handoff start`
        untraced = await run_on(client, queue, to_agent=first, task_description="untraced start")
    assert record.status is ChainStatus.COMPLETED and untraced.status is ChainStatus.COMPLETED
    telemetry.flush()

    chain = spans_of(spans, record.chain_id)
    assert sorted(s.name for s in chain) == [
        "CompleteWorkflow:HandoffChain", "RunActivity:handoff.hop", "RunActivity:handoff.hop",
        "RunWorkflow:HandoffChain", "StartActivity:handoff.hop", "StartActivity:handoff.hop",
        "StartWorkflow:HandoffChain",
    ]
    assert len({s.context.trace_id for s in chain}) == 1
    roots = [s.name for s in chain if s.parent is None]
    assert roots == ["StartWorkflow:HandoffChain"]
    by_id = {s.context.span_id: s for s in chain}
    for run in (s for s in chain if s.name == "RunActivity:handoff.hop"):
        assert by_id[run.parent.span_id].name == "StartActivity:handoff.hop"

    # without a start span there are no workflow spans; each hop's run is still traced
    other = spans_of(spans, untraced.chain_id)
    assert [s.name for s in other] == ["RunActivity:handoff.hop", "RunActivity:handoff.hop"]


@pytest.mark.parametrize("protocol, module", [
    ("grpc", "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"),
    ("http/protobuf", "opentelemetry.exporter.otlp.proto.http.trace_exporter"),
])
def test_an_otlp_endpoint_without_the_exporter_is_a_clear_error(monkeypatch, protocol, module):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(TelemetryUnavailable, match=r"pip install opentelemetry-exporter-otlp"):
        span_exporter()


def test_without_an_otlp_endpoint_spans_go_to_stderr(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert isinstance(span_exporter(), ConsoleSpanExporter)


async def test_connect_with_tracing_but_without_the_extra_is_a_clear_error(monkeypatch, address):
    monkeypatch.setitem(sys.modules, "temporalio.contrib.opentelemetry", None)
    with pytest.raises(TelemetryUnavailable, match=r"pip install 'handoff\[otel\]'"):
        await connect(address=address, tracing=True)


# -- the command line --------------------------------------------------------------------


async def test_worker_serves_metrics_until_sigterm(cli_env):
    port = free_port()
    proc = subprocess.Popen(
        [HANDOFF, "worker", "--chains", "--metrics-port", str(port)],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        metrics = await scrape_until(f"http://127.0.0.1:{port}/metrics",
                                     lambda m: "temporal_num_pollers" in m)
        assert value(metrics, "temporal_num_pollers", task_queue="handoff.chains",
                     poller_type="workflow_task") is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.to_thread(proc.communicate, timeout=20)
    assert proc.returncode == 0, stderr[-2000:]
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert {"event": "metrics_serving", "url": f"http://127.0.0.1:{port}/metrics"}.items() <= \
        next(e for e in events if e["event"] == "metrics_serving").items()


async def test_dev_exports_spans_and_announces_metrics():
    """`handoff dev --otel` without an OTLP endpoint prints the demo chain's spans on stderr."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = await asyncio.to_thread(
        subprocess.run,
        [HANDOFF, "dev", "--port", str(free_port()), "--ui-port", str(free_port()), "--db", "",
         "--a2a-port", str(free_port()), "--mcp-port", str(free_port()), "--console-port", str(free_port()),
         "--demo", str(ROOT / "examples" / "samples" / "inventory_service.py"), "--exit-after-demo", "--approve",
         "--metrics-port", str(port), "--otel"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Prometheus metrics: http://127.0.0.1:{port}/metrics" in result.stdout
    names = re.findall(r'"name": "([^"]+)"', result.stderr)
    for name in ("StartWorkflow:HandoffChain", "RunWorkflow:HandoffChain", "RunActivity:handoff.hop"):
        assert name in names, names


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def without_opentelemetry(tmp_path: Path, cli_env: dict[str, str]) -> dict[str, str]:
    """A `handoff` environment in which `import opentelemetry` fails, as without the extra."""
    blocker = tmp_path / "opentelemetry"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('opentelemetry is not installed')\n")
    return {**cli_env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{cli_env['PYTHONPATH']}"}


async def test_otel_without_the_extra_is_a_one_line_usage_error(without_opentelemetry):
    proc = await cli(without_opentelemetry, "worker", "--chains", "--otel")
    assert_usage_error(proc, "pip install 'handoff[otel]'")


async def test_metrics_port_in_use_is_a_one_line_usage_error(cli_env, busy_port):
    proc = await cli(cli_env, "worker", "--chains", "--metrics-port", str(busy_port))
    assert_usage_error(proc, f"cannot serve metrics on 127.0.0.1:{busy_port}")

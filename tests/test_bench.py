"""The benchmark suite runs end to end (tiny sample counts: this checks it works, not speed)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support import ROOT


def test_bench_runs_every_scenario_and_writes_json_and_the_readme_table(tmp_path):
    out = tmp_path / "latest.json"
    subprocess.run(
        [sys.executable, "-m", "bench", "--samples", "2", "--load-chains", "4", "--rounds", "2",
         "--context-samples", "1", "--skip-default", "--no-plot", "--out", str(out),
         "--registry-sizes", "2,5", "--registry-chains", "4", "--stale", "6", "--skip-cost", "--skip-control",
         "--skip-watch", "--skip-mcp", "--skip-console"],
        cwd=ROOT, check=True, timeout=300, stdout=subprocess.DEVNULL)
    results = json.loads(out.read_text())
    assert sorted(results["latency_by_hops"]) == ["1", "2", "3", "4", "5"]
    five = results["latency_by_hops"]["5"]
    systems = ("handoff", "bare", "bare_unsandboxed", "peer", "peer_unsandboxed")
    assert all(five[name]["n"] == 2 for name in systems)
    assert [level["concurrency"] for level in results["throughput_5_hops"]] == [1, 20, 50]
    for level in results["throughput_5_hops"]:
        assert all(level[name]["chains"] == level["handoff"]["chains"] for name in systems)
        for name in systems:  # every system's chains cost the server and its own workers something
            spent = level[name]["cpu_ms_per_chain"]
            assert spent["server"] > 0 and spent["workers"] > 0, (name, spent)
    # the peer's history: 5 model calls as activities, 6 workflow tasks; handoff's: 5 hops as activities
    history = results["history_5_hops"]
    assert history["peer_unsandboxed"]["events"] == history["bare_unsandboxed"]["events"] == 35
    assert 35 <= history["handoff"]["events"] <= 38 and history["handoff"]["bytes"] > history["bare"]["bytes"]
    # the peer's model calls go back to the worker that scheduled them (eager dispatch); hops go through matching
    dispatched = {name: history[name]["phases_ms"]["activity_dispatch"] for name in systems}
    assert dispatched["peer_unsandboxed"] < dispatched["handoff"]
    assert all(history[name]["phases_ms"]["workflow_task_run"] > 0 for name in systems)
    assert set(results["context_transfer"]) == {"10KB", "1MB", "10MB", "20MB"}
    assert results["fan_out"]["fan_out_8"]["n"] == results["fan_out"]["fan_out_1"]["n"] == 2
    assert results["approval"]["decision_to_hop_ms"]["n"] == 2
    assert 0 < results["approval"]["decision_to_hop_ms"]["p50"] < 5000
    assert results["llm"]["adapter_ms"]["n"] == 2 and results["llm"]["tools_offered"] > 10
    assert results["llm"]["local_model"]["tokens_per_s"] > 0
    scale = results["registry_scale"]
    assert scale["sizes"] == [2, 5] and [scale[n]["live"] for n in ("n2", "n5")] == [2, 5]
    assert scale["n5"]["lookup"]["samples"] == 8 and scale["n5"]["lookup"]["candidates"] == 5
    assert scale["stale"]["stale"] == 6 and scale["stale"]["lookup"]["first_was_stale"] == 0
    assert len(results["targets"]) == 16 and all(isinstance(t["met"], bool) for t in results["targets"].values())
    table = out.with_suffix(".md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    # the header and one row per measure (no default server)
    assert len(rows) == 1 + 20 and "hub-and-spoke" in table and "OpenAI Agents SDK" in table
    assert "fan-out to 8 agents" in table and "approval" in table and "stale registrations" in table


def test_the_control_bench_checks_what_it_measures_and_writes_json(tmp_path):
    out = tmp_path / "control.json"
    subprocess.run([sys.executable, "-m", "bench.control", "--budget-samples", "3", "--steering-samples", "2",
                    "--rerun-samples", "2", "--out", str(out)],
                   cwd=ROOT, check=True, timeout=240, stdout=subprocess.DEVNULL)
    results = json.loads(out.read_text())
    assert {"budget", "steering", "rerun"} <= set(results) and len(results["targets"]) == 3
    assert all(isinstance(t["met"], bool) for t in results["targets"].values())
    assert out.with_suffix(".md").read_text().count("\n| ") >= 3


def test_the_a2a_bindings_bench_runs_every_binding_and_writes_json(tmp_path):
    out = tmp_path / "a2a_bindings.json"
    subprocess.run([sys.executable, "-m", "bench.a2a_bindings", "--samples", "2", "--out", str(out)],
                   cwd=ROOT, check=True, timeout=240, stdout=subprocess.DEVNULL)
    results = json.loads(out.read_text())
    assert set(results["bindings"]) == {"JSON-RPC", "HTTP+JSON (REST)", "gRPC"}
    assert all(b["ms"]["n"] == 2 and isinstance(b["met"], bool) for b in results["bindings"].values())
    assert out.with_suffix(".md").read_text().count("\n| A2A over ") == 3


def test_the_peer_sends_no_traces_anywhere(monkeypatch):
    """The peer's worker runs with the SDK's tracing off and no trace processor to export with,
    also under the trace provider the Temporal plugin installs when its worker runs (a fresh one,
    which reads the environment)."""
    from agents import trace
    from agents.tracing import get_trace_provider
    from agents.tracing.provider import DefaultTraceProvider
    from agents.tracing.traces import NoOpTrace

    from bench.peer import TRACING_OFF, quiet_tracing

    monkeypatch.delenv(TRACING_OFF, raising=False)
    assert not isinstance(DefaultTraceProvider().create_trace("before"), NoOpTrace)  # the check can fail
    quiet_tracing()
    assert isinstance(trace("bench"), NoOpTrace)
    assert isinstance(DefaultTraceProvider().create_trace("plugin's provider"), NoOpTrace)
    assert get_trace_provider()._multi_processor._processors == ()


def test_the_watch_bench_checks_what_it_measures_and_writes_json(tmp_path):
    out = tmp_path / "watch.json"
    subprocess.run([sys.executable, "-m", "bench.watch", "--latency-chains", "2", "--turns", "2", "--crowd-chains", "1",
                    "--at-once", "5", "--out", str(out)], cwd=ROOT, check=True, timeout=300, stdout=subprocess.DEVNULL)
    found = json.loads(out.read_text())
    assert found["latency_ms"]["n"] == 2 * 5, "every hop of every measured chain reached the watcher"
    assert 0 < found["latency_ms"]["p50"] < 5000
    assert found["crowd"]["watchers"] == 100 and found["crowd"]["watched_ms"] > 0
    assert found["at_once"]["chains"] == 5 and found["at_once"]["unwatched_ms"] > 0
    assert found["progress"]["events_per_note"] >= 1
    assert len(found["targets"]) == 4
    assert out.with_suffix(".md").read_text().count("| watching:") == 6


def test_the_console_bench_checks_the_pages_it_loads_and_writes_json(tmp_path):
    out = tmp_path / "console.json"
    subprocess.run([sys.executable, "-m", "bench.console", "--chains", "60", "--waiting", "6", "--samples", "2",
                    "--chain-samples", "2", "--out", str(out)], cwd=ROOT, check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    found = json.loads(out.read_text())
    assert found["settings"]["waiting"] == 6 and len(found["targets"]) == 4
    assert all(t["value"] > 0 for t in found["targets"].values())
    assert "| console:" in out.with_suffix(".md").read_text()

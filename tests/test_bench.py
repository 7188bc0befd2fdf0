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
         "--registry-sizes", "2,5", "--registry-chains", "4", "--stale", "6"],
        cwd=ROOT, check=True, timeout=300, stdout=subprocess.DEVNULL)
    results = json.loads(out.read_text())
    assert sorted(results["latency_by_hops"]) == ["1", "2", "3", "4", "5"]
    five = results["latency_by_hops"]["5"]
    assert five["handoff"]["n"] == five["bare"]["n"] == five["bare_unsandboxed"]["n"] == 2
    assert [level["concurrency"] for level in results["throughput_5_hops"]] == [1, 20, 50]
    assert all(level["handoff"]["chains"] == level["bare"]["chains"] for level in results["throughput_5_hops"])
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
    assert len(results["targets"]) == 12 and all(isinstance(t["met"], bool) for t in results["targets"].values())
    table = out.with_suffix(".md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 14 and "hub-and-spoke" in table  # header + one row per measure (no default server)
    assert "fan-out to 8 agents" in table and "approval" in table and "stale registrations" in table

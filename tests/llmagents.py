"""LLM agents on the local model (SmolLM2 on llama.cpp's server), for tests/test_llm_model.py: a
router that always hands on, one in its own worker process (`handoff worker --agent`) that
leaves a mark when a hop starts so the test can kill it mid-model-call.

Ids carry HANDOFF_TEST_SUFFIX; the model's URL is OPENAI_BASE_URL."""

from __future__ import annotations

import os
from pathlib import Path

from handoff import AgentCapability, HandoffContext, HandoffResult
from handoff.agents.agent import Agent
from handoff.agents.llm import llm_agent
from handoff.servers.local_model import MODEL_NAME as MODEL

SUFFIX = os.environ.get("HANDOFF_TEST_SUFFIX", "local")
MARKS = Path(os.environ.get("HANDOFF_TEST_MARKS", "/tmp"))


def router(agent_id: str, capability: AgentCapability, *, can_finish: bool = False) -> Agent:
    return llm_agent(
        id=agent_id, name=agent_id.split("-")[0].title(), capabilities=[capability], model=MODEL,
        instructions="You are a router. Hand the work on to the next agent with a transfer tool.",
        description=f"handles {capability.value.lower().replace('_', ' ')}", can_finish=can_finish,
        max_tokens=96, max_task_chars=100, context_tokens=600)


def marked(agent: Agent) -> Agent:
    """`agent`, leaving a mark (its process id) as each hop starts, before the model is asked."""
    inner = agent.handler

    async def handle(ctx: HandoffContext) -> HandoffResult:
        (MARKS / f"started-{os.getpid()}").write_text(str(ctx.handoff_id))
        return await inner(ctx)

    return Agent(id=agent.id, name=agent.name, capabilities=agent.capabilities, handler=handle,
                 description=agent.description)


middle = marked(router(f"middle-{SUFFIX}", AgentCapability.SECURITY_AUDIT))

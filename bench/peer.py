"""The Temporal-native peer: the same 5-agent chain on the OpenAI Agents SDK with Temporal's plugin
(`temporalio-openai-agents`), where handoffs happen inside one workflow and each model call is an
activity on the workflow's own queue.

Agents A-E, each with the plugin's deterministic test model (`TestModel`): A-D answer with the
`transfer_to_<next>` tool call, E with its final text. The SDK's trace export is off (it would
call out to the network). The workflow runs as users get it (the workflow sandbox on, the SDK's
default) and without the sandbox, as handoff's chain worker runs its workflows.

Run as a process, one worker with the workflow and the model activity, as the plugin's samples do:
`python -m bench.peer ADDRESS sandboxed|unsandboxed`.
"""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from agents import Agent, Runner

TRACING_OFF = "OPENAI_AGENTS_DISABLE_TRACING"


def quiet_tracing() -> None:
    """The SDK's tracing off, and no trace processor left: its default one exports to OpenAI over
    the network. The plugin installs a trace provider of its own when its worker runs, which reads
    the variable, so it stays off there too."""
    os.environ[TRACING_OFF] = "1"
    from agents import set_trace_processors, set_tracing_disabled

    set_trace_processors([])
    set_tracing_disabled(True)


QUEUES = {"sandboxed": "bench.peer", "unsandboxed": "bench.peer.unsandboxed"}
NAMES = ["A", "B", "C", "D", "E"]
FINAL = "done"


def model_name(agent: str) -> str:
    return f"bench-peer-{agent.lower()}"


def chain() -> Agent:
    """A, handing off to B, ... to E: each agent's only handoff is the next one."""
    following = None
    for name in reversed(NAMES):
        following = Agent(name=name, instructions=f"You are agent {name}.", model=model_name(name),
                          handoffs=[following] if following else [])
    assert following is not None
    return following


@workflow.defn(name="PeerChain")
class PeerChain:
    @workflow.run
    async def run(self, task: str) -> str:
        result = await Runner.run(chain(), input=task)
        return str(result.final_output)


def model_provider():
    """Each agent's model by name: the plugin's TestModel, A-D handing on, E answering."""
    from agents import ModelProvider
    from temporalio.openai_agents.testing import ResponseBuilders, TestModel

    def reply(index: int):
        if index + 1 < len(NAMES):
            following = NAMES[index + 1].lower()  # the call's ids are unique within a run, as a model's are
            return ResponseBuilders.tool_call("{}", f"transfer_to_{following}", call_id=f"call-{following}",
                                              item_id=f"item-{following}")
        return ResponseBuilders.output_message(FINAL)

    models = {model_name(n): TestModel(lambda i=i: reply(i)) for i, n in enumerate(NAMES)}

    class Provider(ModelProvider):
        def get_model(self, model_name: str | None):
            return models[model_name or ""]

    return Provider()


async def serve(address: str, mode: str) -> None:
    from temporalio.client import Client
    from temporalio.openai_agents import ModelActivityParameters, OpenAIAgentsPlugin
    from temporalio.worker import UnsandboxedWorkflowRunner, Worker

    quiet_tracing()
    plugin = OpenAIAgentsPlugin(
        model_params=ModelActivityParameters(start_to_close_timeout=timedelta(seconds=60)),
        model_provider=model_provider(), add_temporal_spans=False)
    client = await Client.connect(address, plugins=[plugin])
    extra = {"workflow_runner": UnsandboxedWorkflowRunner()} if mode == "unsandboxed" else {}
    worker = Worker(client, task_queue=QUEUES[mode], workflows=[PeerChain], max_concurrent_activities=100,
                    **extra)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2]))

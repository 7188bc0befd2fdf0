"""The chain worker: hosts the chain workflow, the registry workflow and registry lookups."""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.registry import RegistryActivities
from handoff.constants import CHAIN_TASK_QUEUE
from workflows.chain import HandoffChainWorkflow
from workflows.registry import AgentRegistryWorkflow


# When a chain worker stops, tasks of the workflows it cached wait this long on its sticky queue
# before any other worker gets them (registry updates included); the SDK default is 10 s.
STICKY_TIMEOUT = timedelta(seconds=1)


# The sandbox re-imports a workflow's module for every new run: for the chain workflow that
# was a third of the chain worker's CPU. Our workflow modules hold no mutable module state, so
# they are imported once and passed through; the golden-history replay tests guard determinism.
RUNNER = SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules("workflows"))


def chain_worker(client: Client, *, task_queue: str = CHAIN_TASK_QUEUE, **options) -> Worker:
    """A worker for the chain and registry workflows on `handoff.chains`."""
    options.setdefault("sticky_queue_schedule_to_start_timeout", STICKY_TIMEOUT)
    options.setdefault("workflow_runner", RUNNER)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[HandoffChainWorkflow, AgentRegistryWorkflow],
        activities=[RegistryActivities(client).resolve_candidates],
        **options,
    )

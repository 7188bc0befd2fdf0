"""The chain worker: hosts the chain workflow, the registry workflow and registry lookups."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.worker import Worker

from activities.registry import RegistryActivities
from handoff.constants import CHAIN_TASK_QUEUE
from workflows.chain import HandoffChainWorkflow
from workflows.registry import AgentRegistryWorkflow


def chain_worker(client: Client, *, task_queue: str = CHAIN_TASK_QUEUE, **options) -> Worker:
    """A worker for the chain and registry workflows on `handoff.chains`."""
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[HandoffChainWorkflow, AgentRegistryWorkflow],
        activities=[RegistryActivities(client).resolve_candidates],
        **options,
    )

"""The chain worker: hosts the chain workflow, the registry workflow and registry lookups."""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.registry import RegistryActivities
from handoff.constants import CHAIN_TASK_QUEUE
from workflows.chain import HandoffChainWorkflow
from workflows.registry import AgentRegistryWorkflow


# When a chain worker stops, tasks of the workflows it cached wait this long on its sticky queue
# before any other worker gets them (registry updates included); the SDK default is 10 s.
STICKY_TIMEOUT = timedelta(seconds=1)


# The chain and registry workflows run without the workflow sandbox. They are handoff's own code
# (agent code runs in activities, never here), and the sandbox was the chain worker's largest
# cost: it re-imported the workflow module for every run and, once that was passed through, it
# still entered the sandbox for every payload of every task to find its serialization context
# (a fifth of the worker's CPU). Determinism is guarded by tests instead: tests/test_replay.py
# replays the golden histories with the SDK's default, fully restricted sandbox.
RUNNER = UnsandboxedWorkflowRunner()


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

"""The chain worker: hosts the chain workflow, the registry workflow and registry lookups."""

from __future__ import annotations

import pkgutil
from datetime import timedelta

import handoff

from temporalio.client import Client
from temporalio.worker import PollerBehaviorSimpleMaximum, UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import (
    SandboxedWorkflowRunner,
    SandboxRestrictions,
)

from handoff.activities.registry import RegistryActivities
from handoff.constants import CHAIN_TASK_QUEUE
from handoff.workflows.chain import HandoffChainWorkflow
from handoff.workflows.registry import AgentRegistryWorkflow

# When a chain worker stops, tasks of the workflows it cached wait this long on its sticky queue
# before any other worker gets them (registry updates included); the SDK default is 10 s.
STICKY_TIMEOUT = timedelta(seconds=1)

# Workflow task polls kept open (a fifth on `handoff.chains`, the rest on the worker's sticky queue).
# A workflow task that finds no poll waiting is written to the task queue's backlog in the database
# and read back: with the SDK's 5 polls, most of a 5-hop chain's workflow tasks take that path at 20
# chains at once; with 20 almost none (docs/figures.md).
WORKFLOW_TASK_POLLS = 20

# Activations run inline on the worker's event loop (the SDK's `debug_mode`), not in its thread
# pool: that saves two thread switches and a wake-up of the loop per workflow task (docs/figures.md
# has what it saves). The pool's one use is the 2 s deadlock
# detector, which fails the task of a workflow whose code blocks; these workflows are handoff's
# own code and never block (agents run in activities), and a slow but finite activation (a big
# record to fit) completes instead of failing its task again at every retry. `debug_mode` also
# installs the SDK's `breakpoint()` hook, which nothing here calls.
INLINE_ACTIVATIONS = True


# The chain and registry workflows run without the workflow sandbox. They are handoff's own code
# (agent code runs in activities, never here), and the sandbox costs the chain worker much of its
# CPU: it loads the workflow modules afresh for every run and enters itself for every payload of
# every task. Determinism is guarded by tests instead: tests/test_replay.py replays the
# golden histories under the SDK's fully restricted sandbox (`sandboxed_runner`).
RUNNER = UnsandboxedWorkflowRunner()

# Every part of handoff but its workflows, passed through the sandbox: the workflow modules are
# loaded afresh and checked; the rest (the `handoff` package they live in included) is the one
# already imported, which also keeps the sandbox from re-importing native extensions it cannot.
SANDBOX_PASSTHROUGH = tuple(
    f"handoff.{m.name}" for m in pkgutil.iter_modules(handoff.__path__) if m.name != "workflows"
) + ("handoff.activities", "handoff.workers", "handoff.examples")
"""Every module and subpackage of `handoff` (its children included) but `handoff.workflows`."""


def sandboxed_runner() -> SandboxedWorkflowRunner:
    """The SDK's workflow sandbox, fully restricted, for handoff's workflows (what the replay
    tests check them under)."""
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*SANDBOX_PASSTHROUGH))


def chain_worker(client: Client, *, task_queue: str = CHAIN_TASK_QUEUE, **options) -> Worker:
    """A worker for the chain and registry workflows on `handoff.chains`."""
    options.setdefault("sticky_queue_schedule_to_start_timeout", STICKY_TIMEOUT)
    options.setdefault("workflow_runner", RUNNER)
    options.setdefault("workflow_task_poller_behavior", PollerBehaviorSimpleMaximum(maximum=WORKFLOW_TASK_POLLS))
    options.setdefault("debug_mode", INLINE_ACTIVATIONS)
    lookups = RegistryActivities(client)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[HandoffChainWorkflow, AgentRegistryWorkflow],
        activities=[lookups.resolve_candidates, lookups.resolve_directory],
        **options,
    )

"""Replay safety: the golden chain histories in tests/golden/ replay against today's workflow code.

A failure here means a change to workflows/ would break chains already running in production
(non-determinism). Such a change needs `workflow.patched(...)` or a new workflow version; see
tests/golden/README.md before regenerating anything.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer
from temporalio.workflow import NondeterminismError

from handoff.client.audit import record_from_history
from handoff.constants import CHAIN_PROTOCOL, CHAIN_WORKFLOW, REGISTRY_WORKFLOW_ID
from handoff.models import ChainRecord, ChainRequest, ChainStatus, HopStatus
from handoff.workers.chain_worker import sandboxed_runner
from handoff.workflows.chain import HandoffChainWorkflow
from handoff.workflows.registry import AgentRegistryWorkflow
from tests.golden.regenerate import BUDGET_IDS, CHAIN_IDS, IDS, PATTERN_IDS, REGISTRY_FILE

GOLDEN = Path(__file__).resolve().parent / "golden"

C, F, U, R, X, T = (HopStatus.COMPLETED, HopStatus.FAILED, HopStatus.UNREACHABLE, HopStatus.REFUSED,
                    HopStatus.CANCELLED, HopStatus.TIMED_OUT)

# What each golden history must contain, as `handoff show` reads it back (replayed):
# chain status, then (to_agent, hop status, attempts, fallback_for) for every hop, final_result.
EXPECTED: dict[str, tuple[ChainStatus, list[tuple[str, HopStatus, int, str | None]], dict]] = {
    "linear": (ChainStatus.COMPLETED, [
        ("golden-a", C, 1, None), ("golden-b", C, 2, None), ("golden-c", C, 1, None),
        ("golden-d", C, 1, None)],
        {"by": "golden-d", "depth": 3, "verdict": "ship it"}),
    "fallback_unreachable": (ChainStatus.COMPLETED, [
        ("golden-a", C, 1, None), ("golden-down", U, 0, None), ("golden-spare", C, 1, "golden-down")],
        {"by": "golden-spare", "depth": 1, "fallback": True}),
    "fallback_capability": (ChainStatus.COMPLETED, [
        ("golden-lead", C, 1, None), ("golden-deploy-1", F, 1, None),
        ("golden-deploy-2", C, 1, "golden-deploy-1")],
        {"by": "golden-deploy-2", "depth": 1, "deployed": True}),
    "depth_exceeded": (ChainStatus.DEPTH_EXCEEDED, [
        ("golden-a", C, 1, None), ("golden-b", C, 1, None), ("golden-c", C, 1, None),
        ("golden-d", C, 1, None), ("golden-e", C, 1, None), ("golden-f", R, 0, None)],
        {"by": "golden-e", "depth": 4}),
    "loop_detected": (ChainStatus.LOOP_DETECTED, [
        ("golden-a", C, 1, None), ("golden-b", C, 1, None), ("golden-a", R, 0, None)],
        {"by": "golden-b", "depth": 1}),
    # The cancelled hop was running its first attempt when the chain was cancelled.
    "cancelled": (ChainStatus.CANCELLED, [("golden-a", C, 1, None), ("golden-slow", X, 1, None)],
                  {"by": "golden-a", "depth": 0}),
    "capability": (ChainStatus.COMPLETED, [("golden-lead", C, 1, None), ("golden-audit", C, 1, None)],
                   {"by": "golden-audit", "depth": 1, "findings": 0}),
    "failed": (ChainStatus.FAILED, [("golden-a", C, 1, None), ("golden-broken", F, 2, None)],
               {"by": "golden-a", "depth": 0}),
    # the handoff patterns: the join (or return) runs one past the deepest branch
    "fan_out": (ChainStatus.COMPLETED, [("golden-lead", C, 1, None), ("golden-e", C, 1, None)],
                {"by": "golden-e", "depth": 3, "branches": ["completed"] * 3}),
    "first_k": (ChainStatus.COMPLETED, [("golden-a", C, 1, None), ("golden-e", C, 1, None)],
                {"by": "golden-e", "depth": 2, "branches": ["cancelled", "completed", "completed"]}),
    "delegate": (ChainStatus.COMPLETED, [("golden-a", C, 1, None), ("golden-a", C, 1, None)],
                 {"by": "golden-a", "depth": 3, "branches": ["completed"]}),
    "approval": (ChainStatus.COMPLETED, [("golden-a", C, 1, None), ("golden-b", C, 1, None)],
                 {"by": "golden-b", "depth": 1, "shipped": True}),
    "approval_rejected": (ChainStatus.REJECTED, [("golden-a", C, 1, None), ("golden-c", R, 0, None)],
                          {"by": "golden-a", "depth": 0}),
    # both attempts of the first round went silent; the second round's first attempt completed
    "silent_round": (ChainStatus.COMPLETED, [("golden-a", C, 1, None), ("golden-stall", C, 3, None)],
                     {"by": "golden-stall", "depth": 1, "held": True}),
    # a and b spend the chain's 20 tokens; the hop to c is refused
    "budget": (ChainStatus.BUDGET_EXCEEDED, [("golden-a", C, 1, None), ("golden-b", C, 1, None),
                                             ("golden-c", R, 0, None)], {"by": "golden-b", "depth": 1}),
    # the slow hop is cut by the chain's 2 s (a schedule-to-close timeout), then the chain ends
    "time_budget": (ChainStatus.BUDGET_EXCEEDED, [("golden-a", C, 1, None), ("golden-slow", T, 1, None),
                                                  ("golden-slow", R, 0, None)], {"by": "golden-a", "depth": 0}),
    # a person redirects a's next handoff (to b) to c while a works
    "steered": (ChainStatus.COMPLETED, [("golden-a", C, 1, None), ("golden-c", C, 1, None)],
                {"by": "golden-c", "depth": 1, "steered": True}),
    # a person stops the chain while a works: a's result kept, no hop to b
    "stopped": (ChainStatus.CANCELLED, [("golden-a", C, 1, None)], {"by": "golden-a", "depth": 0}),
    # the linear chain re-run from hop 2: a and b carried (b's attempts as recorded), c and d again
    "rerun": (ChainStatus.COMPLETED, [("golden-a", C, 1, None), ("golden-b", C, 2, None), ("golden-c", C, 1, None),
                                      ("golden-d", C, 1, None)], {"by": "golden-d", "depth": 3, "verdict": "ship it"}),
}

# The branches of each pattern's fan-out: (status, cut, [(to_agent, hop status, attempts, fallback_for)]).
BRANCHES: dict[str, list[tuple[ChainStatus, str | None, list[tuple[str, HopStatus, int, str | None]]]]] = {
    "fan_out": [
        (ChainStatus.COMPLETED, None, [("golden-deploy-1", F, 1, None), ("golden-deploy-2", C, 1, "golden-deploy-1")]),
        (ChainStatus.COMPLETED, None, [("golden-b", C, 1, None), ("golden-c", C, 1, None)]),
        (ChainStatus.COMPLETED, None, [("golden-d", C, 1, None)])],
    "first_k": [
        (ChainStatus.CANCELLED, "not_needed", [("golden-slow", X, 1, None)]),
        (ChainStatus.COMPLETED, None, [("golden-b", C, 1, None)]),
        (ChainStatus.COMPLETED, None, [("golden-c", C, 1, None)])],
    "delegate": [(ChainStatus.COMPLETED, None, [("golden-b", C, 1, None), ("golden-c", C, 1, None)])],
}


# Every scenario's history as today's protocol records it (`linear`), and as earlier protocols,
# whose chains still replay, recorded it (docs/design.md, "Versioning and replay safety"):
# `linear.v1`, protocol 1 before `progress_after_s` (every hop upserted the search attributes);
# `linear.v2`, protocol 1 (an unsuccessful chain completed its workflow); `linear.v3`, protocol 2
# (silent rounds marked by a patch); `linear.v4`, protocol 3 (a progress timer; a resolve per
# capability hop; every result carried in every later hop and the record); `linear.v5`, protocol 4
# (no usage recorded, no budget). The patterns were first recorded under protocol 2.
OLD_VERSIONS = {**dict.fromkeys(CHAIN_IDS, (".v1", ".v2", ".v3", ".v4", ".v5")),
                **dict.fromkeys(PATTERN_IDS, (".v3", ".v4", ".v5")), **dict.fromkeys(BUDGET_IDS, ())}
CHAIN_FILES = [f"{name}{version}" for name in IDS for version in ("", *OLD_VERSIONS[name])]
PROTOCOL_OF = {"": CHAIN_PROTOCOL, ".v5": 4, ".v4": 3, ".v3": 2, ".v2": 1, ".v1": 1}


def golden_history(file: str) -> WorkflowHistory:
    name = file.split(".")[0]
    workflow_id = REGISTRY_WORKFLOW_ID if name == REGISTRY_FILE else str(IDS[name])
    return WorkflowHistory.from_json(workflow_id, (GOLDEN / f"{file}.json").read_text())


def replayer(*workflows: type) -> Replayer:
    return Replayer(workflows=list(workflows) or [HandoffChainWorkflow, AgentRegistryWorkflow],
                    data_converter=pydantic_data_converter, workflow_runner=sandboxed_runner())


def test_every_scenario_has_a_golden_file_and_an_expectation():
    files = {p.name.removesuffix(".json") for p in GOLDEN.glob("*.json")}
    assert files == {*CHAIN_FILES, REGISTRY_FILE}
    assert set(EXPECTED) == set(IDS)


REPLAY_TIMEOUT_S = 30


@pytest.mark.parametrize("name", [*CHAIN_FILES, REGISTRY_FILE])
async def test_golden_history_replays_without_nondeterminism(name):
    try:
        result = await asyncio.wait_for(replayer().replay_workflow(golden_history(name)), REPLAY_TIMEOUT_S)
    except TimeoutError:
        # Were NondeterminismError among the workflow's failure_exception_types, it would fail
        # the workflow instead of the replay, and replay_workflow would never return.
        pytest.fail(f"replaying {name}.json hung for {REPLAY_TIMEOUT_S}s: probably non-determinism")
    assert result.replay_failure is None


@pytest.mark.parametrize("file", CHAIN_FILES)
async def test_golden_history_is_the_scenario_its_name_says(file):
    name = file.split(".")[0]
    status, hops, final_result = EXPECTED[name]
    history = golden_history(file)
    request = ChainRequest.model_validate_json(
        history.events[0].workflow_execution_started_event_attributes.input.payloads[0].data)
    assert request.protocol == PROTOCOL_OF[file.removeprefix(name)], "recorded by the protocol its name says"
    record = await record_from_history(history, pydantic_data_converter, replay=True)
    assert record == await record_from_history(history, pydantic_data_converter), "replayed == carried"
    assert record.chain_id == IDS[name]
    assert record.status is status
    assert [(h.to_agent, h.status, h.attempts, h.fallback_for) for h in record.hops] == hops
    assert [h.hop for h in record.hops] == sorted(h.hop for h in record.hops)
    assert record.final_result == final_result
    assert (record.error is None) == (status is ChainStatus.COMPLETED)
    fanned = [h.fan_out for h in record.hops if h.fan_out is not None]
    assert [[(b.status, b.cut, [(h.to_agent, h.status, h.attempts, h.fallback_for) for h in b.hops])
             for b in f.branches] for f in fanned] == ([BRANCHES[name]] if name in BRANCHES else [])
    closed = history.events[-1].WhichOneof("attributes")
    if file == name and status is not ChainStatus.COMPLETED:  # today's code: the workflow says so
        # a chain stopped after its hops was not cancelled by Temporal: its workflow fails, as any
        # other chain that ends unsuccessfully
        cancelled = status is ChainStatus.CANCELLED and name != "stopped"
        assert closed == ("workflow_execution_canceled_event_attributes" if cancelled
                          else "workflow_execution_failed_event_attributes"), closed


async def test_capability_hops_were_resolved_through_the_registry():
    record = await record_from_history(golden_history("capability"), pydantic_data_converter)
    assert [h.capability.value for h in record.hops] == ["CODE_ANALYSIS", "SECURITY_AUDIT"]
    assert [h.from_agent for h in record.hops] == ["starter", "golden-lead"]


async def test_the_budget_golden_holds_what_the_hops_spent():
    record = await record_from_history(golden_history("budget"), pydantic_data_converter, replay=True)
    assert [h.usage.tokens if h.usage else None for h in record.hops] == [10, 10, None]
    assert record.usage.tokens == 20 and record.usage.cost == pytest.approx(20 * 2.0 / 1e6)
    assert "20 tokens is used up" in record.error


# -- the replayer catches a change ---------------------------------------------------------

# The real chain workflow's definition options, so a modified copy can be defined exactly alike.
REAL = workflow._Definition.must_from_class(HandoffChainWorkflow)


async def preflight_then_chain(chain: HandoffChainWorkflow, request: ChainRequest) -> ChainRecord:
    """A careless edit: a new activity scheduled before the first hop, without a patch."""
    await workflow.execute_activity(
        "handoff.preflight", request, task_queue="handoff.chains",
        start_to_close_timeout=timedelta(seconds=5),
    )
    return await HandoffChainWorkflow.run(chain, request)


@workflow.defn(name=CHAIN_WORKFLOW, sandboxed=False)
class UnchangedChain(HandoffChainWorkflow):
    """Control: the real workflow, subclassed the same way as the changed copies below."""

    @workflow.run
    async def run(self, request: ChainRequest) -> ChainRecord:
        return await super().run(request)


@workflow.defn(name=CHAIN_WORKFLOW, sandboxed=False)
class ChangedChain(HandoffChainWorkflow):
    """The careless edit, with the SDK's default failure handling."""

    @workflow.run
    async def run(self, request: ChainRequest) -> ChainRecord:
        return await preflight_then_chain(self, request)


@workflow.defn(name=CHAIN_WORKFLOW, sandboxed=False, failure_exception_types=REAL.failure_exception_types)
class ChangedChainLikeReal(HandoffChainWorkflow):
    """The careless edit, with the real workflow's `failure_exception_types`."""

    @workflow.run
    async def run(self, request: ChainRequest) -> ChainRecord:
        return await preflight_then_chain(self, request)


async def test_subclassed_but_unchanged_workflow_replays():
    result = await replayer(UnchangedChain).replay_workflow(golden_history("linear"))
    assert result.replay_failure is None


@pytest.mark.parametrize("name", ["linear", "fallback_capability"])
async def test_changed_workflow_fails_replay_with_nondeterminism(name):
    with pytest.raises(NondeterminismError) as caught:
        await replayer(ChangedChain).replay_workflow(golden_history(name))
    assert "nondeterminism" in str(caught.value).lower()


async def test_changed_copy_of_the_real_definition_fails_replay_with_nondeterminism():
    with pytest.raises(NondeterminismError):
        await asyncio.wait_for(
            replayer(ChangedChainLikeReal).replay_workflow(golden_history("linear")), timeout=5)


async def test_approvals_recorded_who_decided_what():
    approved = await record_from_history(golden_history("approval"), pydantic_data_converter)
    rejected = await record_from_history(golden_history("approval_rejected"), pydantic_data_converter)
    assert (approved.hops[1].approval.asked_by, approved.hops[1].approval.decision,
            approved.hops[1].approval.by) == ("golden-a", "approved", "golden-approver")
    assert (rejected.hops[1].approval.asked_by, rejected.hops[1].approval.decision,
            rejected.hops[1].approval.comment) == ("policy", "rejected", "not today")
    assert "rejected by golden-approver: not today" in rejected.error
    returned = await record_from_history(golden_history("delegate"), pydantic_data_converter)
    assert [h.kind.value for h in returned.hops] == ["handoff", "return"]


def test_only_chains_of_protocol_2_mark_their_silent_rounds_with_a_patch():
    def markers(file: str) -> int:
        return sum(e.HasField("marker_recorded_event_attributes") for e in golden_history(file).events)

    assert markers("silent_round.v3") >= 1 and markers("silent_round") == 0


async def test_many_histories_replayed_in_one_run_read_as_each_alone():
    """`records_from_histories` (the console's page of chains): every golden chain history, in
    every protocol, one of them twice and the registry's history (not a chain's) among them, in
    one call, gives each the record `record_from_history` gives it alone, and the registry its error."""
    from handoff.client.audit import HistoryUnreadable, records_from_histories

    files = [*CHAIN_FILES, CHAIN_FILES[0], REGISTRY_FILE]
    histories = [golden_history(f) for f in files]
    # and each chain as it was while it ran (its history cut after its first hop's workflow task):
    # records that only a replay reads
    for file in CHAIN_FILES:
        events = golden_history(file).events
        tasks = [i for i, e in enumerate(events) if e.HasField("workflow_task_completed_event_attributes")]
        if len(tasks) > 1:
            files.insert(0, f"{file} (running)")
            histories.insert(0, WorkflowHistory(str(IDS[file.split(".")[0]]), events[: tasks[1] + 1]))
    together = await records_from_histories(histories, pydantic_data_converter)
    assert len(together) == len(files)
    assert sum(1 for f in files if f.endswith("(running)")) > 20
    for file, history, record in zip(files[:-1], histories, together):
        assert record == await record_from_history(history, pydantic_data_converter), file
        if file.endswith("(running)"):
            assert not record.status.ended, file
    assert isinstance(together[-1], HistoryUnreadable)

"""Regenerate the golden chain histories that tests/test_replay.py replays.

    .venv/bin/python -m tests.golden.regenerate [SCENARIO ...]

Starts its own local dev server (exactly as tests/conftest.py does), runs the real chain
worker and scripted fake agents with fixed ids, runs every scenario below under a fixed chain
id and writes each chain's history to tests/golden/<scenario>.json (plus, when every scenario
runs, the registry workflow's history to registry.json). Name scenarios to record only those (a
new scenario, without rewriting the histories older code recorded). Only regenerate for an
intentional, versioned change of the workflow code: see README.md in this folder.

Every agent runs the same scripted handler: what it does at a hop is read from the chain's
`context_data["script"]` under `"<agent>@<depth>"`, so each golden file carries its own script.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import UUID

import structlog
from temporalio import activity
from temporalio.client import Client

from temporalio.api.enums.v1 import PendingActivityState
from handoff import (
    AgentCapability,
    Branch,
    ChainRecord,
    ChainStatus,
    HandoffContext,
    HandoffResult,
    Join,
    PermanentError,
)
from handoff.registry import Directory
from handoff.client import (
    approve_chain,
    cancel_chain,
    get_chain,
    reject_chain,
    run_chain,
    start_chain,
    steer_chain,
    stop_chain,
    wait_chain,
)
from handoff.client.chains import start_request
from handoff.client.rerun import rerun_request
from handoff.constants import REGISTRY_WORKFLOW_ID
from handoff.workers.chain_worker import chain_worker
from tests.support import make_agent, running, start_dev_env

GOLDEN = Path(__file__).resolve().parent

# Fixed chain ids (the workflow ids), so regenerated files differ only in times and run ids.
CHAIN_IDS: dict[str, UUID] = {
    "linear": UUID("601de000-0000-4000-8000-000000000001"),
    "fallback_unreachable": UUID("601de000-0000-4000-8000-000000000002"),
    "fallback_capability": UUID("601de000-0000-4000-8000-000000000003"),
    "depth_exceeded": UUID("601de000-0000-4000-8000-000000000004"),
    "loop_detected": UUID("601de000-0000-4000-8000-000000000005"),
    "cancelled": UUID("601de000-0000-4000-8000-000000000006"),
    "capability": UUID("601de000-0000-4000-8000-000000000007"),
    "failed": UUID("601de000-0000-4000-8000-000000000008"),
}
# The handoff patterns (fan-out and join, delegation, approval): recorded once they existed, so
# they have no older versions.
PATTERN_IDS: dict[str, UUID] = {
    "fan_out": UUID("601de000-0000-4000-8000-000000000101"),
    "first_k": UUID("601de000-0000-4000-8000-000000000102"),
    "delegate": UUID("601de000-0000-4000-8000-000000000103"),
    "approval": UUID("601de000-0000-4000-8000-000000000104"),
    "approval_rejected": UUID("601de000-0000-4000-8000-000000000105"),
    "silent_round": UUID("601de000-0000-4000-8000-000000000201"),
}
# Budgets: recorded once hops' usage was, so they have no older versions either.
BUDGET_IDS: dict[str, UUID] = {
    "budget": UUID("601de000-0000-4000-8000-000000000301"),
    "time_budget": UUID("601de000-0000-4000-8000-000000000302"),
    "steered": UUID("601de000-0000-4000-8000-000000000401"),
    "stopped": UUID("601de000-0000-4000-8000-000000000402"),
    "rerun": UUID("601de000-0000-4000-8000-000000000403"),
}
REGISTRY_FILE = "registry"

FAST = {"retry_initial_s": 0.05}

# Plain agents, addressed by id only (not registered).
RELAY = ["golden-a", "golden-b", "golden-c", "golden-d", "golden-e", "golden-f"]
SPARE = "golden-spare"  # the configured fallback agent
DOWN = "golden-down"  # never runs: its hops cannot start
SLOW = "golden-slow"  # works until the chain is cancelled
BROKEN = "golden-broken"  # always raises an ordinary (retryable) error
STALL = "golden-stall"  # stalls its worker (no heartbeat gets out) on its first runs
# Registered agents, found by capability.
LEAD = "golden-lead"  # CODE_ANALYSIS
AUDIT = "golden-audit"  # SECURITY_AUDIT
DEPLOY_1 = "golden-deploy-1"  # DEPLOYMENT
DEPLOY_2 = "golden-deploy-2"  # DEPLOYMENT


STALLS: Counter = Counter()  # runs of each stalling hop, by handoff id


async def scripted(ctx: HandoffContext) -> HandoffResult:
    """Do what the chain's script says for this agent at this depth.

    Step keys: `to` / `capability` + `task` (hand off; `approval`: ask for a person's approval),
    `fan_out` (branches and join, as `ctx.fan_out` takes them), `delegate` (as `ctx.delegate`
    takes it), `complete` (result data), `fail` (ctx.fail), `permanent` (raise PermanentError),
    `error` (raise an ordinary error), `flaky` (raise once, then do the rest of the step), `wait`
    (work until cancelled), `stall` (block the worker's event loop for `seconds` on the hop's first
    `stall` runs, so no heartbeat gets out, then do the rest), `spend` (report that many prompt
    tokens of one model call, then do the rest), `hold` (work that many seconds, then do the rest).
    A hop the chain returns to completes with its branches' statuses.
    """
    if ctx.branches:  # a join, or the chain came back to the agent that delegated
        return ctx.complete({"by": ctx.to_agent, "depth": ctx.chain_depth,
                             "branches": [b.status.value for b in ctx.branches]})
    step: dict[str, Any] = ctx.context_data["script"][f"{ctx.to_agent}@{ctx.chain_depth}"]
    if "stall" in step:
        STALLS[ctx.handoff_id] += 1
        if STALLS[ctx.handoff_id] <= step["stall"]:
            time.sleep(step["seconds"])
    if "hold" in step:
        await asyncio.sleep(step["hold"])
    if "spend" in step:
        ctx.report_usage(model="golden-model", prompt_tokens=step["spend"], model_calls=1)
    if step.get("flaky") and activity.info().attempt == 1:
        raise ConnectionError("transient failure on the first attempt")
    if "error" in step:
        raise RuntimeError(step["error"])
    if "permanent" in step:
        raise PermanentError(step["permanent"])
    if "fail" in step:
        return ctx.fail(step["fail"])
    if step.get("wait"):
        await asyncio.sleep(3600)
    data = {"by": ctx.to_agent, "depth": ctx.chain_depth}
    if "fan_out" in step:
        return ctx.fan_out([Branch(**b) for b in step["fan_out"]["branches"]],
                           join=Join(**step["fan_out"]["join"]), result_data=data)
    if "delegate" in step:
        return ctx.delegate(**step["delegate"], result_data=data)
    if "to" in step:
        return ctx.handoff(to_agent=step["to"], task_description=step["task"], result_data=data,
                           require_approval=step.get("approval", False))
    if "capability" in step:
        return ctx.handoff(capability=step["capability"], task_description=step["task"], result_data=data)
    return ctx.complete({**data, **step.get("complete", {})})


def relay_script(agents: list[str], last: dict[str, Any]) -> dict[str, Any]:
    """agents[0] -> agents[1] -> ...; the last one does `last`."""
    script = {f"{a}@{d}": {"to": agents[d + 1], "task": f"step {d + 1}"} for d, a in enumerate(agents[:-1])}
    script[f"{agents[-1]}@{len(agents) - 1}"] = last
    return script


async def linear(client: Client, chain_id: UUID) -> ChainRecord:
    """Four hops a -> b -> c -> d, all completed; b fails once and succeeds on attempt 2."""
    script = relay_script(RELAY[:4], {"complete": {"verdict": "ship it"}})
    script["golden-b@1"]["flaky"] = True
    return await run_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="review PR 42",
                           context_data={"script": script, "repo": "golden"}, policy=FAST)


async def fallback_unreachable(client: Client, chain_id: UUID) -> ChainRecord:
    """a -> down (no worker: unreachable) -> the configured fallback agent completes."""
    script = {"golden-a@0": {"to": DOWN, "task": "deploy"}, f"{SPARE}@1": {"complete": {"fallback": True}}}
    return await run_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="ship",
                           context_data={"script": script},
                           policy={**FAST, "schedule_to_start_s": 1, "fallback_agent": SPARE})


async def fallback_capability(client: Client, chain_id: UUID) -> ChainRecord:
    """lead -> deploy-1 (PermanentError) -> deploy-2, the other live DEPLOYMENT agent, completes."""
    script = {
        f"{LEAD}@0": {"to": DEPLOY_1, "task": "deploy"},
        f"{DEPLOY_1}@1": {"permanent": "cluster credentials revoked"},
        f"{DEPLOY_2}@1": {"complete": {"deployed": True}},
    }
    return await run_chain(client, chain_id=chain_id, to_agent=LEAD, task_description="release",
                           context_data={"script": script}, policy=FAST)


async def depth_exceeded(client: Client, chain_id: UUID) -> ChainRecord:
    """a -> b -> c -> d -> e complete; e's handoff to f would be depth 5: refused."""
    script = relay_script(RELAY, {"complete": {}})
    return await run_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="dig deeper",
                           context_data={"script": script}, policy=FAST)


async def loop_detected(client: Client, chain_id: UUID) -> ChainRecord:
    """a -> b -> back to a with a's own task: refused as a loop."""
    script = {"golden-a@0": {"to": "golden-b", "task": "check"},
              "golden-b@1": {"to": "golden-a", "task": "review"}}
    return await run_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="review",
                           context_data={"script": script}, policy=FAST)


async def cancelled(client: Client, chain_id: UUID) -> ChainRecord:
    """a -> slow, which works until the chain is cancelled from outside."""
    script = {"golden-a@0": {"to": SLOW, "task": "long job"}, f"{SLOW}@1": {"wait": True}}
    await start_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="long",
                      context_data={"script": script}, policy={**FAST, "heartbeat_timeout_s": 1})
    handle = client.get_workflow_handle(str(chain_id))
    for _ in range(200):  # until the slow hop has started
        state = await handle.query("chain_state", result_type=ChainRecord)
        if len(state.hops) == 2 and state.hops[1].status.value == "running":
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    await cancel_chain(client, chain_id)
    return await wait_chain(client, chain_id)


async def capability(client: Client, chain_id: UUID) -> ChainRecord:
    """Started by capability CODE_ANALYSIS (lead), which hands off by capability SECURITY_AUDIT."""
    script = {f"{LEAD}@0": {"capability": "SECURITY_AUDIT", "task": "audit"},
              f"{AUDIT}@1": {"complete": {"findings": 0}}}
    return await run_chain(client, chain_id=chain_id, capability=AgentCapability.CODE_ANALYSIS,
                           task_description="analyse", context_data={"script": script}, policy=FAST)


async def failed(client: Client, chain_id: UUID) -> ChainRecord:
    """a -> broken, which fails all 2 attempts; no fallback: the chain fails keeping a's result."""
    script = {"golden-a@0": {"to": BROKEN, "task": "fix"}, f"{BROKEN}@1": {"error": "disk on fire"}}
    return await run_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="repair",
                           context_data={"script": script}, policy={**FAST, "max_attempts": 2})


async def fan_out(client: Client, chain_id: UUID) -> ChainRecord:
    """lead fans out to DEPLOYMENT (deploy-1 fails, deploy-2 takes over), to b (which hands on to
    c) and to d; e joins all three."""
    script = {
        f"{LEAD}@0": {"fan_out": {
            "branches": [{"capability": "DEPLOYMENT", "task_description": "deploy"},
                         {"to_agent": "golden-b", "task_description": "b's part"},
                         {"to_agent": "golden-d", "task_description": "d's part"}],
            "join": {"to_agent": "golden-e", "task_description": "join"}}},
        f"{DEPLOY_1}@1": {"permanent": "no cluster"},
        f"{DEPLOY_2}@1": {"complete": {"deployed": True}},
        "golden-b@1": {"to": "golden-c", "task": "c's part"},
        "golden-c@2": {"complete": {}},
        "golden-d@1": {"complete": {}},
    }
    return await run_chain(client, chain_id=chain_id, to_agent=LEAD, task_description="fan out",
                           context_data={"script": script}, policy=FAST)


async def first_k(client: Client, chain_id: UUID) -> ChainRecord:
    """a fans out to slow (works until cut), b and c; e joins the first two to complete, within
    a 60 s deadline: slow's branch is cut."""
    script = {
        "golden-a@0": {"fan_out": {
            "branches": [{"to_agent": SLOW, "task_description": "slow part"},
                         {"to_agent": "golden-b", "task_description": "b's part"},
                         {"to_agent": "golden-c", "task_description": "c's part"}],
            "join": {"to_agent": "golden-e", "task_description": "join two", "wait_for": 2, "deadline_s": 60}}},
        f"{SLOW}@1": {"wait": True},
        "golden-b@1": {"complete": {}},
        "golden-c@1": {"complete": {}},
    }
    return await run_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="first two",
                           context_data={"script": script}, policy={**FAST, "heartbeat_timeout_s": 1})


async def delegate(client: Client, chain_id: UUID) -> ChainRecord:
    """a delegates to b, which hands on to c; the chain comes back to a, which completes."""
    script = {
        "golden-a@0": {"delegate": {"to_agent": "golden-b", "task_description": "help", "then": "finish"}},
        "golden-b@1": {"to": "golden-c", "task": "dig"},
        "golden-c@2": {"complete": {"found": 1}},
    }
    return await run_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="ask around",
                           context_data={"script": script}, policy=FAST)


async def _decided(client: Client, chain_id: UUID, approve: bool) -> ChainRecord:
    handle = client.get_workflow_handle(str(chain_id))
    for _ in range(400):
        state = await handle.query("chain_state", result_type=ChainRecord)
        if state.status is ChainStatus.AWAITING_APPROVAL:
            break
        await asyncio.sleep(0.05)
    if approve:
        await approve_chain(client, chain_id, by="golden-approver", comment="fine")
    else:
        await reject_chain(client, chain_id, by="golden-approver", reason="not today")
    return await wait_chain(client, chain_id)


async def approval(client: Client, chain_id: UUID) -> ChainRecord:
    """a hands off to b asking for approval; a person approves; b completes."""
    script = {"golden-a@0": {"to": "golden-b", "task": "ship", "approval": True},
              "golden-b@1": {"complete": {"shipped": True}}}
    await start_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="release",
                      context_data={"script": script}, policy=FAST)
    return await _decided(client, chain_id, approve=True)


async def approval_rejected(client: Client, chain_id: UUID) -> ChainRecord:
    """The policy asks for approval of hops to c; a person rejects a's handoff to it."""
    script = {"golden-a@0": {"to": "golden-c", "task": "drop it"}}
    await start_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="risky",
                      context_data={"script": script}, policy={**FAST, "approval_required": ["golden-c"]})
    return await _decided(client, chain_id, approve=False)


async def silent_round(client: Client, chain_id: UUID) -> ChainRecord:
    """a -> stall, whose 2 attempts both go silent (heartbeat timeouts): the hop is scheduled
    again, and its third attempt completes."""
    script = {"golden-a@0": {"to": STALL, "task": "hold on"},
              f"{STALL}@1": {"stall": 2, "seconds": 1.6, "complete": {"held": True}}}
    return await run_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="stall",
                           context_data={"script": script},
                           policy={**FAST, "max_attempts": 2, "heartbeat_timeout_s": 1})


async def budget(client: Client, chain_id: UUID) -> ChainRecord:
    """a -> b -> c, a and b each spending 10 tokens of the chain's 20: the hop to c is refused."""
    script = relay_script(RELAY[:3], {"complete": {}})
    script["golden-a@0"]["spend"] = script["golden-b@1"]["spend"] = 10
    return await run_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="spend",
                           context_data={"script": script},
                           policy={**FAST, "budget": {"max_tokens": 20, "prices": {"golden-model": {"prompt": 2.0}}}})


async def time_budget(client: Client, chain_id: UUID) -> ChainRecord:
    """a -> slow, still working when the chain's 2 s are up: its hop is cut, the next refused."""
    script = {"golden-a@0": {"to": SLOW, "task": "take long"}, f"{SLOW}@1": {"wait": True}}
    return await run_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="in time",
                           context_data={"script": script}, policy={**FAST, "budget": {"max_duration_s": 2}})


async def _while_first_hop_runs(client: Client, chain_id: UUID) -> None:
    """Return once the chain's first hop has started on its worker."""
    handle = client.get_workflow_handle(str(chain_id))
    for _ in range(400):  # history writes a hop's start when it ends: the server's description says it now
        pending = (await handle.describe()).raw_description.pending_activities
        if any(a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED for a in pending):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the first hop of {chain_id} never started")


async def steered(client: Client, chain_id: UUID) -> ChainRecord:
    """a, asked to hand on to b, is steered while it works: its next handoff goes to c instead."""
    script = {"golden-a@0": {"hold": 1.0, "to": "golden-b", "task": "finish"},
              "golden-c@1": {"complete": {"steered": True}}}
    await start_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="steer me",
                      context_data={"script": script}, policy=FAST)
    await _while_first_hop_runs(client, chain_id)
    await steer_chain(client, chain_id, message="c knows this code", by="golden-operator", redirect="golden-c")
    return await wait_chain(client, chain_id)


async def stopped(client: Client, chain_id: UUID) -> ChainRecord:
    """a is working when a person stops the chain after its running hops: a's result is kept, b
    never runs, and the chain ends cancelled."""
    script = {"golden-a@0": {"hold": 1.0, "to": "golden-b", "task": "more"}}
    await start_chain(client, chain_id=chain_id, to_agent=RELAY[0], task_description="stop me",
                      context_data={"script": script}, policy=FAST)
    await _while_first_hop_runs(client, chain_id)
    await stop_chain(client, chain_id, by="golden-operator", reason="enough")
    return await wait_chain(client, chain_id)


async def rerun(client: Client, chain_id: UUID) -> ChainRecord:
    """The linear chain (run before it, in the same run) re-run from hop 2: a and b carried, c and
    d run again."""
    request = await rerun_request(client, CHAIN_IDS["linear"], from_hop=2)
    await start_request(client, request.model_copy(update={"chain_id": chain_id}))
    return await wait_chain(client, chain_id)


SCENARIOS = {
    "linear": linear,
    "fallback_unreachable": fallback_unreachable,
    "fallback_capability": fallback_capability,
    "depth_exceeded": depth_exceeded,
    "loop_detected": loop_detected,
    "cancelled": cancelled,
    "capability": capability,
    "failed": failed,
    "fan_out": fan_out,
    "first_k": first_k,
    "delegate": delegate,
    "approval": approval,
    "approval_rejected": approval_rejected,
    "silent_round": silent_round,
    "budget": budget,
    "time_budget": time_budget,
    "steered": steered,
    "stopped": stopped,
    "rerun": rerun,
}
IDS = {**CHAIN_IDS, **PATTERN_IDS, **BUDGET_IDS}


async def write_history(client: Client, workflow_id: str, name: str) -> None:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    (GOLDEN / f"{name}.json").write_text(history.to_json() + "\n")


def quiet_logs() -> None:
    """Only errors: the scenarios fail hops on purpose, and the summary lines are what matter."""
    logging.getLogger("temporalio").setLevel(logging.ERROR)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


async def main(names: list[str]) -> int:
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        print(f"unknown scenarios: {sorted(unknown)} (known: {', '.join(SCENARIOS)})")
        return 2
    quiet_logs()
    env = await start_dev_env()
    try:
        client = env.client
        plain = [make_agent(a, scripted) for a in [*RELAY, SPARE, SLOW, BROKEN, STALL]]
        listed = [
            make_agent(LEAD, scripted, [AgentCapability.CODE_ANALYSIS]),
            make_agent(AUDIT, scripted, [AgentCapability.SECURITY_AUDIT]),
            make_agent(DEPLOY_1, scripted, [AgentCapability.DEPLOYMENT]),
            make_agent(DEPLOY_2, scripted, [AgentCapability.DEPLOYMENT]),
        ]
        async with chain_worker(client):
            async with running(client, *plain), running(client, *listed, register=True):
                for name, scenario in SCENARIOS.items():
                    if names and name not in names:
                        continue
                    # each scenario ranks as the first lookup would: equally loaded agents by id
                    Directory.of(client)._returned.clear()
                    record = await asyncio.wait_for(scenario(client, IDS[name]), 60)
                    # The record a user would see, rebuilt from history like `handoff show`.
                    shown = await get_chain(client, record.chain_id)
                    hops = ", ".join(f"{h.to_agent or '-'}:{h.status.value}" for h in shown.hops)
                    print(f"{name:22} {shown.status.value:15} {hops}")
                    await write_history(client, str(IDS[name]), name)
            if not names:  # after the registered agents deregistered: registrations and deregistrations
                await write_history(client, REGISTRY_WORKFLOW_ID, REGISTRY_FILE)
    finally:
        await env.shutdown()
    return 0


if __name__ == "__main__":
    code = asyncio.run(main(sys.argv[1:]))
    sys.stdout.flush()
    os._exit(code)  # like the CLI: skip the interpreter shutdown the client's native threads can crash

"""The holes found when the system was attacked, and by a careless user, each pinned against the
real server: a handoff that names two targets, failure text in history, a record outgrowing the
payload limit, dead chains listed as running, reused chain ids, deep nesting, results that are
not JSON, and the CLI's edges."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
from uuid import uuid4

import pytest
import structlog
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError

from handoff import (
    AgentCapability,
    Branch,
    ChainStatus,
    HandoffDirective,
    HandoffResult,
    HopStatus,
    InvalidRequest,
    Join,
    PermanentError,
    get_chain,
    run_chain,
    start_chain,
)
from handoff.activities.hop import ENV_LOG_TASK_TEXT, hop_activity
from handoff.client import connect, wait_chain
from handoff.payloads.codec import ENV_KEY_ID, ENV_KEYS, CodecConfigError, CodecSettings
from handoff.constants import MAX_NESTING
from handoff.observability.log import configure_logging
from handoff.models import HandoffContext, HopInput
from handoff.client.search import chain_query, find_chains
from handoff.servers.embedded import EmbeddedServer, free_port
from handoff.workers.chain_worker import chain_worker
from tests.support import HANDOFF, assert_usage_error, cli, make_agent, running

pytestmark = pytest.mark.usefixtures("chains")

FAST = {"retry_initial_s": 0.05}


def nested(depth: int) -> dict:
    value: dict = {"leaf": True}
    for _ in range(depth):
        value = {"next": value}
    return value


# -- the handoff policy judges what a directive names -------------------------------------------


async def test_a_directive_naming_an_agent_and_a_capability_is_refused(client, uid):
    """Policy {"starter": [bypass], bypass: [TESTING]}: naming a DEPLOYMENT-only agent beside the
    allowed capability used to reach that agent."""
    bypass, deployer = f"bypass-{uid}", f"deploy-only-{uid}"
    ran: list[str] = []

    async def sneaky(ctx):
        both = HandoffDirective(to_agent=deployer, to_capability=AgentCapability.TESTING,
                                task_description="ship it")
        return HandoffResult(handoff_id=ctx.handoff_id, success=True, result_data={"by": bypass},
                             next_handoff=both)

    async def deploy(ctx):
        ran.append(ctx.to_agent)
        return ctx.complete({"deployed": True})

    policy = {"allowed_handoffs": {"starter": [bypass], bypass: ["TESTING"]}}
    async with running(client, make_agent(bypass, sneaky),
                       make_agent(deployer, deploy, capabilities=[AgentCapability.DEPLOYMENT])):
        record = await run_chain(client, to_agent=bypass, task_description="t", policy=policy)
    assert record.status is ChainStatus.REJECTED
    assert [h.status for h in record.hops] == [HopStatus.COMPLETED, HopStatus.REFUSED]
    assert "exactly one of an agent" in record.hops[1].error
    assert ran == [], "the named agent never ran"
    with pytest.raises(InvalidRequest, match="exactly one"):
        HandoffContext(task_description="t").handoff(to_agent=deployer, capability="TESTING",
                                                     task_description="x")


# -- failure text is encrypted with the payloads ------------------------------------------------


async def test_with_keys_failure_messages_reach_history_encrypted(address, uid, monkeypatch):
    secret = f"CARD-{uuid4().hex}"
    monkeypatch.setenv(ENV_KEYS, f"k1:{base64.b64encode(os.urandom(32)).decode()}")
    monkeypatch.setenv(ENV_KEY_ID, "k1")
    sealed = await connect(address=address)

    async def leak(ctx):
        raise PermanentError(f"cannot charge {secret}")

    queue = f"sealed-chains-{uid}"  # the session's chain worker has no keys
    agent = make_agent(f"leaky-{uid}", leak)
    async with chain_worker(sealed, task_queue=queue), running(sealed, agent):
        from handoff.client import build_request
        from handoff.constants import CHAIN_WORKFLOW
        from handoff.models import ChainRecord

        request = build_request(to_agent=agent.id, task_description="charge the card")
        handle = await sealed.start_workflow(CHAIN_WORKFLOW, request, id=str(request.chain_id),
                                             task_queue=queue, result_type=ChainRecord)
        record = await wait_chain(sealed, request.chain_id)  # the chain fails its workflow
        history = (await handle.fetch_history()).to_json()
    assert record.status is ChainStatus.FAILED
    assert secret in record.hops[0].error, "a client with the keys reads the failure"
    assert secret not in history and base64.b64encode(secret.encode()).decode() not in history
    assert "charge the card" not in history, "the task text, in the input and in every summary"
    assert (await get_chain(sealed, request.chain_id)).hops[0].error == record.hops[0].error


async def test_task_text_can_be_kept_out_of_the_logs(monkeypatch, capsys):
    ctx = HandoffContext(to_agent="quiet", task_description="the merger with ACME, codename ORCHID")

    async def handle(hop_ctx):
        return hop_ctx.complete()

    agent = make_agent("quiet", handle)
    from temporalio.testing import ActivityEnvironment

    lines = {}
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    for setting in ("on", "off"):
        monkeypatch.setenv(ENV_LOG_TASK_TEXT, setting)
        configure_logging("json")
        await ActivityEnvironment().run(hop_activity(agent), HopInput(hop=0, context=ctx, heartbeat_interval_s=1))
        lines[setting] = [json.loads(line) for line in capsys.readouterr().out.splitlines()
                          if '"hop_started"' in line]
    structlog.reset_defaults()
    root.handlers[:], root.level = handlers, level  # configure_logging pointed them at capsys
    assert lines["on"][0]["task"].startswith("the merger")
    assert "task" not in lines["off"][0] and "ORCHID" not in json.dumps(lines["off"])
    assert lines["off"][0]["to_agent"] == "quiet"


# -- a chain always ends with a status -----------------------------------------------------------


async def test_results_larger_together_than_the_payload_limit_are_each_carried_once(client, uid):
    """Two hops each returning ~1.2 MB: a record holding both would be 2.4 MB, over the payload
    limit, but each is carried once, in its own hop's activity result, and read back whole."""
    first, second = f"bulky-a-{uid}", f"bulky-b-{uid}"

    async def bulky(ctx):
        data = {"blob": ctx.to_agent[0] * 1_200_000, "by": ctx.to_agent}
        if ctx.to_agent == first:
            return ctx.handoff(to_agent=second, task_description="more", result_data=data,
                               visible_previous_results=0)
        return ctx.complete(data)

    async with running(client, make_agent(first, bulky), make_agent(second, bulky)):
        record = await asyncio.wait_for(run_chain(client, to_agent=first, task_description="t"), 60)
    assert record.status is ChainStatus.COMPLETED, record.error
    assert [len(h.result_data["blob"]) for h in record.hops] == [1_200_000, 1_200_000]
    assert await get_chain(client, record.chain_id) == record


async def test_a_record_outgrowing_the_payload_limit_ends_the_chain_failed(client, uid):
    """Two branches each ending with ~0.8 MB, and a join ending with as much: the record keeps a
    copy of each branch's final result and of the chain's, 2.4 MB, over the payload limit."""
    lead, join = f"bulky-lead-{uid}", f"bulky-join-{uid}"
    branches = [f"bulky-b{i}-{uid}" for i in range(2)]

    async def bulky(ctx):
        if ctx.to_agent == lead:
            return ctx.fan_out([Branch(to_agent=b, task_description="part") for b in branches],
                               join=Join(to_agent=join, task_description="join"))
        return ctx.complete({"blob": "x" * 800_000, "by": ctx.to_agent})

    async with running(client, *(make_agent(a, bulky) for a in [lead, join, *branches])):
        record = await asyncio.wait_for(run_chain(client, to_agent=lead, task_description="t"), 60)
    assert record.status is ChainStatus.FAILED
    assert "over the" in record.error and "limit" in record.error
    assert [h.status for h in record.hops] == [HopStatus.COMPLETED, HopStatus.COMPLETED]
    assert record.final_result == {}, "the chain's copy of its last result left the record first"
    assert record.hops[1].result_data["by"] == join, "the join's own result is read back from history"
    assert len(record.model_dump_json()) < 3_000_000


async def test_a_result_that_is_not_json_is_not_retried(client, uid):
    attempts = []

    async def odd(ctx):
        attempts.append(1)
        return ctx.complete({"when": object()})

    async with running(client, make_agent(f"odd-{uid}", odd)):
        record = await run_chain(client, to_agent=f"odd-{uid}", task_description="t", policy=FAST)
    assert record.status is ChainStatus.FAILED
    assert record.hops[0].attempts == 1 and len(attempts) == 1
    assert "not JSON" in record.hops[0].error


async def test_a_result_nested_too_deeply_fails_its_hop_at_once(client, uid):
    async def deep(ctx):
        return ctx.complete(nested(MAX_NESTING + 5))

    async with running(client, make_agent(f"deep-{uid}", deep)):
        record = await run_chain(client, to_agent=f"deep-{uid}", task_description="t", policy=FAST)
    assert record.status is ChainStatus.FAILED
    assert record.hops[0].attempts == 1
    assert f"nests more than {MAX_NESTING} levels" in record.hops[0].error


async def test_deeply_nested_input_is_refused_before_anything_starts(client, cli_env, tmp_path):
    with pytest.raises(InvalidRequest, match="nests more than"):
        await start_chain(client, to_agent="a", task_description="t", context_data=nested(240))
    for depth in (240, 5000):
        context = tmp_path / f"deep-{depth}.json"
        context.write_text('{"a": ' * depth + "1" + "}" * depth)
        assert_usage_error(await cli(cli_env, "start", "--to", "a", "--task", "t", "--context", f"@{context}"),
                           "nest")


# -- visibility and ids -------------------------------------------------------------------------


async def test_list_shows_a_terminated_chain_as_ended_not_running(client, uid):
    started = asyncio.Event()

    async def hang(ctx):
        started.set()
        await asyncio.sleep(30)
        return ctx.complete()

    async with running(client, make_agent(f"hang-{uid}", hang)):
        chain_id = await start_chain(client, to_agent=f"hang-{uid}", task_description="t",
                                     policy={"progress_after_s": 0})
        await asyncio.wait_for(started.wait(), 20)
        await client.get_workflow_handle(str(chain_id)).terminate(reason="operator")
    query = chain_query(agent=f"hang-{uid}")
    for _ in range(100):
        rows = await find_chains(client, query)
        if rows and rows[0]["chain_id"] == str(chain_id):
            break
        await asyncio.sleep(0.1)
    assert rows[0]["status"] == ChainStatus.FAILED.value
    assert (await get_chain(client, chain_id)).error == "terminated: operator"


async def test_reusing_the_id_of_a_chain_that_ended_is_refused_unless_asked(client, uid, cli_env):
    async def done(ctx):
        return ctx.complete({"run": 1})

    async with running(client, make_agent(f"once-{uid}", done)):
        first = await run_chain(client, to_agent=f"once-{uid}", task_description="t")
        with pytest.raises(InvalidRequest, match="already exists"):
            await start_chain(client, to_agent=f"once-{uid}", task_description="t", chain_id=first.chain_id)
        refused = await cli(cli_env, "start", "--to", f"once-{uid}", "--task", "again", "--id", str(first.chain_id))
        assert_usage_error(refused, "already exists")
        assert (await get_chain(client, first.chain_id)).task_description == "t", "the first run stays"
        again = await cli(cli_env, "start", "--to", f"once-{uid}", "--task", "again", "--id",
                          str(first.chain_id), "--reuse-id", "--wait", "--json")
        assert again.returncode == 0, again.stderr
    assert (await get_chain(client, first.chain_id)).task_description == "again"


# -- the CLI's edges -----------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "fragment"), [
    pytest.param(["list", "--since", "99999999d"], "before the year 1", id="since-overflow"),
    pytest.param(["start", "--to", "a", "--task", "t", "--hop-timeout", "nan"], "finite", id="nan"),
])
async def test_odd_values_get_one_clear_line(cli_env, args, fragment):
    assert_usage_error(await cli(cli_env, *args), fragment)


def test_a_task_that_is_not_utf8_gets_one_clear_line(cli_env):
    proc = subprocess.run([HANDOFF.encode(), b"start", b"--to", b"a", b"--task", b"caf\xe9"],
                          env=cli_env, capture_output=True, text=True, timeout=60)
    assert_usage_error(proc, "not valid UTF-8")


def test_a_bare_key_is_never_echoed():
    key = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(CodecConfigError) as caught:
        CodecSettings.from_env({ENV_KEYS: key})
    assert key[:4] not in str(caught.value) and "44 characters" in str(caught.value)


async def test_start_wait_says_when_no_chain_worker_takes_the_chain(cli_env):
    with EmbeddedServer(port=free_port(), ui_port=free_port()) as lonely:  # no chain worker here
        env = {**cli_env, "TEMPORAL_ADDRESS": lonely.address}
        proc = await cli(env, "start", "--to", "nobody", "--task", "t", "--wait", "--wait-timeout", "12",
                         timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "no chain worker has taken chain" in proc.stderr
    assert "still running after 12s" in proc.stderr.splitlines()[-1]


async def test_a_worker_keeps_trying_to_reach_the_server_then_exits_1(cli_env):
    env = {**cli_env, "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}"}
    proc = await cli(env, "worker", "--chains", "--connect-timeout", "3", timeout=60)
    assert proc.returncode == 1
    assert proc.stdout.count("server_unreachable") >= 2, proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Temporal server")


async def test_with_keys_a_chain_started_without_them_is_refused_not_run(client, address, uid, monkeypatch):
    """A keyless client (the session's) starts a chain on encrypting workers: strict decryption
    (on by default with keys) refuses its plaintext input, and the chain ends failed at once."""
    monkeypatch.setenv(ENV_KEYS, f"k1:{base64.b64encode(os.urandom(32)).decode()}")
    monkeypatch.setenv(ENV_KEY_ID, "k1")
    sealed = await connect(address=address)
    ran = []

    async def work(ctx):
        ran.append(ctx.task_description)
        return ctx.complete()

    from handoff.client import build_request
    from handoff.constants import CHAIN_WORKFLOW

    queue = f"strict-chains-{uid}"
    agent = make_agent(f"strict-{uid}", work)
    request = build_request(to_agent=agent.id, task_description="injected")
    async with chain_worker(sealed, task_queue=queue), running(sealed, agent):
        await client.start_workflow(CHAIN_WORKFLOW, request, id=str(request.chain_id), task_queue=queue)
        handle = sealed.get_workflow_handle(str(request.chain_id))  # its failure is encrypted
        with pytest.raises(WorkflowFailureError) as caught:
            await asyncio.wait_for(handle.result(), 30)
    assert "was not encrypted" in str(caught.value.cause), caught.value.cause
    assert ran == []
    assert (await handle.describe()).status is WorkflowExecutionStatus.FAILED

    monkeypatch.setenv("HANDOFF_ENCRYPTION_STRICT", "off")  # accepting them is a choice
    lenient = await connect(address=address)
    queue = f"lenient-chains-{uid}"
    request = build_request(to_agent=agent.id, task_description="accepted")
    async with chain_worker(lenient, task_queue=queue), running(lenient, agent):
        await client.start_workflow(CHAIN_WORKFLOW, request, id=str(request.chain_id), task_queue=queue)
        await asyncio.wait_for(lenient.get_workflow_handle(str(request.chain_id)).result(), 30)
    assert ran == ["accepted"]

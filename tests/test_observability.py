"""Structured logs (replay-safe) and finding chains through visibility queries."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
import structlog

from handoff import ChainRecord, ChainStatus, InvalidRequest, run_chain
from handoff.client import start_chain, wait_chain
from handoff.constants import SA_AGENTS, SA_CURRENT_AGENT, SA_DEPTH, SA_STATUS
from handoff.observability.log import configure_logging
from handoff.client.search import chain_query, find_chains, parse_since
from handoff.workers.chain_worker import chain_worker
from tests.support import make_agent, running, start_dev_env


def test_parse_since_takes_durations_and_iso_times():
    now = datetime(2026, 1, 2, 12, 0, tzinfo=timezone.utc)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2d", now) == now - timedelta(days=2)
    assert parse_since("2026-01-01T00:00:00", now) == datetime(2026, 1, 1, tzinfo=timezone.utc)
    with pytest.raises(InvalidRequest, match="--since"):
        parse_since("yesterday", now)


def test_chain_query_validates_what_goes_into_it():
    since = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert chain_query(agent="a-1", status="failed", since=since) == (
        "WorkflowType = 'HandoffChain' AND HandoffAgents = 'a-1' AND HandoffStatus = 'failed' "
        "AND StartTime >= '2026-01-01T00:00:00+00:00'")
    with pytest.raises(InvalidRequest):
        chain_query(agent="x' OR 1=1 --")
    with pytest.raises(InvalidRequest):
        chain_query(status="finished")


async def run_two_hops(client, a: str, b: str, **request) -> ChainRecord:
    """Run a chain a -> b, where b completes, on the agents' real workers."""

    async def first(ctx):
        return ctx.handoff(to_agent=b, task_description="next")

    async def second(ctx):
        return ctx.complete({})

    async with running(client, make_agent(a, first), make_agent(b, second)):
        return await run_chain(client, to_agent=a, **request)


@pytest.mark.usefixtures("chains")
async def test_chains_are_found_by_agent_status_and_time(client, uid):
    a, b = f"find-a-{uid}", f"find-b-{uid}"
    record = await run_two_hops(client, a, b, task_description="find me")
    query = chain_query(agent=b, status="completed", since=datetime.now(timezone.utc) - timedelta(minutes=5))
    for _ in range(50):  # visibility is eventually consistent
        rows = await find_chains(client, query)
        if rows:
            break
        await asyncio.sleep(0.2)
    assert [r["chain_id"] for r in rows] == [str(record.chain_id)]
    assert rows[0]["agents"] == sorted([a, b]) and rows[0]["status"] == ChainStatus.COMPLETED.value
    old = chain_query(agent=b, since=datetime.now(timezone.utc) + timedelta(minutes=5))
    assert await find_chains(client, old) == []


def upserts(history) -> list[dict]:
    """The search attributes each upsert event of a history set."""
    return [dict(e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields)
            for e in history.events if e.HasField("upsert_workflow_search_attributes_event_attributes")]


@pytest.mark.usefixtures("chains")
async def test_a_fast_chain_writes_its_search_attributes_once_at_its_end(client, uid):
    a, b = f"fast-a-{uid}", f"fast-b-{uid}"
    record = await run_two_hops(client, a, b, task_description="fast", policy={"progress_after_s": 30})
    history = await client.get_workflow_handle(str(record.chain_id)).fetch_history()
    assert [sorted(fields) for fields in upserts(history)] == [
        ["HandoffAgents", "HandoffCurrentAgent", "HandoffDepth", "HandoffStatus"]]
    described = (await client.get_workflow_handle(str(record.chain_id)).describe()).typed_search_attributes
    assert described.get(SA_AGENTS) == sorted([a, b]) and described.get(SA_CURRENT_AGENT) == b
    assert described.get(SA_DEPTH) == 1 and described.get(SA_STATUS) == ChainStatus.COMPLETED.value


@pytest.mark.usefixtures("chains")
async def test_a_slow_chain_shows_its_current_agent_while_it_runs(client, uid):
    """From the first hop that starts `progress_after_s` into the chain, each hop upserts its
    progress; no timer is started for it (a chain that ends in time never needs one)."""
    a, b, c = f"slow-a-{uid}", f"slow-b-{uid}", f"slow-c-{uid}"
    release = asyncio.Event()

    async def first(ctx):
        await asyncio.sleep(0.6)  # past progress_after_s: b's hop shows where the chain is
        return ctx.handoff(to_agent=b, task_description="wait")

    async def waiting(ctx):
        await release.wait()
        return ctx.handoff(to_agent=c, task_description="finish")

    async def last(ctx):
        return ctx.complete({})

    async with running(client, make_agent(a, first), make_agent(b, waiting), make_agent(c, last)):
        chain_id = await start_chain(client, to_agent=a, task_description="slow",
                                     policy={"progress_after_s": 0.3})
        query = f"WorkflowId = '{chain_id}' AND HandoffCurrentAgent = '{b}' AND HandoffDepth = 1"
        for _ in range(100):  # visibility is eventually consistent
            if [w async for w in client.list_workflows(query)]:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"the running chain never showed {b!r} at depth 1")
        release.set()
        record = await wait_chain(client, chain_id)
    assert record.status is ChainStatus.COMPLETED
    history = await client.get_workflow_handle(str(chain_id)).fetch_history()
    assert not any(e.HasField("timer_started_event_attributes") for e in history.events)
    # past the time: b's progress; then c's hop; then the end (status only)
    assert [fields.keys() & {"HandoffCurrentAgent", "HandoffStatus"} for fields in upserts(history)] == [
        {"HandoffCurrentAgent"}, {"HandoffCurrentAgent"}, {"HandoffStatus"}]


@pytest.fixture
def json_logs():
    """Route logging through handoff's JSON renderer for one test, then restore the root logger."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    configure_logging("json", stream=stream)

    def lines() -> list[dict]:
        return [json.loads(line) for line in stream.getvalue().splitlines()]

    yield lines
    root.handlers[:], root.level = saved[0], saved[1]


def test_log_lines_stay_json_whatever_the_values(json_logs):
    # orjson renders the lines; what it refuses (an integer past 64 bits) falls back to json.dumps,
    # and what neither knows is written as its repr: a log call never fails a hop.
    structlog.get_logger("handoff.test").info("odd_values", big=2**70, keys={1: "one"}, thing=object())
    logging.getLogger("handoff.test.stdlib").info("stdlib_line", extra={"chain_id": "c-1"})
    odd, stdlib = json_logs()
    assert odd["big"] == 2**70 and odd["keys"] == {"1": "one"} and odd["thing"].startswith("<object")
    assert (stdlib["event"], stdlib["chain_id"], stdlib["level"]) == ("stdlib_line", "c-1", "info")


async def test_hop_logs_are_json_bound_to_the_hop_and_not_repeated_on_replay(json_logs, uid):
    # A server of its own, so that the only chain worker is this one, which caches no workflow:
    # every workflow task replays the whole history, and must not log the past again.
    env = await start_dev_env()
    ids = [f"log{i}-{uid}" for i in range(3)]

    async def relay(ctx):
        i = ids.index(ctx.to_agent)
        if i + 1 < len(ids):
            return ctx.handoff(to_agent=ids[i + 1], task_description=f"step {i + 1}")
        return ctx.complete({"done": True})

    try:
        client = env.client
        async with chain_worker(client, max_cached_workflows=0), \
                running(client, *[make_agent(i, relay) for i in ids]):
            record = await run_chain(client, to_agent=ids[0], task_description="log me",
                                     context_data={"api_token": "s3cr3t-t0ken-value"})
    finally:
        await env.shutdown()
    assert record.status is ChainStatus.COMPLETED
    events = json_logs()
    assert "s3cr3t-t0ken-value" not in json.dumps(events), "context data is never logged"
    workflow_lines = [e for e in events if e.get("event") == "hop_completed" and e.get("logger") == "temporalio.workflow"]
    assert Counter(e["handoff_id"] for e in workflow_lines) == Counter(
        str(h.handoff_id) for h in record.hops), "one workflow line per hop, even with replays"
    started = [e for e in events if e.get("event") == "hop_started"]
    assert len(started) == 3
    for line, hop in zip(started, record.hops):
        assert line["chain_id"] == str(record.chain_id)
        assert line["handoff_id"] == str(hop.handoff_id)
        assert (line["hop"], line["from_agent"], line["to_agent"], line["attempt"]) == (
            hop.hop, hop.from_agent, hop.to_agent, 1)
        assert line["level"] == "info" and "timestamp" in line

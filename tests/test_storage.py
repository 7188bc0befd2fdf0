"""Large contexts through external payload storage: 20 MB crosses hops intact; more is refused."""

from __future__ import annotations

import hashlib
import time
from uuid import uuid4

import pytest
from handoff.workers.chain_worker import chain_worker
from temporalio.api.common.v1 import Payload
from temporalio.converter import (
    StorageDriverClaim,
    StorageDriverRetrieveContext,
    StorageDriverStoreContext,
)

from handoff import ChainRecord, ChainStatus, ContextTooLarge
from handoff.client import build_request, connect, context_limit
from handoff.constants import (
    CHAIN_WORKFLOW,
    MAX_CONTEXT_BYTES,
    MAX_EXTERNAL_CONTEXT_BYTES,
)
from handoff.server import free_port
from handoff.storage import (
    PAYLOAD_DIR_ENV,
    S3_BUCKET_ENV,
    S3_ENDPOINT_ENV,
    FileStorageDriver,
    StorageError,
)
from tests.support import make_agent, running


async def test_file_driver_is_content_addressed_and_checks_what_it_reads(tmp_path):
    driver = FileStorageDriver(tmp_path)
    payload = Payload(metadata={"encoding": b"json/plain"}, data=b'{"x": 1}')
    claims = await driver.store(StorageDriverStoreContext(), [payload, payload])
    assert claims[0] == claims[1] and len(list(tmp_path.iterdir())) == 1
    assert await driver.retrieve(StorageDriverRetrieveContext(), claims[:1]) == [payload]
    [stored] = tmp_path.iterdir()
    stored.write_bytes(b"tampered")
    with pytest.raises(StorageError, match="corrupt"):
        await driver.retrieve(StorageDriverRetrieveContext(), claims[:1])
    with pytest.raises(StorageError, match="missing"):
        await driver.retrieve(StorageDriverRetrieveContext(), [StorageDriverClaim({"sha256": "0" * 64})])
    with pytest.raises(StorageError, match="malformed"):
        await driver.retrieve(StorageDriverRetrieveContext(), [StorageDriverClaim({"sha256": "../x"})])


@pytest.fixture
async def stored_client(address, tmp_path, monkeypatch):
    monkeypatch.setenv(PAYLOAD_DIR_ENV, str(tmp_path / "payloads"))
    return await connect(address=address)


async def test_twenty_megabyte_context_crosses_hops_intact(stored_client, uid, tmp_path):
    client = stored_client
    assert context_limit(client) == MAX_EXTERNAL_CONTEXT_BYTES
    blob = "".join(f"line {i}: {uuid4().hex}\n" for i in range(420_000))[:20 * 1024 * 1024]
    digest = hashlib.sha256(blob.encode()).hexdigest()
    first, second = f"big-a-{uid}", f"big-b-{uid}"

    async def read_and_pass(ctx):
        assert hashlib.sha256(ctx.context_data["source"].encode()).hexdigest() == digest
        return ctx.handoff(to_agent=second, task_description="check again",
                           result_data={"size": len(ctx.context_data["source"])},
                           context_data={"checked_by": ctx.to_agent})

    async def read_and_finish(ctx):
        same = hashlib.sha256(ctx.context_data["source"].encode()).hexdigest() == digest
        return ctx.complete({"intact": same, "checked_by": ctx.context_data["checked_by"]})

    queue = f"chains-{uid}"
    request = build_request(task_description="big", to_agent=first, context_data={"source": blob},
                            max_context_bytes=context_limit(client))
    async with chain_worker(client, task_queue=queue), \
            running(client, make_agent(first, read_and_pass), make_agent(second, read_and_finish)):
        started = time.perf_counter()
        handle = await client.start_workflow(CHAIN_WORKFLOW, request, id=str(request.chain_id),
                                             task_queue=queue, result_type=ChainRecord)
        record = await handle.result()
        elapsed = time.perf_counter() - started
    print(f"20 MiB context, 2-hop chain: {elapsed * 1000:.0f} ms")
    assert record.status is ChainStatus.COMPLETED
    assert record.final_result == {"intact": True, "checked_by": first}
    assert record.hops[0].result_data == {"size": len(blob)}
    history = await handle.fetch_history()
    assert len(history.to_json()) < MAX_CONTEXT_BYTES, "the context lives in storage, not in history"


async def test_context_over_the_external_limit_is_refused_before_starting(stored_client):
    with pytest.raises(ContextTooLarge):
        build_request(task_description="t", to_agent="a",
                      context_data={"blob": "x" * (MAX_EXTERNAL_CONTEXT_BYTES + 1)},
                      max_context_bytes=context_limit(stored_client))


def test_without_storage_the_limit_stays_under_temporals(monkeypatch):
    monkeypatch.delenv(PAYLOAD_DIR_ENV, raising=False)
    with pytest.raises(ContextTooLarge):
        build_request(task_description="t", to_agent="a", context_data={"blob": "x" * MAX_CONTEXT_BYTES})


@pytest.fixture
def s3_server(monkeypatch, uid):
    """moto's S3-compatible HTTP server on a free loopback port, with one bucket."""
    boto3 = pytest.importorskip("boto3", reason="the dev extra installs boto3 (via aioboto3)")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", S3_BUCKET_ENV: f"handoff-{uid}",
                       S3_ENDPOINT_ENV: endpoint}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(PAYLOAD_DIR_ENV, raising=False)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=f"handoff-{uid}")
    yield s3, f"handoff-{uid}"
    server.stop()


async def test_large_context_travels_through_an_s3_compatible_server(s3_server, address, uid):
    s3, bucket = s3_server
    client = await connect(address=address)
    assert context_limit(client) == MAX_EXTERNAL_CONTEXT_BYTES
    blob = "".join(f"{i}:{uuid4().hex}\n" for i in range(150_000))  # ~5 MB
    digest = hashlib.sha256(blob.encode()).hexdigest()
    first, second = f"s3-a-{uid}", f"s3-b-{uid}"

    async def pass_on(ctx):
        return ctx.handoff(to_agent=second, task_description="again",
                           result_data={"ok": hashlib.sha256(ctx.context_data["source"].encode()).hexdigest() == digest})

    async def finish(ctx):
        return ctx.complete({"ok": hashlib.sha256(ctx.context_data["source"].encode()).hexdigest() == digest})

    queue = f"chains-{uid}"
    request = build_request(task_description="s3", to_agent=first, context_data={"source": blob},
                            max_context_bytes=context_limit(client))
    async with chain_worker(client, task_queue=queue), \
            running(client, make_agent(first, pass_on), make_agent(second, finish)):
        handle = await client.start_workflow(CHAIN_WORKFLOW, request, id=str(request.chain_id),
                                             task_queue=queue, result_type=ChainRecord)
        record = await handle.result()
    assert record.status is ChainStatus.COMPLETED
    assert [h.result_data for h in record.hops] == [{"ok": True}, {"ok": True}]
    stored = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    assert stored and all(o["Size"] > 256 * 1024 for o in stored), "large payloads went to S3"
    history = await handle.fetch_history()
    assert len(history.to_json()) < MAX_CONTEXT_BYTES

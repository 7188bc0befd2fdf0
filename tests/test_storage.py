"""Large contexts through external payload storage: 20 MB crosses hops intact; more is refused.
The file store works only in a directory private to its user, reads only regular files, never
through a link, and sweeps only the files it wrote."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from uuid import uuid4

import pytest
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
from handoff.servers.embedded import free_port, port_open
from handoff.payloads.storage import (
    PAYLOAD_DIR_ENV,
    S3_BUCKET_ENV,
    S3_ENDPOINT_ENV,
    FileStorageDriver,
    StorageError,
    payload_dir,
)
from handoff.workers.chain_worker import chain_worker
from tests.support import HANDOFF, ROOT, make_agent, running


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
    with pytest.raises(StorageError, match="do not share one payload store"):
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
    monkeypatch.setenv(PAYLOAD_DIR_ENV, "off")
    with pytest.raises(ContextTooLarge):
        build_request(task_description="t", to_agent="a", context_data={"blob": "x" * MAX_CONTEXT_BYTES})


def test_a_server_on_this_host_gets_file_storage_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv(PAYLOAD_DIR_ENV, raising=False)
    monkeypatch.delenv(S3_BUCKET_ENV, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    for local in ("localhost:7233", "127.0.0.1:7233", "127.0.0.5:9", "[::1]:7233"):
        assert payload_dir(local) == tmp_path / "handoff" / "payloads", local
    for remote in ("temporal.example.com:7233", "10.1.2.3:7233", "my-ns.a1b2c.tmprl.cloud:7233"):
        assert payload_dir(remote) is None, remote
    monkeypatch.setenv(PAYLOAD_DIR_ENV, str(tmp_path / "mine"))
    assert payload_dir("temporal.example.com:7233") == tmp_path / "mine"


async def test_stored_blobs_are_private_unique_per_writer_and_swept_when_unused(tmp_path):
    directory = tmp_path / "blobs"
    driver = FileStorageDriver(directory, retention_days=1)
    payloads = [Payload(metadata={"encoding": b"json/plain"}, data=f'"{i % 3}"'.encode()) for i in range(60)]
    # many threads of one process store the same three blobs at once: no write clobbers another
    claims = await asyncio.gather(*(driver.store(StorageDriverStoreContext(), [p]) for p in payloads))
    assert {c[0].claim_data["sha256"] for c in claims} == {c.claim_data["sha256"] for c in (await driver.store(
        StorageDriverStoreContext(), payloads[:3]))}
    blobs = sorted(directory.iterdir())
    assert len(blobs) == 3, "no temporary file left behind"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert {stat.S_IMODE(b.stat().st_mode) for b in blobs} == {0o600}
    assert await driver.retrieve(StorageDriverRetrieveContext(), claims[0]) == [payloads[0]]
    old = time.time() - 2 * 86400
    for blob in blobs[1:]:
        os.utime(blob, (old, old))
    fresh = FileStorageDriver(directory, retention_days=1)
    await fresh.store(StorageDriverStoreContext(), payloads[:1])
    assert len(list(directory.iterdir())) == 1, "blobs unused past the retention are gone"


def blob_of(text: str) -> tuple[Payload, str]:
    """A payload and the digest the file store names it by."""
    payload = Payload(metadata={"encoding": b"json/plain"}, data=f'"{text}"'.encode())
    return payload, hashlib.sha256(payload.SerializeToString()).hexdigest()


def private_dir(path):
    path.mkdir(mode=0o700)
    return path


async def test_the_sweep_removes_only_old_blobs_and_partial_writes(tmp_path):
    directory = tmp_path / "payloads"
    old, old_digest = blob_of("old")
    fresh, fresh_digest = blob_of("fresh")
    await FileStorageDriver(directory).store(StorageDriverStoreContext(), [old])
    outside = tmp_path / "outside.txt"
    outside.write_text("not the store's")
    planted = {
        "partial": directory / f".{old_digest}.k2x_9qzt.tmp",
        "notes": directory / "team-notes.txt",
        "folder": directory / "archive",
        "link": directory / "latest",
    }
    planted["partial"].write_bytes(b"half a blob")
    planted["notes"].write_text("minutes of the last meeting")
    planted["folder"].mkdir()
    planted["link"].symlink_to(outside)
    eight_days_ago = time.time() - 8 * 86400
    for path in (directory / old_digest, outside, *planted.values()):
        os.utime(path, (eight_days_ago, eight_days_ago), follow_symlinks=False)
    # a driver's first store sweeps: its last sweep is set an interval in the past
    await FileStorageDriver(directory, retention_days=7).store(StorageDriverStoreContext(), [fresh])
    assert sorted(p.name for p in directory.iterdir()) == sorted([fresh_digest, "team-notes.txt", "archive", "latest"])
    assert outside.read_text() == "not the store's"


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702], ids=oct)
async def test_a_payload_directory_others_may_write_is_refused(tmp_path, mode):
    directory = private_dir(tmp_path / "shared")
    directory.chmod(mode)
    driver = FileStorageDriver(directory)
    refusal = rf"payload directory {re.escape(str(directory))} is writable by group or others .*chmod 700"
    with pytest.raises(StorageError, match=refusal) as refused:
        await driver.store(StorageDriverStoreContext(), [blob_of("x")[0]])
    assert "\n" not in str(refused.value)
    with pytest.raises(StorageError, match=refusal):
        await driver.retrieve(StorageDriverRetrieveContext(), [StorageDriverClaim({"sha256": blob_of("x")[1]})])
    assert not any(directory.iterdir())


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory to another user")
async def test_a_payload_directory_of_another_user_is_refused(tmp_path):
    directory = private_dir(tmp_path / "theirs")
    os.chown(directory, 12345, 12345)
    with pytest.raises(StorageError, match=r"is owned by uid 12345, not this user"):
        await FileStorageDriver(directory).store(StorageDriverStoreContext(), [blob_of("x")[0]])
    assert not any(directory.iterdir())


async def test_a_payload_directory_that_is_a_symlink_is_refused(tmp_path):
    real = private_dir(tmp_path / "real")
    link = tmp_path / "payloads"
    link.symlink_to(real)
    with pytest.raises(StorageError, match=rf"payload directory {re.escape(str(link))} is a symlink"):
        await FileStorageDriver(link).store(StorageDriverStoreContext(), [blob_of("x")[0]])
    assert not any(real.iterdir())


async def test_a_blob_name_linked_to_a_file_outside_is_not_read(tmp_path):
    directory = private_dir(tmp_path / "payloads")
    payload, digest = blob_of("outside")
    outside = tmp_path / "outside"
    outside.write_bytes(payload.SerializeToString())  # the right content: only the link is wrong
    os.utime(outside, (1_000_000, 1_000_000))
    (directory / digest).symlink_to(outside)
    with pytest.raises(StorageError, match="is a symlink"):
        await FileStorageDriver(directory).retrieve(StorageDriverRetrieveContext(), [StorageDriverClaim({"sha256": digest})])
    assert outside.stat().st_mtime == 1_000_000, "the link's target was not touched"


async def test_storing_a_blob_replaces_a_link_planted_at_its_name_not_its_target(tmp_path):
    directory = private_dir(tmp_path / "payloads")
    payload, digest = blob_of("planted")
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    os.utime(outside, (1_000_000, 1_000_000))
    (directory / digest).symlink_to(outside)
    driver = FileStorageDriver(directory)
    assert await driver.store(StorageDriverStoreContext(), [payload]) == [StorageDriverClaim({"sha256": digest})]
    assert outside.read_bytes() == b"precious" and outside.stat().st_mtime == 1_000_000
    blob = directory / digest
    assert not blob.is_symlink() and blob.is_file() and stat.S_IMODE(blob.stat().st_mode) == 0o600
    assert await driver.retrieve(StorageDriverRetrieveContext(), [StorageDriverClaim({"sha256": digest})]) == [payload]


# Runs in a child whose address space is capped, so a store that reads without bound fails
# with MemoryError there instead of exhausting the host's memory.
RETRIEVE_UNDER_A_MEMORY_CAP = """
import resource, sys, time
from temporalio.converter import StorageDriverClaim
from handoff.payloads.storage import FileStorageDriver, StorageError

with open("/proc/self/statm") as statm:
    mapped = int(statm.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (mapped + 512 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
driver, claim = FileStorageDriver(sys.argv[1]), StorageDriverClaim({"sha256": sys.argv[2]})
rss_before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
try:
    driver._retrieve_all([claim])
    outcome = "read"
except StorageError:
    outcome = "StorageError"
except MemoryError:
    outcome = "MemoryError"
grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
print(outcome, time.monotonic() - started, grown_kib)
"""


@pytest.mark.parametrize("plant", ["link to /dev/zero", "fifo"])
def test_a_blob_name_that_is_no_regular_file_is_refused_at_once(tmp_path, plant):
    directory = private_dir(tmp_path / "payloads")
    digest = blob_of("x")[1]
    if plant == "fifo":
        os.mkfifo(directory / digest, 0o600)
    else:
        (directory / digest).symlink_to("/dev/zero")
    done = subprocess.run([sys.executable, "-c", RETRIEVE_UNDER_A_MEMORY_CAP, str(directory), digest],
                          capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    outcome, seconds, grown_kib = done.stdout.split()
    assert outcome == "StorageError"
    assert float(seconds) < 2
    assert int(grown_kib) < 8 * 1024, "reading the blob did not grow the process"


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


async def test_an_s3_claim_naming_another_bucket_is_refused(s3_server, address):
    s3, bucket = s3_server
    s3.create_bucket(Bucket=f"{bucket}-other")
    s3.put_object(Bucket=f"{bucket}-other", Key="planted", Body=b"\n\x00")
    client = await connect(address=address)
    [driver] = client.data_converter.external_storage.drivers
    claim = StorageDriverClaim({"bucket": f"{bucket}-other", "key": "planted",
                                "hash_algorithm": "sha256", "hash_value": "0" * 64})
    with pytest.raises(StorageError, match="not the configured"):
        await driver.retrieve(StorageDriverRetrieveContext(), [claim])


def test_cli_chains_carry_8_and_20_mib_contexts_with_no_storage_settings(tmp_path, uid):
    """`handoff server`, the chain worker, the agents' worker and `handoff start` as separate
    processes on one host, no storage variables: large contexts go through the default store."""
    env = {k: v for k, v in os.environ.items() if k not in (PAYLOAD_DIR_ENV, S3_BUCKET_ENV, S3_ENDPOINT_ENV)}
    port = free_port()
    env.update({"TEMPORAL_ADDRESS": f"127.0.0.1:{port}", "HANDOFF_TEST_SUFFIX": uid, "PYTHONPATH": str(ROOT)})
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    processes = [subprocess.Popen([HANDOFF, "server", "--port", str(port), "--ui-port", str(free_port()),
                                   "--db", ""], **quiet)]
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        processes.append(subprocess.Popen([HANDOFF, "worker", "--chains"], **quiet))
        processes.append(subprocess.Popen([HANDOFF, "worker", "--agent", "tests.procagents:checkers"], **quiet))
        for mib in (8, 20):
            blob = "".join(f"{i}:{uuid4().hex}\n" for i in range(mib * 1024 * 1024 // 40))[:mib * 1024 * 1024]
            context = tmp_path / f"context-{mib}.json"
            context.write_text(json.dumps({"blob": blob, "sha256": hashlib.sha256(blob.encode()).hexdigest()}))
            done = subprocess.run([HANDOFF, "start", "--to", f"blob-a-{uid}", "--task", f"check {mib} MiB",
                                   "--context", f"@{context}", "--wait", "--json"],
                                  env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]
            record = ChainRecord.model_validate_json(done.stdout)
            assert record.status is ChainStatus.COMPLETED, record.error
            assert [h.result_data for h in record.hops] == [
                {"by": f"blob-a-{uid}", "intact": True, "size": len(blob)},
                {"by": f"blob-b-{uid}", "intact": True, "size": len(blob)}]
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=20)

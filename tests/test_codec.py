"""The payload codec chain (compression, AES-GCM encryption with rotating keys) and the codec
server that lets the Web UI and `temporal --codec-endpoint` read what the server only stores
as ciphertext."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
import urllib.request
import uuid

import aiohttp
import pytest
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter

from handoff import ChainStatus
from handoff.client import build_request, connect
from handoff.payloads.codec import (
    ENCODING_ENCRYPTED,
    ENCODING_ZLIB,
    ENV_KEY_ID,
    ENV_KEYS,
    ENV_THRESHOLD,
    KEY_ID,
    CodecConfigError,
    CodecSettings,
    PayloadDecodeError,
    SharedPydanticPayloadConverter,
    codec_from_env,
    data_converter,
)
from handoff.servers.codec import start_codec_server
from handoff.constants import CHAIN_WORKFLOW
from handoff.errors import HandoffError
from handoff.models import ChainRecord
from handoff.servers.embedded import EmbeddedServer, free_port, port_open, temporal_binary
from handoff.workers.chain_worker import chain_worker
from tests.support import HANDOFF, ROOT, make_agent, running

UI_ORIGIN = "http://localhost:8233"


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def keys_env(current: str, **keys: str) -> dict[str, str]:
    return {ENV_KEYS: ",".join(f"{k}:{v}" for k, v in keys.items()), ENV_KEY_ID: current}


def payload(value: object) -> Payload:
    return pydantic_data_converter.payload_converter.to_payloads([value])[0]


def value(p: Payload) -> object:
    return pydantic_data_converter.payload_converter.from_payloads([p])[0]


# -- the codec chain -------------------------------------------------------------------


async def test_small_payloads_pass_untouched():
    codec = codec_from_env({})
    small = payload({"k": "v" * 100})
    [encoded] = await codec.encode([small])
    assert encoded == small
    assert await codec.decode([encoded]) == [small]


async def test_large_payloads_are_compressed_and_decode_exactly():
    codec = codec_from_env({})
    big = payload({"source": "def f():\n    return 42\n" * 20000})
    [encoded] = await codec.encode([big])
    assert encoded.metadata["encoding"] == ENCODING_ZLIB
    assert len(encoded.SerializeToString()) < len(big.SerializeToString()) // 10
    [decoded] = await codec.decode([encoded])
    assert decoded == big


async def test_compression_can_be_turned_off_and_tuned():
    big = payload({"blob": "x" * 10_000})
    assert codec_from_env({ENV_THRESHOLD: "off"}) is None
    plain = data_converter(codec_from_env({ENV_THRESHOLD: "off"}))
    assert plain.payload_codec is None and plain.payload_converter_class is SharedPydanticPayloadConverter
    [kept] = await codec_from_env({ENV_THRESHOLD: "100000"}).encode([big])
    assert kept == big
    [packed] = await codec_from_env({ENV_THRESHOLD: "0"}).encode([payload({"x": "y" * 50})])
    assert packed.metadata["encoding"] == ENCODING_ZLIB


async def test_encrypted_payloads_hold_no_plaintext_and_name_their_key():
    secret = f"hunter2-{uuid.uuid4().hex}"
    codec = codec_from_env(keys_env("k1", k1=new_key()))
    for original in (payload({"password": secret}), payload({"password": secret, "pad": "a" * 9000})):
        [encoded] = await codec.encode([original])
        assert encoded.metadata["encoding"] == ENCODING_ENCRYPTED
        assert encoded.metadata[KEY_ID] == b"k1"
        assert secret.encode() not in encoded.SerializeToString()
        assert await codec.decode([encoded]) == [original]
    [first], [second] = await codec.encode([payload("same")]), await codec.encode([payload("same")])
    assert first.data != second.data, "every payload gets a fresh nonce"


async def test_rotated_key_sets_still_decrypt_old_payloads():
    k1, k2 = new_key(), new_key()
    before = codec_from_env(keys_env("k1", k1=k1))
    [old] = await before.encode([payload({"chain": "old"})])

    after = codec_from_env(keys_env("k2", k1=k1, k2=k2))
    [new] = await after.encode([payload({"chain": "new"})])
    assert new.metadata[KEY_ID] == b"k2"
    assert [value(p) for p in await after.decode([old, new])] == [{"chain": "old"}, {"chain": "new"}]


async def test_unknown_or_wrong_keys_fail_with_a_clear_error():
    k1 = new_key()
    [sealed] = await codec_from_env(keys_env("k1", k1=k1)).encode([payload({"x": 1})])

    with pytest.raises(PayloadDecodeError, match=r"key id 'k1', which is not configured \(known: k2\)"):
        await codec_from_env(keys_env("k2", k2=new_key())).decode([sealed])
    with pytest.raises(PayloadDecodeError, match="does not decrypt with the configured key"):
        await codec_from_env(keys_env("k1", k1=new_key())).decode([sealed])
    with pytest.raises(PayloadDecodeError, match=f"no keys are configured: set {ENV_KEYS}"):
        await codec_from_env({}).decode([sealed])
    assert issubclass(PayloadDecodeError, HandoffError)


@pytest.mark.parametrize(("env", "message"), [
    pytest.param({ENV_KEYS: "k1"}, "each entry is ID:BASE64KEY", id="no-colon"),
    pytest.param({ENV_KEYS: "k1:not base64!"}, "key 'k1' is not valid base64", id="bad-base64"),
    pytest.param({ENV_KEYS: "k1:" + base64.b64encode(b"short").decode()}, "key 'k1' is 5 bytes", id="short-key"),
    pytest.param({ENV_KEYS: "k1:{k},k1:{k}"}, "appears twice", id="duplicate-id"),
    pytest.param({ENV_KEYS: "k1:{k},k2:{k}"}, f"set {ENV_KEY_ID}", id="ambiguous-current"),
    pytest.param({ENV_KEYS: "k1:{k}", ENV_KEY_ID: "k9"}, "k9 is not among the keys", id="unknown-current"),
    pytest.param({ENV_KEY_ID: "k1"}, f"{ENV_KEYS} is empty", id="id-without-keys"),
    pytest.param({ENV_THRESHOLD: "big"}, "number of bytes or 'off'", id="bad-threshold"),
])
def test_bad_configuration_is_one_typed_line(env, message):
    key = new_key()
    env = {k: v.replace("{k}", key) for k, v in env.items()}
    with pytest.raises(CodecConfigError, match=message) as raised:
        CodecSettings.from_env(env)
    text = str(raised.value)
    assert isinstance(raised.value, HandoffError)
    assert "\n" not in text and key not in text, "one line, and never the key itself"


def test_settings_never_print_keys():
    key = new_key()
    settings = CodecSettings.from_env({ENV_KEYS: f"only:{key}"})
    assert settings.key_id == "only"
    assert key not in repr(settings) and str(base64.b64decode(key)) not in repr(settings)


def test_a_bad_configuration_stops_the_cli_with_one_line(cli_env):
    result = subprocess.run([HANDOFF, "codec-server", "--port", str(free_port())],
                            env={**cli_env, ENV_KEYS: "k1:short"}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {ENV_KEYS}: key 'k1' is not valid base64"]


# -- end to end ------------------------------------------------------------------------


async def temporal_show(address: str, workflow_id: str, *extra: str) -> str:
    process = await asyncio.create_subprocess_exec(
        temporal_binary(), "workflow", "show", "--workflow-id", workflow_id, "--address", address,
        "--namespace", "default", "--output", "json", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()[-2000:]
    return out.decode()


def payload_data(output: str) -> str:
    """The `data` of every payload in `temporal ... --output json` output (it prints them as
    base64), decoded and joined: what a reader of the history can see."""
    found: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("data"), str) and isinstance(node.get("metadata"), dict):
                found.append(base64.b64decode(node["data"]).decode(errors="replace"))
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(json.loads(output))
    return "\n".join(found)


def wait_listening(port: int, process: subprocess.Popen, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not port_open(port):
        assert process.poll() is None, process.stderr.read() if process.stderr else "exited"
        assert time.monotonic() < deadline, f"nothing listening on {port}"
        time.sleep(0.1)


async def test_encrypted_chain_is_unreadable_in_history_but_readable_through_the_codec_server(
        address, cli_env, uid, monkeypatch):
    secret = f"TOP-SECRET-{uuid.uuid4().hex}"
    env = keys_env("k2", k1=new_key(), k2=new_key())
    for name, setting in env.items():
        monkeypatch.setenv(name, setting)
    client = await connect(address=address)
    assert client.data_converter.payload_codec is not None

    async def review(ctx):
        return ctx.complete({"saw": ctx.context_data["secret"], "bulk": len(ctx.context_data["bulk"])})

    agent = make_agent(f"sealed-{uid}", review)
    request = build_request(to_agent=agent.id, task_description="review the sealed context",
                            context_data={"secret": secret, "bulk": "lorem ipsum " * 1000})
    queue = f"sealed-chains-{uid}"  # the session's chain worker has no keys: keep off its queue
    async with chain_worker(client, task_queue=queue), running(client, agent):
        handle = await client.start_workflow(
            CHAIN_WORKFLOW, request, id=str(request.chain_id), task_queue=queue, result_type=ChainRecord)
        record = await handle.result()
    assert record.status is ChainStatus.COMPLETED
    assert record.final_result == {"saw": secret, "bulk": 12_000}

    stored = await temporal_show(address, handle.id)
    assert secret not in stored and secret not in payload_data(stored)
    assert base64.b64encode(ENCODING_ENCRYPTED).decode() in stored

    port = free_port()
    server = subprocess.Popen([HANDOFF, "codec-server", "--port", str(port)],
                              env={**cli_env, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        await asyncio.to_thread(wait_listening, port, server)
        decoded = await temporal_show(address, handle.id, "--codec-endpoint", f"http://127.0.0.1:{port}")
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert base64.b64encode(ENCODING_ENCRYPTED).decode() not in decoded
    started = json.loads(decoded)["events"][0]["workflowExecutionStartedEventAttributes"]
    assert secret in payload_data(json.dumps(started["input"]))
    assert secret in payload_data(decoded)


async def test_codec_server_answers_cors_for_the_ui_origin_only():
    port = free_port()
    runner = await start_codec_server(codec_from_env({}), port=port, ui_origins=[UI_ORIGIN], allow_encode=True)
    base = f"http://127.0.0.1:{port}"
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type,x-namespace"}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.options(f"{base}/decode", headers={"Origin": UI_ORIGIN, **preflight}) as resp:
                assert resp.status < 300
                assert resp.headers["Access-Control-Allow-Origin"] == UI_ORIGIN
                allowed = {h.strip() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
                assert {"content-type", "x-namespace"} <= allowed
                assert "POST" in resp.headers["Access-Control-Allow-Methods"]
            async with http.options(f"{base}/decode", headers={"Origin": "http://evil.example", **preflight}) as resp:
                assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers

            body = {"payloads": [{"metadata": {"encoding": base64.b64encode(b"json/plain").decode()},
                                  "data": base64.b64encode(json.dumps({"x": "y" * 300_000}).encode()).decode()}]}
            async with http.post(f"{base}/encode", json=body, headers={"Origin": UI_ORIGIN}) as resp:
                assert resp.headers["Access-Control-Allow-Origin"] == UI_ORIGIN
                encoded = await resp.json()
            zlib_marker = base64.b64encode(ENCODING_ZLIB).decode()
            assert encoded["payloads"][0]["metadata"]["encoding"] == zlib_marker
            async with http.post(f"{base}/decode", json=encoded, headers={"X-Namespace": "default"}) as resp:
                assert await resp.json() == body
            async with http.post(f"{base}/decode", data=b"{not json") as resp:
                assert resp.status == 400
    finally:
        await runner.cleanup()


async def test_codec_server_reports_undecodable_payloads():
    port = free_port()
    [sealed] = await codec_from_env(keys_env("old", old=new_key())).encode([payload({"x": 1})])
    runner = await start_codec_server(codec_from_env(keys_env("new", new=new_key())), port=port)
    body = {"payloads": [{"metadata": {k: base64.b64encode(v).decode() for k, v in sealed.metadata.items()},
                          "data": base64.b64encode(sealed.data).decode()}]}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/decode", json=body) as resp:
                assert resp.status == 400
                assert "key id 'old', which is not configured" in (await resp.json())["error"]
    finally:
        await runner.cleanup()


def test_embedded_server_points_the_web_ui_at_the_codec_server():
    endpoint = "http://localhost:8081"
    server = EmbeddedServer(port=free_port(), ui_port=free_port(), codec_endpoint=endpoint)
    argv = server.argv()
    assert argv[argv.index("--ui-codec-endpoint") + 1] == endpoint
    assert "--ui-codec-endpoint" not in EmbeddedServer().argv()
    with server:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{server.ui_url}/api/v1/settings", timeout=5) as resp:
                    settings = json.load(resp)
                break
            except OSError:
                assert time.monotonic() < deadline, "the Web UI did not answer"
                time.sleep(0.2)
    assert settings["Codec"]["Endpoint"] == endpoint


def test_cli_server_takes_a_codec_endpoint():
    result = subprocess.run([HANDOFF, "server", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "--codec-endpoint" in result.stdout

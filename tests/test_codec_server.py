"""The codec server holds the deployment's decryption keys: who it answers, over real HTTP.

Host and Origin are checked on every request (403), a credential when authentication is
configured (401: a bearer token, or a JWT checked against a JWKS served here on loopback), it
does not listen beyond loopback without authentication, `/encode` is off unless asked for, and
malformed, truncated, oversized or decompression-bomb requests get a 4xx with CORS, never a 500.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import zlib
from collections.abc import AsyncIterator

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from temporalio.api.common.v1 import Payload

from handoff.payloads.codec import ENCODING_ZLIB, ENV_KEY_ID, ENV_KEYS, codec_from_env
from handoff.servers.codec import ENV_TOKENS, start_codec_server
from handoff.servers.http import AuthRefused, BearerAuth
from handoff.servers.embedded import free_port
from tests.support import HANDOFF, assert_usage_error

UI = "http://localhost:8233"
TOKEN = "s3cret-" + os.urandom(8).hex()
ISSUER, AUDIENCE = "https://issuer.test", "handoff-codec"


def keys_env() -> dict[str, str]:
    return {ENV_KEYS: f"k1:{base64.b64encode(os.urandom(32)).decode()}", ENV_KEY_ID: "k1"}


def as_json(*payloads: Payload) -> dict:
    return {"payloads": [{"metadata": {k: base64.b64encode(v).decode() for k, v in p.metadata.items()},
                          "data": base64.b64encode(p.data).decode()} for p in payloads]}


def plain(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(text).encode())


async def serve(**options) -> tuple[web.AppRunner, str]:
    port = free_port()
    runner = await start_codec_server(codec_from_env(keys_env(), strict=False), port=port, ui_origins=[UI], **options)
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_a_foreign_host_or_origin_is_refused_before_anything_is_decoded(http):
    runner, base = await serve()
    body = as_json(plain("hello"))
    try:
        async with http.post(f"{base}/decode", json=body, headers={"Origin": UI}) as resp:
            assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == UI
        async with http.post(f"{base}/decode", json=body, headers={"Host": "rebound.example:8081"}) as resp:
            assert resp.status == 403, "DNS rebinding: a name that resolves here is not a host we answer"
        async with http.post(f"{base}/decode", json=body, headers={"Origin": "http://evil.example"}) as resp:
            assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
        async with http.post(f"{base}/decode", json=body) as resp:  # the temporal CLI sends no Origin
            assert resp.status == 200
    finally:
        await runner.cleanup()


async def test_with_tokens_every_request_needs_one(http):
    runner, base = await serve(auth=BearerAuth(tokens=(TOKEN,)))
    body = as_json(plain("hello"))
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            async with http.post(f"{base}/decode", json=body, headers={"Origin": UI, **headers}) as resp:
                assert resp.status == 401, headers
                assert resp.headers["Access-Control-Allow-Origin"] == UI, "the UI can read the refusal"
        async with http.post(f"{base}/decode", json=body,
                             headers={"Origin": UI, "Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 200
            assert await resp.json() == body
        preflight = {"Origin": UI, "Access-Control-Request-Method": "POST"}
        async with http.options(f"{base}/decode", headers=preflight) as resp:
            assert resp.status == 204, "a browser's preflight carries no credential"
    finally:
        await runner.cleanup()


@pytest.fixture
async def jwks() -> AsyncIterator[tuple[rsa.RSAPrivateKey, str]]:
    """A JWKS endpoint on loopback with one RSA key, as an identity provider publishes it."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    async def keys(_: web.Request) -> web.Response:
        return web.json_response({"keys": [{**public, "kid": "k1", "use": "sig"}]})

    app = web.Application()
    app.router.add_get("/jwks.json", keys)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield key, f"http://127.0.0.1:{port}/jwks.json"
    finally:
        await runner.cleanup()


def token(key, **claims) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "someone", "iat": now, "exp": now + 300, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


async def test_a_jwt_is_checked_against_the_jwks_issuer_and_audience(http, jwks):
    key, url = jwks
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    runner, base = await serve(auth=BearerAuth(jwks_url=url, issuer=ISSUER, audience=AUDIENCE))
    body = as_json(plain("hello"))

    async def status(credential: str) -> int:
        async with http.post(f"{base}/decode", json=body, headers={"Authorization": f"Bearer {credential}"}) as resp:
            return resp.status

    try:
        assert await status(token(key)) == 200
        assert await status(token(key, aud="someone-else")) == 401
        assert await status(token(key, iss="https://other.test")) == 401
        assert await status(token(key, exp=int(time.time()) - 10)) == 401
        assert await status(token(other)) == 401, "signed by a key the JWKS does not hold"
        assert await status("not.a.jwt") == 401
    finally:
        await runner.cleanup()


async def test_it_does_not_listen_beyond_loopback_without_authentication(cli_env):
    with pytest.raises(AuthRefused, match="beyond loopback"):
        await start_codec_server(None, host="0.0.0.0", port=free_port())
    with pytest.raises(AuthRefused, match="issuer and audience"):
        BearerAuth(jwks_url="http://127.0.0.1:1/jwks.json")
    refused = subprocess.run([HANDOFF, "codec-server", "--host", "0.0.0.0", "--port", str(free_port())],
                             env={**cli_env, ENV_TOKENS: ""}, capture_output=True, text=True, timeout=60)
    assert_usage_error(refused, "beyond loopback")
    runner = await start_codec_server(None, host="0.0.0.0", port=free_port(), auth=BearerAuth(tokens=(TOKEN,)))
    await runner.cleanup()


async def test_encode_is_off_unless_asked_for(http):
    body = as_json(plain("x" * 300_000))
    runner, base = await serve()
    try:
        async with http.post(f"{base}/encode", json=body) as resp:
            assert resp.status in (404, 405)
    finally:
        await runner.cleanup()
    runner, base = await serve(allow_encode=True)
    try:
        async with http.post(f"{base}/encode", json=body) as resp:
            assert resp.status == 200
            [sealed] = (await resp.json())["payloads"]
            assert base64.b64decode(sealed["metadata"]["encoding"]) == b"binary/encrypted"
    finally:
        await runner.cleanup()


async def test_bad_bodies_get_a_4xx_with_cors_never_a_500(http):
    runner, base = await serve()
    codec = codec_from_env(keys_env())
    [sealed] = await codec.encode([plain("secret")])
    truncated = Payload(metadata=dict(sealed.metadata), data=sealed.data[:20])
    short = Payload(metadata=dict(sealed.metadata), data=sealed.data[:5])
    bomb = Payload(metadata={"encoding": ENCODING_ZLIB}, data=zlib.compress(b"\0" * (64 * 1024 * 1024), 9))
    not_a_payload = Payload(metadata={"encoding": ENCODING_ZLIB}, data=zlib.compress(b"\xff\xff\xff garbage"))
    try:
        for bad in (truncated, short, bomb, not_a_payload):
            async with http.post(f"{base}/decode", json=as_json(bad), headers={"Origin": UI}) as resp:
                assert resp.status == 400, (bad.metadata, await resp.text())
                assert resp.headers["Access-Control-Allow-Origin"] == UI
        assert len(bomb.data) < 200_000, "a small request that would inflate to 64 MiB"
        for raw in (b"{not json", b'{"payloads": [{"data": 7}]}', b"\xff\xfe"):
            async with http.post(f"{base}/decode", data=raw, headers={"Origin": UI}) as resp:
                assert resp.status == 400 and resp.headers["Access-Control-Allow-Origin"] == UI, raw
        largest_inline = as_json(plain("y" * 2_000_000))
        async with http.post(f"{base}/decode", json=largest_inline) as resp:
            assert resp.status == 200, "the largest inline payload fits the request limit"
        async with http.post(f"{base}/decode", data=b"x" * (5 * 1024 * 1024), headers={"Origin": UI}) as resp:
            assert resp.status == 413 and resp.headers["Access-Control-Allow-Origin"] == UI
    finally:
        await runner.cleanup()

"""Large contexts: payloads over a threshold travel through external storage, not Temporal.

Temporal refuses payloads over 2 MB. With external storage on, the SDK replaces every payload
over `threshold` with a small reference and keeps the bytes in a driver: the filesystem driver
below (the embedded default: every process of a laptop or one host shares the directory), or
the SDK's S3 driver for a real deployment. Stored blobs are content-addressed, so a context
that every hop carries unchanged is written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from temporalio.api.common.v1 import Payload
from temporalio.converter import (
    ExternalStorage,
    StorageDriver,
    StorageDriverClaim,
    StorageDriverRetrieveContext,
    StorageDriverStoreContext,
)

from handoff.constants import MAX_EXTERNAL_CONTEXT_BYTES
from handoff.errors import HandoffError

PAYLOAD_DIR_ENV = "HANDOFF_PAYLOAD_DIR"
S3_BUCKET_ENV = "HANDOFF_S3_BUCKET"
S3_ENDPOINT_ENV = "HANDOFF_S3_ENDPOINT_URL"
THRESHOLD = 256 * 1024
"""Payloads above this many bytes are stored externally (the SDK's default)."""


class StorageError(HandoffError):
    """An externally stored payload cannot be written or read."""


class FileStorageDriver(StorageDriver):
    """Stores payloads as files named by their SHA-256 in one directory."""

    def __init__(self, directory: str | os.PathLike[str], name: str = "handoff-files") -> None:
        self._directory = Path(directory)
        self._name = name

    def name(self) -> str:
        return self._name

    def type(self) -> str:
        return "handoff.filesystem"

    async def store(
        self, context: StorageDriverStoreContext, payloads: Sequence[Payload]
    ) -> list[StorageDriverClaim]:
        return await asyncio.to_thread(self._store_all, payloads)

    async def retrieve(
        self, context: StorageDriverRetrieveContext, claims: Sequence[StorageDriverClaim]
    ) -> list[Payload]:
        return await asyncio.to_thread(self._retrieve_all, claims)

    def _store_all(self, payloads: Sequence[Payload]) -> list[StorageDriverClaim]:
        self._directory.mkdir(parents=True, exist_ok=True)
        claims = []
        for payload in payloads:
            data = payload.SerializeToString()
            digest = hashlib.sha256(data).hexdigest()
            path = self._directory / digest
            if not path.exists():  # content-addressed: an unchanged context is written once
                partial = path.with_suffix(f".{os.getpid()}.tmp")
                partial.write_bytes(data)
                partial.replace(path)
            claims.append(StorageDriverClaim({"sha256": digest}))
        return claims

    def _retrieve_all(self, claims: Sequence[StorageDriverClaim]) -> list[Payload]:
        payloads = []
        for claim in claims:
            digest = claim.claim_data.get("sha256", "")
            if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                raise StorageError(f"malformed storage claim {dict(claim.claim_data)!r}")
            path = self._directory / digest
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                raise StorageError(f"stored payload {digest} is missing from {self._directory}") from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise StorageError(f"stored payload {digest} is corrupt")
            payload = Payload()
            payload.ParseFromString(data)
            payloads.append(payload)
        return payloads


def file_storage(directory: str | os.PathLike[str], threshold: int = THRESHOLD) -> ExternalStorage:
    return ExternalStorage(drivers=[FileStorageDriver(directory)], payload_size_threshold=threshold)


def storage_configured() -> bool:
    """Whether this environment stores large payloads externally (S3 or a directory)."""
    return bool(os.environ.get(S3_BUCKET_ENV) or os.environ.get(PAYLOAD_DIR_ENV))


# S3 clients live as long as the process: every client and worker it builds may store and
# fetch payloads until it exits.
_s3_clients = contextlib.AsyncExitStack()


async def s3_storage(bucket: str, endpoint_url: str | None = None, threshold: int = THRESHOLD) -> ExternalStorage:
    """The SDK's S3 driver on an aioboto3 client (credentials and region from the usual AWS
    environment); `endpoint_url` for an S3-compatible server. Needs the `s3` extra."""
    try:
        import aioboto3
        from temporalio.contrib.aws.s3driver import S3StorageDriver
        from temporalio.contrib.aws.s3driver.aioboto3 import new_aioboto3_client
    except ImportError:
        raise StorageError(f"{S3_BUCKET_ENV} is set but aioboto3 is missing: pip install 'handoff[s3]'") from None
    s3 = await _s3_clients.enter_async_context(aioboto3.Session().client("s3", endpoint_url=endpoint_url))
    driver = S3StorageDriver(client=new_aioboto3_client(s3), bucket=bucket,
                             max_payload_size=MAX_EXTERNAL_CONTEXT_BYTES + 1024 * 1024)
    return ExternalStorage(drivers=[driver], payload_size_threshold=threshold)


async def storage_from_env() -> ExternalStorage | None:
    """S3 when $HANDOFF_S3_BUCKET is set (endpoint: $HANDOFF_S3_ENDPOINT_URL), else files in
    $HANDOFF_PAYLOAD_DIR when that is set; else none (payloads stay inline)."""
    bucket = os.environ.get(S3_BUCKET_ENV)
    if bucket:
        return await s3_storage(bucket, os.environ.get(S3_ENDPOINT_ENV) or None)
    directory = os.environ.get(PAYLOAD_DIR_ENV)
    return file_storage(directory) if directory else None

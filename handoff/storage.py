"""Large contexts: payloads over a threshold travel through external storage, not Temporal.

Temporal refuses payloads over 2 MB. With external storage on, the SDK replaces every payload
over `threshold` with a small reference and keeps the bytes in a driver: the filesystem driver
below (the embedded default: every process of a laptop or one host shares the directory), or
the SDK's S3 driver for a real deployment. Stored blobs are content-addressed, so a context
that every hop carries unchanged is written once.
"""

from __future__ import annotations

import asyncio
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

from handoff.errors import HandoffError

PAYLOAD_DIR_ENV = "HANDOFF_PAYLOAD_DIR"
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


def storage_from_env() -> ExternalStorage | None:
    """File storage in $HANDOFF_PAYLOAD_DIR when it is set; else none (payloads stay inline)."""
    directory = os.environ.get(PAYLOAD_DIR_ENV)
    return file_storage(directory) if directory else None

"""Large contexts: payloads over a threshold travel through external storage, not Temporal.

Temporal refuses payloads over 2 MB. With external storage on, the SDK replaces every payload
over `threshold` with a small reference and keeps the bytes in a driver: the filesystem driver
below, or the SDK's S3 driver for a deployment across hosts. Stored blobs are content-addressed,
so a context that every hop carries unchanged is written once.

Which one, from the environment (`storage_from_env`): S3 when `HANDOFF_S3_BUCKET` is set; files in
`HANDOFF_PAYLOAD_DIR` when that is set (`off`: none); otherwise, when the Temporal server is on
this host (a loopback address), files in a per-user directory every process of this host's
deployment shares (`default_payload_dir()`), swept of blobs unused for
`HANDOFF_PAYLOAD_RETENTION_DAYS` (7). A server elsewhere and no setting: payloads stay inline.

A payload directory must be this user's alone: one that another user owns, that group or others
may write, or that is a symlink is refused. Blobs are read only as regular files, never through a
link, and every blob is checked against its digest on read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import os
import re
import stat
import tempfile
import time
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

from handoff.constants import LARGE_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES
from handoff.errors import HandoffError
from handoff.settings import Settings, settings

PAYLOAD_DIR_ENV = Settings.env_name("payload_dir")
RETENTION_ENV = Settings.env_name("payload_retention_days")
S3_BUCKET_ENV = Settings.env_name("s3_bucket")
S3_ENDPOINT_ENV = Settings.env_name("s3_endpoint_url")
THRESHOLD = LARGE_PAYLOAD_BYTES
"""Payloads above this many bytes are stored externally (the SDK's default)."""
MAX_STORED_BYTES = MAX_PAYLOAD_BYTES
"""No stored payload is larger (a context at its limit, plus its envelope)."""
DEFAULT_RETENTION_DAYS = 7.0
SWEEP_EVERY_S = 3600.0
CHUNK = 1024 * 1024
BLOB_NAME = re.compile(r"[0-9a-f]{64}")
"""A blob's file name: the SHA-256 of its content."""
PARTIAL_NAME = re.compile(r"\.[0-9a-f]{64}\.[a-z0-9_]+\.tmp")
"""A blob being written (or left behind by a writer that died): `.<digest>.<random>.tmp`."""


class StorageError(HandoffError):
    """An externally stored payload cannot be written or read."""


class FileStorageDriver(StorageDriver):
    """Stores payloads as files named by their SHA-256 in one directory, readable by this user
    only. The directory is created 0700 if missing, and refused (`StorageError`) unless this user
    owns it, no one else may write it and it is not a symlink. A blob unused (neither stored nor
    read) for `retention_days` is swept away; the sweep removes only blobs and partial writes,
    never other files, directories or symlinks."""

    def __init__(self, directory: str | os.PathLike[str], name: str = "handoff-files",
                 retention_days: float = DEFAULT_RETENTION_DAYS) -> None:
        self._directory = Path(directory)
        self._name = name
        self._retention_s = retention_days * 86400
        self._swept = -SWEEP_EVERY_S

    @property
    def directory(self) -> Path:
        return self._directory

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
        self._check_directory()
        claims = [StorageDriverClaim({"sha256": self._store(payload.SerializeToString())})
                  for payload in payloads]
        self._sweep()
        return claims

    def _store(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self._directory / digest
        if not _touch_blob(path):  # content-addressed: an unchanged context is written once
            self._write_blob(path, digest, data)
        return digest

    def _write_blob(self, path: Path, digest: str, data: bytes) -> None:
        # a name of its own per writer (threads of one process included), 0600 from birth; the
        # rename replaces whatever is at the blob's name (a planted link itself, not its target)
        fd, partial = tempfile.mkstemp(dir=self._directory, prefix=f".{digest}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(partial, path)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise StorageError(f"cannot store payload {digest} in {self._directory}: {error}") from None

    def _retrieve_all(self, claims: Sequence[StorageDriverClaim]) -> list[Payload]:
        self._check_directory()
        return [self._retrieve(claim) for claim in claims]

    def _retrieve(self, claim: StorageDriverClaim) -> Payload:
        digest = claim.claim_data.get("sha256", "")
        if not BLOB_NAME.fullmatch(digest):
            raise StorageError(f"malformed storage claim {dict(claim.claim_data)!r}")
        fd = self._open_blob(digest)  # the claim names a digest, never a path
        try:
            data = _read_bounded(fd, digest)
            if hashlib.sha256(data).hexdigest() != digest:
                raise StorageError(f"stored payload {digest} is corrupt")
            with contextlib.suppress(OSError):
                os.utime(fd)  # in use: not swept (the file read, whatever its name points to now)
        finally:
            os.close(fd)
        payload = Payload()
        payload.ParseFromString(data)
        return payload

    def _open_blob(self, digest: str) -> int:
        """A descriptor of the blob `digest`, a regular file no larger than `MAX_STORED_BYTES`."""
        path = self._directory / digest
        try:
            # O_NONBLOCK: a FIFO planted at a blob's name must not stall the open; it is refused below
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise StorageError(
                f"stored payload {digest} is not in {self._directory}: the processes of this deployment "
                "do not share one payload store (across hosts, set HANDOFF_S3_BUCKET, or "
                "HANDOFF_PAYLOAD_DIR to a shared volume, for every process)") from None
        except OSError as error:
            # O_NOFOLLOW fails with ELOOP exactly when the name is a symlink
            reason = "is a symlink, which the store never follows" if error.errno == errno.ELOOP else str(error)
            raise StorageError(f"stored payload {digest} in {self._directory} {reason}; refused") from None
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise StorageError(f"stored payload {digest} in {self._directory} is not a regular file; refused")
            if status.st_size > MAX_STORED_BYTES:
                raise StorageError(f"stored payload {digest} is larger than any payload a chain carries")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_directory(self) -> None:
        """Create the directory (0700) if it is missing; raise `StorageError` unless it is trusted."""
        try:
            self._directory.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            pass
        except OSError as error:
            raise StorageError(f"cannot create payload directory {self._directory}: {error}") from None
        try:
            problem = _directory_problem(os.lstat(self._directory), self._directory)
        except OSError as error:
            problem = f"cannot be examined ({error})"
        if problem:
            raise StorageError(f"payload directory {self._directory} {problem}")

    def _sweep(self) -> None:
        """Remove blobs and partial writes unused for the retention period (at most once an hour
        per process). Any other entry of the directory is left alone."""
        now = time.monotonic()
        if now - self._swept < SWEEP_EVERY_S:
            return
        self._swept = now
        cutoff = time.time() - self._retention_s
        with contextlib.suppress(OSError), os.scandir(self._directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if (_is_stored_name(entry.name) and entry.is_file(follow_symlinks=False)
                            and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                        os.unlink(entry.path)


def _is_stored_name(name: str) -> bool:
    """Whether a file name is one the file store writes: a blob or a partial write."""
    return bool(BLOB_NAME.fullmatch(name) or PARTIAL_NAME.fullmatch(name))


def _directory_problem(status: os.stat_result, directory: Path) -> str | None:
    """Why a payload directory (its `lstat`) cannot be trusted, or None when it can: it must be
    a real directory, owned by this user, that neither group nor others may write."""
    if stat.S_ISLNK(status.st_mode):
        return "is a symlink: set the directory it points to instead"
    if not stat.S_ISDIR(status.st_mode):
        return "is not a directory"
    if status.st_uid != os.geteuid():
        return (f"is owned by uid {status.st_uid}, not this user (uid {os.geteuid()}): "
                "chown it or use another directory")
    if status.st_mode & 0o022:
        return (f"is writable by group or others (mode {stat.S_IMODE(status.st_mode):o}): "
                f"chmod 700 {directory}")
    return None


def _touch_blob(path: Path) -> bool:
    """Mark the blob at `path` as in use; False when no regular file is there (nothing, or a
    planted link, which storing replaces)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        os.utime(path, follow_symlinks=False)  # if a link took its place since, the link is touched
    except OSError:
        return False
    return True


def _read_bounded(fd: int, digest: str) -> bytes:
    """The content of `fd`, read in chunks; `StorageError` as soon as it passes `MAX_STORED_BYTES`
    (a file may grow after its size was checked), so no more than that is ever held."""
    parts, total = [], 0
    while chunk := os.read(fd, min(CHUNK, MAX_STORED_BYTES + 1 - total)):
        total += len(chunk)
        if total > MAX_STORED_BYTES:
            raise StorageError(f"stored payload {digest} is larger than any payload a chain carries")
        parts.append(chunk)
    return b"".join(parts)


def file_storage(directory: str | os.PathLike[str], threshold: int = THRESHOLD,
                 retention_days: float = DEFAULT_RETENTION_DAYS) -> ExternalStorage:
    return ExternalStorage(drivers=[FileStorageDriver(directory, retention_days=retention_days)],
                           payload_size_threshold=threshold)


def default_payload_dir() -> Path:
    """Where a host's processes store large payloads when nothing says otherwise: per user,
    under $XDG_STATE_HOME (default ~/.local/state)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "handoff" / "payloads"


def is_local(address: str) -> bool:
    """Whether a Temporal address (host:port) is on this host."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def payload_dir(address: str) -> Path | None:
    """The directory large payloads go to for a client of `address`, or None (S3, or inline)."""
    env = settings()
    if env.s3_bucket:
        return None
    setting = env.payload_dir.strip()
    if setting.lower() == "off":
        return None
    if setting:
        return Path(setting)
    return default_payload_dir() if is_local(address) else None


def storage_configured(address: str) -> bool:
    """Whether clients of `address` built from this environment store large payloads externally."""
    return bool(settings().s3_bucket) or payload_dir(address) is not None


def _retention_days() -> float:
    value = settings().payload_retention_days.strip()
    try:
        days = float(value) if value else DEFAULT_RETENTION_DAYS
    except ValueError:
        raise StorageError(f"{RETENTION_ENV} must be a number of days, got {value!r}") from None
    if not days > 0:
        raise StorageError(f"{RETENTION_ENV} must be more than 0 days, got {value!r}")
    return days


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

    class PinnedS3StorageDriver(S3StorageDriver):
        """The SDK's S3 driver, reading only from the configured bucket: a claim read from
        history that names another bucket is refused, not followed."""

        async def retrieve(self, context: StorageDriverRetrieveContext,
                           claims: Sequence[StorageDriverClaim]) -> list[Payload]:
            for claim in claims:
                if claim.claim_data.get("bucket") != bucket:
                    raise StorageError(f"a payload claim names bucket {claim.claim_data.get('bucket')!r}, "
                                       f"not the configured {bucket!r}; refused")
            return await super().retrieve(context, claims)

    s3 = await _s3_clients.enter_async_context(aioboto3.Session().client("s3", endpoint_url=endpoint_url))
    driver = PinnedS3StorageDriver(client=new_aioboto3_client(s3), bucket=bucket, max_payload_size=MAX_STORED_BYTES)
    return ExternalStorage(drivers=[driver], payload_size_threshold=threshold)


async def storage_from_env(address: str) -> ExternalStorage | None:
    """The external storage for a client of the Temporal server at `address` (see the module)."""
    env = settings()
    if env.s3_bucket:
        return await s3_storage(env.s3_bucket, env.s3_endpoint_url or None)
    directory = payload_dir(address)
    return file_storage(directory, retention_days=_retention_days()) if directory else None

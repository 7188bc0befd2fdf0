"""The payload codec chain: context travels with every hop, so it is compressed when large and,
when keys are configured, encrypted before it reaches the Temporal server.

Configured once, from the environment (see `CodecSettings.from_env`):

- `HANDOFF_COMPRESSION_THRESHOLD`: zlib-compress payloads whose serialized size is above this
  many bytes (default 256 KiB, so the Web UI shows ordinary payloads as they are); `off`
  disables compression.
- `HANDOFF_ENCRYPTION_KEYS`: `id:<base64 of 32 bytes>` entries, comma separated, e.g.
  `k1:...,k2:...`. Unset: no encryption.
- `HANDOFF_ENCRYPTION_KEY_ID`: the key that encrypts new payloads (optional with a single key).
  Every configured key still decrypts, so keys rotate by adding a new one, making it current,
  and dropping the old one once no history needs it.

A fresh key: `python -c "import base64, os; print(base64.b64encode(os.urandom(32)).decode())"`.

Each codec wraps the whole serialized payload (metadata included) in a new payload whose
`encoding` names the codec, so decoding is exact and payloads without that marking (small
ones, or ones written before the codec was enabled) pass through untouched.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError
from pydantic import BaseModel, ConfigDict, Field
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import (
    PydanticPayloadConverter,
    pydantic_data_converter,
)
from temporalio.converter import (
    DataConverter,
    DefaultFailureConverter,
    DefaultFailureConverterWithEncodedAttributes,
    EncodingPayloadConverter,
    PayloadCodec,
)

from handoff.constants import LARGE_PAYLOAD_BYTES, MAX_PAYLOAD_BYTES
from handoff.errors import HandoffError
from handoff.settings import Settings, settings, switched_on

ENV_KEYS = Settings.env_name("encryption_keys")
ENV_KEY_ID = Settings.env_name("encryption_key_id")
ENV_THRESHOLD = Settings.env_name("compression_threshold")
ENV_STRICT = Settings.env_name("encryption_strict")

DEFAULT_COMPRESSION_THRESHOLD = LARGE_PAYLOAD_BYTES
MAX_DECOMPRESSED_BYTES = MAX_PAYLOAD_BYTES
"""No payload a chain carries inflates past this; a compressed payload that would is refused."""
KEY_BYTES = 32
NONCE_BYTES = 12

ENCODING = "encoding"
ENCODING_ZLIB = b"binary/zlib"
ENCODING_ENCRYPTED = b"binary/encrypted"
ENCODING_REFUSED = b"binary/handoff-refused-unencrypted"
"""What strict decryption makes of a payload that was not encrypted: no value can be read from
it, so code that needs its value (a workflow's input, an activity's result) fails, and a workflow
that fails this way ends (its failure types include ValueError) instead of retrying its task."""
KEY_ID = "encryption-key-id"

_KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class CodecConfigError(HandoffError, ValueError):
    """The codec settings in the environment cannot be used; nothing was connected."""


class PayloadDecodeError(HandoffError):
    """A payload this process cannot decode (unknown key id, wrong key, corrupt data)."""


class CodecSettings(BaseModel):
    """Validated codec configuration: what `codec_from_settings` builds the chain from."""

    model_config = ConfigDict(frozen=True)

    compression_threshold: int | None = DEFAULT_COMPRESSION_THRESHOLD
    keys: dict[str, bytes] = Field(default_factory=dict, repr=False)  # secrets: never printed
    key_id: str | None = None
    strict: bool = True
    """With keys: refuse payloads that are not encrypted (`HANDOFF_ENCRYPTION_STRICT=off` accepts
    them, e.g. while histories from before encryption are still read)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CodecSettings:
        """Read and check the `HANDOFF_*` codec variables; raises `CodecConfigError`."""
        env = settings(environ)
        keys = _parse_keys(env.encryption_keys)
        key_id = env.encryption_key_id.strip() or None
        if key_id is not None and not keys:
            raise CodecConfigError(f"{ENV_KEY_ID}={key_id} is set but {ENV_KEYS} is empty")
        if keys and key_id is None:
            if len(keys) > 1:
                raise CodecConfigError(
                    f"{ENV_KEYS} has {len(keys)} keys ({', '.join(keys)}): "
                    f"set {ENV_KEY_ID} to the one that encrypts")
            key_id = next(iter(keys))
        if key_id is not None and key_id not in keys:
            raise CodecConfigError(f"{ENV_KEY_ID}={key_id} is not among the keys in {ENV_KEYS} ({', '.join(keys)})")
        strict = switched_on(env.encryption_strict)
        return cls(compression_threshold=_parse_threshold(env.compression_threshold), keys=keys, key_id=key_id,
                   strict=strict)


def _parse_threshold(value: str | None) -> int | None:
    if value is None or not value.strip():
        return DEFAULT_COMPRESSION_THRESHOLD
    if value.strip().lower() in ("off", "none", "false"):
        return None
    try:
        threshold = int(value)
    except ValueError:
        raise CodecConfigError(f"{ENV_THRESHOLD} must be a number of bytes or 'off', got {value!r}") from None
    if threshold < 0:
        raise CodecConfigError(f"{ENV_THRESHOLD} must not be negative, got {threshold}")
    return threshold


def _parse_keys(value: str) -> dict[str, bytes]:
    keys: dict[str, bytes] = {}
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        key_id, sep, encoded = entry.partition(":")
        key_id = key_id.strip()
        if not sep or not _KEY_ID_PATTERN.match(key_id):
            raise CodecConfigError(
                f"{ENV_KEYS}: each entry is ID:BASE64KEY (ID of letters, digits, '_.-'), "
                f"got {_redacted(entry)!r}")
        if key_id in keys:
            raise CodecConfigError(f"{ENV_KEYS}: key id {key_id!r} appears twice")
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise CodecConfigError(f"{ENV_KEYS}: key {key_id!r} is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise CodecConfigError(
                f"{ENV_KEYS}: key {key_id!r} is {len(key)} bytes; AES-256-GCM needs {KEY_BYTES}")
        keys[key_id] = key
    return keys


def _redacted(entry: str) -> str:
    """An entry for an error message, without anything that may be the secret."""
    head, sep, _ = entry.partition(":")
    return f"{head}:..." if sep else f"<{len(entry)} characters with no ':'>"


def _parsed(raw: bytes, kind: str) -> Payload:
    """The payload a codec wrapped; PayloadDecodeError when the bytes are not one."""
    try:
        return Payload.FromString(raw)
    except DecodeError:
        raise PayloadDecodeError(f"a {kind} payload does not hold a payload (corrupt data)") from None


class CompressionCodec(PayloadCodec):
    """zlib for payloads whose serialized size is above `threshold` bytes, when it helps."""

    def __init__(self, threshold: int = DEFAULT_COMPRESSION_THRESHOLD, level: int = 6) -> None:
        self.threshold = threshold
        self.level = level

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._encode(p) for p in payloads]

    def _encode(self, payload: Payload) -> Payload:
        raw = payload.SerializeToString()
        if len(raw) <= self.threshold:
            return payload
        packed = zlib.compress(raw, self.level)
        if len(packed) >= len(raw):
            return payload
        return Payload(metadata={ENCODING: ENCODING_ZLIB}, data=packed)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._decode(p) for p in payloads]

    @staticmethod
    def _decode(payload: Payload) -> Payload:
        if payload.metadata.get(ENCODING) != ENCODING_ZLIB:
            return payload
        inflate = zlib.decompressobj()
        try:
            raw = inflate.decompress(payload.data, MAX_DECOMPRESSED_BYTES)
        except zlib.error as err:
            raise PayloadDecodeError(f"a zlib payload is corrupt: {err}") from None
        if inflate.unconsumed_tail:  # a decompression bomb, or a payload no chain could carry
            raise PayloadDecodeError(
                f"a zlib payload inflates past {MAX_DECOMPRESSED_BYTES:,} bytes; refused")
        if not inflate.eof:
            raise PayloadDecodeError("a zlib payload is truncated")
        return _parsed(raw, "zlib")


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM with a named key; the key id travels in the payload's metadata (and is bound
    to the ciphertext), so any configured key decrypts what it encrypted."""

    def __init__(self, keys: Mapping[str, bytes], key_id: str, *, strict: bool = False) -> None:
        if key_id not in keys:
            raise CodecConfigError(f"encryption key id {key_id!r} is not among the keys ({', '.join(keys)})")
        self.key_id = key_id
        self.strict = strict
        self._ciphers = {kid: AESGCM(key) for kid, key in keys.items()}

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._encode(p) for p in payloads]

    def _encode(self, payload: Payload) -> Payload:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.key_id].encrypt(nonce, payload.SerializeToString(), self.key_id.encode())
        return Payload(metadata={ENCODING: ENCODING_ENCRYPTED, KEY_ID: self.key_id.encode()},
                       data=nonce + sealed)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._decode(p) for p in payloads]

    def _decode(self, payload: Payload) -> Payload:
        if payload.metadata.get(ENCODING) != ENCODING_ENCRYPTED:
            if self.strict:
                return Payload(metadata={ENCODING: ENCODING_REFUSED}, data=(
                    f"a payload ({payload.metadata.get(ENCODING, b'?').decode(errors='replace')}) "
                    f"was not encrypted, and with {ENV_KEYS} set unencrypted payloads are refused "
                    f"({ENV_STRICT}=off accepts them)").encode())
            return payload
        key_id = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise PayloadDecodeError(
                f"payload is encrypted with key id {key_id!r}, which is not configured "
                f"(known: {', '.join(self._ciphers)}); add it to {ENV_KEYS}")
        try:
            plain = cipher.decrypt(payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:], key_id.encode())
        except (InvalidTag, ValueError):
            raise PayloadDecodeError(
                f"payload encrypted with key id {key_id!r} does not decrypt with the configured "
                f"key of that id (wrong key, or corrupt or truncated data)") from None
        return _parsed(plain, "encrypted")


class DecryptionUnavailableCodec(PayloadCodec):
    """Used when no keys are configured: encrypted payloads fail with a clear error instead of
    reaching the pydantic converter as unreadable bytes."""

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return list(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        for payload in payloads:
            if payload.metadata.get(ENCODING) == ENCODING_ENCRYPTED:
                key_id = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
                raise PayloadDecodeError(
                    f"payload is encrypted with key id {key_id!r} but no keys are configured: set {ENV_KEYS}")
        return list(payloads)


class CodecChain(PayloadCodec):
    """Codecs applied in order on encode and in reverse order on decode."""

    def __init__(self, codecs: Sequence[PayloadCodec]) -> None:
        self.codecs = list(codecs)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        result = list(payloads)
        for codec in self.codecs:
            result = await codec.encode(result)
        return result

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        result = list(payloads)
        for codec in reversed(self.codecs):
            result = await codec.decode(result)
        return result


def codec_from_settings(settings: CodecSettings, *, strict: bool | None = None) -> PayloadCodec | None:
    """Compression first (ciphertext does not compress), then encryption; None when neither
    applies. `strict`: override the settings' (the codec server shows any payload as it is)."""
    codecs: list[PayloadCodec] = []
    if settings.compression_threshold is not None:
        codecs.append(CompressionCodec(settings.compression_threshold))
    if settings.keys and settings.key_id:
        codecs.append(EncryptionCodec(settings.keys, settings.key_id,
                                      strict=settings.strict if strict is None else strict))
    elif codecs:
        codecs.append(DecryptionUnavailableCodec())
    if not codecs:
        return None
    return codecs[0] if len(codecs) == 1 else CodecChain(codecs)


def codec_from_env(environ: Mapping[str, str] | None = None, *, strict: bool | None = None) -> PayloadCodec | None:
    """The codec chain the `HANDOFF_*` variables describe; raises `CodecConfigError`."""
    return codec_from_settings(CodecSettings.from_env(environ), strict=strict)


class UnencryptedPayload(PayloadDecodeError, ValueError):
    """A payload that should have been encrypted was not (strict decryption)."""


class RefusedPayloadConverter(EncodingPayloadConverter):
    """Reads what strict decryption refused: raises `UnencryptedPayload`, saying why."""

    @property
    def encoding(self) -> str:
        return ENCODING_REFUSED.decode()

    def to_payload(self, value: Any) -> Payload | None:
        return None  # never chosen to encode a value

    def from_payload(self, payload: Payload, type_hint: type | None = None) -> Any:
        raise UnencryptedPayload(payload.data.decode(errors="replace"))


class SharedPydanticPayloadConverter(PydanticPayloadConverter):
    """The pydantic payload converter, built once per process. The SDK copies its data converter
    for every serialization context (every activity, and with external storage every payload of
    a workflow task), and each copy constructed a new payload converter, with its own empty cache
    of pydantic type adapters, only to discard it. It holds no per-context state."""

    _instance: SharedPydanticPayloadConverter | None = None

    def __new__(cls) -> SharedPydanticPayloadConverter:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
            PydanticPayloadConverter.__init__(cls._instance)
            cls._instance._set_converters(*cls._instance.converters.values(), RefusedPayloadConverter())
        return cls._instance

    def __init__(self) -> None:  # initialised once, in __new__
        pass


def encrypts(codec: PayloadCodec | None) -> bool:
    """Whether `codec` encrypts what it encodes."""
    if isinstance(codec, CodecChain):
        return any(encrypts(c) for c in codec.codecs)
    return isinstance(codec, EncryptionCodec)


def data_converter(codec: PayloadCodec | None | Literal["env"] = "env") -> DataConverter:
    """The pydantic data converter (as `pydantic_data_converter`, built once) with `codec` (by
    default the one from the environment). When the codec encrypts, failures are encoded too:
    their message and stack trace travel as an encoded payload, so no exception text (a
    handler's, or pydantic's excerpt of bad input) reaches history in the clear."""
    if isinstance(codec, str):
        codec = codec_from_env()
    failures = DefaultFailureConverterWithEncodedAttributes if encrypts(codec) else DefaultFailureConverter
    return dataclasses.replace(pydantic_data_converter, payload_converter_class=SharedPydanticPayloadConverter,
                               payload_codec=codec, failure_converter_class=failures)

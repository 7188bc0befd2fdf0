"""Connecting to Temporal: through its environment configuration, with the data converter every
part of handoff uses (the pydantic converter, the payload codec and external storage the
`HANDOFF_*` variables describe), and how large a context such a client's chains may carry."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from temporalio.client import Client
from temporalio.converter import PayloadCodec
from temporalio.envconfig import ClientConfig
from temporalio.runtime import Runtime

from handoff.constants import MAX_CONTEXT_BYTES, MAX_EXTERNAL_CONTEXT_BYTES
from handoff.errors import ServerUnreachable
from handoff.observability.telemetry import tracing_interceptor
from handoff.payloads.codec import data_converter
from handoff.payloads.storage import storage_configured, storage_from_env

DEFAULT_ADDRESS = "localhost:7233"


async def connect(
    profile: str | None = None,
    *,
    address: str | None = None,
    namespace: str | None = None,
    runtime: Runtime | None = None,
    tracing: bool = False,
    codec: PayloadCodec | None | Literal["env"] = "env",
) -> Client:
    """A client configured from Temporal's environment configuration (TEMPORAL_ADDRESS,
    TEMPORAL_NAMESPACE, TLS, API key, profiles), defaulting to localhost:7233, with the
    pydantic data converter every part of handoff uses.

    `runtime`: e.g. `handoff.observability.telemetry.metrics_runtime(port)`, so this client and the workers
    built from it report metrics there. `tracing`: attach OpenTelemetry tracing to the client
    and its workers (needs the `otel` extra; raises `TelemetryUnavailable` without it).
    `codec`: the payload codec (compression, encryption) of the client and its workers; by
    default the one the `HANDOFF_*` variables describe (`handoff.payloads.codec`; bad settings raise
    `CodecConfigError`), None for none.
    """
    converter = data_converter(codec)
    config = connect_config(profile, address)
    storage = await storage_from_env(config["target_host"])
    if storage is not None:
        converter = dataclasses.replace(converter, external_storage=storage)
    if namespace:
        config["namespace"] = namespace
    interceptors = [tracing_interceptor()] if tracing else []
    try:
        return await Client.connect(
            **config, data_converter=converter, runtime=runtime, interceptors=interceptors
        )
    except RuntimeError as err:  # the core reports a failed connection as a plain runtime error
        raise ServerUnreachable(f"cannot reach the Temporal server at {config['target_host']}: {err}") from None


def connect_config(profile: str | None = None, address: str | None = None) -> dict[str, Any]:
    """Temporal's environment configuration, defaulting to localhost:7233."""
    config = ClientConfig.load_client_connect_config(profile=profile)
    config.setdefault("target_host", DEFAULT_ADDRESS)
    if address:
        config["target_host"] = address
    return config


def env_context_limit() -> int:
    """The context limit for clients that `connect()` builds from this environment."""
    external = storage_configured(connect_config()["target_host"])
    return MAX_EXTERNAL_CONTEXT_BYTES if external else MAX_CONTEXT_BYTES


def context_limit(client: Client) -> int:
    """How large a context chains started by `client` may carry: over Temporal's payload limit
    only when its converter stores large payloads externally."""
    external = client.data_converter.external_storage is not None
    return MAX_EXTERNAL_CONTEXT_BYTES if external else MAX_CONTEXT_BYTES

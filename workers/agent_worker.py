"""An agent's worker: polls `agent.<id>`, runs at most `max_concurrent` hops at once, and keeps
the agent's card in the registry while it runs."""

from __future__ import annotations

import asyncio
import os
import random
import socket
from contextlib import asynccontextmanager, suppress
from datetime import timedelta
from typing import AsyncIterator

import structlog
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from handoff.activities.hop import CANCEL_WITHIN_S, hop_activity
from handoff.agents.agent import Agent
from handoff.models.wire import LEASE_REFRESH_S
from handoff.registry import leave_registry, register_agent, registration_of
from handoff.client.versioning import current_build_id, deployment_config, set_current_build_id

log = structlog.get_logger("handoff.worker")

REGISTER_RETRY_S = 2.0
CONFIRM_AFTER_S = 2.0
"""When the worker asks whether the registry took its registration (or refused it, saying why)."""
REFRESH_JITTER = 0.2
"""Each refresh waits its period give or take this fraction, so a fleet started together spreads
its refreshes."""
MAX_HOSTNAME_CHARS = 64
"""Of the host's name, what an instance's name keeps: it stays within the registry's bound."""


def agent_worker(client: Client, agent: Agent, *, versioned: bool = False, **options) -> Worker:
    """The Temporal worker for one agent: the hop activity on the agent's own task queue.

    `versioned`: the worker is version `agent.version` of the agent's Worker Deployment, and
    gets hops only while that version is current (see `handoff rollout`).
    """
    options.setdefault("graceful_shutdown_timeout", timedelta(seconds=5))
    # A cancel reaches a handler with the answer to a heartbeat. The hop heartbeats rarely (each
    # recorded beat is billed) and once more as soon as it learns of a cancel; the SDK would hold
    # that beat back for up to 80 % of the heartbeat timeout since the last one unless told otherwise.
    options.setdefault("max_heartbeat_throttle_interval", timedelta(seconds=CANCEL_WITHIN_S))
    options.setdefault("default_heartbeat_throttle_interval", timedelta(seconds=CANCEL_WITHIN_S))
    if versioned:
        options["deployment_config"] = deployment_config(agent)
    return Worker(
        client,
        task_queue=agent.task_queue,
        activities=[hop_activity(agent)],
        max_concurrent_activities=agent.max_concurrent,
        **options,
    )


def instance_name(agent: Agent) -> str:
    """This worker's identity in the registry: at most 153 characters, within `MAX_INSTANCE_BYTES`."""
    return f"{agent.id}@{socket.gethostname()[:MAX_HOSTNAME_CHARS]}:{os.getpid()}:{id(agent):x}"


async def _send_registration(client: Client, agent: Agent, instance: str) -> None:
    """Register, retrying (with jitter) while the registry cannot be reached."""
    delay = REGISTER_RETRY_S
    while True:
        try:
            await register_agent(client, agent, instance)
            return
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the server may not be reachable yet; keep the worker running
            log.warning("agent_registration_failed", agent_id=agent.id, error=str(err))
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 30.0)


async def _confirm(client: Client, agent: Agent, instance: str) -> str:
    """Ask, a moment after a registration, whether the registry took it or refused it, and say
    so; what it said (empty when it could not be asked)."""
    await asyncio.sleep(CONFIRM_AFTER_S * random.uniform(1.0, 1.5))
    try:
        said = await registration_of(client, agent.id)
    except asyncio.CancelledError:
        raise
    except Exception as err:  # only a check: the registration was sent
        log.warning("agent_registration_unconfirmed", agent_id=agent.id, error=str(err))
        return ""
    if said.startswith("rejected"):
        log.error("agent_registration_rejected", agent_id=agent.id, reason=said.removeprefix("rejected: "))
    elif said.startswith("registered"):
        log.info("agent_registered", agent_id=agent.id, instance=instance)
    else:
        log.warning("agent_registration_unconfirmed", agent_id=agent.id, error="the registry does not know it yet")
    return said


async def _keep_registered(client: Client, agent: Agent, instance: str, sent: asyncio.Event,
                           refresh_every_s: float) -> None:
    """Register, then register again every `refresh_every_s` (jittered) for as long as the worker
    runs: each is one signal-with-start, which also recreates a registry that was removed. The
    outcome is asked after the first registration, and after each refresh until the registry has
    taken it (one refused because the registry was full is taken at a refresh once there is room)."""
    await _send_registration(client, agent, instance)
    sent.set()
    said = await _confirm(client, agent, instance)
    while True:
        await asyncio.sleep(refresh_every_s * random.uniform(1 - REFRESH_JITTER, 1 + REFRESH_JITTER))
        try:
            await register_agent(client, agent, instance)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the lease outlasts two missed refreshes
            log.warning("agent_registration_refresh_failed", agent_id=agent.id, error=str(err))
            continue
        if not said.startswith("registered"):
            said = await _confirm(client, agent, instance)


@asynccontextmanager
async def registered(client: Client, agent: Agent, *,
                     refresh_every_s: float = LEASE_REFRESH_S) -> AsyncIterator[str]:
    """Keep `agent` registered while the block runs (registering again every `refresh_every_s`,
    jittered, so the registry keeps its card: `LEASE_S`); deregister this instance on the way out."""
    instance = instance_name(agent)
    sent = asyncio.Event()
    registration = asyncio.create_task(_keep_registered(client, agent, instance, sent, refresh_every_s))
    try:
        yield instance
    finally:
        registration.cancel()
        with suppress(asyncio.CancelledError):  # a refresh under way ends before the deregistration
            await registration
        if sent.is_set():
            try:
                await asyncio.wait_for(leave_registry(client, agent.id, instance), timeout=5)
                log.info("agent_deregistered", agent_id=agent.id, instance=instance)
            except Exception as err:  # shutting down: the registry keeps the card until its lease ends
                log.warning("agent_deregistration_failed", agent_id=agent.id, error=str(err))


DEPLOYMENT_RETRIES_S = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Pauses before asking a Worker Deployment again when it said it was asked too often."""


async def _current_if_first(client: Client, agent: Agent) -> None:
    """Make this worker's version current when its deployment has none yet, asking again while
    the deployment says it is asked too often (the server limits requests per deployment)."""
    for retry_in in (*DEPLOYMENT_RETRIES_S, None):
        try:
            if await current_build_id(client, agent.id) is None:
                await set_current_build_id(client, agent.id, agent.version, checked=False)
                log.info("agent_version_current", agent_id=agent.id, build_id=agent.version)
            return
        except RPCError as err:
            if retry_in is None or err.status != RPCStatusCode.RESOURCE_EXHAUSTED:
                raise
        await asyncio.sleep(retry_in)


async def run_agent(
    client: Client, agent: Agent, stop: asyncio.Event, *, register: bool = True, versioned: bool = False,
    refresh_every_s: float = LEASE_REFRESH_S,
) -> None:
    """Run `agent`'s worker until `stop` is set, registered in the registry meanwhile (registering
    again every `refresh_every_s`).

    A versioned worker whose deployment has no current version yet makes its own version current:
    the first version of an agent serves at once; later ones wait for `handoff rollout`.
    """
    worker = agent_worker(client, agent, versioned=versioned)
    async with worker:
        if versioned:
            await _current_if_first(client, agent)
        if register:
            async with registered(client, agent, refresh_every_s=refresh_every_s):
                log.info("agent_worker_started", agent_id=agent.id, task_queue=agent.task_queue,
                         max_concurrent=agent.max_concurrent)
                await stop.wait()
        else:
            await stop.wait()
    log.info("agent_worker_stopped", agent_id=agent.id)

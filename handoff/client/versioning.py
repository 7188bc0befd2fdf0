"""Worker Deployments for agent rollouts: each agent is a deployment, each build id a version.

Hops are activities, which are not pinned to a version: once a new version is current, the next
hop to that agent, in new and in already running chains, runs on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from temporalio.api.workflowservice.v1 import (
    DescribeWorkerDeploymentRequest,
    SetWorkerDeploymentCurrentVersionRequest,
)
from temporalio.client import Client
from temporalio.common import WorkerDeploymentVersion
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import WorkerDeploymentConfig

from handoff.agents.agent import Agent
from handoff.errors import InvalidRequest, unless_missing
from handoff.models import check_agent_id

DEPLOYMENT_PREFIX = "handoff-agent-"
# The server bounds the calls about one deployment; a call refused as one too many is tried
# again after these pauses.
DEPLOYMENT_RETRIES_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)

T = TypeVar("T")


def deployment_name(agent_id: str) -> str:
    return f"{DEPLOYMENT_PREFIX}{agent_id}"


def deployment_config(agent: Agent) -> WorkerDeploymentConfig:
    """The worker's deployment version: the agent's deployment, its `version` as build id."""
    return WorkerDeploymentConfig(
        version=WorkerDeploymentVersion(deployment_name=deployment_name(agent.id), build_id=agent.version),
        use_worker_versioning=True,
    )


@dataclass(frozen=True)
class Routing:
    """Where hops to an agent's Worker Deployment go: the current version, a ramping one (with
    the percentage of hops it takes), and every version whose workers have polled."""

    current: str | None
    ramping: str | None
    ramping_percentage: float
    versions: tuple[str, ...]


async def routing_of(client: Client, agent_id: str) -> Routing | None:
    """The agent's deployment routing; None when it has no versioned workers (no deployment)."""
    response = await patiently(lambda: unless_missing(client.workflow_service.describe_worker_deployment(
        DescribeWorkerDeploymentRequest(namespace=client.namespace, deployment_name=deployment_name(agent_id)))))
    if response is None:
        return None
    info = response.worker_deployment_info
    routing = info.routing_config
    return Routing(current=routing.current_deployment_version.build_id or None,
                   ramping=routing.ramping_deployment_version.build_id or None,
                   ramping_percentage=routing.ramping_version_percentage,
                   versions=tuple(v.deployment_version.build_id for v in info.version_summaries))


async def current_build_id(client: Client, agent_id: str) -> str | None:
    """The build id hops to `agent_id` are routed to; None if the deployment has none yet."""
    routing = await routing_of(client, agent_id)
    return routing.current if routing is not None else None


async def set_current_build_id(client: Client, agent_id: str, build_id: str, *, checked: bool = True) -> None:
    """Route every later hop to `agent_id` to the workers of `build_id` (a rollout). `checked`:
    refuse an agent with no versioned workers, and a version none of whose workers has polled
    (a worker making its own version current, before its first poll is seen, passes False)."""
    check_agent_id(agent_id)
    if not build_id.strip():
        raise InvalidRequest("the build id is empty")
    routing = await routing_of(client, agent_id) if checked else None
    if checked and routing is None:
        raise InvalidRequest(f"cannot roll out {agent_id}: it has no versioned workers (deployment "
                             f"{deployment_name(agent_id)!r}); run them with `handoff worker --versioned`")
    if routing is not None and build_id not in routing.versions:
        seen = ", ".join(routing.versions) or "none"
        raise InvalidRequest(f"cannot roll out {agent_id} {build_id}: no worker of that version has polled "
                             f"(versions seen: {seen}); start them first")
    try:
        await patiently(lambda: client.workflow_service.set_worker_deployment_current_version(
            SetWorkerDeploymentCurrentVersionRequest(
                namespace=client.namespace, deployment_name=deployment_name(agent_id), build_id=build_id,
                allow_no_pollers=True)))
    except RPCError as err:
        if err.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT,
                          RPCStatusCode.FAILED_PRECONDITION):
            raise InvalidRequest(f"cannot roll out {agent_id} {build_id}: {err.message}") from None
        raise


async def patiently(call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, tried again after a pause while the server refuses it as one too many."""
    for pause in (*DEPLOYMENT_RETRIES_S, None):
        try:
            return await call()
        except RPCError as err:
            if err.status != RPCStatusCode.RESOURCE_EXHAUSTED or pause is None:
                raise
        await asyncio.sleep(pause)
    raise AssertionError("unreachable: the last try returns or raises")

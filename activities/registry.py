"""Registry lookups as an activity, so the chain workflow can read live task-queue state."""

from __future__ import annotations

from temporalio import activity
from temporalio.client import Client

from handoff.constants import DIRECTORY_ACTIVITY, RESOLVE_ACTIVITY
from handoff.models import Candidate, CapabilityCandidates, ResolveRequest
from handoff.registry import Directory


class RegistryActivities:
    """Activities that need a client; registered on the chain worker. Lookups go through one
    cached `Directory` per worker: no RPC per hop, however many agents are registered."""

    def __init__(self, client: Client) -> None:
        self._directory = Directory.of(client)

    @activity.defn(name=RESOLVE_ACTIVITY)
    async def resolve_candidates(self, request: ResolveRequest) -> list[Candidate]:
        return await self._directory.candidates(
            request.capability, like_agent=request.like_agent, exclude=request.exclude)

    @activity.defn(name=DIRECTORY_ACTIVITY)
    async def resolve_directory(self, limit: int) -> CapabilityCandidates:
        return CapabilityCandidates(candidates=await self._directory.every_capability(limit=limit))

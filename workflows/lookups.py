"""The chain workflow's registry lookups: the candidates of a capability hop or a fallback, and
the chain's lookup of every capability's candidates, which serves its capability hops while fresh
(a part of `HandoffChainWorkflow`)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, CancelledError

with workflow.unsafe.imports_passed_through():
    from handoff.constants import DIRECTORY_ACTIVITY, DIRECTORY_CANDIDATES, DIRECTORY_FRESH_S, RESOLVE_ACTIVITY
    from handoff.models import Candidate, CapabilityCandidates, ChainRecord, ResolveRequest

    from handoff.workflows.paths import Path, Target
    from handoff.workflows.versions import Behaviour


class Lookups:
    """A part of `HandoffChainWorkflow`, which provides the state declared here."""

    _behaviour: Behaviour
    _record: ChainRecord
    _directory: tuple[Any, CapabilityCandidates] | None

    async def _candidates(self, path: Path, target: Target) -> list[Candidate]:
        """The registered agents with the target's capability (or the capability of the agent it
        names), minus the agents that failed on this path, ranked (the resolve activity). A
        capability hop on a path where nothing failed yet takes them from the chain's lookup of
        every capability (`_every_capability`), when its protocol has one."""
        if self._behaviour.cost_floor and target.capability is not None and not path.failed:
            return (await self._every_capability(path)).candidates.get(target.capability, [])
        request = ResolveRequest(capability=target.capability,
                                 like_agent=None if target.capability else target.to_agent,
                                 exclude=sorted(path.failed))
        summary = f"resolve {target.capability.value if target.capability else 'like ' + target.to_agent}"
        found = await self._resolve(path, RESOLVE_ACTIVITY, request, list[Candidate], summary)
        return found if found is not None else []

    async def _every_capability(self, path: Path) -> CapabilityCandidates:
        """Every capability's best candidates, looked up at most once per `DIRECTORY_FRESH_S` of
        the chain's time: a chain's capability hops cost one lookup, not one each. A lookup that
        fails leaves no candidates, and is not kept."""
        now = workflow.now()
        if self._directory is not None and (now - self._directory[0]).total_seconds() < DIRECTORY_FRESH_S:
            return self._directory[1]
        found = await self._resolve(path, DIRECTORY_ACTIVITY, DIRECTORY_CANDIDATES, CapabilityCandidates,
                                    "resolve every capability")
        if found is None:
            return CapabilityCandidates()
        self._directory = (workflow.now(), found)
        return found

    async def _resolve(self, path: Path, activity: str, argument: Any, result_type: Any, summary: str) -> Any:
        """One registry lookup; None when the registry cannot be reached (the rules then give the
        chain a status).

        On the chain's own path, a local activity (no round trip through the server). Inside a
        branch, a regular activity: a local activity resolves when it finishes, outside the
        history's order of events, so with branches running side by side the live run and a
        replay could resume them in different orders and attach later results to the wrong
        branch; a regular activity's completion is an event, in the same order in both."""
        retry = RetryPolicy(maximum_attempts=3, initial_interval=timedelta(milliseconds=200))
        execute = workflow.execute_local_activity if path.position is None else workflow.execute_activity
        try:
            return await execute(activity, argument, result_type=result_type,
                                 start_to_close_timeout=timedelta(seconds=10), retry_policy=retry, summary=summary)
        except ActivityError as err:
            if isinstance(err.cause, CancelledError):  # the branch was cut or the chain cancelled
                raise asyncio.CancelledError("resolve cancelled") from err
            workflow.logger.warning("resolve_failed", extra={"chain_id": str(self._record.chain_id),
                                                             "reason": str(err.cause or err)})
            return None

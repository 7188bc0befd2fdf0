"""Typed errors. Each carries the facts a user needs; the CLI turns them into one line and exit 2."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from temporalio.service import RPCError, RPCStatusCode

T = TypeVar("T")


class HandoffError(Exception):
    """Base class of the errors this package raises on purpose: each says in one line what a user
    needs to know (the CLI prints it, and maps the error to its exit code)."""


class InvalidRequest(HandoffError, ValueError):
    """A chain request, context or option that cannot be accepted; nothing was started."""


class ContextTooLarge(InvalidRequest):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"context is {size:,} bytes of JSON; the limit is {limit:,} bytes per hop"
        )
        self.size = size
        self.limit = limit


class UnknownAgent(InvalidRequest):
    def __init__(self, agent_id: str, known: list[str]) -> None:
        listed = ", ".join(sorted(known)) or "none registered"
        super().__init__(f"Agent not found: {agent_id!r} (registered: {listed})")
        self.agent_id = agent_id
        self.known = known


class ServerUnreachable(HandoffError):
    """The Temporal server cannot be reached."""


class ChainNotFound(HandoffError, LookupError):
    def __init__(self, chain_id: str) -> None:
        super().__init__(f"no chain with id {chain_id}")
        self.chain_id = chain_id


class Unavailable(HandoffError):
    """Something a hop depends on cannot answer now (a model, a remote agent): the hop's retry
    policy tries again."""


class PermanentError(HandoffError):
    """Raise from a handler for a failure that retrying cannot fix: the hop fails at once.

    Any other exception from a handler is retried (bounded by the chain's `max_attempts`).
    """


async def unless_missing(call: Awaitable[T]) -> T | None:
    """The result of a call to the Temporal server; None when the server says it does not know
    what was asked for (NOT_FOUND)."""
    try:
        return await call
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return None
        raise

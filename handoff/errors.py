"""Typed errors. Each carries the facts a user needs; the CLI turns them into one line and exit 2."""

from __future__ import annotations


class HandoffError(Exception):
    """Base class of the errors this package raises on purpose."""


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
        super().__init__(f"unknown agent {agent_id!r} (known: {listed})")
        self.agent_id = agent_id
        self.known = known


class ChainNotFound(HandoffError, LookupError):
    def __init__(self, chain_id: str) -> None:
        super().__init__(f"no chain with id {chain_id}")
        self.chain_id = chain_id


class PermanentError(HandoffError):
    """Raise from a handler for a failure that retrying cannot fix: the hop fails at once.

    Any other exception from a handler is retried (bounded by the chain's `max_attempts`).
    """

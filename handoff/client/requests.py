"""Chain requests as the client validates them at the edge: one readable line (`InvalidRequest`)
for anything the chain could not take, before anything starts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from uuid import UUID, uuid4

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from handoff.client.connect import env_context_limit
from handoff.constants import CHAIN_PROTOCOL, MAX_CONTEXT_BYTES
from handoff.errors import ContextTooLarge, InvalidRequest
from handoff.models import AgentCapability, ChainPolicy, ChainRequest
from handoff.models.checks import one_line
from handoff.settings import Settings, settings


def build_request(
    *,
    task_description: str,
    to_agent: str | None = None,
    capability: AgentCapability | str | None = None,
    context_data: dict[str, Any] | None = None,
    chain_id: UUID | str | None = None,
    hop_timeout: float | None = None,
    max_depth: int | None = None,
    policy: ChainPolicy | Mapping[str, Any] | None = None,
    max_context_bytes: int | None = None,
) -> ChainRequest:
    """Validate a chain request at the edge; raises `InvalidRequest` with one readable line.

    The chain's bounds are its `policy` (a `ChainPolicy`, or a mapping of its fields);
    `hop_timeout` and `max_depth` are shorthands for its `hop_timeout_s` and `max_depth`, to
    give one way or the other. `max_context_bytes`: what this deployment can carry, by default
    what this environment's payload storage allows; a policy may lower the chain's limit, never
    raise it past that (without external storage, no hop input or result can be larger than a
    payload Temporal accepts, and a chain carrying one would stall).
    """
    if capability is not None:
        capability = capability_of(capability)
    fields = policy.model_dump(exclude_unset=True) if isinstance(policy, ChainPolicy) else dict(policy or {})
    for name, value in (("hop_timeout_s", hop_timeout), ("max_depth", max_depth)):
        if value is not None:
            if name in fields:
                raise InvalidRequest(f"{name} is given twice: as an argument and in the policy")
            fields[name] = value
    budget = fields.get("budget")
    if isinstance(budget, BaseModel):
        budget = fields["budget"] = budget.model_dump(exclude_unset=True)
    if isinstance(budget, dict) and "prices" not in budget:  # the deployment's table
        prices = deployment_prices()
        if prices:
            fields["budget"] = {**budget, "prices": prices}
    carried = max_context_bytes or env_context_limit()
    asked = fields.setdefault("max_context_bytes", carried)
    if isinstance(asked, (int, float)) and not isinstance(asked, bool) and asked > carried:
        raise InvalidRequest(
            f"policy.max_context_bytes {asked:,} is over the {carried:,} bytes this deployment can carry"
            + ("" if carried > MAX_CONTEXT_BYTES else
               " (without external payload storage: set HANDOFF_PAYLOAD_DIR or HANDOFF_S3_BUCKET)"))
    try:
        request = ChainRequest(
            protocol=CHAIN_PROTOCOL,
            chain_id=uuid4() if chain_id is None else chain_uuid(chain_id),
            to_agent=to_agent or "",
            capability=capability,
            task_description=task_description,
            context_data=context_data or {},
            policy=ChainPolicy(**fields),
        )
    except ValidationError as err:
        raise InvalidRequest(one_line(err)) from None
    return checked(request)


def deployment_prices() -> dict[str, Any]:
    """The model prices `HANDOFF_PRICES` configures (JSON), for budgets that name none;
    `InvalidRequest` when it is not a JSON object."""
    text = settings().prices.strip()
    if not text:
        return {}
    try:
        prices = json.loads(text)
    except ValueError as err:
        raise InvalidRequest(f"{Settings.env_name('prices')} is not JSON: {err}") from None
    if not isinstance(prices, dict):
        raise InvalidRequest(f"{Settings.env_name('prices')} must be a JSON object of model prices")
    return prices


def checked(request: ChainRequest) -> ChainRequest:
    """`request`, if the chain may start; else `InvalidRequest` (`ContextTooLarge`) saying why."""
    problem = request.problem()
    if problem:
        raise InvalidRequest(problem)
    try:
        size = len(request.model_dump_json())
    except PydanticSerializationError as err:  # e.g. text that is not valid UTF-8
        raise InvalidRequest(f"the request cannot be stored as JSON: {err}") from None
    if size > request.policy.max_context_bytes:
        raise ContextTooLarge(size, request.policy.max_context_bytes)
    return request


def capability_of(value: AgentCapability | str) -> AgentCapability:
    try:
        return AgentCapability(value)
    except ValueError:
        known = ", ".join(c.value for c in AgentCapability)
        raise InvalidRequest(f"unknown capability {value!r} (known: {known})") from None


def chain_uuid(value: UUID | str) -> UUID:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value))
    except ValueError:
        raise InvalidRequest(f"chain id must be a UUID, got {value!r}") from None

"""A2A agent cards, built from the registry when asked: handoff's own card (its skills are the
capabilities live agents serve now) and one card per registered agent."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
)
from a2a.utils import TransportProtocol
from temporalio.client import Client

from handoff.servers.http import BearerAuth
from handoff.models import AgentCapability
from handoff.models import AgentCard as HandoffCard
from handoff.registry import Directory

PROTOCOL_VERSION = "1.0"
CARD_PATH = "/.well-known/agent-card.json"



def skill_of(capability: AgentCapability, description: str = "") -> AgentSkill:
    words = capability.value.lower().replace("_", " ")
    return AgentSkill(id=capability.value, name=words, description=description or f"{words}, by handoff's agents",
                      tags=[capability.value, "handoff"])


def _secured(card: AgentCard, auth: BearerAuth) -> AgentCard:
    if auth.configured:
        card.security_schemes["bearer"].CopyFrom(
            SecurityScheme(http_auth_security_scheme=HTTPAuthSecurityScheme(scheme="bearer")))
        requirement = SecurityRequirement()
        requirement.schemes["bearer"].SetInParent()
        card.security_requirements.append(requirement)
    return card


REST_PATH = "/rest"
"""Where the HTTP+JSON (REST) binding is served, below an endpoint (`/rest`, `/agents/<id>/rest`)."""


@dataclass(frozen=True)
class Served:
    """How this server is reached and what it offers, as every card declares it: its base URL,
    its gRPC target (`host:port`, when the gRPC binding is served), authentication, and whether
    push notifications are on."""

    base_url: str
    auth: BearerAuth = BearerAuth()
    grpc_url: str | None = None
    push: bool = False

    def capabilities(self) -> AgentCapabilities:
        return AgentCapabilities(streaming=True, push_notifications=self.push, extended_agent_card=True)


def interfaces(endpoint: str, served: Served, agent_id: str = "") -> list[AgentInterface]:
    """The bindings an endpoint is served over: JSON-RPC at it, HTTP+JSON (REST) below it, and
    gRPC at the server's gRPC target, the agent named by the request's `tenant`."""
    found = [AgentInterface(protocol_binding=TransportProtocol.JSONRPC, url=endpoint,
                            protocol_version=PROTOCOL_VERSION),
             AgentInterface(protocol_binding=TransportProtocol.HTTP_JSON, url=f"{endpoint.rstrip('/')}{REST_PATH}",
                            protocol_version=PROTOCOL_VERSION)]
    if served.grpc_url:
        found.append(AgentInterface(protocol_binding=TransportProtocol.GRPC, url=served.grpc_url, tenant=agent_id,
                                    protocol_version=PROTOCOL_VERSION))
    return found


def agent_card_of(card: HandoffCard, served: Served) -> AgentCard:
    """The A2A card of a registered agent: a message to its endpoint starts a chain at it."""
    return _secured(AgentCard(
        name=card.name, description=card.description or f"{card.name}, a handoff agent",
        version=card.version, capabilities=served.capabilities(),
        default_input_modes=["text/plain", "application/json"], default_output_modes=["application/json"],
        skills=[skill_of(c, card.description) for c in card.capabilities],
        supported_interfaces=interfaces(f"{served.base_url}/agents/{card.agent_id}", served, card.agent_id),
    ), served.auth)


def handoff_card(cards: Sequence[HandoffCard], served: Served, version: str) -> AgentCard:
    """handoff's own card: its skills are the capabilities the live agents serve now."""
    offered = sorted({c for card in cards for c in card.capabilities}, key=lambda c: c.value)
    return _secured(AgentCard(
        name="handoff",
        description=("Durable peer-to-peer agent handoff on Temporal: a message starts a chain at the agent or "
                     "capability its metadata names (metadata.agent, metadata.capability)"),
        version=version, capabilities=served.capabilities(),
        default_input_modes=["text/plain", "application/json"], default_output_modes=["application/json"],
        skills=[skill_of(c) for c in offered] or [AgentSkill(
            id="handoff", name="handoff chain", tags=["handoff"],
            description="Start a durable chain of handoff agents (none is live right now)")],
        supported_interfaces=interfaces(f"{served.base_url}/", served),
    ), served.auth)


def extended_card(cards: Sequence[HandoffCard], live: Sequence[HandoffCard], served: Served,
                  version: str) -> AgentCard:
    """The authenticated extended card (GetExtendedAgentCard): handoff's card whose skills are
    every registered agent, live or not, one skill each (`agent:<id>`: its name, description,
    capabilities as tags, `live` or `not-live`, and its endpoint), the directory the public card
    leaves out."""
    alive = {c.agent_id for c in live}
    card = handoff_card(live, served, version)
    del card.skills[:]
    for agent in sorted(cards, key=lambda c: c.agent_id):
        card.skills.append(AgentSkill(
            id=f"agent:{agent.agent_id}", name=agent.name,
            description=(agent.description or f"{agent.name}, a handoff agent")
            + f" (endpoint {served.base_url}/agents/{agent.agent_id})",
            tags=[*(c.value for c in agent.capabilities), "live" if agent.agent_id in alive else "not-live"]))
    card.description += "; this extended card lists every registered agent as a skill"
    return card


class LiveCards:
    """The registry's cards, and the live ones, from the process's cached `Directory`."""

    def __init__(self, client: Client) -> None:
        self._directory = Directory.of(client)

    async def registered(self) -> list[HandoffCard]:
        return list(await self._directory.cards())

    async def live(self) -> list[HandoffCard]:
        return await self._directory.live_cards()

"""handoff's console: web pages for the people around the agents (`handoff console`)."""

from handoff.console.app import Console, ConsoleServer
from handoff.console.auth import ConsoleAuth, Person, Role

__all__ = ["Console", "ConsoleAuth", "ConsoleServer", "Person", "Role"]

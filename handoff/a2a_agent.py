"""Remote A2A agents, by the import path they are documented under: see `handoff.agents.remote`."""

from handoff.agents.remote import RemoteUnavailable, remote_agent

__all__ = ["RemoteUnavailable", "remote_agent"]

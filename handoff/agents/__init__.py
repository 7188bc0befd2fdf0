"""Agents: the agent SDK (`Agent`, a handler per hop), LLM agents whose model chooses the handoff
(`llm_agent`), and remote A2A agents served as handoff agents (`remote_agent`)."""

from handoff.agents.agent import Agent, Handler
from handoff.agents.llm import llm_agent
from handoff.agents.remote import remote_agent

__all__ = ["Agent", "Handler", "llm_agent", "remote_agent"]

"""LLM agents, by the import path they are documented under: see `handoff.agents.llm`."""

from handoff.agents.llm import ModelUnavailable, Tool, fit_prompt, llm_agent, transfers

__all__ = ["ModelUnavailable", "Tool", "fit_prompt", "llm_agent", "transfers"]

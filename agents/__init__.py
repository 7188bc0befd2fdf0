"""Example specialist agents for the demo chain (`make run`).

analyzer (CODE_ANALYSIS) -> auditor (SECURITY_AUDIT) -> dba (DATABASE_OPERATIONS)
-> tester (TESTING) -> deployer (DEPLOYMENT). Each hands off by capability, not by name,
and skips the hops its input does not need (clean code goes straight to TESTING).
"""

from __future__ import annotations

from agents.analyzer import analyzer
from agents.auditor import auditor
from agents.dba import dba
from agents.deployer import deployer
from agents.tester import tester
from handoff.agent import Agent

ALL_AGENTS: list[Agent] = [analyzer, auditor, dba, tester, deployer]

__all__ = ["ALL_AGENTS", "analyzer", "auditor", "dba", "deployer", "tester"]

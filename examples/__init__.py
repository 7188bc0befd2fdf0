"""Example specialist agents for the demo chain (`make run`).

analyzer (CODE_ANALYSIS) -> auditor (SECURITY_AUDIT) -> dba (DATABASE_OPERATIONS)
-> tester (TESTING) -> deployer (DEPLOYMENT). Each hands off by capability, not by name,
and skips the hops its input does not need (clean code goes straight to TESTING).
"""

from __future__ import annotations

from handoff.agent import Agent
from handoff.examples.analyzer import analyzer
from handoff.examples.auditor import auditor
from handoff.examples.dba import dba
from handoff.examples.deployer import deployer
from handoff.examples.tester import tester

ALL_AGENTS: list[Agent] = [analyzer, auditor, dba, tester, deployer]

__all__ = ["ALL_AGENTS", "analyzer", "auditor", "dba", "deployer", "tester"]

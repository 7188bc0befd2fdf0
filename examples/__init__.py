"""Example specialist agents for the demo chain (`make run`).

analyzer (CODE_ANALYSIS) fans out to auditor (SECURITY_AUDIT, which hands on to dba,
DATABASE_OPERATIONS, when it finds dynamic SQL) and tester (TESTING) at once; deployer
(DEPLOYMENT) joins their results, after a person approves (the demo's policy asks for it). Each
hands off by capability, not by name, and skips the hops its input does not need (clean code goes
straight to TESTING, then DEPLOYMENT). Started elsewhere in a plain chain, auditor, dba and tester
hand on in a line: auditor -> dba -> tester -> deployer.
"""

from __future__ import annotations

from handoff.agents.agent import Agent
from handoff.examples.analyzer import analyzer
from handoff.examples.auditor import auditor
from handoff.examples.dba import dba
from handoff.examples.deployer import deployer
from handoff.examples.tester import tester

ALL_AGENTS: list[Agent] = [analyzer, auditor, dba, tester, deployer]

__all__ = ["ALL_AGENTS", "analyzer", "auditor", "dba", "deployer", "tester"]

"""Triage: a language model reads the request and picks the specialist that starts on it.

An LLM agent (`handoff.agents.llm`): its transfer tools are built from the live registry at its hop, so
it can only pick an agent that is running and that the chain's policy lets it reach; its choice
and its reason go into the hop's entry. `handoff dev --llm` (`make run-llm`) runs it on the local
model; `HANDOFF_TRIAGE_MODEL`, `OPENAI_BASE_URL` and `OPENAI_API_KEY` point it at another one.
"""

from __future__ import annotations

import os

from handoff.agents.llm import llm_agent
from handoff.servers.local_model import MODEL_NAME
from handoff.models import AgentCapability

TRIAGE_TARGETS = ["analyzer", "auditor", "tester"]
"""Whom triage may pick in the demo (the policy's `allowed_handoffs` for it)."""

triage = llm_agent(
    id="triage",
    name="Triage",
    capabilities=[AgentCapability.CODE_ANALYSIS],
    model=os.environ.get("HANDOFF_TRIAGE_MODEL", MODEL_NAME),
    instructions=("Read the review request and hand it to the specialist that should start on it: "
                  "the analyzer for a first look at the code, the auditor for security findings, "
                  "the tester for a test plan."),
    description="Reads a request and picks the specialist that starts on it (a language model).",
    can_finish=False,
    max_tokens=96,
    max_task_chars=100,
    context_tokens=800,
)

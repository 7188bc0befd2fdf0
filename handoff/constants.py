"""Names and defaults shared by the workflows, activities, workers and the CLI.

Kept in one module so a task-queue name or a search-attribute key is never spelled twice.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

CHAIN_TASK_QUEUE = "handoff.chains"
"""Task queue of the chain workflow, the registry workflow and their local activities."""

AGENT_TASK_QUEUE_PREFIX = "agent."
CHAIN_WORKFLOW = "HandoffChain"
REGISTRY_WORKFLOW = "AgentRegistry"
REGISTRY_WORKFLOW_ID = "handoff-agent-registry"
REGISTRY_MEMO_KEY = "agents"
"""Memo key under which the registry workflow publishes its agent cards."""
REGISTRY_REJECTED_MEMO_KEY = "rejected"
"""Memo key of the registrations the registry refused, by agent id (why)."""
REGISTER_SIGNAL = "register_agents"
DEREGISTER_SIGNAL = "deregister_agents"
REGISTRATION_QUERY = "registration_of"
"""The registry's signals: registrations and deregistrations, however many arrive at once."""
REGISTER_UPDATE = "register"
DEREGISTER_UPDATE = "deregister"
"""The registry's Updates: one registration or deregistration, answered at once (an operator's tool)."""
HOP_ACTIVITY = "handoff.hop"
APPROVAL_UPDATE = "decide_approval"
"""The chain workflow's Update that approves or rejects a hop waiting for a person."""
STEER_UPDATE = "steer"
"""The chain workflow's Update that gives its next hop a person's message (and maybe a new target)."""
STOP_UPDATE = "stop_after_hop"
"""The chain workflow's Update that stops it once its running hops end."""
CHAIN_STATE_QUERY = "chain_state"
PROGRESS_SIGNAL = "progress"
"""What an agent says it is doing, from inside a running hop (`ctx.progress`): a `ProgressNote`."""
"""The chain workflow's query: its record as it stands."""
RESOLVE_ACTIVITY = "handoff.resolve_candidates"
DIRECTORY_ACTIVITY = "handoff.resolve_directory"
"""Every capability's best candidates in one lookup, which a chain reuses while it is fresh."""
DIRECTORY_FRESH_S = 2.0
"""How long a chain reuses its lookup of every capability's candidates (the registry's own cache
refreshes the stats of where a hop goes as often)."""
DIRECTORY_CANDIDATES = 8
"""Of each capability, how many candidates that lookup keeps (a fallback asks afresh, for up to 32)."""
INLINE_RESULT_BYTES = 1024
"""A hop result over this many bytes (as JSON) is carried once, in its hop's activity result in
the chain's history: later hops' inputs and the record the workflow returns name it instead, and
the agent's worker and the client read it back from there."""

STARTER_AGENT = "starter"
"""`from_agent` of the first hop: the chain was started by a person or a program, not an agent."""

MAX_CHAIN_DEPTH = 5
"""A chain runs at most this many hops (`chain_depth` 0..4); configurable lower, never higher."""

DEFAULT_HOP_TIMEOUT_S = 60.0
DEFAULT_SCHEDULE_TO_START_S = 10.0
DEFAULT_HEARTBEAT_TIMEOUT_S = 10.0
BEAT_SHARE = 0.8
"""A running hop heartbeats every this share of its heartbeat timeout (the SDK's own default):
each recorded heartbeat is a billed action, so a 30 s hop with the default timeout records three."""
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_RETRY_INITIAL_S = 1.0
DEFAULT_MAX_VISITS_PER_AGENT = 2
# A chain's progress search attributes (current agent, depth, agents) follow each hop once the
# chain has run this long; a chain that ends sooner gets them in one write at its end. Each
# upsert is a visibility write, and the timer that starts them wakes the workflow once: worth it
# for a chain of slow agents, not for one that ends within seconds. Visibility itself lags about
# a second on a cluster, and the Web UI shows the running hop live either way. The mark is well
# past what a chain of fast agents takes on a loaded server, so those never pay the wake-up and
# the upserts when the server is busiest (docs/figures.md).
DEFAULT_PROGRESS_AFTER_S = 10.0

DEFAULT_MAX_BRANCHES = 8
MAX_BRANCHES = 32
"""Branches per fan-out: 8 unless a chain's policy says otherwise, never more than 32."""
DEFAULT_MAX_TOTAL_HOPS = 20
MAX_TOTAL_HOPS = 200
"""A chain's hop budget over all its branches (fallbacks included): 20 unless its policy says."""
DEFAULT_APPROVAL_TIMEOUT_S = 24 * 3600.0
MAX_APPROVAL_TIMEOUT_S = 30 * 24 * 3600.0
"""How long a hop waits for a person's decision: a day unless the policy says, at most 30 days."""
MAX_DESCRIPTION_CHARS = 500
"""An agent's description as its card carries it."""
MAX_IDENTITY_CHARS = 200
MAX_COMMENT_CHARS = 2000
"""Bounds of an approval decision's identity and comment."""

MAX_CONTEXT_BYTES = 1_900_000
"""Largest hop input we schedule: a little under the payload limit, leaving room for the envelope."""
MAX_EXTERNAL_CONTEXT_BYTES = 32 * 1024 * 1024
"""With external payload storage, the largest hop input or result a chain accepts."""
MAX_PAYLOAD_BYTES = MAX_EXTERNAL_CONTEXT_BYTES + 1024 * 1024
"""No payload a chain carries is larger (a context at its limit, plus its envelope): a compressed
payload that would inflate past it, or a stored one that is larger, is refused."""
LARGE_PAYLOAD_BYTES = 256 * 1024
"""Payloads over this many bytes are compressed (by default) and stored externally (when storage
is configured): smaller ones stay readable in the Web UI as they are."""

RETRIED_HTTP_STATUSES = frozenset({408, 409, 429})
"""HTTP answers worth asking again (a timeout, a conflict, a rate limit), with every 5xx: a model's
or a remote agent's; any other 4xx is not retried."""


def retried_status(status: int) -> bool:
    """Whether an HTTP status from a model or a remote agent is worth a retry."""
    return status in RETRIED_HTTP_STATUSES or status >= 500

MAX_NESTING = 64
"""How deep a context or result may nest lists and objects (pydantic's decoder stops near 250)."""

DEFAULT_UI_URL = "http://localhost:8233"
"""The embedded Temporal Web UI, where links point unless `HANDOFF_UI_URL` says otherwise."""
DEFAULT_UI_ORIGINS = ("http://localhost:8233", "http://127.0.0.1:8233")
"""The embedded Web UI's origins, both spellings: the codec server answers them by default."""

LIVE_POLLER_WINDOW_S = 70.0
"""An agent is live when one of its pollers was seen within this many seconds."""

# Search attributes: registered by `handoff server` / `handoff dev`, upserted by the chain workflow.
SA_STATUS = SearchAttributeKey.for_keyword("HandoffStatus")
SA_AGENTS = SearchAttributeKey.for_keyword_list("HandoffAgents")
SA_CURRENT_AGENT = SearchAttributeKey.for_keyword("HandoffCurrentAgent")
SA_DEPTH = SearchAttributeKey.for_int("HandoffDepth")
SA_RERUN_OF = SearchAttributeKey.for_keyword("HandoffRerunOf")
"""Set at the start of a re-run: the chain it re-runs (`handoff list --rerun-of`)."""
SA_COST = SearchAttributeKey.for_float("HandoffCost")
"""What a chain with a budget has spent, in its budget's currency: set at its start, written at its end."""
SEARCH_ATTRIBUTES = (SA_STATUS, SA_AGENTS, SA_CURRENT_AGENT, SA_DEPTH, SA_RERUN_OF, SA_COST)


def agent_task_queue(agent_id: str) -> str:
    """The task queue an agent's worker polls: `agent.<agent_id>`."""
    return f"{AGENT_TASK_QUEUE_PREFIX}{agent_id}"

CHAIN_PROTOCOL = 5
"""The chain behaviour new requests ask for (`ChainRequest.protocol`; `handoff.workflows.versions`
reads it): 1, every chain completes its workflow whatever its status; 2, a chain that ends
unsuccessfully fails its workflow, its record in the failure's details, so the Web UI lists it as
Failed; 3, every behaviour keyed on the protocol alone (silent rounds unmarked, the hop budget and
deferred progress whatever fields the policy carries); 4, at the cost floor: no progress timer, one
registry lookup serves a chain's capability hops while fresh, large results carried once; 5, hops'
usage recorded and added up, and the chain's budget (`ChainPolicy.budget`) enforced."""
UNSUCCESSFUL_CHAIN_ERROR = "UnsuccessfulChain"
"""The failure type of a chain workflow that ended unsuccessfully (its details: the record)."""

# Error types of the hop activity that retrying cannot fix (raised in activities/hop.py).
PERMANENT_ERROR = "PermanentError"
INVALID_RESULT_ERROR = "InvalidHandlerResult"
RESULT_TOO_LARGE_ERROR = "PayloadsTooLarge"
NON_RETRYABLE_ERRORS = (PERMANENT_ERROR, INVALID_RESULT_ERROR, RESULT_TOO_LARGE_ERROR, "ValidationError")

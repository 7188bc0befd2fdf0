"""Evaluation cases: a chain's start and what should happen, one JSON object a line.

A file of cases is read and validated whole before anything runs (`load_cases`): every bad line
is named at once, one line each (`cases.jsonl:3: expect.status: ...`), in an `InvalidCases`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from handoff.client import build_request
from handoff.errors import InvalidRequest
from handoff.models import AgentCapability, ChainPolicy, ChainRequest, ChainStatus, check_agent_id

MAX_LINE_BYTES = 1_000_000
"""The longest line a case file may hold (a case's context travels in its line)."""
MAX_CASES = 10_000
MAX_FILE_BYTES = 200_000_000
MAX_NAME_CHARS = 200
MAX_TASK_CHARS = 10_000
MAX_EXPECTED_HOPS = 50
MAX_LISTED = 100
"""The most agents `expect.visits` and keys `expect.result_keys` may list."""
MAX_KEY_CHARS = 200
MAX_PROBLEMS_SHOWN = 50
"""How many bad lines an `InvalidCases` names one by one (the rest are counted)."""

ANY_HOP = "*"
"""In `expect.hops`: this hop may go anywhere (it is not scored)."""
ANY_MORE = "..."
"""Last in `expect.hops`: any further hops, or none, may follow."""
CAPABILITIES = frozenset(c.value for c in AgentCapability)


class InvalidCases(InvalidRequest):
    """A case file that cannot be run: `problems` holds one line per bad case (`file:line: what`)."""

    def __init__(self, problems: list[str], more: int = 0) -> None:
        self.problems = problems
        self.more = more
        lines = problems + ([f"... and {more} more bad cases"] if more else [])
        super().__init__("\n".join(lines))


class Closed(BaseModel):
    """A model that refuses fields it does not know (a misspelt expectation is an error, not a
    silent pass) and values that are not finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


def target_problem(target: str) -> str | None:
    """What is wrong with an expected hop target: an agent id or a capability name."""
    if target in CAPABILITIES:
        return None
    try:
        check_agent_id(target)
    except InvalidRequest:
        return f"{target!r} is neither an agent id nor a capability ({', '.join(sorted(CAPABILITIES))})"
    return None


class Visits(Closed):
    """The agents a chain should visit (its branches included): as a set, or in this order."""

    agents: list[str] = Field(min_length=1, max_length=MAX_LISTED)
    ordered: bool = False

    @field_validator("agents")
    @classmethod
    def _agent_ids(cls, agents: list[str]) -> list[str]:
        for agent in agents:
            check_agent_id(agent)
        return agents


class Expect(Closed):
    """What should happen; each field given is checked, the others are not."""

    hops: list[str] | None = Field(default=None, min_length=1, max_length=MAX_EXPECTED_HOPS)
    """Hop k's target, hop 0 (where the chain starts) included: an agent id, or a capability the
    hop is addressed by or its agent has; `*` for a hop that may go anywhere, and `...` last for
    any further hops. Each hop from 1 on is a routing choice, scored against what the agent at the
    hop before chose."""
    visits: Visits | None = None
    status: ChainStatus | None = None
    result_keys: list[str] | None = Field(default=None, min_length=1, max_length=MAX_LISTED)
    """Keys the chain's final result must have."""
    max_duration_s: float | None = Field(default=None, gt=0, le=86_400)
    max_tokens: int | None = Field(default=None, ge=0, le=100_000_000)
    """Most prompt plus completion tokens the chain's model decisions may use in all."""

    @field_validator("hops")
    @classmethod
    def _targets(cls, hops: list[str]) -> list[str]:
        for index, target in enumerate(hops):
            if target == ANY_MORE:
                if index != len(hops) - 1:
                    raise ValueError(f"{ANY_MORE!r} may only end the list")
                if index == 0:
                    raise ValueError(f"{ANY_MORE!r} needs the hops before it")
                continue
            problem = None if target == ANY_HOP else target_problem(target)
            if problem:
                raise ValueError(f"hop {index}: {problem}")
        return hops

    @field_validator("result_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        if any(not key or len(key) > MAX_KEY_CHARS for key in keys):
            raise ValueError(f"each key is 1 to {MAX_KEY_CHARS} characters")
        return keys

    @model_validator(mode="after")
    def _says_something(self) -> Expect:
        if all(getattr(self, name) is None for name in type(self).model_fields):
            raise ValueError("expect names nothing to check (hops, visits, status, result_keys, "
                             "max_duration_s, max_tokens)")
        return self

    @property
    def exact_hops(self) -> list[str] | None:
        """`hops` without a final `...`."""
        if self.hops is None:
            return None
        return self.hops[:-1] if self.hops[-1] == ANY_MORE else self.hops

    @property
    def open_ended(self) -> bool:
        """Whether `hops` ends with `...` (any further hops may follow)."""
        return self.hops is not None and self.hops[-1] == ANY_MORE


class Case(Closed):
    """One case: where a chain starts, with what, and what should happen."""

    name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME_CHARS)
    """Default: `line N` of its file."""
    to_agent: str | None = None
    capability: AgentCapability | None = None
    task: str = Field(min_length=1, max_length=MAX_TASK_CHARS)
    context: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None
    """The chain's policy, as `ChainPolicy` fields."""
    expect: Expect

    @model_validator(mode="after")
    def _starts_somewhere(self) -> Case:
        if (self.to_agent is None) == (self.capability is None):
            raise ValueError("give exactly one of to_agent or capability")
        if self.to_agent is not None:
            check_agent_id(self.to_agent)
        hops = self.expect.hops
        if hops and self.to_agent and hops[0] not in (ANY_HOP, self.to_agent) and hops[0] not in CAPABILITIES:
            raise ValueError(f"expect.hops[0] is {hops[0]!r}, but the case starts at {self.to_agent!r}")
        if hops and self.capability and hops[0] in CAPABILITIES and hops[0] != self.capability.value:
            raise ValueError(f"expect.hops[0] is {hops[0]!r}, but the case starts at {self.capability.value}")
        return self

    def request(self, chain_id: Any = None, *, max_context_bytes: int | None = None) -> ChainRequest:
        """The chain request this case starts (`InvalidRequest` if it cannot start)."""
        return build_request(task_description=self.task, to_agent=self.to_agent, capability=self.capability,
                             context_data=self.context, chain_id=chain_id, policy=self.policy,
                             max_context_bytes=max_context_bytes)


class NamedCase(BaseModel):
    """A case as read from its file: its name there (given, or `line N`) and its line."""

    model_config = ConfigDict(frozen=True)

    name: str
    line: int
    case: Case


def validation_line(err: ValidationError) -> str:
    """A pydantic error as one line: where, what, and how many more problems there are."""
    errors = err.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field (extra fields are not allowed)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {message}{more}" if where else f"{message}{more}"


def parse_case(text: str) -> Case:
    """One case from its JSON text; `InvalidRequest` in one line saying what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidRequest(f"not JSON: {err.msg} at column {err.colno}") from None
    except RecursionError:
        raise InvalidRequest("nests lists or objects too deeply to read") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"a case is a JSON object, got {type(data).__name__}")
    try:
        case = Case.model_validate(data)
        ChainPolicy.model_validate(case.policy or {})
    except ValidationError as err:
        where = "" if err.title == Case.__name__ else "policy."
        raise InvalidRequest(where + validation_line(err)) from None
    case.request()  # the chain it starts must be one the client accepts (policy, context size)
    return case


def parse_cases(text: str, source: str = "cases") -> list[NamedCase]:
    """Every case of a JSON Lines text (blank lines are skipped), or `InvalidCases` naming every
    bad one as `source:line: what`."""
    problems: list[str] = []
    cases: list[NamedCase] = []
    names: dict[str, int] = {}
    lines = text.splitlines()
    count = sum(1 for line in lines if line.strip())
    if count > MAX_CASES:
        raise InvalidCases([f"{source}: {count:,} cases, over the {MAX_CASES:,} a file may hold"])
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        size = len(line.encode("utf-8", "surrogatepass"))
        try:
            if size > MAX_LINE_BYTES:
                raise InvalidRequest(f"the line is {size:,} bytes, over the {MAX_LINE_BYTES:,} a case may take")
            case = parse_case(line)
            name = case.name or f"line {number}"
            if name in names:
                raise InvalidRequest(f"the name {name!r} is taken by line {names[name]}")
        except InvalidRequest as err:
            problems.append(f"{source}:{number}: {err}")
            continue
        names[name] = number
        cases.append(NamedCase(name=name, line=number, case=case))
    if not problems and not cases:
        problems.append(f"{source}: no cases")
    if problems:
        raise InvalidCases(problems[:MAX_PROBLEMS_SHOWN], more=max(0, len(problems) - MAX_PROBLEMS_SHOWN))
    return cases


def load_cases(path: Path | str) -> list[NamedCase]:
    """Every case of a JSON Lines file, validated up front (`InvalidCases` names each bad line)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InvalidCases([f"{path}: {size:,} bytes, over the {MAX_FILE_BYTES:,} a case file may hold"])
        raw = path.read_bytes()
    except OSError as err:
        raise InvalidCases([f"{path}: cannot read it: {err.strerror}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidCases([f"{path}: not UTF-8 text (byte {err.start})"]) from None
    return parse_cases(text, str(path))

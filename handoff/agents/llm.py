"""LLM agents: an `Agent` whose handler asks a language model what to do with its hop.

The model is any OpenAI-compatible chat-completions endpoint (OpenAI, Azure OpenAI, vLLM, Ollama,
llama.cpp's server, LiteLLM), reached through the official `openai` client by URL and key
(`OPENAI_BASE_URL` and `OPENAI_API_KEY`, or the `base_url` and `api_key` arguments). At every hop it
is offered, built when the hop runs:

- the agent's own tools: plain async functions with typed parameters, which it may call first;
- the tools of its MCP servers (`mcp_servers`), as `mcp__<server>__<tool>`, which it may call first
  too (`handoff.agents.mcp_tools`: each call bounded in time and result, recorded in the decision);
- `transfer_to_<agent>` for each live agent in the registry it may hand off to, and
  `transfer_to_any_<capability>` for each capability among them. What the chain would refuse is
  never offered: targets the handoff policy forbids, agents the visit rule excludes, and every
  transfer once the depth limit or the hop budget leaves no room (`HandoffContext.limits`);
- `finish`, to end with an answer.

A transfer becomes the chain's next handoff (its task bounded in length); `finish`, or plain text,
completes the hop. An unknown tool, malformed arguments or a text that only says it will hand off
is asked about once more, with the error; a second miss fails the hop with the reason, so the
chain falls back to another agent. Rate limits, 5xx answers and lost connections raise, and the
hop's retry policy retries them; other 4xx answers are not retried. What the model sees of the
task, the context and the earlier results fits `context_tokens` (estimated at four characters a
token); what was left out, and how the model decided, go into the hop's entry (`AgentDecision`).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, create_model

from handoff.agents.agent import Agent
from handoff.agents.mcp_tools import TOOL_PREFIX as MCP_TOOL_PREFIX
from handoff.agents.mcp_tools import McpHop, McpServer
from handoff.constants import retried_status
from handoff.errors import PermanentError, Unavailable
from handoff.models import (
    AgentCapability,
    AgentCard,
    AgentDecision,
    HandoffContext,
    HandoffResult,
    HopLimits,
    nesting_problem,
)

CHARS_PER_TOKEN = 4
"""How many characters a token is taken to be when fitting the prompt to its budget."""
MAX_REASON_CHARS = 200
MAX_ANSWER_CHARS = 4000
MAX_ARGUMENTS_CHARS = 16_000
"""The longest arguments a model's tool call may give (a transfer's task and reason are a few hundred
characters; an agent's own tools take what fits here): longer ones are refused, never recorded."""
FINISH = "finish"
AGENT_TOOL_PREFIX = "transfer_to_"
CAPABILITY_TOOL_PREFIX = "transfer_to_any_"
MAX_TOOL_NAME = 64  # OpenAI's limit on a function's name
SAYS_IT_HANDS_OFF = re.compile(r"\b(transfer|hand(ing|s|ed)? ?(it |this |the work )?off|handoff|delegat)", re.I)


Directory = Callable[[], Awaitable[list[AgentCard]]]
"""Where the live agents come from; by default the registry, through the hop's worker's client."""


class ModelUnavailable(Unavailable):
    """The model could not answer now (a rate limit, a 5xx, a lost connection): the hop's retry
    policy tries again."""


@dataclass(frozen=True)
class Tool:
    """One of the agent's own tools: an async function the model may call with JSON arguments."""

    name: str
    description: str
    arguments: type[BaseModel]
    function: Callable[..., Awaitable[Any]]

    @classmethod
    def of(cls, function: Callable[..., Awaitable[Any]]) -> Tool:
        """A tool from an async function with typed parameters; its docstring describes it."""
        if not inspect.iscoroutinefunction(function):
            raise TypeError(f"tool {function.__name__!r} must be an async function")
        fields: dict[str, Any] = {}
        for name, parameter in inspect.signature(function, eval_str=True).parameters.items():
            if parameter.annotation is inspect.Parameter.empty:
                raise TypeError(f"tool {function.__name__!r}: parameter {name!r} has no type")
            default = ... if parameter.default is inspect.Parameter.empty else parameter.default
            fields[name] = (parameter.annotation, default)
        arguments = create_model(f"{function.__name__}_arguments", **fields)
        return cls(function.__name__, inspect.getdoc(function) or function.__name__, arguments, function)

    def schema(self) -> dict[str, Any]:
        return _function(self.name, self.description, self.arguments.model_json_schema())

    async def call(self, arguments: dict[str, Any]) -> str:
        values = self.arguments.model_validate(arguments)
        result = await self.function(**dict(values))
        return result if isinstance(result, str) else json.dumps(result, default=str)


@dataclass(frozen=True)
class Transfer:
    """A transfer tool: the agent or capability it hands the chain to."""

    name: str
    to_agent: str = ""
    capability: AgentCapability | None = None
    description: str = ""


@dataclass
class Prompt:
    """What the model is told of the hop, fitted to the token budget, and what was left out."""

    text: str
    trimmed: list[str] = field(default_factory=list)


def _function(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _transfer_parameters(max_task_chars: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "task": {"type": "string", "maxLength": max_task_chars,
                     "description": "what the next agent should do, in one short sentence"},
            "reason": {"type": "string", "maxLength": MAX_REASON_CHARS, "description": "why, in a few words"},
        },
        "required": ["task"],
    }


FINISH_PARAMETERS = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "description": "the result of the work"},
        "reason": {"type": "string", "maxLength": MAX_REASON_CHARS, "description": "why the work is done"},
    },
    "required": ["answer"],
}


def _tool_name(prefix: str, name: str) -> str:
    full = f"{prefix}{name.replace('-', '_')}"
    return full if len(full) <= MAX_TOOL_NAME else full[:MAX_TOOL_NAME]


def transfers(cards: Sequence[AgentCard], limits: HopLimits | None, me: str) -> list[Transfer]:
    """The transfer tools for a hop of `me`: one per live agent it may reach and one per capability
    among them, leaving out what the chain's rules would refuse; none past the depth limit or the
    hop budget."""
    limits = limits or HopLimits()
    if not limits.can_hand_off:
        return []
    excluded = set(limits.excluded_agents) | {me}
    offered: list[Transfer] = []
    capabilities: dict[AgentCapability, list[str]] = {}
    for card in sorted(cards, key=lambda c: c.agent_id):
        if card.agent_id in excluded:
            continue
        if limits.permits(card.agent_id):
            what = card.description or card.name
            offered.append(Transfer(_tool_name(AGENT_TOOL_PREFIX, card.agent_id), to_agent=card.agent_id,
                                    description=f"Hand the work to {card.name} ({card.agent_id}): {what}"))
        for capability in card.capabilities:
            capabilities.setdefault(capability, []).append(card.agent_id)
    for capability, agents in sorted(capabilities.items(), key=lambda kv: kv[0].value):
        if limits.permits(capability.value):
            offered.append(Transfer(
                _tool_name(CAPABILITY_TOOL_PREFIX, capability.value.lower()), capability=capability,
                description=f"Hand the work to any live agent for {capability.value} ({', '.join(agents)})"))
    return [t for i, t in enumerate(offered) if t.name not in {o.name for o in offered[:i]}]


def fit_prompt(ctx: HandoffContext, budget_tokens: int) -> Prompt:
    """The task, the context and the earlier results, as the model reads them, within
    `budget_tokens`: the oldest results go first (the latest stays), then the largest context
    values, then the latest result, then the text is cut. What was left out is named."""
    budget = budget_tokens * CHARS_PER_TOKEN
    results = list(enumerate(ctx.previous_results))
    context = dict(ctx.context_data)
    trimmed: list[str] = []

    def render() -> str:
        parts = [f"Task: {ctx.task_description}"]
        if context:
            parts.append("Context: " + json.dumps(context, default=str, ensure_ascii=False))
        if results:
            parts.append("Earlier results (oldest first):\n" + "\n".join(
                json.dumps(r, default=str, ensure_ascii=False) for _, r in results))
        if ctx.branches:
            parts.append("Branches that ran for you: " + json.dumps(
                [b.model_dump(mode="json", include={"index", "status", "final_result", "error"})
                 for b in ctx.branches], ensure_ascii=False))
        return "\n\n".join(parts)

    def drop_result() -> None:
        index, _ = results.pop(0)
        trimmed.append(f"previous_results[{index}]")

    text = render()
    while len(text) > budget and len(results) > 1:
        drop_result()
        text = render()
    while len(text) > budget and context:
        key = max(context, key=lambda k: len(json.dumps(context[k], default=str)))
        trimmed.append(f"context_data.{key}")
        del context[key]
        text = render()
    if len(text) > budget and results:
        drop_result()
        text = render()
    if len(text) > budget:
        trimmed.append("task_description (cut)")
        text = text[:budget]
    return Prompt(text, trimmed)


class _Miss(Exception):
    """The model's answer cannot be followed: it is asked once more, with this message."""


@dataclass
class _Conversation:
    """One hop's exchange with the model: the messages and what it cost."""

    messages: list[dict[str, Any]]
    decision: AgentDecision
    tokens_left: int | None = None
    """The tokens the chain's budget leaves this hop (`ctx.limits.budget`), if it has a limit."""


def llm_agent(
    *,
    id: str,
    name: str,
    capabilities: Sequence[AgentCapability | str],
    instructions: str,
    model: str,
    description: str = "",
    tools: Sequence[Callable[..., Awaitable[Any]]] = (),
    base_url: str | None = None,
    api_key: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = 512,
    context_tokens: int = 2000,
    max_task_chars: int = 200,
    max_tool_rounds: int = 4,
    can_finish: bool = True,
    max_concurrent: int = 5,
    version: str = "1",
    directory: Directory | None = None,
    directory_ttl_s: float = 2.0,
    mcp_servers: Sequence[McpServer] = (),
) -> Agent:
    """An agent whose hops a language model decides (see the module's docstring).

    `instructions`: the system prompt's own part. `model`, `temperature`, `max_tokens`: the
    chat-completions settings. `base_url`/`api_key`: default `OPENAI_BASE_URL`/`OPENAI_API_KEY`.
    `context_tokens`: the budget of what the model reads of the hop. `max_task_chars`: the
    longest task a transfer may give. `can_finish`: False for a router that always hands on
    (`finish` is then offered only when no transfer is). `directory`: where live agents come from
    (default: the registry, through the hop's worker's client), read again once `directory_ttl_s`
    has passed (the registry's own liveness window is 70 s). `mcp_servers`: MCP servers whose tools
    the model is offered beside its own (`McpStdioServer`, `McpHttpServer`; see
    `handoff.agents.mcp_tools`)."""
    own = [Tool.of(f) for f in tools]
    names = [t.name for t in own]
    if FINISH in names or any(n.startswith((AGENT_TOOL_PREFIX, MCP_TOOL_PREFIX)) for n in names):
        raise ValueError(f"agent {id!r}: a tool may not be named {FINISH!r} or start with "
                         f"{AGENT_TOOL_PREFIX!r} or {MCP_TOOL_PREFIX!r}")
    servers = list(mcp_servers)
    if len({s.name for s in servers}) < len(servers):
        raise ValueError(f"agent {id!r}: two MCP servers share a name")
    settings = _Settings(model=model, base_url=base_url, api_key=api_key, temperature=temperature,
                         max_tokens=max_tokens, context_tokens=context_tokens, max_task_chars=max_task_chars,
                         max_tool_rounds=max_tool_rounds, instructions=instructions, can_finish=can_finish)

    live = _Cached(directory or _live_cards, directory_ttl_s)
    clients: dict[int, Any] = {}

    async def handle(ctx: HandoffContext) -> HandoffResult:
        loop = id_of_running_loop()
        if loop not in clients:  # one HTTP client per event loop: creating one costs milliseconds
            clients[loop] = _client(settings)
        offered = transfers(await live.get(), ctx.limits, id)
        async with McpHop(servers) as mcp:  # its sessions close with the hop, cancelled or not
            await mcp.list()
            return await _decide(ctx, settings, own, offered, name, clients[loop], mcp)

    return Agent(id=id, name=name, capabilities=list(capabilities), handler=handle, max_concurrent=max_concurrent,
                 version=version, description=description or instructions[:200])


@dataclass(frozen=True)
class _Settings:
    model: str
    base_url: str | None
    api_key: str | None
    temperature: float | None
    max_tokens: int | None
    context_tokens: int
    max_task_chars: int
    max_tool_rounds: int
    instructions: str
    can_finish: bool = True


def id_of_running_loop() -> int:
    import asyncio

    return id(asyncio.get_running_loop())


class _Cached:
    """The live agents, read again once they are `ttl_s` old."""

    def __init__(self, read: Directory, ttl_s: float) -> None:
        self._read, self._ttl_s = read, ttl_s
        self._cards: list[AgentCard] = []
        self._at = float("-inf")

    async def get(self) -> list[AgentCard]:
        if time.monotonic() - self._at >= self._ttl_s:
            self._cards = await self._read()
            self._at = time.monotonic()
        return self._cards


async def _live_cards() -> list[AgentCard]:
    """The live agents' cards, read through the client of the worker running this hop (its
    process's cached `Directory`)."""
    from temporalio import activity

    from handoff.registry import Directory

    return await Directory.of(activity.client()).live_cards()


def _client(settings: _Settings):
    """The official client; its own retries are off: the hop's retry policy decides."""
    try:
        from openai import AsyncOpenAI
    except ImportError:  # pragma: no cover - the llm extra is missing
        raise PermanentError("handoff.agents.llm needs the openai package: pip install 'handoff[llm]'") from None
    return AsyncOpenAI(base_url=settings.base_url or os.environ.get("OPENAI_BASE_URL"),
                       api_key=settings.api_key or os.environ.get("OPENAI_API_KEY") or "none",
                       max_retries=0)


async def _decide(ctx: HandoffContext, settings: _Settings, own: list[Tool], offered: list[Transfer],
                  agent_name: str, client: Any, mcp: McpHop | None = None) -> HandoffResult:
    mcp = mcp or McpHop([])
    prompt = fit_prompt(ctx, settings.context_tokens)
    schemas = ([t.schema() for t in own] + mcp.schemas()
               + [_function(t.name, t.description, _transfer_parameters(settings.max_task_chars)) for t in offered])
    if settings.can_finish or not offered:
        schemas.append(_function(FINISH, "Finish: the work is done; give the answer.", FINISH_PARAMETERS))
    system = (f"{settings.instructions}\n\nYou are {agent_name} ({ctx.to_agent}), one of several specialist "
              "agents. Do your part, then call exactly one tool: a transfer_to_... tool to hand the work to "
              f"another agent, or {FINISH} when the work is done.")
    if mcp.failures:
        system += "\n\nThese tool servers are unavailable now: " + "; ".join(
            f"{f.server} ({f.error})" for f in mcp.failures) + "."
    if ctx.steering:  # a person's instructions to the running chain come first
        system += "\n\nA person overseeing this chain tells you:\n" + "\n".join(
            f"- {s.message} (from {s.by})" for s in ctx.steering)
    talk = _Conversation(
        messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt.text}],
        decision=AgentDecision(model=settings.model, tools_offered=[s["function"]["name"] for s in schemas],
                               trimmed=prompt.trimmed + mcp.left_out, mcp_calls=list(mcp.failures)),
        tokens_left=ctx.limits.budget.tokens if ctx.limits and ctx.limits.budget else None)
    missed = False
    rounds = 0
    while True:
        message = await _ask(client, settings, talk, schemas)
        try:
            calls = message.tool_calls or []
            own_calls = [c for c in calls if c.function.name in {t.name for t in own} | set(mcp.tools)]
            if own_calls and rounds < settings.max_tool_rounds:
                rounds += 1
                await _run_tools(ctx, own, mcp, own_calls, talk)
                continue
            return _outcome(ctx, message, offered, talk.decision, settings)
        except _Miss as miss:
            if missed:
                talk.decision.reason = f"gave up after a second unusable answer: {miss}"
                return ctx.fail(f"the model's answer could not be followed twice: {miss}").model_copy(
                    update={"decision": talk.decision})
            missed = True
            talk.messages.append({"role": "assistant", "content": message.content or ""})
            talk.messages.append({"role": "user", "content": f"That cannot be followed: {miss}. Call one of the "
                                                             f"tools: {', '.join(talk.decision.tools_offered)}."})


async def _ask(client: Any, settings: _Settings, talk: _Conversation, schemas: list[dict[str, Any]]) -> Any:
    """One model call; its errors as the hop's retry policy should see them."""
    import openai

    options: dict[str, Any] = {"model": settings.model, "messages": talk.messages, "tools": schemas,
                               "tool_choice": "auto"}
    if settings.temperature is not None:
        options["temperature"] = settings.temperature
    cap = settings.max_tokens
    if talk.tokens_left is not None:  # the chain's token budget: what this hop's calls have not spent
        spent = talk.decision.prompt_tokens + talk.decision.completion_tokens
        cap = max(1, min(cap or talk.tokens_left, talk.tokens_left - spent))
    if cap is not None:
        options["max_tokens"] = cap
    talk.decision.model_calls += 1
    started = time.perf_counter()
    try:
        response = await client.chat.completions.create(**options)
    except openai.APIConnectionError as err:  # timeouts included
        raise ModelUnavailable(f"the model cannot be reached: {err}") from None
    except openai.APIStatusError as err:
        if retried_status(err.status_code):
            raise ModelUnavailable(f"the model is unavailable ({err.status_code}): {err.message}") from None
        raise PermanentError(f"the model refused the request ({err.status_code}): {err.message}") from None
    finally:
        talk.decision.model_ms += (time.perf_counter() - started) * 1000
    if response.usage is not None:
        talk.decision.prompt_tokens += response.usage.prompt_tokens or 0
        talk.decision.completion_tokens += response.usage.completion_tokens or 0
    if not response.choices:
        raise ModelUnavailable("the model returned no choice")
    return response.choices[0].message


async def _run_tools(ctx: HandoffContext, own: list[Tool], mcp: McpHop, calls: list[Any], talk: _Conversation) -> None:
    """Run the agent's own tools and the MCP tools the model called and give it their results;
    each call is a progress note of the hop (`ctx.progress`) for the chain's watchers."""
    by_name = {t.name: t for t in own}
    # Some servers refuse an assistant message whose content is null: an empty string instead.
    talk.messages.append({"role": "assistant", "content": "", "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in calls]})
    for call in calls:
        talk.decision.tool_calls.append(call.function.name)
        await ctx.progress(f"calling {call.function.name}", {"tool": call.function.name})
        try:
            if call.function.name in mcp.tools:
                output, record = await mcp.call(call.function.name, _arguments(call))
                talk.decision.mcp_calls.append(record)
            else:
                output = await by_name[call.function.name].call(_arguments(call))
        except Exception as err:  # bad arguments, or the tool failed: the model is told and goes on
            output = f"error: {type(err).__name__}: {err}"
        talk.messages.append({"role": "tool", "tool_call_id": call.id, "content": output[:MAX_ANSWER_CHARS]})


def _arguments(call: Any) -> dict[str, Any]:
    """A tool call's arguments, bounded as a hop result is (size, then nesting) before they are
    decoded or recorded: what is over the bounds is put back to the model as a miss."""
    text = call.function.arguments or "{}"
    if len(text) > MAX_ARGUMENTS_CHARS:
        raise _Miss(f"the arguments of {call.function.name} are {len(text):,} characters, over the "
                    f"{MAX_ARGUMENTS_CHARS:,} a tool call may take")
    try:
        arguments = json.loads(text)
    except json.JSONDecodeError as err:
        raise _Miss(f"the arguments of {call.function.name} are not JSON ({err.msg})") from None
    except RecursionError:
        arguments = None
    problem = nesting_problem(arguments, f"the call of {call.function.name}") if arguments is not None \
        else f"the arguments of {call.function.name} nest too deeply to read"
    if problem:
        raise _Miss(problem)
    if not isinstance(arguments, dict):
        raise _Miss(f"the arguments of {call.function.name} are not a JSON object")
    return arguments


def _text(arguments: dict[str, Any], key: str, limit: int) -> str:
    value = arguments.get(key, "")
    return value.strip()[:limit] if isinstance(value, str) else ""


def _outcome(ctx: HandoffContext, message: Any, offered: list[Transfer], decision: AgentDecision,
             settings: _Settings) -> HandoffResult:
    """The hop's result from the model's final answer: a handoff, a finish, or plain text."""
    calls = message.tool_calls or []
    if not calls:
        text = (message.content or "").strip()
        if not text:
            raise _Miss("the answer is empty")
        if SAYS_IT_HANDS_OFF.search(text) and offered:
            raise _Miss("it says it will hand off, but calls no transfer tool")
        decision.reason = text[:MAX_REASON_CHARS]
        return ctx.complete({"answer": text[:MAX_ANSWER_CHARS]}).model_copy(update={"decision": decision})
    call = calls[0]
    arguments = _arguments(call)
    decision.tool, decision.arguments = call.function.name, arguments
    decision.reason = _text(arguments, "reason", MAX_REASON_CHARS)
    if call.function.name == FINISH and (settings.can_finish or not offered):
        # a model that writes its answer as the message's text beside the call is taken at its word
        answer = _text(arguments, "answer", MAX_ANSWER_CHARS) or (message.content or "").strip()[:MAX_ANSWER_CHARS]
        if not answer:
            raise _Miss(f"{FINISH} needs an answer")
        return ctx.complete({"answer": answer}).model_copy(update={"decision": decision})
    transfer = next((t for t in offered if t.name == call.function.name), None)
    if transfer is None:
        raise _Miss(f"there is no tool {call.function.name!r}")
    task = _text(arguments, "task", settings.max_task_chars)
    if not task:
        raise _Miss(f"{call.function.name} needs a task")
    if transfer.to_agent and (transfer.to_agent, task) in {tuple(p) for p in (ctx.limits.asked if ctx.limits else [])}:
        raise _Miss(f"{transfer.to_agent} was already asked to {task!r}")
    where = transfer.to_agent or (transfer.capability.value if transfer.capability else "")
    summary = f"handed to {where}: {task}" + (f" ({decision.reason})" if decision.reason else "")
    result = ctx.handoff(to_agent=transfer.to_agent or None, capability=transfer.capability, task_description=task,
                         result_data={"summary": summary[:MAX_REASON_CHARS * 2]})
    return result.model_copy(update={"decision": decision})

"""The MCP server's tools and resources: each calls the client API as the CLI does, validated
and bounded as the CLI is, and answers with the record's JSON (structured content) and a one-line
summary. Bad input is a tool error with one sentence; nothing is started from it.

Who calls (`caller_of`): over HTTP the principal `HttpGuard` named (`token-N`, `operator-N`, a
JWT's subject, or `local` without authentication), over stdio `local`. A chain started through
MCP keeps its caller as its owner (memo key `mcp`), set as it starts; a caller sees and decides
only the chains it owns, unless it is an operator (an operator token, a JWT with the operator
scope, `local`). To any other caller such a chain answers as a chain that does not exist. What a
caller decides, steers or stops is recorded as `mcp:<principal>`.

A tool that waits for a chain (`wait_s`) and was sent a progress token follows the chain and
reports MCP progress each time one of its hops completes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError, UnexpectedToolError
from mcp_types import CallToolResult, TextContent
from pydantic import Field, ValidationError
from temporalio.client import Client

from handoff.client import (
    approve_chain,
    cancel_chain,
    chain_uuid,
    get_chain,
    reject_chain,
    rerun_chain,
    start_chain,
    steer_chain,
    stop_chain,
    wait_chain,
)
from handoff.client.search import chain_query, find_chains, parse_since
from handoff.client.watch import ChainWatch
from handoff.errors import ChainNotFound, HandoffError, unless_missing
from handoff.models import ChainRecord, ChainStatus, EventKind
from handoff.models.checks import one_line
from handoff.registry import agent_statuses
from handoff.servers.http import LOCAL, Principal

MAX_WAIT_S = 300.0
"""The longest a tool waits for a chain to end before it answers with the chain as it is."""
MAX_LIST = 200
"""The most chains `list_chains` returns at once."""
"""How often a wait that reports progress reads the chain (each read of a running chain is a query)."""
CHAIN_URI = "handoff://chains/{chain_id}"
AGENTS_URI = "handoff://agents"
MEMO_KEY = "mcp"
"""The chain's memo key for what the MCP server knows of it: the caller that started it (its owner)."""

ChainId = Annotated[str, Field(description="the chain's id (a UUID)", max_length=64)]
WaitS = Annotated[float, Field(ge=0, le=MAX_WAIT_S,
                               description=f"wait up to this many seconds (at most {MAX_WAIT_S:g}) for the chain "
                                           "to end; 0: answer at once")]
HopId = Annotated[str | None, Field(description="the handoff id of the waiting hop, when several wait",
                                    max_length=64)]


class HandoffMCP(MCPServer):
    """`MCPServer` whose tool errors are one sentence, as handoff says it: arguments that fail the
    tool's schema are told as `argument: what is wrong` (not pydantic's report), and a refusal as
    the error handoff raised, without the SDK's `Error executing tool` prefix. An unexpected
    error stays the SDK's (its text is logged, not sent)."""

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except UnexpectedToolError:
            raise
        except ToolError as err:
            cause = err.__cause__
            if isinstance(cause, ValidationError):
                raise ToolError(one_line(cause)) from None
            if isinstance(cause, ToolError) and not isinstance(cause, UnexpectedToolError):
                raise ToolError(str(cause)) from None
            raise


def caller_of(ctx: Context) -> Principal:
    """Who calls: over HTTP the principal `HttpGuard` put in the request's scope (an operator when
    its credential says so); over stdio the user's own process, `local`, an operator. A request
    over HTTP with no principal (an app served without the guard) is no one and sees nothing."""
    request = ctx.request_context.request
    if request is None:
        return Principal(LOCAL, operator=True)
    scope = getattr(request, "scope", {})
    user = scope.get("user")
    if not getattr(user, "is_authenticated", False):
        return Principal("")
    return Principal(user.username, operator="operator" in getattr(scope.get("auth"), "scopes", ()))


def decider(caller: Principal) -> str:
    """How a caller's decisions are recorded: `mcp:<principal>`."""
    return f"mcp:{caller.name}"


def owned_by(caller: Principal) -> dict[str, Any]:
    """The memo of a chain `caller` starts: it is the chain's owner."""
    return {MEMO_KEY: {"owner": caller.name}}


def may_see(caller: Principal, memo: Mapping[str, Any]) -> bool:
    """Whether `caller` may see and decide a chain whose memo is `memo`: the caller that started
    it through MCP, or an operator. A chain started otherwise (the CLI, the client API, the A2A
    server) has no MCP owner: operators alone see it."""
    mcp = memo.get(MEMO_KEY)
    owner = mcp.get("owner") if isinstance(mcp, Mapping) else None
    return caller.operator or (bool(caller.name) and owner == caller.name)


async def visible(client: Client, chain_id: str, caller: Principal) -> None:
    """Return when `caller` may see chain `chain_id`; else raise `ChainNotFound`, as for a chain
    that does not exist, so a caller cannot tell another's chains exist. An operator's call is
    not looked up here: the call it guards says whether the chain exists."""
    if caller.operator:
        return
    description = await unless_missing(client.get_workflow_handle(str(chain_uuid(chain_id))).describe())
    if description is None or not may_see(caller, await description.memo()):
        raise ChainNotFound(str(chain_id))


def record_result(record: ChainRecord) -> CallToolResult:
    data = record.model_dump(mode="json")
    return CallToolResult(content=[TextContent(type="text", text=summary(record))], structured_content=data)


def summary(record: ChainRecord) -> str:
    """One line: the chain, its status, its hops and, when it ended unsuccessfully, why."""
    hops = sum(1 for _ in record.all_hops())
    line = f"chain {record.chain_id} {record.status.value} ({hops} hop{'s' if hops != 1 else ''})"
    if record.status is ChainStatus.AWAITING_APPROVAL:
        line += ": a hop awaits approval (the approve or reject tool)"
    elif record.error:
        line += f": {record.error}"
    return line


def json_result(text: str, data: dict[str, Any]) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content=json.loads(json.dumps(data, default=str)))


Progress = Callable[[int, str], Awaitable[None]]
"""Reports that `n` hops have completed, with a line saying which one did last."""


def progress_of(ctx: Context) -> Progress | None:
    """How to report a tool's progress to its caller, when the caller sent a progress token."""
    meta = ctx.request_context.meta or {}
    if meta.get("progress_token") is None:
        return None

    async def report(completed: int, message: str) -> None:
        await ctx.report_progress(completed, None, message)

    return report


async def until_ended(client: Client, chain_id: Any, wait_s: float, progress: Progress | None = None) -> ChainRecord:
    """The chain's record once it ends, or as it is after `wait_s` seconds; with `progress`, each
    of its hops is reported as it completes meanwhile."""
    if wait_s > 0:
        ending = wait_chain(client, chain_id) if progress is None else followed(client, chain_id, progress)
        try:
            return await asyncio.wait_for(ending, wait_s)
        except TimeoutError:
            pass
    return await get_chain(client, chain_id)


async def followed(client: Client, chain_id: Any, progress: Progress) -> ChainRecord:
    """Follow the chain to its end through its stream of events (`handoff.client.watch`, no
    query of the chain): its final record, each hop reported to `progress` as it completes."""
    watch = ChainWatch(client, chain_id)
    done = 0
    async for event in watch:
        if event.kind is EventKind.HOP_COMPLETED:
            done += 1
            await progress(done, f"{event.place}: {event.data.get('from_agent', '')} -> {event.agent} completed")
    if watch.record is None:
        raise AssertionError("a watched chain always ends with its record")
    return watch.record


async def handoff_errors(call: Any) -> Any:
    """Run a tool's call; the errors handoff raises on purpose become the tool's error sentence."""
    try:
        return await call
    except HandoffError as err:
        raise ToolError(str(err)) from None


def handoff_mcp(client: Client) -> HandoffMCP:
    """The MCP server for the chains and agents of `client`'s namespace (not yet serving)."""
    server = HandoffMCP(
        "handoff", log_level="WARNING",
        instructions="Start, follow and decide handoff chains (durable Temporal workflows of agents handing "
                     "work to each other), and list the registered agents.")

    async def seen(ctx: Context, chain_id: str) -> Principal:
        """The caller, once it may see chain `chain_id`; else the tool's error: there is no such chain."""
        caller = caller_of(ctx)
        await handoff_errors(visible(client, chain_id, caller))
        return caller

    @server.tool(name="start_chain")
    async def start_chain_tool(
        ctx: Context,
        task: Annotated[str, Field(description="what the first agent is asked to do", min_length=1,
                                   max_length=100_000)],
        to_agent: Annotated[str | None, Field(description="the first agent, by id", max_length=200)] = None,
        capability: Annotated[str | None, Field(description="the first agent, by capability (e.g. CODE_ANALYSIS)",
                                                max_length=100)] = None,
        context: Annotated[dict[str, Any] | None, Field(description="the chain's context, a JSON object")] = None,
        policy: Annotated[dict[str, Any] | None, Field(
            description="the chain's policy (ChainPolicy: approvals, allowed handoffs, bounds, budget)")] = None,
        wait_s: WaitS = 0,
    ) -> CallToolResult:
        """Start a chain at an agent or a capability; its record, once it ends or after wait_s seconds."""
        chain_id = await handoff_errors(start_chain(client, task_description=task, to_agent=to_agent,
                                                    capability=capability, context_data=context, policy=policy,
                                                    memo=owned_by(caller_of(ctx))))
        return record_result(await handoff_errors(until_ended(client, chain_id, wait_s, progress_of(ctx))))

    @server.tool(name="get_chain")
    async def get_chain_record(ctx: Context, chain_id: ChainId, wait_s: WaitS = 0) -> CallToolResult:
        """A chain's record (hops, statuses, results), read back from its history; with wait_s, once it ends."""
        await seen(ctx, chain_id)
        return record_result(await handoff_errors(until_ended(client, chain_id, wait_s, progress_of(ctx))))

    @server.tool()
    async def list_chains(
        ctx: Context,
        agent: Annotated[str | None, Field(description="chains that visited this agent", max_length=200)] = None,
        status: Annotated[str | None, Field(description="running, completed, failed, awaiting_approval, ...",
                                            max_length=40)] = None,
        since: Annotated[str | None, Field(description="started within 30m/2h/7d, or since an ISO time",
                                           max_length=40)] = None,
        limit: Annotated[int, Field(ge=1, le=MAX_LIST, description=f"at most this many (1-{MAX_LIST})")] = 20,
    ) -> CallToolResult:
        """Chains found through their search attributes, newest first (the caller's own, unless it is an operator)."""
        caller = caller_of(ctx)

        async def found() -> list[dict[str, Any]]:
            query = chain_query(agent=agent, status=status, since=parse_since(since) if since else None)
            return await find_chains(client, query, limit=limit,
                                     keep=None if caller.operator else lambda memo: may_see(caller, memo))

        rows = await handoff_errors(found())
        return json_result(f"{len(rows)} chain{'s' if len(rows) != 1 else ''}", {"chains": rows})

    @server.tool()
    async def list_agents() -> CallToolResult:
        """The registered agents: capabilities, live or down, queued work and pollers."""
        cards = await agents_json(client)
        live = sum(1 for c in cards if c["live"])
        return json_result(f"{len(cards)} agents registered, {live} live", {"agents": cards})

    @server.tool()
    async def approve(
        ctx: Context, chain_id: ChainId,
        comment: Annotated[str, Field(description="why (recorded in the hop entry)", max_length=2000)] = "",
        hop: HopId = None,
    ) -> CallToolResult:
        """Approve the hop a chain waits on: it starts at once."""
        by = decider(await seen(ctx, chain_id))
        entry = await handoff_errors(approve_chain(client, chain_id, by=by, comment=comment, handoff_id=hop))
        return json_result(f"chain {chain_id}: hop {entry.hop} {entry.from_agent} -> {entry.to_agent} approved",
                           entry.model_dump(mode="json"))

    @server.tool()
    async def reject(
        ctx: Context, chain_id: ChainId,
        reason: Annotated[str, Field(description="why (the chain ends rejected with it)", min_length=1,
                                     max_length=2000)],
        hop: HopId = None,
    ) -> CallToolResult:
        """Reject the hop a chain waits on: the chain (or its branch) ends rejected."""
        by = decider(await seen(ctx, chain_id))
        entry = await handoff_errors(reject_chain(client, chain_id, by=by, reason=reason, handoff_id=hop))
        return json_result(f"chain {chain_id}: hop {entry.hop} {entry.from_agent} -> {entry.to_agent} rejected",
                           entry.model_dump(mode="json"))

    @server.tool()
    async def cancel(
        ctx: Context, chain_id: ChainId,
        after_hop: Annotated[bool, Field(
            description="let the running hops finish (their results kept) and start no new hop")] = False,
        reason: Annotated[str, Field(description="with after_hop: why (recorded)", max_length=2000)] = "",
    ) -> CallToolResult:
        """Cancel a running chain: its running hops are cancelled (or, with after_hop, finish first)."""
        by = decider(await seen(ctx, chain_id))
        if after_hop:
            await handoff_errors(stop_chain(client, chain_id, by=by, reason=reason))
            said = "stops once its running hops end"
        else:
            await handoff_errors(cancel_chain(client, chain_id))
            said = "cancellation requested"
        return json_result(f"chain {chain_id}: {said}", {"chain_id": chain_id, "after_hop": after_hop})

    @server.tool()
    async def steer(
        ctx: Context, chain_id: ChainId,
        message: Annotated[str, Field(description="what the next hop should know", min_length=1, max_length=2000)],
        redirect: Annotated[str | None, Field(
            description="an agent id or a capability: the chain's next handoff goes there instead",
            max_length=200)] = None,
    ) -> CallToolResult:
        """Tell a running chain's next hop something (and maybe where its next handoff goes)."""
        by = decider(await seen(ctx, chain_id))
        sent = await handoff_errors(steer_chain(client, chain_id, message=message, by=by, redirect=redirect))
        text = f"chain {chain_id}: the next hop will hear it" + (
            f"; its next handoff goes to {sent.redirect}" if sent.redirect else "")
        return json_result(text, sent.model_dump(mode="json"))

    @server.tool()
    async def rerun(
        ctx: Context, chain_id: ChainId,
        from_hop: Annotated[int, Field(ge=0, le=4, description="the hop to run again (its depth)")],
        to_agent: Annotated[str | None, Field(description="run the hop on this agent instead", max_length=200)] = None,
        capability: Annotated[str | None, Field(description="run the hop by this capability instead",
                                                max_length=100)] = None,
        task: Annotated[str | None, Field(description="ask the hop this instead", min_length=1,
                                          max_length=100_000)] = None,
        wait_s: WaitS = 0,
    ) -> CallToolResult:
        """Re-run a chain from one of its hops: the hops before it are carried as they were; the new chain is
        the caller's."""
        caller = await seen(ctx, chain_id)
        new_id = await handoff_errors(rerun_chain(client, chain_id, from_hop=from_hop, to_agent=to_agent,
                                                  capability=capability, task_description=task,
                                                  memo=owned_by(caller)))
        return record_result(await handoff_errors(until_ended(client, new_id, wait_s, progress_of(ctx))))

    @server.resource(CHAIN_URI, mime_type="application/json", description="a chain's record, by its id")
    async def chain_resource(chain_id: str, ctx: Context) -> str:
        try:
            await visible(client, chain_id, caller_of(ctx))
            return (await get_chain(client, chain_id)).model_dump_json(indent=2)
        except HandoffError as err:
            raise ResourceError(str(err)) from None

    @server.resource(AGENTS_URI, mime_type="application/json", description="the registered agents' cards")
    async def agents_resource() -> str:
        return json.dumps(await agents_json(client), indent=2, default=str)

    return server


async def agents_json(client: Client) -> list[dict[str, Any]]:
    """Each registered card with what its queue says now (as `handoff agents --json`)."""
    return [{**s.card.model_dump(mode="json"), **s.stats.model_dump(mode="json"), "load": s.load}
            for s in await agent_statuses(client)]

"""The MCP server of `python -m bench.mcp`'s tool-call figures: one tool, `lookup_owner`, the same
function an LLM agent is also given as its own tool. `python -m bench.tool_server` serves it over
stdio; `python -m bench.tool_server http PORT` over streamable HTTP at http://127.0.0.1:PORT/mcp."""

from __future__ import annotations

import sys

from mcp.server.mcpserver import MCPServer

OWNERS = {"handoff/agents/llm.py": "ada", "workflows/chain.py": "grace"}

server = MCPServer("bench-owners", log_level="WARNING")


@server.tool()
async def lookup_owner(path: str) -> str:
    """Who owns a file in this repository."""
    return OWNERS.get(path, "nobody")


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()

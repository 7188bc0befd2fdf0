"""A small MCP server for tests/test_llm_mcp.py: `python tests/mcp_tool_server.py` serves it over
stdio, `python tests/mcp_tool_server.py http PORT` over streamable HTTP at
http://127.0.0.1:PORT/mcp."""

from __future__ import annotations

import asyncio
import os
import sys

from mcp.server.mcpserver import MCPServer

OWNERS = {"handoff/agents/llm.py": "ada", "workflows/chain.py": "grace"}

server = MCPServer("owners")


@server.tool()
def lookup_owner(path: str) -> str:
    """Who owns a file in this repository."""
    return OWNERS.get(path, "nobody")


@server.tool()
async def wait(seconds: float) -> str:
    """Answer after `seconds`."""
    await asyncio.sleep(seconds)
    return "waited"


@server.tool()
def exit_now() -> str:
    """End the server's process without answering."""
    os._exit(3)


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()

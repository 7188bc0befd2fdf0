"""handoff as an MCP server (`handoff mcp`): the chains and the registry as Model Context
Protocol tools and resources, over stdio for a client that starts it, or streamable HTTP behind
the checks every handoff HTTP server makes (`handoff.servers.http`). See docs/mcp.md."""

from handoff.mcp.http import McpHttpServer
from handoff.mcp.tools import handoff_mcp

__all__ = ["McpHttpServer", "handoff_mcp"]

"""The MCP server: `server.app.create_server` builds it, `mtp-mcp serve` (server.cli) runs it.

Kept empty of imports so that `mtp-mcp generate`, which builds the serve parser too, does not import fastmcp.
"""

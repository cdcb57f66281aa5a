"""The MCP server: `mtp_mcp.server.app.create_server` builds it, `mtp-mcp serve` (server/cli.py) runs it, and
`mtp-mcp install` (server/host_install.py) adds it to a host. Nothing here imports torch: the server answers the
MCP handshake while the engine imports and loads in the background."""

"""mtp-mcp: fast local text generation with multi-token prediction (speculative decoding), as an MCP server.

One distribution, one top-level name: the repository's engine/, server/ and benchmarks/ folders install as
mtp_mcp.engine, mtp_mcp.server and mtp_mcp.benchmarks; mtp_mcp.cli is the command line above all three.
"""

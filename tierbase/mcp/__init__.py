"""The MCP server for coding agents (`tierbase mcp`): the platform's API as MCP tools, under its policy."""

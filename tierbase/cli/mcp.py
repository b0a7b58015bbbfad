"""`tierbase mcp`: an MCP server for coding agents, acting as the principal of TIERBASE_TOKEN."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import InvalidInput
from .base import client, command


@click.command("mcp")
@click.option("--read-only", is_flag=True, help="Expose only the tools that cannot write (SQL runs as tb_reader).")
@click.option("--http", "http", default=None, metavar="[HOST:]PORT",
              help="Serve streamable HTTP on HOST:PORT (default host 127.0.0.1) instead of stdio; callers must "
                   "send `Authorization: Bearer $TIERBASE_TOKEN`.")
@click.option("--dir", "migrations_dir", type=click.Path(file_okay=False), default=None,
              help="The migrations directory (default: [project] migrations of ./tierbase.toml, if it exists).")
@click.option("--repo", type=click.Path(file_okay=False, exists=True), default=".", show_default=True,
              help="The git working copy the flow tools work on.")
@command
@click.pass_context
def mcp(ctx: click.Context, read_only: bool, http: str | None, migrations_dir: str | None, repo: str) -> None:
    """Serve the platform to a coding agent over MCP (stdio by default), under the token's policy.

    Every tool is one call of the platform's API as the token's principal: policy, audit and quotas
    are the server's. A read-only role (`roles.X.read_only` in tierbase.toml) gets read-only mode too.
    """
    from ..mcp.server import build, serve_http, serve_stdio
    from ..mcp.tools import Agent

    sdk = client(ctx)
    me = sdk.whoami()  # a bad token fails here, before an agent sees any tool
    agent = Agent(sdk, me, _migrations(migrations_dir), Path(repo).absolute(),
                  read_only=read_only or bool(me.get("read_only")))
    server = build(agent)
    if http is None:
        serve_stdio(server)
        return
    host, _, port = http.rpartition(":")
    if not port.isdigit():
        raise InvalidInput(f"--http {http!r} is not [HOST:]PORT", "Use e.g. --http 127.0.0.1:8765")
    token = sdk._http.headers["Authorization"].removeprefix("Bearer ")
    serve_http(server, token, host or "127.0.0.1", int(port))


def _migrations(given: str | None) -> Path | None:
    if given:
        return Path(given).absolute()
    import tomllib

    try:
        with open("tierbase.toml", "rb") as fh:
            rel = tomllib.load(fh).get("project", {}).get("migrations")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return Path(str(rel)).absolute() if rel else None

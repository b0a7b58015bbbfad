"""`tierbase mcp` driven by the MCP SDK's own client, over stdio and streamable HTTP, as agents.

One real service (`tierbase up`) for the module with production and staging both protected
(staging the entry tier); agent principals act only through MCP servers started with their
tokens. Every refusal is checked for its code and rule, for its audit record, and for the state
staying as it was.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.types import CallToolResult

from tierbase.api.client import Client as Sdk

from .conftest import free_port, make_home, needs_root_btrfs
from .test_cli import leftovers, new_env, tierbase

pytestmark = needs_root_btrfs

CONFIG = """
[tiers.production]
protected = true

[tiers.staging]
parent = "production"
protected = true
entry = true

[roles.viewer]
like = "agent"
read_only = true
"""

MIGRATION = {"V0001__items.sql": "CREATE TABLE items (id int PRIMARY KEY, note text NOT NULL);\n"}


@dataclass
class Svc:
    env: dict[str, str]
    home: Path
    api: str
    pe: Sdk
    tokens: dict[str, str]

    def agent_env(self, who: str) -> dict[str, str]:
        return {"TIERBASE_API": self.api, "TIERBASE_TOKEN": self.tokens[who],
                "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "HOME": str(self.home.parent)}

    def names(self) -> list[str]:
        return sorted(b["name"] for b in self.pe.list_branches(with_bytes=False))

    def last_audit(self, actor: str) -> dict[str, Any]:
        return self.pe.audit_log(actor=actor, limit=1)[-1]


@pytest.fixture(scope="module")
def svc() -> Iterator[Svc]:
    home = make_home() / "home"
    env = new_env(home)
    try:
        up = json.loads(tierbase(env, "up", "--btrfs-size", "2G", "--api-port", str(free_port()), "--proxy-port",
                                 str(free_port()), "--json").stdout)
        env["TIERBASE_TOKEN"] = (home / "api.token").read_text().strip()
        pe = Sdk(home)
        pe.apply_config(CONFIG, "test")
        tokens = {who: pe.create_principal(who, role)["token"]
                  for who, role in (("bot", "agent"), ("rival", "agent"), ("viewer", "viewer"))}
        Sdk(home, url=up["api_url"], token=tokens["rival"]).create_branch("rival-work")
        yield Svc(env, home, up["api_url"], pe, tokens)
    finally:
        tierbase(env, "down", "--purge", check=False)
        assert leftovers(home) == []
        shutil.rmtree(home.parent, ignore_errors=True)


def mcp_command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "tierbase.cli.main", "mcp", *extra]


@asynccontextmanager
async def over_stdio(svc: Svc, who: str = "bot", *extra: str) -> AsyncIterator[Client]:
    params = StdioServerParameters(command=sys.executable, args=mcp_command(*extra)[1:], env=svc.agent_env(who))
    async with Client(params, read_timeout_seconds=120) as client:
        yield client


@asynccontextmanager
async def over_http(url: str, token: str) -> AsyncIterator[Client]:
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
    async with http, Client(streamable_http_client(url, http_client=http), read_timeout_seconds=120) as client:
        yield client


@pytest.fixture
def http_server(svc: Svc) -> Iterator[str]:
    """`tierbase mcp --http` as the agent `bot`, on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen(mcp_command("--http", f"127.0.0.1:{port}"), env=dict(os.environ, **svc.agent_env("bot")),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the MCP HTTP server did not start"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(10)


def ok(res: CallToolResult) -> Any:
    assert not res.is_error, res.content[0].text if res.content else res
    got = res.structured_content
    return got["result"] if isinstance(got, dict) and set(got) == {"result"} else got


def refused(res: CallToolResult) -> dict[str, Any]:
    assert res.is_error, res
    assert res.structured_content is not None, res.content
    return dict(res.structured_content["error"])


def run(fn: Any, *args: Any) -> Any:
    return anyio.run(fn, *args)


# -- a task, start to end --------------------------------------------------------------------------
async def _task(client: Client, name: str) -> dict[str, Any]:
    tools = {t.name for t in (await client.list_tools()).tools}
    assert {"create_branch", "run_sql", "migration_apply", "schema_diff", "audit_mine", "explain"} <= tools
    me = ok(await client.call_tool("whoami", {}))
    assert me["name"] == "bot" and me["base_role"] == "agent"
    made = ok(await client.call_tool("create_branch", {"name": name}))
    assert made["parent"] == "staging" and made["creator"] == "bot"
    applied = ok(await client.call_tool("migration_apply", {"branch": name, "files": MIGRATION}))
    assert [m["version"] for m in applied["applied"]] == [1], applied
    insert = "INSERT INTO items VALUES (1, 'a'), (2, 'b')"
    wrote = ok(await client.call_tool("run_sql", {"branch": name, "sql": insert}))
    assert wrote["role"] == "tb_owner" and wrote["committed"] is True
    got = ok(await client.call_tool("run_sql", {"branch": name, "sql": "SELECT id, note FROM items WHERE id > %s",
                                                "params": [0]}))
    assert got["columns"] == ["id", "note"] and got["rows"] == [[1, "a"], [2, "b"]] and got["truncated"] is False
    table = ok(await client.call_tool("describe_schema", {"branch": name, "table": "items"}))
    assert [c["name"] for c in table["columns"]] == ["id", "note"] and table["indexes"]
    diff = ok(await client.call_tool("schema_diff", {"a": name}))
    assert diff["from"] == "staging" and "items" in diff["text"]
    url = ok(await client.call_tool("connection_string", {"branch": name}))["url"]
    mine = ok(await client.call_tool("list_branches", {"mine": True}))
    assert [b["name"] for b in mine] == [name]
    trail = ok(await client.call_tool("audit_mine", {"limit": 20}))
    assert {"branch.create", "migrate.apply", "branch.sql"} <= {r["action"] for r in trail}
    ok(await client.call_tool("delete_branch", {"name": name}))
    return {"url": url}


def test_an_agent_task_over_stdio(svc: Svc) -> None:
    name = f"bot-{secrets.token_hex(3)}"

    async def go() -> dict[str, Any]:
        async with over_stdio(svc) as client:
            return await _task(client, name)

    got = run(go)
    assert got["url"].startswith("postgresql://bot:") and name not in svc.names()


def test_an_agent_task_over_http(svc: Svc, http_server: str) -> None:
    name = f"bot-{secrets.token_hex(3)}"

    async def go() -> dict[str, Any]:
        async with over_http(http_server, svc.tokens["bot"]) as client:
            return await _task(client, name)

    run(go)
    assert name not in svc.names()


def test_http_transport_needs_the_token(svc: Svc, http_server: str) -> None:
    frame = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    for header in ({}, {"Authorization": "Bearer " + svc.tokens["rival"]}, {"Authorization": "Bearer tbt_nope"}):
        got = httpx.post(http_server, json=frame, headers=header, timeout=10)
        assert got.status_code == 401 and got.json()["error"]["code"] == "unauthorized"

"""`tierbase mcp` driven by the MCP SDK's own client, over stdio and streamable HTTP, as agents.

One real service (`tierbase up`) for the module with production and staging both protected
(staging the entry tier); agent principals act only through MCP servers started with their
tokens. Every refusal is checked for its code and rule, for its audit record, and for the state
staying as it was.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.types import CallToolResult

from tierbase.api.client import Client as Sdk
from tierbase.errors import PolicyDenied, QuotaExceeded, TierbaseError
from tierbase.governance.config import ConfigError, parse_config

from .conftest import free_port, make_home, needs_root_btrfs, query
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

[roles.small-bot]
like = "agent"

[quotas.small-bot]
branches = 2
computes = 1
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
                                 str(free_port()), "--pool-port", str(free_port()), "--json").stdout)
        env["TIERBASE_TOKEN"] = (home / "api.token").read_text().strip()
        pe = Sdk(home)
        pe.apply_config(CONFIG, "test")
        tokens = {who: pe.create_principal(who, role)["token"]
                  for who, role in (("bot", "agent"), ("rival", "agent"), ("viewer", "viewer"), ("tiny", "small-bot"))}
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
async def _task(client: Client, name: str, session: bool) -> dict[str, Any]:
    tools = {t.name for t in (await client.list_tools()).tools}
    assert {"create_branch", "run_sql", "migration_apply", "schema_diff", "audit_mine", "explain",
            "session_start"} <= tools
    me = ok(await client.call_tool("whoami", {}))
    assert me["name"] == "bot" and me["base_role"] == "agent"
    if session:
        lease = ok(await client.call_tool("session_start", {"branch": name, "ttl": "1h"}))
        assert lease["live"] and lease["url"].startswith("postgresql://bot:") and lease["ttl_seconds"] == 3600
        made = lease["branch_info"]
    else:
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
    if session:
        assert [x["branch"] for x in ok(await client.call_tool("session_list", {}))] == [name]
        ended = ok(await client.call_tool("session_end", {"session_id": lease["id"]}))
        assert ended["deleted"] == [name] and ended["end_reason"] == "ended"
        assert ok(await client.call_tool("session_list", {})) == []
    else:
        ok(await client.call_tool("delete_branch", {"name": name}))
    return {"url": url}


def test_an_agent_task_over_stdio(svc: Svc) -> None:
    name = f"bot-{secrets.token_hex(3)}"

    async def go() -> dict[str, Any]:
        async with over_stdio(svc) as client:
            return await _task(client, name, session=True)

    got = run(go)
    assert got["url"].startswith("postgresql://bot:") and name not in svc.names()


def test_an_agent_task_over_http(svc: Svc, http_server: str) -> None:
    name = f"bot-{secrets.token_hex(3)}"

    async def go() -> dict[str, Any]:
        async with over_http(http_server, svc.tokens["bot"]) as client:
            return await _task(client, name, session=False)

    run(go)
    assert name not in svc.names()


def test_http_transport_needs_the_token(svc: Svc, http_server: str) -> None:
    frame = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    for header in ({}, {"Authorization": "Bearer " + svc.tokens["rival"]}, {"Authorization": "Bearer tbt_nope"}):
        got = httpx.post(http_server, json=frame, headers=header, timeout=10)
        assert got.status_code == 401 and got.json()["error"]["code"] == "unauthorized"


# -- what an agent may not do ------------------------------------------------------------------------
def test_forbidden_calls_are_refused_audited_and_change_nothing(svc: Svc) -> None:
    before = svc.names()
    calls = [  # tool, arguments, rule, audited action, audited target
        ("create_branch", {"name": "bot-prod", "parent": "production"}, "builtin.agent-no-branch-off-protected",
         "branch.create", "production"),
        ("promote", {"tier": "production", "files": MIGRATION}, "builtin.agent-no-promote", "promote", "production"),
        ("run_sql", {"branch": "staging", "sql": "SELECT 1"}, "builtin.agent-no-credentials-on-protected",
         "branch.sql", "staging"),
        ("run_sql", {"branch": "rival-work", "sql": "SELECT 1"}, "default.deny", "branch.sql", "rival-work"),
        ("delete_branch", {"name": "rival-work"}, "default.deny", "branch.delete", "rival-work"),
        ("reset_branch", {"name": "rival-work"}, "default.deny", "branch.reset", "rival-work"),
        ("migration_apply", {"branch": "rival-work", "files": MIGRATION}, "builtin.agent-migrate-own-only",
         "migrate.apply", "rival-work"),
    ]

    async def go() -> list[tuple[dict[str, Any], dict[str, Any]]]:
        out = []
        async with over_stdio(svc) as client:
            for tool, args, *_ in calls:
                out.append((refused(await client.call_tool(tool, args)), svc.last_audit("bot")))
            # an explain before trying says the same as the refusal
            said = ok(await client.call_tool("explain", {"action": "branch.create", "target": "production"}))
            assert said["allowed"] is False and said["rule"] == "builtin.agent-no-branch-off-protected"
        return out

    for (err, record), (tool, _, rule, action, target) in zip(run(go), calls, strict=True):
        assert err["code"] == "policy_denied" and err["rule"] == rule and err["hint"], (tool, err)
        assert (record["action"], record["target"], record["decision"]) == (action, target, "denied"), tool
        assert record["reason"].startswith(rule)
    assert svc.names() == before
    assert "rival-work" in before


def test_read_only_mode_exposes_no_write_tool_and_writes_nothing(svc: Svc) -> None:
    name = f"bot-{secrets.token_hex(3)}"
    bot = Sdk(svc.home, url=svc.api, token=svc.tokens["bot"])
    bot.create_branch(name)
    bot.run_sql(name, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)")

    async def go(who: str, *extra: str) -> tuple[set[str], dict[str, Any], CallToolResult]:
        async with over_stdio(svc, who, *extra) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            sql = refused(await client.call_tool("run_sql", {"branch": name, "sql": "INSERT INTO t VALUES (2)"}))
            return tools, sql, await client.call_tool("create_branch", {"name": "ro-made"})

    try:
        for who, extra in (("bot", ("--read-only",)), ("viewer", ())):  # the flag, or a read-only role
            tools, sql, create = run(go, who, *extra)
            assert "run_sql" in tools and "describe_schema" in tools and "audit_mine" in tools
            assert not tools & {"create_branch", "delete_branch", "reset_branch", "migration_apply", "promote",
                                "flow_claim", "migration_new", "session_start"}, who
            assert create.is_error and "ro-made" not in svc.names()
            # SQL runs as tb_reader: the bot's own branch is read, never written; the viewer may not even read it
            assert sql["code"] in ("sql_error", "policy_denied"), sql
        assert bot.run_sql(name, "SELECT x FROM t")["rows"] == [[1]]
        # the role attribute is the server's: the viewer's token refuses writes whatever the client
        viewer = Sdk(svc.home, url=svc.api, token=svc.tokens["viewer"])
        with pytest.raises(PolicyDenied) as got:
            viewer.create_branch("viewer-made")
        assert got.value.data["rule"] == "role.read-only"
        assert svc.last_audit("viewer")["action"] == "branch.create"
        assert svc.last_audit("viewer")["decision"] == "denied" and "viewer-made" not in svc.names()
    finally:
        bot.delete_branch(name)


# -- bad input -----------------------------------------------------------------------------------------
def test_unknown_tools_and_arguments_are_tool_errors(svc: Svc) -> None:
    async def go() -> list[CallToolResult]:
        async with over_stdio(svc) as client:
            out = [await client.call_tool("drop_everything", {}),
                   await client.call_tool("create_branch", {"name": "bot-x", "bogus": True}),
                   await client.call_tool("create_branch", {"name": ["not", "a", "name"]}),
                   await client.call_tool("create_branch", {}),
                   await client.call_tool("create_branch", {"name": "Not A Name"})]
            # a tool whose work fails on this side (no workflow in this working copy) is an error too, not a crash
            out.append(await client.call_tool("flow_status", {}))
            # the server is still there and answers
            out.append(await client.call_tool("whoami", {}))
            return out

    unknown, extra, wrong_type, missing, bad_name, flow, still = run(go)
    assert refused(flow)["code"] and refused(flow)["message"]
    assert unknown.is_error and "drop_everything" in unknown.content[0].text
    assert extra.is_error and "bogus" in extra.content[0].text
    assert wrong_type.is_error and missing.is_error
    assert refused(bad_name)["code"] == "invalid_name"
    assert ok(still)["name"] == "bot"
    assert not {"bot-x", "Not A Name"} & set(svc.names())


MANY = "SELECT g, repeat('x', 100) FROM generate_series(1, 5000000) g"
WIDE = "SELECT g, repeat('y', 2000) FROM generate_series(1, 10000) g"


def test_sql_past_its_limit_is_cancelled_on_the_compute_and_huge_results_are_cut(svc: Svc) -> None:
    name = f"bot-{secrets.token_hex(3)}"
    bot = Sdk(svc.home, url=svc.api, token=svc.tokens["bot"])
    bot.create_branch(name)
    bot.run_sql(name, "CREATE TABLE t (x int)")

    async def go() -> list[CallToolResult]:
        async with over_stdio(svc) as client:
            return [
                await client.call_tool("run_sql", {"branch": name, "timeout_s": 1,
                                                   "sql": "INSERT INTO t VALUES (1); SELECT pg_sleep(60)"}),
                await client.call_tool("run_sql", {"branch": name, "max_rows": 50, "sql": MANY}),
                await client.call_tool("run_sql", {"branch": name, "max_rows": 10000, "sql": WIDE}),
                await client.call_tool("run_sql", {"branch": name, "sql": "SELEC nonsense"}),
            ]

    try:
        slow, many, wide, bad = run(go)
        err = refused(slow)
        assert err["code"] == "sql_timeout" and "cancelled on the compute" in err["message"]
        assert bot.run_sql(name, "SELECT count(*) FROM t")["rows"] == [[0]]  # the INSERT went with it
        active = svc.pe.run_sql(name, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' "
                                      "AND pid <> pg_backend_pid()")
        assert active["rows"] == [[0]]
        cut = ok(many)
        assert cut["truncated"] is True and cut["row_count"] == 50 and "max_rows=50" in cut["truncated_because"]
        cut = ok(wide)
        assert cut["truncated"] is True and 0 < cut["row_count"] < 10000 and "MiB" in cut["truncated_because"]
        assert refused(bad)["code"] == "sql_error" and refused(bad)["data"]["sqlstate"] == "42601"
        active = svc.pe.run_sql(name, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%generate_series%' "
                                      "AND pid <> pg_backend_pid()")
        assert active["rows"] == [[0]]
    finally:
        bot.delete_branch(name)


def _frames(proc: subprocess.Popen[bytes], *frames: bytes) -> None:
    assert proc.stdin is not None
    for f in frames:
        proc.stdin.write(f + b"\n")
    proc.stdin.flush()


def _read_until(proc: subprocess.Popen[bytes], want_id: int) -> dict[str, Any]:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        assert line, "the MCP server closed its stdout"
        msg = json.loads(line)
        if msg.get("id") == want_id:
            return dict(msg)


INIT = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}).encode()
INITIALIZED = b'{"jsonrpc": "2.0", "method": "notifications/initialized"}'


def test_a_malformed_frame_over_stdio_is_answered_and_the_server_goes_on(svc: Svc) -> None:
    proc = subprocess.Popen(mcp_command(), env=dict(os.environ, **svc.agent_env("bot")), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        _frames(proc, INIT)
        assert "result" in _read_until(proc, 1)
        _frames(proc, INITIALIZED, b'{"jsonrpc": "2.0", "id": 2, "method": ', b"\x00\xffnot json at all",
                b'{"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}')
        got = _read_until(proc, 3)
        assert got["result"]["structuredContent"]["result"]["name"] == "bot", got
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(10)


def test_a_malformed_frame_over_http_is_a_json_rpc_error(svc: Svc, http_server: str) -> None:
    auth = {"Authorization": f"Bearer {svc.tokens['bot']}", "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json"}
    got = httpx.post(http_server, content=b'{"jsonrpc": "2.0", "id": 1, "method": ', headers=auth, timeout=10)
    assert got.status_code == 400 and got.json()["error"]["code"] == -32700

    async def go() -> Any:
        async with over_http(http_server, svc.tokens["bot"]) as client:
            return ok(await client.call_tool("whoami", {}))

    assert run(go)["name"] == "bot"


def test_a_client_that_disconnects_mid_call_leaves_nothing_half_made(svc: Svc, http_server: str) -> None:
    name = f"bot-{secrets.token_hex(3)}"
    # stdio: the agent's process dies right after asking for a branch
    proc = subprocess.Popen(mcp_command(), env=dict(os.environ, **svc.agent_env("bot")), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    _frames(proc, INIT)
    _read_until(proc, 1)
    _frames(proc, INITIALIZED, json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
        "name": "create_branch", "arguments": {"name": name}}}).encode())
    time.sleep(0.05)
    proc.kill()
    proc.wait(10)
    bot = Sdk(svc.home, url=svc.api, token=svc.tokens["bot"])
    deadline = time.monotonic() + 60
    while True:  # the platform finishes or undoes what it was asked: never a branch left 'creating'
        state = next((b["state"] for b in svc.pe.list_branches(with_bytes=False) if b["name"] == name), None)
        if state in (None, "ready") and time.monotonic() > deadline - 55:
            break
        assert time.monotonic() < deadline, f"branch {name} stayed {state}"
        time.sleep(0.2)
    if state == "ready":
        bot.delete_branch(name)

    # HTTP: the caller goes away during a slow SQL call; its transaction is whole or absent
    bot.create_branch(name)
    bot.run_sql(name, "CREATE TABLE t (x int)")

    async def go() -> None:
        with anyio.move_on_after(1):
            async with over_http(http_server, svc.tokens["bot"]) as client:
                await client.call_tool("run_sql", {"branch": name, "timeout_s": 20,
                                                   "sql": "INSERT INTO t SELECT generate_series(1, 1000); "
                                                          "SELECT pg_sleep(3)"})

    async def after() -> Any:
        async with over_http(http_server, svc.tokens["bot"]) as client:
            return ok(await client.call_tool("whoami", {}))

    try:
        run(go)
        assert run(after)["name"] == "bot"
        time.sleep(4)
        assert bot.run_sql(name, "SELECT count(*) FROM t")["rows"] in ([[0]], [[1000]])
    finally:
        bot.delete_branch(name)


# -- sessions, leases, quotas ----------------------------------------------------------------------------
def test_a_lease_is_renewed_by_use_and_reclaimed_by_the_sweeper(svc: Svc) -> None:
    bot = Sdk(svc.home, url=svc.api, token=svc.tokens["bot"])
    by_sql, by_proxy = bot.session_start(ttl="15s"), bot.session_start(ttl="15s")
    time.sleep(2)
    bot.run_sql(by_sql["branch"], "SELECT 1")
    query(bot.branch_url(by_proxy["branch"]), "SELECT 1")
    for lease in (by_sql, by_proxy):
        renewed = bot.get_branch(lease["branch"])["expires_at"]
        assert renewed > lease["expires_at"] + 1, lease["branch"]  # pushed to the use + ttl
    # rival cannot renew nor end another's lease: it is as unknown to it as a missing one
    rival = Sdk(svc.home, url=svc.api, token=svc.tokens["rival"])
    for call, sid in ((rival.session_renew, by_sql["id"]), (rival.session_end, by_sql["id"]),
                      (bot.session_end, "ses_0000000000000000")):
        with pytest.raises(TierbaseError) as got:
            call(sid)
        assert got.value.code == "session_not_found"
    with pytest.raises(TierbaseError) as got:
        bot.session_start(ttl="30d")
    assert got.value.code == "invalid_input"
    assert {s["id"] for s in bot.session_list()} >= {by_sql["id"], by_proxy["id"]}
    time.sleep(16)  # idle past the ttl
    svc.pe.sweep()  # (or the service's own sweeper did already)
    assert not {by_sql["branch"], by_proxy["branch"]} & set(svc.names())
    assert not {s["id"] for s in bot.session_list()} & {by_sql["id"], by_proxy["id"]}
    trail = svc.pe.audit_log(action="session.expire", limit=10)
    reclaimed = {r["after"]["session"]: r for r in trail}
    for lease in (by_sql, by_proxy):
        assert reclaimed[lease["id"]]["actor"] == "tierbase" and reclaimed[lease["id"]]["after"]["principal"] == "bot"


def test_quotas_refuse_past_the_limit_naming_the_quota(svc: Svc) -> None:
    env = dict(svc.env, TIERBASE_TOKEN=svc.tokens["tiny"], TIERBASE_API=svc.api)
    tiny = Sdk(svc.home, url=svc.api, token=svc.tokens["tiny"])
    made = [tiny.session_start()["branch"], tiny.create_branch(f"tiny-{secrets.token_hex(2)}")["name"]]
    try:
        before = svc.names()
        with pytest.raises(QuotaExceeded) as got:
            tiny.session_start()
        assert "quotas.small-bot.branches" in got.value.message and "raise" in got.value.hint
        cli = tierbase(env, "branch", "create", "tiny-third", check=False)
        assert cli.returncode == 2 and "quota quotas.small-bot.branches exceeded" in cli.stderr
        assert svc.names() == before
        tiny.start_branch(made[0])
        with pytest.raises(QuotaExceeded) as got:
            tiny.start_branch(made[1])
        assert got.value.data["quota"] == "quotas.small-bot.computes"
        with pytest.raises(QuotaExceeded):
            tiny.run_sql(made[1], "SELECT 1")  # SQL would wake it: the same quota
        assert tiny.get_branch(made[1])["compute"] == "stopped"
        refusal = svc.last_audit("tiny")
        assert refusal["outcome"].startswith("error: quota quotas.small-bot.computes")
        # a connection through the proxy would wake it: the same quota, said to the client, audited
        with pytest.raises(psycopg.OperationalError, match=r"quota quotas\.small-bot\.computes exceeded"):
            psycopg.connect(tiny.branch_url(made[1]), connect_timeout=10).close()
        assert tiny.get_branch(made[1])["compute"] == "stopped"
        woken = svc.pe.audit_log(action="branch.start.proxy", limit=1)[-1]
        got_record = (woken["actor"], woken["target"], woken["decision"], woken["outcome"])
        assert got_record == ("tiny", made[1], "denied", "refused")
        tiny.stop_branch(made[0])  # under the limit again: the proxy wakes it
        with psycopg.connect(tiny.branch_url(made[1]), connect_timeout=30) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        mine = json.loads(tierbase(env, "branch", "list", "--mine", "--no-bytes", "--json").stdout)
        assert sorted(b["name"] for b in mine) == sorted(made)
    finally:
        for name in made:
            tiny.delete_branch(name)


# -- connections that scale -------------------------------------------------------------------------------
CLIENTS = 500


def test_the_pooled_url_serves_500_clients_on_a_few_server_connections(svc: Svc) -> None:
    name = f"bot-{secrets.token_hex(3)}"
    bot = Sdk(svc.home, url=svc.api, token=svc.tokens["bot"])
    bot.create_branch(name)
    bot.run_sql(name, "CREATE TABLE hits (client int PRIMARY KEY)")
    pooled, direct = bot.branch_url(name, pooled=True), bot.branch_url(name)
    assert pooled != direct and pooled.rsplit("/", 1)[1] == direct.rsplit("/", 1)[1] == name

    async def go() -> tuple[int, int]:
        gate = asyncio.Semaphore(50)  # how fast clients arrive; all of them stay connected at once

        async def one(i: int) -> psycopg.AsyncConnection[Any]:
            async with gate:
                return await psycopg.AsyncConnection.connect(pooled, autocommit=True, connect_timeout=60)

        conns = await asyncio.gather(*(one(i) for i in range(CLIENTS)))
        try:
            for i, c in enumerate(conns):  # every one of them still works, each in its own transactions
                await c.execute("INSERT INTO hits VALUES (%s)", (i,), prepare=False)
            backends = svc.pe.run_sql(name, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'tb_owner' "
                                            "AND pid <> pg_backend_pid()")["rows"][0][0]
            return len(conns), int(backends)
        finally:
            await asyncio.gather(*(c.close() for c in conns))

    try:
        connected, backends = asyncio.run(go())
        assert connected == CLIENTS
        assert backends <= 21  # PgBouncer's pool (20), not one backend per client
        assert bot.run_sql(name, "SELECT count(*) FROM hits")["rows"] == [[CLIENTS]]
        # the pooled connection is still the principal's: another's branch is refused at the proxy
        rival = Sdk(svc.home, url=svc.api, token=svc.tokens["rival"]).branch_url("rival-work", pooled=True)
        with pytest.raises(psycopg.OperationalError, match="permission denied"):
            query(rival.replace("/rival-work", f"/{name}"), "SELECT 1")
    finally:
        bot.delete_branch(name)


def test_quotas_and_read_only_roles_are_checked_when_the_config_loads() -> None:
    cfg = parse_config(CONFIG + '\n[quotas.default]\nbytes = "2G"\n')
    assert cfg.quota("small-bot") == {"branches": 2, "computes": 1}
    assert cfg.quota("agent") == {"bytes": 2 * 1024**3} and cfg.read_only("viewer") and not cfg.read_only("agent")
    for bad, key in (('[quotas.nobody]\nbranches = 1\n', "quotas.nobody"),
                     ('[quotas.agent]\nbytes = "lots"\n', "quotas.agent.bytes"),
                     ('[quotas.agent]\nbranches = -1\n', "quotas.agent.branches"),
                     ('[roles.x]\nlike = "agent"\nread_only = "yes"\n', "roles.x.read_only")):
        with pytest.raises(ConfigError) as got:
            parse_config(CONFIG + "\n" + bad)
        assert key in got.value.message, (bad, got.value.message)


def test_a_repoint_moves_pooled_sessions_too(svc: Svc) -> None:
    a, b, route = (f"pool-{x}-{secrets.token_hex(2)}" for x in ("a", "b", "r"))
    svc.pe.create_branch(a)
    svc.pe.create_branch(b)
    try:
        svc.pe.set_route(route, a)
        conn = psycopg.connect(svc.pe.branch_url(route, pooled=True), autocommit=True)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert svc.pe.set_route(route, b)["sessions_ended"] == 1
        with pytest.raises(psycopg.OperationalError, match=f'now points to branch "{b}"'):
            conn.execute("SELECT 1")
        conn.close()
        assert query(svc.pe.branch_url(route, pooled=True), "SELECT 2") == [(2,)]
    finally:
        for name in (a, b):
            with suppress(TierbaseError):  # the one behind the route stays (routes are not deleted)
                svc.pe.delete_branch(name)

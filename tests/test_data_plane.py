"""The data plane as an attacker sees it: every connection through the real proxy is a principal,
nobody but the platform holds a superuser, and computes cannot be reached around the proxy.

Each attack runs as an agent principal through the session platform's proxy (the service's own,
see conftest) against real computes, and asserts the refusal, the audit record and that nothing
changed (rows, roles, files).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from tierbase import Tierbase
from tierbase.errors import PolicyDenied
from tierbase.governance.principals import db_password
from tierbase.proxy import ProxyThread
from tierbase.proxy import protocol as pq
from tierbase.service import make_proxy

from .conftest import free_port, free_port_base, make_home, needs_root_btrfs, query, serving, teardown_platform

pytestmark = needs_root_btrfs


@dataclass
class Who:
    name: str
    token: str

    @property
    def password(self) -> str:
        return db_password(self.token)


@dataclass
class Plane:
    tb: Tierbase
    agent: Who
    dev: Who

    def view(self, who: Who) -> Tierbase:
        return self.tb.as_principal(who.name, token=who.token)

    def dsn(self, who: Who, dbname: str, *, password: str | None = None, user: str | None = None,
            **extra: str) -> str:
        parts = {"host": "127.0.0.1", "port": str(self.tb.proxy_port), "user": user or who.name,
                 "password": who.password if password is None else password, "dbname": dbname,
                 "connect_timeout": "20", **extra}
        return " ".join(f"{k}='{v}'" for k, v in parts.items())


TOPOLOGY = """
[tiers.production]
protected = true

[tiers.staging]
parent = "production"
protected = true
entry = true
"""


@pytest.fixture(scope="module")
def plane() -> Iterator[Plane]:
    """A platform of its own: production <- staging (the entry tier agents branch off), its proxy running."""
    base = make_home()
    os.environ["TIERBASE_PORT_BASE"] = str(free_port_base())
    cfg = base / "tierbase.toml"
    tb = Tierbase(base / "home")
    try:
        tb.init(storage="btrfs", btrfs_size="2G", proxy_port=free_port())
        with serving(tb):
            with psycopg.connect(tb.branch_url("production"), autocommit=True) as conn:
                conn.execute("CREATE TABLE seed (id int PRIMARY KEY, label text NOT NULL)")
                conn.execute("INSERT INTO seed SELECT g, 'row ' || g FROM generate_series(1, 1000) g")
            cfg.write_text(TOPOLOGY)
            tb.reload_config(str(cfg))
            agent = tb.create_principal("bot", "agent")
            dev = tb.create_principal("dev", "developer")
            yield Plane(tb, Who(agent["name"], agent["token"]), Who(dev["name"], dev["token"]))
    finally:
        teardown_platform(tb, base)


@pytest.fixture
def own(plane: Plane) -> Iterator[str]:
    """A feature branch of staging created by the agent (agents may branch off the entry tier)."""
    name = f"dp-{secrets.token_hex(3)}"
    plane.view(plane.agent).create_branch(name)
    yield name
    if plane.tb.store.find(name):
        plane.tb.delete_branch(name, recursive=True)


def fatal(dsn: str) -> psycopg.OperationalError:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn, autocommit=True).close()
    return info.value


def seed_count(tb: Tierbase) -> int:
    return int(query(tb.branch_url("production"), "SELECT count(*) FROM seed")[0][0])  # type: ignore[arg-type]


def audit_since(tb: Tierbase, since: int, actor: str) -> list[dict[str, object]]:
    return [r for r in tb.gate.audit.after(since) if r["actor"] == actor]


def last_id(tb: Tierbase) -> int:
    rows = tb.gate.audit.after(0)
    return int(rows[-1]["id"]) if rows else 0


# -- credentials -------------------------------------------------------------------------------


def test_branch_url_carries_the_principals_own_credentials(plane: Plane, own: str) -> None:
    url = plane.view(plane.agent).branch_url(own)
    parts = urlsplit(url)
    assert parts.username == plane.agent.name and parts.password == plane.agent.password
    assert parts.port == plane.tb.proxy_port and parts.path == f"/{own}"
    assert plane.agent.token not in url  # the API token itself never travels in a database URL
    rows = query(url, "SELECT current_user, rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user")
    assert rows == [("tb_owner", False, False)]
    query(url, "CREATE TABLE mine (id int PRIMARY KEY); INSERT INTO mine VALUES (1)")  # DDL + DML: its own
    assert query(url, "SELECT count(*) FROM mine") == [(1,)]
    superusers = query(url, "SELECT rolname FROM pg_roles WHERE rolsuper ORDER BY 1")
    assert superusers == [("tierbase",)]


def test_no_principal_can_reach_the_superuser_anywhere(plane: Plane, own: str) -> None:
    """The superuser exists for the platform only: not through the proxy, not over TCP."""
    b = plane.tb.store.get(own)
    plane.tb.branches.start(own)
    for user in ("tierbase", "tb_owner", plane.agent.name):
        err = fatal(f"host=127.0.0.1 port={b.port} user={user} password={plane.agent.password} dbname=postgres "
                    "connect_timeout=10")
        assert "no pg_hba.conf entry" in str(err) or "rejects connection" in str(err), err
    # through the proxy, the superuser's name is just an unknown principal
    err = fatal(plane.dsn(plane.agent, own, user="tierbase"))
    assert "password authentication failed" in str(err)


def test_wrong_revoked_and_borrowed_credentials_are_refused(plane: Plane, own: str) -> None:
    start = last_id(plane.tb)
    assert "password authentication failed" in str(fatal(plane.dsn(plane.agent, own, password="tbp_wrong")))
    # another principal's name with one's own secret
    err = fatal(plane.dsn(plane.agent, own, user=plane.dev.name))
    assert "password authentication failed" in str(err)
    # an unknown user sees exactly what a wrong password sees (no principal enumeration)
    err_unknown = fatal(plane.dsn(plane.agent, own, user="nobody-here"))
    assert str(err_unknown).replace("nobody-here", "X") == str(err).replace(plane.dev.name, "X")
    # a revoked principal is refused at the next login
    temp = plane.tb.create_principal(f"tmp-{secrets.token_hex(3)}", "agent")
    who = Who(temp["name"], temp["token"])
    plane.tb.revoke_principal(who.name)
    assert "password authentication failed" in str(fatal(plane.dsn(who, own)))
    plane.tb.gate.audit.flush()  # failures are folded per source and minute; write the summaries now
    failures = [r for r in plane.tb.gate.audit.after(start) if r["action"] == "proxy.login"]
    assert failures and all(r["decision"] == "denied" and r["outcome"] == "refused" for r in failures)


def test_agent_cannot_connect_to_production_by_any_name(plane: Plane) -> None:
    before, start = seed_count(plane.tb), last_id(plane.tb)
    for dsn in (plane.dsn(plane.agent, "production"),
                plane.dsn(plane.agent, "production.postgres"),
                plane.dsn(plane.agent, "postgres", options="endpoint=production")):
        err = fatal(dsn)
        assert "permission denied" in str(err) and "production" in str(err), err
    with pytest.raises(PolicyDenied):
        plane.view(plane.agent).branch_url("production")
    assert seed_count(plane.tb) == before
    denied = [r for r in audit_since(plane.tb, start, plane.agent.name) if r["target"] == "production"]
    assert denied and all(r["outcome"] == "refused" for r in denied)
    assert any("builtin.agent-no-credentials-on-protected" in str(r["reason"]) for r in denied)


def test_direct_urls_are_for_platform_engineers_only(plane: Plane, own: str) -> None:
    start = last_id(plane.tb)
    with pytest.raises(PolicyDenied, match="only platform engineers"):
        plane.view(plane.agent).branch_url(own, direct=True)
    assert any(r["outcome"] == "refused" for r in audit_since(plane.tb, start, plane.agent.name))
    url = plane.tb.branch_url(own, direct=True)  # the owner of the platform: its own login role
    assert urlsplit(url).username == f"pe_{plane.tb.gate.owner}"
    assert query(url, "SELECT current_user, session_user") == [("tb_owner", f"pe_{plane.tb.gate.owner}")]


def test_readers_get_a_read_only_role(plane: Plane) -> None:
    """A developer may read the production tier (default.read-tiers), and nothing more."""
    before = seed_count(plane.tb)
    with psycopg.connect(plane.dsn(plane.dev, "production"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user, count(*) FROM seed").fetchone() == ("tb_reader", before)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("INSERT INTO seed VALUES (-1, 'x')")
        conn.execute("SET default_transaction_read_only = off")  # its own session setting: no privilege
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("INSERT INTO seed VALUES (-1, 'x')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE t (x int)")
    assert seed_count(plane.tb) == before


# -- what a branch owner may not do in SQL ---------------------------------------------------------


ESCAPES = [
    "COPY (SELECT 1) TO PROGRAM 'touch {marker}'",
    "COPY seed FROM PROGRAM 'touch {marker}'",
    "COPY seed FROM '/etc/passwd'",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT pg_read_binary_file('postgresql.conf')",
    "SELECT pg_ls_dir('.')",
    "SELECT lo_import('/etc/passwd')",
    "ALTER SYSTEM SET listen_addresses = '*'",
    "SET ROLE tierbase",
    "SET SESSION AUTHORIZATION tierbase",
    "CREATE ROLE sneaky SUPERUSER LOGIN",
    "ALTER ROLE tb_owner SUPERUSER",
    "GRANT pg_execute_server_program TO tb_owner",
    "GRANT tb_direct TO tb_owner",
    "CREATE EXTENSION dblink",
    "CREATE EXTENSION postgres_fdw",
    "CREATE EXTENSION file_fdw",
    "CREATE EXTENSION adminpack",
    "CREATE EXTENSION plpython3u",
    "LOAD 'auto_explain'",
    "SET session_preload_libraries = 'auto_explain'",
    "SELECT pg_reload_conf()",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'tierbase'",
]


@pytest.mark.parametrize("sql", ESCAPES)
def test_owner_role_cannot_escape_its_databases(plane: Plane, own: str, sql: str, tmp_path: Path) -> None:
    marker = Path("/tmp") / f"tb-escape-{secrets.token_hex(4)}"
    url = plane.view(plane.agent).branch_url(own)
    roles_before = query(url, "SELECT rolname, rolsuper, rolcanlogin FROM pg_roles ORDER BY 1")
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            got = conn.execute(sql.format(marker=marker))
            rows = got.fetchall() if got.description else []
            # a few of these run but do nothing (pg_terminate_backend on a backend it may not signal)
            assert sql.startswith("SELECT pg_terminate_backend") and rows in ([], [(False,)]), (sql, rows)
        except (psycopg.errors.InsufficientPrivilege, psycopg.errors.FeatureNotSupported,
                psycopg.errors.UndefinedFile, psycopg.errors.UndefinedObject) as err:
            assert err.sqlstate in ("42501", "0A000", "58P01", "42704"), err
    assert not marker.exists()
    assert query(url, "SELECT rolname, rolsuper, rolcanlogin FROM pg_roles ORDER BY 1") == roles_before
    assert query(url, "SELECT current_user, session_user") == [("tb_owner", "tb_owner")]


def test_migrations_run_as_the_owner_role_not_the_superuser(plane: Plane, own: str, tmp_path: Path) -> None:
    """What a principal cannot do in SQL it cannot do through a migration."""
    d = tmp_path / "migrations"
    d.mkdir()
    (d / "V1__who.sql").write_text("CREATE TABLE who AS SELECT current_user AS u;\n")
    (d / "V2__escape.sql").write_text("CREATE EXTENSION dblink;\n")
    agent = plane.view(plane.agent)
    with pytest.raises(Exception) as info:
        agent.migrate_apply(own, str(d))
    assert "permission denied" in str(info.value) or "must be superuser" in str(info.value)
    (d / "V2__escape.sql").unlink()
    agent.migrate_apply(own, str(d))
    assert query(agent.branch_url(own), "SELECT u FROM who") == [("tb_owner",)]


# -- TLS ---------------------------------------------------------------------------------------


def test_tls_verify_full_and_channel_binding(plane: Plane, own: str) -> None:
    ca = plane.tb.home.root / "tls" / "ca.crt"
    dsn = plane.dsn(plane.agent, own, sslmode="verify-full", sslrootcert=str(ca), channel_binding="require")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == ("tb_owner",)
    with psycopg.connect(plane.dsn(plane.agent, own, sslmode="require"), autocommit=True) as conn:
        assert conn.info.pgconn.ssl_in_use
    # plain text still works on loopback (the setting's default) ...
    with psycopg.connect(plane.dsn(plane.agent, own, sslmode="disable"), autocommit=True) as conn:
        assert not conn.info.pgconn.ssl_in_use
    # ... and channel binding cannot be asked for without TLS
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(plane.dsn(plane.agent, own, sslmode="disable", channel_binding="require")).close()


def test_plain_text_refused_when_the_setting_says_so(plane: Plane, own: str) -> None:
    t = ProxyThread(make_proxy(plane.tb, port=0)).start()
    t.proxy.plain_loopback = False
    try:
        port = str(t.proxy.port)
        err = fatal(plane.dsn(plane.agent, own, sslmode="disable", port=port))
        assert "only TLS" in str(err)
        with psycopg.connect(plane.dsn(plane.agent, own, sslmode="require", port=port), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        t.stop()


def test_plaintext_injected_after_ssl_request_is_refused(plane: Plane) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", plane.tb.proxy_port), timeout=10) as s:
        s.sendall(struct.pack("!II", 8, pq.SSL_REQUEST) + pq.build_startup(pq.PROTOCOL_3, {"user": "x"}))
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data[:1] in (b"E", b"N") and (data[:1] == b"N" or b"unencrypted data after SSL request" in data)


# -- floods ---------------------------------------------------------------------------------------


async def _bad_login(port: int, user: str) -> bool:
    """One SCRAM login with a forged proof, by hand: the proxy must answer 28P01 and close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(pq.build_startup(pq.PROTOCOL_3, {"user": user, "database": "production"}))
        head = await reader.readexactly(5)  # AuthenticationSASL
        await reader.readexactly(int.from_bytes(head[1:], "big") - 4)
        nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        first = f"n,,n=,r={nonce}".encode()
        body = b"SCRAM-SHA-256\x00" + struct.pack("!I", len(first)) + first
        writer.write(b"p" + struct.pack("!I", len(body) + 4) + body)
        head = await reader.readexactly(5)
        cont = await reader.readexactly(int.from_bytes(head[1:], "big") - 4)
        server_nonce = dict(p.split("=", 1) for p in cont[4:].decode().split(","))["r"]
        final = f"c=biws,r={server_nonce},p={base64.b64encode(secrets.token_bytes(32)).decode()}".encode()
        writer.write(b"p" + struct.pack("!I", len(final) + 4) + final)
        rest = await reader.read()
        return rest[:1] == b"E" and b"28P01" in rest
    finally:
        writer.close()


def test_failed_login_storm_leaves_the_proxy_serving_and_the_trail_bounded(plane: Plane, own: str) -> None:
    proxy = ProxyThread(make_proxy(plane.tb, port=0))
    proxy.proxy.tls = None  # plain SCRAM offer only, so the forged exchange stays small
    proxy.proxy._ssl = None
    proxy.proxy._cb_data = None
    proxy.start()
    good = plane.view(plane.agent).branch_url(own).replace(f":{plane.tb.proxy_port}/", f":{proxy.proxy.port}/")
    start = last_id(plane.tb)
    total, refused = 10_000, 0

    async def storm() -> int:
        sem = asyncio.Semaphore(64)

        async def one(i: int) -> bool:
            async with sem:
                return await _bad_login(proxy.proxy.port, plane.agent.name if i % 2 else f"ghost-{i}")

        return sum(await asyncio.gather(*(one(i) for i in range(total))))

    try:
        loop_result: list[int] = []
        import threading

        t = threading.Thread(target=lambda: loop_result.append(asyncio.run(storm())))
        t0 = time.monotonic()
        t.start()
        while t.is_alive():  # other clients keep being served during the storm
            assert query(good, "SELECT 1") == [(1,)]
            time.sleep(0.2)
        t.join()
        refused = loop_result[0]
        assert refused == total, f"{total - refused} forged logins were not refused with 28P01"
        elapsed = time.monotonic() - t0
        assert query(good, "SELECT 1") == [(1,)]
    finally:
        proxy.stop()
    plane.tb.gate.audit.flush()
    logins = [r for r in plane.tb.gate.audit.after(start) if r["action"] == "proxy.login"]
    counted = sum(int(json.loads(str(r["after"] or "{}")).get("count", 1)) for r in logins)
    assert counted >= total, (counted, total)
    # aggregated: a few records per source and minute, not one per attempt
    assert 1 <= len(logins) <= 4 * (int(elapsed / 60) + 2), len(logins)

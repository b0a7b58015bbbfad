"""Real clients through the proxy, each with a principal's own URL, over plain loopback and over TLS.

psql, psycopg 3, asyncpg, SQLAlchemy (psycopg dialect), node-postgres, pgjdbc
and pgbench each connect as a developer principal to a branch it created, read
the seeded table, write on that branch and (where the client can) cancel a
running query. Each does so in every transport mode it supports:

* ``plain``: ``sslmode=disable`` (loopback only; the proxy refuses plain text elsewhere);
* ``require``: TLS without verifying the server;
* ``verify-full``: TLS verified against the platform's CA (``<home>/tls/ca.crt``);
* ``channel-binding``: verify-full plus SCRAM-SHA-256-PLUS (``channel_binding=require``
  for libpq clients, ``enableChannelBinding`` for node-postgres).

asyncpg 0.32 and pgjdbc 42.5 implement SCRAM-SHA-256 without channel binding
(asyncpg always sends ``n,,``; pgjdbc gained ``channelBinding`` only in 42.7.4),
so they run the first three modes. pgbench runs ``-i`` and then ``-T 3`` in plain
text and with channel binding, ``-T 1`` in the other two TLS modes (runtime).
Next to each happy path runs an attack: a wrong password and a server
certificate from a CA the client does not trust, per client; with psql also
another developer's hand-made URL for this branch and a revoked principal.

``test_pg_regress`` runs PostgreSQL's own ``pg_regress`` driver on a schedule
under ``tests/fixtures/regress`` (see its README) through the proxy.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa

from tierbase import Tierbase
from tierbase.compute.binaries import find_binaries
from tierbase.governance.principals import db_password
from tierbase.proxy.tls import ensure_certificates

from .conftest import make_home, needs_root_btrfs

pytestmark = needs_root_btrfs

HERE = Path(__file__).parent
NODE_DIR = HERE / "clients" / "node"
JAVA_SOURCE = HERE / "clients" / "java" / "Client.java"
JDBC_JAR = Path("/usr/share/java/postgresql.jar")
REGRESS_DIR = HERE / "fixtures" / "regress"

LIBPQ_MODES = ("plain", "require", "verify-full", "channel-binding")
NO_PLUS_MODES = ("plain", "require", "verify-full")  # asyncpg, pgjdbc: SCRAM-SHA-256 only
# The foreign CA has the same subject as the platform's (another tierbase's CA), so OpenSSL may fail
# on the signature check ("EVP lib") rather than with "certificate verify failed": refused either way.
FOREIGN_CA_ERROR = "certificate verify failed|SSL error|EVP lib"


@dataclass
class Dev:
    """A developer principal and the branch it made; URLs carry its own derived password."""

    tb: Tierbase
    name: str
    password: str  # derived from its token, as the CLI/SDK do
    branch: str
    ca: Path
    foreign_ca: Path  # a CA that did not sign the proxy's certificate

    def url(self, mode: str, dbname: str = "postgres", *, password: str | None = None,
            ca: Path | None = None) -> str:
        url = self.tb.branch_url(self.branch, dbname)
        if password is not None:
            parts = urlsplit(url)
            url = url.replace(f":{parts.password}@", f":{password}@", 1)
        return f"{url}?{urlencode(self.params(mode, ca=ca))}"

    def params(self, mode: str, *, ca: Path | None = None) -> dict[str, str]:
        """libpq connection parameters for a transport mode."""
        if mode == "plain":
            return {"sslmode": "disable"}  # not libpq's default 'prefer', which would take TLS
        if mode == "require":
            return {"sslmode": "require"}
        out = {"sslmode": "verify-full", "sslrootcert": str(ca or self.ca)}
        if mode == "channel-binding":
            out["channel_binding"] = "require"
        return out

    def port(self) -> int:
        return self.tb.proxy_port


@pytest.fixture(scope="module")
def dev(platform: Tierbase) -> Iterator[Dev]:
    name = f"dev-{secrets.token_hex(3)}"
    token = platform.create_principal(name, "developer")["token"]
    me = platform.as_principal(name, token=token)
    branch = f"cl-{secrets.token_hex(3)}"
    me.create_branch(branch, start=True)
    other = make_home()
    try:
        yield Dev(me, name, db_password(token), branch, platform.home.root / "tls" / "ca.crt",
                  ensure_certificates(other).ca)
    finally:
        shutil.rmtree(other, ignore_errors=True)
        if platform.store.find(branch):
            platform.delete_branch(branch, recursive=True)
        platform.revoke_principal(name)


def table_for(client: str, mode: str) -> str:
    return f"{client}_{mode}".replace("-", "_")


def assert_landed(dev: Dev, client: str, modes: tuple[str, ...]) -> None:
    """Each mode's write is on the developer's branch (read back over a connection of our own), not its parent."""
    with psycopg.connect(dev.url("verify-full"), autocommit=True) as conn:
        for mode in modes:
            row = conn.execute(f"SELECT client FROM {table_for(client, mode)} WHERE id = 1").fetchone()
            assert row is not None and row[0] == f"{client} {mode}"
    with psycopg.connect(dev.tb.branch_url("production", sslmode="require"), autocommit=True) as conn:
        for mode in modes:
            assert conn.execute("SELECT to_regclass(%s)", (table_for(client, mode),)).fetchone() == (None,)


def env_without_pg() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def sleep_sql(tag: str) -> str:
    """A long query with a tag of its own, to be found in pg_stat_activity and cancelled."""
    return f"SELECT pg_sleep(30) /* {tag} */"


def wait_running(dev: Dev, sql: str, timeout: float = 20) -> None:
    """Until the compute is running ``sql``: a cancel sent before it arrives would cancel nothing."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dev.url("plain"), autocommit=True) as conn:
        while time.monotonic() < deadline:
            if conn.execute("SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query = %s",
                            (sql,)).fetchone():
                return
            time.sleep(0.05)
    raise AssertionError(f"{sql!r} did not start within {timeout} s")


def cancel_when_running(dev: Dev, sql: str, cancel: Callable[[], object]) -> threading.Thread:
    def run() -> None:
        wait_running(dev, sql)
        cancel()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# -- psql ----------------------------------------------------------------------------------


def psql(url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-A", "-t", url, *args], capture_output=True,
                          text=True, env=env_without_pg(), timeout=timeout)


def psql_cancel(dev: Dev, url: str, tag: str) -> str:
    """Start a long query, ^C it as a person would; psql sends a CancelRequest on a new connection."""
    sql = sleep_sql(tag)
    proc = subprocess.Popen(["psql", "-X", url, "-c", sql], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env_without_pg())
    try:
        wait_running(dev, sql)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        proc.wait()
    return err


@pytest.mark.parametrize("mode", LIBPQ_MODES)
def test_psql(dev: Dev, mode: str) -> None:
    url = dev.url(mode)
    info = psql(url, "-c", r"\conninfo")
    assert info.returncode == 0, info.stderr
    assert f'as user "{dev.name}"' in info.stdout
    assert ("SSL connection" in info.stdout) == (mode != "plain")
    got = psql(url, "-c", "SELECT current_user, count(*) FROM seed")
    assert got.stdout.strip() == "tb_owner|1000"
    table = table_for("psql", mode)
    wrote = psql(url, "-c", f"CREATE TABLE {table} (id int PRIMARY KEY, client text NOT NULL)",
                 "-c", f"INSERT INTO {table} VALUES (1, 'psql {mode}')", "-c", f"SELECT client FROM {table}")
    assert wrote.returncode == 0, wrote.stderr
    assert wrote.stdout.split() == ["CREATE", "TABLE", "INSERT", "0", "1", "psql", mode]
    err = psql_cancel(dev, url, f"psql {mode}")
    assert "canceling statement due to user request" in err
    assert_landed(dev, "psql", (mode,))


def test_psql_refused(dev: Dev) -> None:
    wrong = psql(dev.url("verify-full", password="tbp_" + "x" * 40), "-c", "SELECT 1")
    assert wrong.returncode == 2
    assert f'password authentication failed for user "{dev.name}"' in wrong.stderr
    foreign = psql(dev.url("verify-full", ca=dev.foreign_ca), "-c", "SELECT 1")
    assert foreign.returncode == 2
    assert re.search(FOREIGN_CA_ERROR, foreign.stderr), foreign.stderr
    # libpq itself refuses channel_binding=require without TLS: nothing to bind to
    plain_cb = psql(dev.url("plain") + "&channel_binding=require", "-c", "SELECT 1")
    assert plain_cb.returncode == 2
    assert "channel binding" in plain_cb.stderr


def test_psql_other_principals(platform: Tierbase, dev: Dev) -> None:
    """Another developer may not connect to this developer's branch even with a URL made by hand, reads
    production as tb_reader without writing; a revoked principal's URL gets nowhere."""
    peer_name, gone_name = f"peer-{secrets.token_hex(3)}", f"gone-{secrets.token_hex(3)}"
    peer_token = platform.create_principal(peer_name, "developer")["token"]
    gone = platform.as_principal(gone_name, token=platform.create_principal(gone_name, "developer")["token"])
    try:
        by_hand = f"postgresql://{peer_name}:{db_password(peer_token)}@127.0.0.1:{dev.port()}/{dev.branch}" \
                  f"?sslmode=verify-full&sslrootcert={dev.ca}"
        refused = psql(by_hand, "-c", "SELECT 1")
        assert refused.returncode == 2
        assert "branch.connect" in refused.stderr and dev.branch in refused.stderr, refused.stderr
        url = platform.as_principal(peer_name, token=peer_token).branch_url("production") + "?sslmode=require"
        read = psql(url, "-c", "SELECT current_user, count(*) FROM seed")
        assert read.returncode == 0, read.stderr
        assert read.stdout.strip() == "tb_reader|1000"
        write = psql(url, "-c", "INSERT INTO seed VALUES (5000, 'not mine')")
        assert write.returncode == 1
        assert "cannot execute INSERT in a read-only transaction" in write.stderr
        stale = gone.branch_url("production") + "?sslmode=require"
        platform.revoke_principal(gone_name)
        refused = psql(stale, "-c", "SELECT 1")
        assert refused.returncode == 2
        assert f'password authentication failed for user "{gone_name}"' in refused.stderr
    finally:
        platform.revoke_principal(peer_name)


# -- psycopg 3 ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", LIBPQ_MODES)
def test_psycopg(dev: Dev, mode: str) -> None:
    table = table_for("psycopg", mode)
    with psycopg.connect(dev.url(mode), connect_timeout=20) as conn:
        assert conn.pgconn.ssl_in_use == (mode != "plain")
        assert conn.execute("SELECT current_user, count(*) FROM seed").fetchone() == ("tb_owner", 1000)
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, client text NOT NULL)")
        conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (1, f"psycopg {mode}"))  # extended protocol
        conn.commit()
        # cancel_safe(): libpq 17+ (psycopg's own) sends the CancelRequest over TLS when the session has it
        sql = sleep_sql(f"psycopg {mode}")
        canceller = cancel_when_running(dev, sql, conn.cancel_safe)
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(sql)
        canceller.join()
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert_landed(dev, "psycopg", (mode,))


def test_psycopg_notifications(dev: Dev) -> None:
    """LISTEN on one session, NOTIFY from another: the relay delivers the asynchronous message."""
    with psycopg.connect(dev.url("verify-full"), autocommit=True) as listener, \
            psycopg.connect(dev.url("plain"), autocommit=True) as talker:
        listener.execute("LISTEN clients_test")
        talker.execute("SELECT pg_notify('clients_test', 'hello through the proxy')")
        got = next(listener.notifies(timeout=10, stop_after=1))
        assert (got.channel, got.payload) == ("clients_test", "hello through the proxy")


def test_psycopg_refused(dev: Dev) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dev.url("require", password="tbp_" + "y" * 40), connect_timeout=20)
    with pytest.raises(psycopg.OperationalError, match=FOREIGN_CA_ERROR):
        psycopg.connect(dev.url("verify-full", ca=dev.foreign_ca), connect_timeout=20)


# -- asyncpg ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", NO_PLUS_MODES)
def test_asyncpg(dev: Dev, mode: str) -> None:
    table = table_for("asyncpg", mode)

    async def run() -> None:
        conn = await asyncpg.connect(dev.url(mode), timeout=20)
        try:
            assert (conn._transport.get_extra_info("ssl_object") is not None) == (mode != "plain")
            row = await conn.fetchrow("SELECT current_user, count(*) FROM seed")
            assert tuple(row) == ("tb_owner", 1000)
            async with conn.transaction():
                await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, client text NOT NULL)")
                await conn.execute(f"INSERT INTO {table} VALUES ($1, $2)", 1, f"asyncpg {mode}")
            # a timeout makes asyncpg send a CancelRequest and wait for the server to confirm it
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.execute("SELECT pg_sleep(30)", timeout=0.3)
            assert time.monotonic() - started < 10
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()

    asyncio.run(run())
    assert_landed(dev, "asyncpg", (mode,))


def test_asyncpg_refused(dev: Dev) -> None:

    async def run() -> None:
        with pytest.raises(asyncpg.InvalidPasswordError, match="password authentication failed"):
            await asyncpg.connect(dev.url("require", password="tbp_" + "z" * 40), timeout=20)
        with pytest.raises(OSError, match=FOREIGN_CA_ERROR):
            await asyncpg.connect(dev.url("verify-full", ca=dev.foreign_ca), timeout=20)

    asyncio.run(run())


# -- SQLAlchemy (psycopg dialect) ----------------------------------------------------------------


@pytest.mark.parametrize("mode", LIBPQ_MODES)
def test_sqlalchemy(dev: Dev, mode: str) -> None:
    table = table_for("sqlalchemy", mode)
    engine = sa.create_engine(dev.url(mode).replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.begin() as conn:
            assert tuple(conn.execute(sa.text("SELECT current_user, count(*) FROM seed")).one()) == ("tb_owner", 1000)
            conn.execute(sa.text(f"CREATE TABLE {table} (id int PRIMARY KEY, client text NOT NULL)"))
            conn.execute(sa.text(f"INSERT INTO {table} VALUES (:id, :client)"),
                         {"id": 1, "client": f"sqlalchemy {mode}"})
        with engine.connect() as conn:
            # SQLAlchemy has no cancel of its own: it is the driver's (psycopg's) cancel under it
            driver = conn.connection.driver_connection
            assert driver is not None
            sql = sleep_sql(f"sqlalchemy {mode}")
            canceller = cancel_when_running(dev, sql, driver.cancel_safe)
            with pytest.raises(sa.exc.OperationalError, match="canceling statement due to user request"):
                conn.execute(sa.text(sql))
            canceller.join()
    finally:
        engine.dispose()
    assert_landed(dev, "sqlalchemy", (mode,))


# -- node-postgres -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_pg() -> Path:
    """node-postgres 8 under tests/clients/node (npm install on first use; node_modules is not committed)."""
    if not (NODE_DIR / "node_modules" / "pg" / "package.json").exists():
        done = subprocess.run(["npm", "install", "--no-save", "--no-audit", "--no-fund", "--loglevel=error"],
                              cwd=NODE_DIR, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    return NODE_DIR / "client.js"


def node_config(dev: Dev, mode: str, password: str | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"host": "127.0.0.1", "port": dev.port(), "user": dev.name,
                           "password": password or dev.password, "database": dev.branch}
    if mode == "require":
        cfg["ssl"] = {"rejectUnauthorized": False}
    elif mode in ("verify-full", "channel-binding"):
        cfg["ssl"] = {"rejectUnauthorized": True}  # the CA is read from caFile by client.js
    if mode == "channel-binding":
        cfg["enableChannelBinding"] = True
    return cfg


def run_json_lines(cmd: list[str], *, stdin: str | None = None, cwd: Path | None = None) -> dict[str, dict[str, Any]]:
    done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=cwd, timeout=120,
                          env=env_without_pg())
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {r["name"]: r for r in rows}


def assert_client_result(got: dict[str, Any], client: str, mode: str) -> None:
    assert "error" not in got, got
    assert (got["role"], got["seed"], got["wrote"]) == ("tb_owner", 1000, f"{client} {mode}")
    assert got["cancel"] == "57014", got  # query_canceled
    assert got["cancel_seconds"] < 10 and got["after_cancel"] == 1


def test_node_pg(dev: Dev, node_pg: Path) -> None:
    cases = [{"name": f"node {mode}", "config": node_config(dev, mode), "table": table_for("node", mode),
              "cancel": True, "caFile": str(dev.ca) if mode in ("verify-full", "channel-binding") else None}
             for mode in LIBPQ_MODES]
    cases += [
        {"name": "wrong password", "config": node_config(dev, "require", "tbp_" + "w" * 40), "table": "x"},
        {"name": "foreign CA", "config": node_config(dev, "verify-full"), "table": "x", "caFile": str(dev.foreign_ca)},
    ]
    results = run_json_lines(["node", str(node_pg), json.dumps(cases)])
    for mode in LIBPQ_MODES:
        got = results[f"node {mode}"]
        assert_client_result(got, "node", mode)
        assert got["tls"] == (mode != "plain")
        assert got["mechanism"] == ("SCRAM-SHA-256-PLUS" if mode == "channel-binding" else "SCRAM-SHA-256")
    assert results["wrong password"]["code"] == "28P01"
    assert "password authentication failed" in results["wrong password"]["error"]
    # same subject as the real CA, other key: node's OpenSSL reports the signature check failing
    assert results["foreign CA"]["code"] in ("CERT_SIGNATURE_FAILURE", "SELF_SIGNED_CERT_IN_CHAIN"), \
        results["foreign CA"]
    assert_landed(dev, "node", LIBPQ_MODES)


# -- pgjdbc ------------------------------------------------------------------------------------------


def jdbc_url(dev: Dev, mode: str, *, ca: Path | None = None) -> str:
    params = dev.params(mode, ca=ca)
    params.pop("channel_binding", None)
    return f"jdbc:postgresql://127.0.0.1:{dev.port()}/{dev.branch}?{urlencode(params)}"


def test_jdbc(dev: Dev) -> None:
    assert JDBC_JAR.exists(), "pgjdbc is missing: run `make deps` (Debian package libpostgresql-jdbc-java)"
    lines = [[f"jdbc {mode}", jdbc_url(dev, mode), dev.name, dev.password, table_for("jdbc", mode), "1"]
             for mode in NO_PLUS_MODES]
    lines += [["wrong password", jdbc_url(dev, "require"), dev.name, "tbp_" + "v" * 40, "x", "0"],
              ["foreign CA", jdbc_url(dev, "verify-full", ca=dev.foreign_ca), dev.name, dev.password, "x", "0"]]
    stdin = "".join("\t".join(line) + "\n" for line in lines)
    # the JDK's source launcher compiles Client.java in memory: no build step, nothing left behind
    results = run_json_lines(["java", "-cp", str(JDBC_JAR), str(JAVA_SOURCE)], stdin=stdin)
    for mode in NO_PLUS_MODES:
        assert_client_result(results[f"jdbc {mode}"], "jdbc", mode)
    assert results["wrong password"]["code"] == "28P01"
    assert "password authentication failed" in results["wrong password"]["error"]
    assert "PKIX path" in results["foreign CA"]["error"] or "certificate" in results["foreign CA"]["error"], \
        results["foreign CA"]
    assert_landed(dev, "jdbc", NO_PLUS_MODES)


# -- pgbench ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["plain", "channel-binding", "require", "verify-full"])
def test_pgbench(dev: Dev, mode: str) -> None:
    url = dev.url(mode)
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q", url], capture_output=True, text=True,
                          env=env_without_pg(), timeout=120)
    assert init.returncode == 0, init.stderr
    seconds = "3" if mode in ("plain", "channel-binding") else "1"
    run = subprocess.run(["pgbench", "-c", "2", "-j", "2", "-T", seconds, url], capture_output=True, text=True,
                         env=env_without_pg(), timeout=120)
    assert run.returncode == 0, run.stderr
    done = re.search(r"number of transactions actually processed: (\d+)", run.stdout)
    assert done and int(done.group(1)) > 0, run.stdout
    assert "number of failed transactions: 0" in run.stdout
    with psycopg.connect(url) as conn:
        history = conn.execute("SELECT count(*) FROM pgbench_history").fetchone()
    assert history is not None and history[0] == int(done.group(1))


# -- PostgreSQL's regression driver ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["plain", "channel-binding"])
def test_pg_regress(dev: Dev, mode: str, tmp_path: Path) -> None:
    """pg_regress --use-existing runs tests/fixtures/regress/schedule through the proxy as the developer.

    Plain: routed by ``options=endpoint=<branch>`` (PGOPTIONS, to which pg_regress appends its own
    ``-c intervalstyle=...``). TLS with channel binding: routed by the database name ``<branch>.<db>``.
    """
    bindir = find_binaries().bindir  # Debian ships pg_regress in postgresql-client-<major>, beside it
    pg_regress = bindir.parent / "lib" / "pgxs" / "src" / "test" / "regress" / "pg_regress"
    assert pg_regress.exists(), f"{pg_regress} is missing: run `make deps` (Debian package postgresql-client)"
    db = f"regress_{mode.replace('-', '_')}"
    with psycopg.connect(dev.url("plain"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db}")  # --use-existing: pg_regress creates nothing itself
    env = env_without_pg() | {"PGPASSWORD": dev.password, "PGCONNECT_TIMEOUT": "20"}
    if mode == "plain":
        env |= {"PGSSLMODE": "disable", "PGOPTIONS": f"endpoint={dev.branch}"}
        dbname = db
    else:
        env |= {"PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(dev.ca), "PGCHANNELBINDING": "require"}
        dbname = f"{dev.branch}.{db}"
    done = subprocess.run([str(pg_regress), "--use-existing", f"--bindir={bindir}", "--host=127.0.0.1",
                           f"--port={dev.port()}", f"--user={dev.name}", f"--dbname={dbname}",
                           f"--inputdir={REGRESS_DIR}", f"--outputdir={tmp_path}",
                           f"--schedule={REGRESS_DIR / 'schedule'}"],
                          capture_output=True, text=True, env=env, timeout=180)
    diffs = tmp_path / "regression.diffs"
    assert done.returncode == 0, done.stdout + done.stderr + (diffs.read_text() if diffs.exists() else "")
    tests = len(list((REGRESS_DIR / "sql").glob("*.sql")))
    assert f"All {tests} tests passed." in done.stdout, done.stdout

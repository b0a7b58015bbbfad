"""The wire-protocol proxy with real computes and real clients (psycopg, psql, pgbench, raw sockets).

The proxy runs on its own event loop in a background thread (``ProxyThread``),
so the tests can use sync psycopg and subprocesses against it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors as pgerrors
from scramp import ScramClient

from tierbase import Tierbase, TierbaseError
from tierbase.compute.postgres import Postgres
from tierbase.governance.principals import db_password
from tierbase.proxy import Proxy, ProxyThread, RouteError, Target
from tierbase.proxy import protocol as pq
from tierbase.service import PlatformAuthority

# -- a resolver over the facade ------------------------------------------------------


class BranchResolver:
    """Route name -> branch (identity unless mapped), waking stopped computes."""

    def __init__(self, platform: Tierbase) -> None:
        self.platform = platform
        self.routes: dict[str, str] = {}
        self.broken: dict[str, Exception] = {}

    async def resolve(self, route: str) -> Target:
        if route in self.broken:
            raise self.broken[route]
        branch = self.routes.get(route, route)
        b = self.platform.store.find(branch)
        if b is None:
            raise RouteError(f"route {route!r} does not exist", "Run `tierbase branch list` to see routes")
        provider = self.platform.branches.provider
        # starting is not ready (the socket comes after postmaster.pid): take the start path, which waits
        if provider.running_pid(b.volume) is None or not Postgres.is_ready(provider.datadir(b.volume)):
            try:
                await asyncio.to_thread(self.platform.start_branch, branch)
            except TierbaseError as err:
                raise RouteError(err.message, err.hint, "57P03") from err
        return Target(branch, str(self.platform.branches.provider.sockets), b.port)


@dataclass
class Router:
    """A proxy over a test resolver (routes of its own) and the platform's real authority."""

    thread: ProxyThread
    resolver: BranchResolver
    authority: PlatformAuthority
    user: str  # the platform's owner principal
    password: str  # its Postgres password
    extra: list[ProxyThread] = field(default_factory=list)

    @property
    def proxy(self) -> Proxy:
        return self.thread.proxy

    @property
    def port(self) -> int:
        return self.proxy.port

    def connect(self, dbname: str, *, port: int | None = None, password: str | None = None,
                **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(host="127.0.0.1", port=port or self.port, user=self.user,
                               password=self.password if password is None else password, dbname=dbname,
                               connect_timeout=20, autocommit=True, **kwargs)

    def env(self) -> dict[str, str]:
        return dict(os.environ, PGPASSWORD=self.password, PGCONNECT_TIMEOUT="20")

    def wait_sessions(self, branch: str, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.proxy.sessions(branch) != count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.proxy.sessions(branch) == count

    def spare(self, **kwargs: Any) -> ProxyThread:
        """Another proxy over the same resolver, with other settings; stopped at teardown."""
        t = ProxyThread(Proxy(self.resolver, self.authority, **kwargs)).start()
        self.extra.append(t)
        return t


@pytest.fixture(scope="module")
def router(platform: Tierbase) -> Iterator[Router]:
    resolver = BranchResolver(platform)
    authority = PlatformAuthority(platform)
    owner = platform.gate.owner
    r = Router(ProxyThread(Proxy(resolver, authority)).start(), resolver, authority, owner,
               db_password(platform.home.token.read_text().strip()))
    try:
        yield r
    finally:
        for t in r.extra:
            t.stop()
        r.thread.stop()


@pytest.fixture
def make_branch(platform: Tierbase) -> Iterator[Callable[..., str]]:
    """Create branches of production (optionally with a one-row ``marker`` table); deleted afterwards."""
    made: list[str] = []

    def make(marker: str | None = None, *, start: bool = False) -> str:
        name = f"px-{secrets.token_hex(3)}"
        platform.create_branch(name, start=start or marker is not None)
        made.append(name)
        if marker is not None:
            with psycopg.connect(platform.branch_url(name, direct=True), autocommit=True) as conn:
                conn.execute("CREATE TABLE marker (v text NOT NULL)")
                conn.execute("INSERT INTO marker VALUES (%s)", (marker,))
        return name

    yield make
    for name in made:
        if platform.store.find(name):
            platform.delete_branch(name, recursive=True)


def one(conn: psycopg.Connection[Any], sql: str, *params: object) -> Any:
    row = conn.execute(sql, params or None).fetchone()
    assert row is not None
    return row[0]


# -- raw sockets -----------------------------------------------------------------------


def raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    return s


def recv_until_closed(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def messages(data: bytes) -> list[tuple[str, bytes]]:
    out = []
    pos = 0
    while pos + 5 <= len(data):
        length = struct.unpack("!I", data[pos + 1:pos + 5])[0]
        out.append((chr(data[pos]), data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def error_fields(data: bytes) -> dict[str, str]:
    errs = [body for kind, body in messages(data) if kind == "E"]
    assert errs, f"no ErrorResponse in {data[:200]!r}"
    return pq.parse_error_fields(errs[0])


def startup(params: dict[str, str]) -> bytes:
    return pq.build_startup(pq.PROTOCOL_3, params)


def login(s: socket.socket, router: Router, params: dict[str, str], password: str | None = None) -> None:
    """Send the startup packet and do SCRAM-SHA-256 by hand; returns after AuthenticationSASLFinal."""
    s.sendall(startup({"user": router.user, **params}))
    kind, body = _read_message(s)
    assert kind == "R" and struct.unpack("!I", body[:4])[0] == 10 and b"SCRAM-SHA-256" in body
    client = ScramClient(["SCRAM-SHA-256"], router.user, router.password if password is None else password)
    first = client.get_client_first().encode()
    payload = b"SCRAM-SHA-256\x00" + struct.pack("!I", len(first)) + first
    s.sendall(b"p" + struct.pack("!I", len(payload) + 4) + payload)
    kind, body = _read_message(s)
    assert kind == "R" and struct.unpack("!I", body[:4])[0] == 11, body
    client.set_server_first(body[4:].decode())
    final = client.get_client_final().encode()
    s.sendall(b"p" + struct.pack("!I", len(final) + 4) + final)
    kind, body = _read_message(s)
    assert kind == "R" and struct.unpack("!I", body[:4])[0] == 12, (kind, body)


# -- routing ---------------------------------------------------------------------------


def test_routes_to_several_branches_at_once(router: Router, make_branch: Callable[..., str]) -> None:
    a, b = make_branch("from a"), make_branch("from b")
    with router.connect(a) as ca, router.connect(b) as cb, router.connect("production") as cp:
        assert one(ca, "SELECT v FROM marker") == "from a"
        assert one(cb, "SELECT v FROM marker") == "from b"
        assert one(cp, "SELECT to_regclass('marker') IS NULL") is True
        assert one(cp, "SELECT count(*) FROM seed") == 1000
        assert one(ca, "SELECT current_setting('cluster_name')") == f"tierbase-{a}"
        assert one(cb, "SELECT current_setting('cluster_name')") == f"tierbase-{b}"
        assert router.proxy.sessions(a) == 1 and router.proxy.sessions(b) == 1
        opened = router.proxy.last_active(a)
        assert opened > 0 and router.proxy.last_active("never-used") == 0
        ca.execute("INSERT INTO marker VALUES ('only in a')")
        assert one(cb, "SELECT count(*) FROM marker") == 1
    router.wait_sessions(a, 0)
    router.wait_sessions(b, 0)
    assert router.proxy.last_active(a) > opened  # the end of a session counts as activity (idle suspend)


def test_database_and_endpoint_option_forms(router: Router, platform: Tierbase,
                                            make_branch: Callable[..., str]) -> None:
    a = make_branch("from a")
    with psycopg.connect(platform.branch_url(a, direct=True), autocommit=True) as conn:
        conn.execute("CREATE DATABASE appdb")
    with router.connect(f"{a}.appdb") as conn:
        assert one(conn, "SELECT current_database()") == "appdb"
        assert one(conn, "SELECT current_setting('cluster_name')") == f"tierbase-{a}"
    with router.connect("appdb", options=f"endpoint={a}") as conn:
        assert one(conn, "SELECT current_database()") == "appdb"
    # other options survive, the endpoint one is stripped before the compute sees it
    with router.connect("postgres", options=f"-c search_path=elsewhere endpoint={a} -c work_mem=7MB") as conn:
        assert one(conn, "SHOW search_path") == "elsewhere"
        assert one(conn, "SHOW work_mem") == "7MB"
        assert one(conn, "SELECT current_setting('cluster_name')") == f"tierbase-{a}"
    url = f"postgresql://{router.user}:{router.password}@127.0.0.1:{router.port}/postgres?options=endpoint%3D{a}"
    with psycopg.connect(url, autocommit=True) as conn:
        assert one(conn, "SELECT v FROM marker") == "from a"


def test_psql_and_pgbench_through_the_proxy(router: Router, make_branch: Callable[..., str]) -> None:
    a = make_branch("psql sees a")
    got = subprocess.run(["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(router.port), "-U", router.user,
                          "-d", a, "-c", "SELECT v FROM marker"],
                         capture_output=True, text=True, env=router.env(), timeout=60)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "psql sees a"
    base = ["-h", "127.0.0.1", "-p", str(router.port), "-U", router.user]
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q", *base, a], capture_output=True, text=True,
                          env=router.env(), timeout=120)
    assert init.returncode == 0, init.stderr
    for mix in ([], ["-S"]):
        run = subprocess.run(["pgbench", *mix, "-c", "4", "-j", "2", "-t", "200", *base, a],
                             capture_output=True, text=True, env=router.env(), timeout=300)
        assert run.returncode == 0, run.stderr
        assert "number of transactions actually processed: 800/800" in run.stdout
        assert "number of failed transactions: 0" in run.stdout


def test_asyncpg_and_sqlalchemy(router: Router, make_branch: Callable[..., str]) -> None:
    asyncpg = pytest.importorskip("asyncpg")
    sqlalchemy = pytest.importorskip("sqlalchemy")
    a = make_branch("from a")

    async def with_asyncpg() -> tuple[str, str, bool]:
        # asyncpg: SSLRequest first (answered 'N'), extended protocol, and cancel on timeout
        conn = await asyncpg.connect(host="127.0.0.1", port=router.port, user=router.user,
                                     password=router.password, database="postgres",
                                     server_settings={"options": f"endpoint={a}"})
        try:
            marker = await conn.fetchval("SELECT v FROM marker WHERE v = $1", "from a")
            database = await conn.fetchval("SELECT current_database()")
            try:
                await conn.execute("SELECT pg_sleep(30)", timeout=0.5)
                cancelled = False
            except TimeoutError:
                cancelled = True
            # usable again only once the CancelRequest reached the compute and pg_sleep ended
            assert await conn.fetchval("SELECT 1", timeout=15) == 1
            return str(marker), str(database), cancelled
        finally:
            await conn.close()

    assert asyncio.run(with_asyncpg()) == ("from a", "postgres", True)
    engine = sqlalchemy.create_engine(
        f"postgresql+psycopg://{router.user}:{router.password}@127.0.0.1:{router.port}/{a}.postgres")
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT v FROM marker")).scalar() == "from a"
    finally:
        engine.dispose()


# -- wake on connect ------------------------------------------------------------------------


def _ready_count(platform: Tierbase, name: str) -> int:
    log = Path(platform.branches.provider.logs) / f"{name}.log"
    return log.read_text().count("database system is ready to accept connections") if log.exists() else 0


def test_wake_on_connect(router: Router, platform: Tierbase, make_branch: Callable[..., str]) -> None:
    a = make_branch()
    volume = platform.store.get(a).volume
    assert platform.branches.provider.running_pid(volume) is None
    with router.connect(a) as conn:
        assert one(conn, "SELECT count(*) FROM seed") == 1000
    assert platform.branches.provider.running_pid(volume) is not None
    assert _ready_count(platform, a) == 1


def test_concurrent_first_connections_start_the_compute_once(router: Router, platform: Tierbase,
                                                             make_branch: Callable[..., str]) -> None:
    a = make_branch("woken")
    platform.stop_branch(a)
    volume = platform.store.get(a).volume
    assert platform.branches.provider.running_pid(volume) is None
    starts = _ready_count(platform, a)
    barrier = threading.Barrier(10)

    def first_query(_: int) -> str:
        barrier.wait()
        with router.connect(a) as conn:
            return str(one(conn, "SELECT v FROM marker"))

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(first_query, range(10)))
    assert results == ["woken"] * 10
    assert _ready_count(platform, a) == starts + 1


def test_compute_that_fails_to_start_reports_the_reason(router: Router, platform: Tierbase,
                                                        make_branch: Callable[..., str]) -> None:
    a = make_branch()
    conf = platform.branches.provider.datadir(platform.store.get(a).volume) / "postgresql.conf"
    conf.write_text(conf.read_text() + "\nshared_buffers = 'plenty'\n")
    with pytest.raises(psycopg.OperationalError) as info:
        router.connect(a)
    text = str(info.value)
    assert "did not start" in text and "postgresql.conf\" contains errors" in text
    with raw(router.port) as s:
        login(s, router, {"database": a})
        fields = error_fields(recv_until_closed(s))
    assert fields["S"] == "FATAL" and fields["C"] == "57P03"
    assert "contains errors" in fields["M"] and "See the full log" in fields["H"]


# -- repoint ------------------------------------------------------------------------------------


def test_repoint_under_load(router: Router, make_branch: Callable[..., str]) -> None:
    old, new = make_branch("old"), make_branch("new")
    route = f"rp-{secrets.token_hex(3)}"
    router.resolver.routes[route] = old
    message = f"route {route} now points to branch {new}; reconnect"
    switched = threading.Event()
    stop = threading.Event()
    held = threading.Event()
    wrong: list[str] = []
    shutdowns: list[str] = []
    answers: list[str] = []

    def client() -> None:
        conn = router.connect(route)
        try:
            while not stop.is_set():
                after = switched.is_set()
                try:
                    v = one(conn, "SELECT v FROM marker")
                except pgerrors.AdminShutdown as err:
                    shutdowns.append(str(err))
                    conn.close()
                    conn = router.connect(route)
                    continue
                answers.append(v)
                if after and v != "new":
                    wrong.append(v)
        finally:
            conn.close()

    def latecomer() -> str:
        held.wait(10)
        with router.connect(route) as conn:  # arrives while the route is held: waits, then goes to `new`
            return str(one(conn, "SELECT v FROM marker"))

    async def repoint() -> int:
        async with router.proxy.hold(route):
            held.set()
            await asyncio.sleep(0.3)  # let the latecomer arrive and wait
            router.resolver.routes[route] = new
            n = await router.proxy.terminate(old, message)
        return n

    with ThreadPoolExecutor(6) as pool:
        clients = [pool.submit(client) for _ in range(4)]
        late = pool.submit(latecomer)
        while len(answers) < 200:
            time.sleep(0.01)
        assert router.proxy.sessions(old) == 4
        ended = router.thread.call(repoint())
        switched.set()
        count = len(answers)
        while len(answers) < count + 200:
            time.sleep(0.01)
        stop.set()
        for c in clients:
            c.result(60)
        assert late.result(60) == "new"
    assert ended == 4
    assert len(shutdowns) == 4
    assert all(message in text for text in shutdowns)
    assert wrong == []
    assert router.proxy.sessions(old) == 0
    router.wait_sessions(new, 0)


def test_terminate_reports_57P01_and_cancels_a_running_query(router: Router, platform: Tierbase,
                                                            make_branch: Callable[..., str]) -> None:
    a = make_branch("a")
    with router.connect(a) as idle, router.connect(a) as busy:
        idle.execute("SELECT 1")
        outcome: dict[str, BaseException] = {}

        def sleep() -> None:
            try:
                busy.execute("SELECT pg_sleep(30)")
            except BaseException as err:
                outcome["err"] = err

        t = threading.Thread(target=sleep)
        t.start()
        _wait_for_query(platform, a, "pg_sleep(30)", present=True)
        assert router.thread.call(router.proxy.terminate(a, "going away, reconnect")) == 2
        t.join(20)
        assert isinstance(outcome.get("err"), pgerrors.AdminShutdown)
        assert "going away, reconnect" in str(outcome["err"])
        with pytest.raises(pgerrors.AdminShutdown, match="going away, reconnect"):
            idle.execute("SELECT 1")
    _wait_for_query(platform, a, "pg_sleep(30)", present=False)  # the proxy cancelled it on the compute
    assert router.proxy.sessions(a) == 0


def test_terminate_waits_for_a_message_boundary(router: Router, make_branch: Callable[..., str]) -> None:
    """A session killed while a big result streams never sees a cut message."""
    a = make_branch("a")
    with router.connect(a) as conn:
        outcome: dict[str, Any] = {}

        def fetch() -> None:
            try:
                cur = conn.execute("SELECT g, repeat('x', 200) FROM generate_series(1, 200000) g")
                outcome["rows"] = len(cur.fetchall())
            except BaseException as err:
                outcome["err"] = err

        t = threading.Thread(target=fetch)
        t.start()
        time.sleep(0.1)  # most likely mid-stream by now; either way the client must not desync
        router.thread.call(router.proxy.terminate(a, "cut"))
        t.join(60)
        if "rows" in outcome:  # killed after the result: the whole result, then the error
            assert outcome["rows"] == 200000
            with pytest.raises(pgerrors.AdminShutdown, match="cut"):
                conn.execute("SELECT 1")
        else:
            assert isinstance(outcome["err"], (pgerrors.AdminShutdown, psycopg.OperationalError))
            assert "lost synchronization" not in str(outcome["err"])


def test_terminate_an_idle_session_that_got_a_notification(router: Router, platform: Tierbase,
                                                              make_branch: Callable[..., str]) -> None:
    """The last thing relayed was an async NotificationResponse, not ReadyForQuery: still a boundary."""
    a = make_branch("a")
    with router.connect(a) as listener:
        listener.execute("LISTEN ping")
        with psycopg.connect(platform.branch_url(a, direct=True), autocommit=True) as other:
            other.execute("NOTIFY ping, 'hello'")
        assert next(listener.notifies(timeout=10)).payload == "hello"
        router.thread.call(router.proxy.terminate(a, "moved on"))
        with pytest.raises(pgerrors.AdminShutdown, match="moved on"):
            listener.execute("SELECT 1")


def test_terminate_with_drain_lets_sessions_end(router: Router, make_branch: Callable[..., str]) -> None:
    a = make_branch("a")
    conn = router.connect(a)
    conn.execute("SELECT 1")
    threading.Timer(0.2, conn.close).start()
    assert router.thread.call(router.proxy.terminate(a, "drained", drain=20)) == 0
    assert router.proxy.sessions(a) == 0


def _wait_for_query(platform: Tierbase, branch: str, text: str, *, present: bool) -> None:
    deadline = time.monotonic() + 20
    with psycopg.connect(platform.branch_url(branch, direct=True), autocommit=True) as conn:
        while time.monotonic() < deadline:
            n = one(conn, "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s"
                          " AND pid <> pg_backend_pid()", f"%{text}%")
            if (n > 0) == present:
                return
            time.sleep(0.05)
    raise AssertionError(f"query {text!r} {'never showed up' if present else 'still runs'} on {branch}")


# -- cancel, auth ------------------------------------------------------------------------------


def test_cancel_reaches_the_right_compute(router: Router, make_branch: Callable[..., str]) -> None:
    # cancel_safe: psycopg's plain cancel() calls libpq's blocking PQcancel without releasing the
    # GIL, which would freeze the proxy thread of this very process (psql below covers PQcancel).
    a, b = make_branch("a"), make_branch("b")
    with router.connect(a) as other, router.connect(b) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        try:
            with pytest.raises(pgerrors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30)")
        finally:
            timer.cancel()
        assert one(conn, "SELECT v FROM marker") == "b"  # the session goes on
        assert one(other, "SELECT v FROM marker") == "a"


def test_psql_cancel_on_ctrl_c(router: Router, platform: Tierbase, make_branch: Callable[..., str]) -> None:
    a = make_branch("a")
    psql = subprocess.Popen(["psql", "-X", "-h", "127.0.0.1", "-p", str(router.port), "-U", router.user, "-d", a,
                             "-c", "SELECT pg_sleep(30)"], env=router.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_query(platform, a, "pg_sleep(30)", present=True)
        psql.send_signal(signal.SIGINT)  # psql sends a CancelRequest on a new connection
        _, err = psql.communicate(timeout=20)
    finally:
        psql.kill()
        psql.wait()
    assert "canceling statement due to user request" in err


def test_unknown_cancel_key_is_ignored(router: Router) -> None:
    with raw(router.port) as s:
        s.sendall(pq.cancel_request(struct.pack("!ii", 1, 2)))
        assert recv_until_closed(s) == b""
    with router.connect("production") as conn:
        assert one(conn, "SELECT 1") == 1


def test_wrong_password_is_relayed(router: Router) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        router.connect("production", password="not-the-password")
    # and the exact SQLSTATE, by speaking SCRAM by hand with a wrong proof
    with raw(router.port) as s:
        s.sendall(startup({"user": router.user, "database": "production"}))
        kind, body = _read_message(s)
        assert kind == "R" and struct.unpack("!I", body[:4])[0] == 10 and b"SCRAM-SHA-256" in body
        nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        first = f"n,,n=,r={nonce}".encode()
        payload = b"SCRAM-SHA-256\x00" + struct.pack("!I", len(first)) + first
        s.sendall(b"p" + struct.pack("!I", len(payload) + 4) + payload)
        kind, body = _read_message(s)
        assert kind == "R" and struct.unpack("!I", body[:4])[0] == 11
        server_first = dict(p.split("=", 1) for p in body[4:].decode().split(","))
        final = f"c=biws,r={server_first['r']},p={base64.b64encode(secrets.token_bytes(32)).decode()}".encode()
        s.sendall(b"p" + struct.pack("!I", len(final) + 4) + final)
        fields = error_fields(recv_until_closed(s))
    assert fields["C"] == "28P01" and fields["S"] == "FATAL"


def _read_message(s: socket.socket) -> tuple[str, bytes]:
    head = _recv_exact(s, 5)
    return chr(head[0]), _recv_exact(s, struct.unpack("!I", head[1:])[0] - 4)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "connection closed early"
        out += chunk
    return out


# -- bad input ----------------------------------------------------------------------------------


def test_unknown_route_names_it_and_how_to_list(router: Router) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        router.connect("no-such-route")
    assert "no-such-route" in str(info.value)
    assert "tierbase branch list" in str(info.value)
    with raw(router.port) as s:
        login(s, router, {"database": "no-such-route"})
        fields = error_fields(recv_until_closed(s))
    assert fields["S"] == "FATAL" and fields["C"] == "3D000"
    assert "no-such-route" in fields["M"] and "tierbase branch list" in fields["H"]


@pytest.mark.parametrize("database", ["Not_A_Route", "prod.", "a/b"])
def test_database_that_is_no_route(router: Router, database: str) -> None:
    with raw(router.port) as s:  # refused before authentication: the startup packet alone says so
        s.sendall(startup({"user": router.user, "database": database}))
        fields = error_fields(recv_until_closed(s))
    assert fields["C"] == "3D000"


def test_resolver_crash_becomes_an_error_response(router: Router) -> None:
    router.resolver.broken["boom"] = RuntimeError("the route table is on fire")
    try:
        with raw(router.port) as s:
            login(s, router, {"database": "boom"})
            fields = error_fields(recv_until_closed(s))
    finally:
        del router.resolver.broken["boom"]
    assert fields["C"] == "XX000" and fields["M"] == "the route table is on fire"


def test_ssl_and_gss_requests_are_declined(router: Router) -> None:
    with raw(router.port) as s:
        s.sendall(struct.pack("!II", 8, pq.GSSENC_REQUEST))
        assert _recv_exact(s, 1) == b"N"
        s.sendall(struct.pack("!II", 8, pq.SSL_REQUEST))
        assert _recv_exact(s, 1) == b"N"
        login(s, router, {"database": "production"})
        kind, body = _read_message(s)
        assert kind == "R" and body[:4] == b"\x00\x00\x00\x00"  # AuthenticationOk: the session is on


@pytest.mark.parametrize("garbage, sqlstate, words", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "08P01", "over the limit"),
    (struct.pack("!II", 4, 0), "08P01", "invalid length"),
    (struct.pack("!II", 8, 2 << 16), "0A000", "unsupported frontend protocol 2.0"),
    (struct.pack("!II", 20008, pq.PROTOCOL_3) + b"x" * 20000, "08P01", "over the limit of 10000 bytes"),
    (startup({"database": "production"}), "28000", "no PostgreSQL user name"),
    (struct.pack("!II", 12, pq.PROTOCOL_3) + b"user", "08P01", "invalid startup packet layout"),
])
def test_bad_startup_input(router: Router, garbage: bytes, sqlstate: str, words: str) -> None:
    with router.connect("production") as bystander, raw(router.port) as s:
        s.sendall(garbage)
        fields = error_fields(recv_until_closed(s))
        assert fields["S"] == "FATAL" and fields["C"] == sqlstate and words in fields["M"]
        assert one(bystander, "SELECT count(*) FROM seed") == 1000


def test_half_a_packet_then_silence_times_out(router: Router) -> None:
    spare = router.spare(startup_timeout=1.0)
    with raw(spare.proxy.port) as stalled:
        stalled.sendall(startup({"user": "tierbase", "database": "production"})[:10])
        with router.connect("production", port=spare.proxy.port) as other:
            assert one(other, "SELECT count(*) FROM seed") == 1000
        fields = error_fields(recv_until_closed(stalled))
    assert fields["C"] == "08P01" and "timeout" in fields["M"]


def test_500_idle_connections_do_not_hurt_others(router: Router, make_branch: Callable[..., str]) -> None:
    a = make_branch("a")
    idle: list[socket.socket] = []
    try:
        for i in range(500):
            s = raw(router.port)
            if i % 2:
                s.sendall(struct.pack("!II", 8, pq.SSL_REQUEST))  # half of them got as far as 'N'
            idle.append(s)
        with router.connect(a) as conn:
            assert one(conn, "SELECT v FROM marker") == "a"
        got = subprocess.run(["psql", "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(router.port),
                              "-U", router.user, "-d", a, "-c", "SELECT v FROM marker"],
                             capture_output=True, text=True, env=router.env(), timeout=60)
        assert got.stdout.strip() == "a", got.stderr
    finally:
        for s in idle:
            s.close()


def test_close_ends_sessions_with_a_message(router: Router, make_branch: Callable[..., str]) -> None:
    a = make_branch("a")
    spare = ProxyThread(Proxy(router.resolver, router.authority)).start()
    try:
        conn = router.connect(a, port=spare.proxy.port)
        with conn, raw(spare.proxy.port) as waiting:
            conn.execute("SELECT 1")
            spare.stop()
            with pytest.raises(pgerrors.AdminShutdown, match="shutting down"):
                conn.execute("SELECT 1")
            fields = error_fields(recv_until_closed(waiting))
            assert fields["C"] == "57P01"
    finally:
        spare.stop()


# -- the pure parts --------------------------------------------------------------------------


@pytest.mark.parametrize("params, route, expect", [
    ({"user": "u", "database": "feat-a"}, "feat-a", {"user": "u", "database": "postgres"}),
    ({"user": "u", "database": "feat-a.app"}, "feat-a", {"user": "u", "database": "app"}),
    ({"user": "u", "database": "feat-a.app.v2"}, "feat-a", {"user": "u", "database": "app.v2"}),
    ({"user": "feat-a"}, "feat-a", {"user": "feat-a", "database": "postgres"}),
    ({"user": "u", "database": "app", "options": "endpoint=feat-a"}, "feat-a", {"user": "u", "database": "app"}),
    ({"user": "u", "database": "app", "options": "-c a=b endpoint=feat-a  -c\\ x"}, "feat-a",
     {"user": "u", "database": "app", "options": "-c a=b -c\\ x"}),
])
def test_route_startup(params: dict[str, str], route: str, expect: dict[str, str]) -> None:
    got = pq.route_startup(params)
    assert got.route == route and got.params == expect


def test_scanner_finds_key_and_ready_across_chunks() -> None:
    msgs = (b"R\x00\x00\x00\x08\x00\x00\x00\x00" + b"S\x00\x00\x00\x09ab\x00c\x00"
            + b"K\x00\x00\x00\x0c" + struct.pack("!ii", 42, 7) + b"Z\x00\x00\x00\x05I" + b"T-tail")
    scanner = pq.BackendScanner()
    sent = b""
    for i in range(0, len(msgs), 3):
        done, rest = scanner.feed(msgs[i:i + 3])
        sent += done + rest
        if scanner.ready:
            sent += msgs[i + 3:]
            break
    assert sent == msgs
    assert scanner.key == struct.pack("!ii", 42, 7)
    assert pq.ends_ready(msgs[:-6]) and not pq.ends_ready(msgs)
    assert pq.whole_messages(msgs[:-6]) and not pq.whole_messages(msgs) and not pq.whole_messages(msgs[:-7])
    assert pq.parse_error_fields(pq.error_response("bye", "57P01", hint="h")[5:]) == {
        "S": "FATAL", "V": "FATAL", "C": "57P01", "M": "bye", "H": "h"}

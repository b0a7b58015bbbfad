"""The Postgres wire-protocol router: one port in front of every branch's compute.

Routing (read from the startup packet; works with unmodified libpq clients,
psycopg, asyncpg, SQLAlchemy, JDBC and pgbench):

* ``options`` holding ``endpoint=NAME`` (Neon's way, e.g. ``?options=endpoint%3Dfeat-a``)
  routes to NAME and keeps the database name as given;
* otherwise the database name: ``ROUTE`` means database ``postgres`` on
  ROUTE, ``ROUTE.DBNAME`` database DBNAME on ROUTE. The compute receives the
  rewritten ``database`` (and ``options`` without ``endpoint=``).

TLS: with certificates (``tls.py``) an SSLRequest is answered ``S`` and the
connection upgraded; GSSENCRequest is answered ``N``. Without TLS a client
may go on in plain text only from loopback, and only while the
``plain_loopback`` setting allows it.

Authentication is the proxy's: the startup packet's ``user`` is a principal,
who proves its password with SCRAM-SHA-256 (``-PLUS`` over TLS) against the
verifier the platform stores (``auth.py``). Then the :class:`Authority`
decides whether that principal may connect to the branch behind the route
(the policy engine, audited) and which fixed role it gets there; the proxy
logs in to the compute as that role over the compute's private unix socket
(peer auth), so no principal ever holds a compute password. From the
compute's AuthenticationOk on, server messages are read only until the
first ReadyForQuery, to learn the BackendKeyData so that a CancelRequest
(which arrives on a new connection) reaches the right compute. After that a
session is a bare byte relay (see ``session.py``), which is what keeps it
near PgBouncer's throughput.

Waking a stopped compute is the resolver's job; the proxy only waits for it.
Every error the proxy itself produces is a FATAL ErrorResponse before the
socket closes, never a silent drop.

The Proxy is not thread-safe: call its coroutines on the loop that runs it
(from another thread, ``asyncio.run_coroutine_threadsafe`` or
:class:`ProxyThread`). ``sessions`` and ``last_active`` only read and may be
called from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ..errors import TierbaseError
from . import protocol as pq
from .auth import AuthFailed, Verifier, channel_binding_data, scram_exchange
from .session import Backend, ClientGone, Inbound, Session
from .tls import TlsFiles

log = logging.getLogger("tierbase.proxy")
T = TypeVar("T")

UNKNOWN_ROUTE_HINT = "Run `tierbase branch list` to see routes"
SHUTDOWN_MESSAGE = "the tierbase proxy is shutting down"
#: How long a killed session may wait for the server to reach a message boundary.
BOUNDARY_TIMEOUT = 2.0
CANCEL_TIMEOUT = 5.0


@dataclass(frozen=True)
class Target:
    """Where a route leads now."""

    branch: str  # the branch serving the route
    host: str
    port: int


class RouteError(TierbaseError):
    """Raised by a resolver; the proxy sends it to the client as a FATAL ErrorResponse.

    sqlstate 3D000 (invalid_catalog_name) for an unknown route, 57P03
    (cannot_connect_now) for a compute that fails to start.
    """

    code = "route_error"

    def __init__(self, message: str, hint: str = "", sqlstate: str = "3D000") -> None:
        super().__init__(message, hint, sqlstate=sqlstate)
        self.sqlstate = sqlstate


class Resolver(Protocol):
    async def resolve(self, route: str) -> Target:
        """Look the route up and wake its branch's compute if stopped; RouteError if it cannot."""
        ...


class Authority(Protocol):
    """Who a client is, and what it may do: the platform's side of authentication."""

    async def verifier(self, user: str) -> Verifier | None:
        """The SCRAM verifier of a live principal; None if unknown or revoked."""
        ...

    async def authorize(self, user: str, route: str, branch: str, peer: str) -> str:
        """The compute role ``user`` logs in as on ``branch``; RouteError (42501) when refused."""
        ...

    async def failed(self, user: str, peer: str, reason: str) -> None:
        """A client failed to authenticate (for the audit trail, which aggregates floods)."""
        ...


class _Hold:
    def __init__(self) -> None:
        self.count = 0
        self.released = asyncio.Event()


class Proxy:
    def __init__(self, resolver: Resolver, authority: Authority, *, host: str = "127.0.0.1", port: int = 0,
                 startup_timeout: float = 10.0, max_startup_packet: int = 10_000, tls: TlsFiles | None = None,
                 plain_loopback: bool = True, decoy_key: bytes = b"") -> None:
        self.resolver = resolver
        self.authority = authority
        self.tls = tls
        self._ssl = tls.context() if tls else None
        self._cb_data = channel_binding_data(tls.certificate_pem()) if tls else None
        self.plain_loopback = plain_loopback
        self.decoy_key = decoy_key or secrets.token_bytes(32)
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.max_startup_packet = max_startup_packet
        self.boundary_timeout = BOUNDARY_TIMEOUT
        #: BackendKeyData (pid, secret) of every relayed session -> the compute it lives on
        self.cancel_keys: dict[bytes, Target] = {}
        self._server: asyncio.AbstractServer | None = None
        self._by_branch: dict[str, set[Session]] = {}
        self._live: set[Session] = set()  # every session not closed yet, killed ones included
        self._last_active: dict[str, float] = {}
        self._holds: dict[str, _Hold] = {}
        self._epochs: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # a deep backlog: a burst of hundreds of connects must not overflow the SYN queue
        self._server = await loop.create_server(lambda: Inbound(self), self.host, self.port, backlog=4096)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("proxy listening on %s:%d", self.host, self.port)

    async def close(self) -> None:
        """Stop listening and end every session (relayed ones get FATAL 57P01)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        live = list(self._live)
        for s in live:
            s.kill(SHUTDOWN_MESSAGE, self.boundary_timeout)
        for task in list(self._tasks):
            task.cancel()
        pending = [s.done for s in live] + list(self._tasks)
        if pending:
            await asyncio.wait(pending, timeout=self.boundary_timeout + 1)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- observing ---------------------------------------------------------------
    def sessions(self, branch: str) -> int:
        """Client sessions currently relayed (or being connected) to ``branch``."""
        return len(self._by_branch.get(branch, ()))

    def last_active(self, branch: str) -> float:
        """``time.monotonic()`` of the last session start or end on ``branch``; 0 if never."""
        return self._last_active.get(branch, 0.0)

    # -- repointing --------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def hold(self, route: str) -> AsyncIterator[None]:
        """While held, new connections to ``route`` wait, then resolve after release.

        A resolution already under way when the hold starts is discarded and
        done again after release, so nobody connects to a target chosen
        before the route changed.
        """
        h = self._holds.get(route)
        if h is None:
            h = self._holds[route] = _Hold()
        h.count += 1
        self._epochs[route] = self._epochs.get(route, 0) + 1
        try:
            yield
        finally:
            h.count -= 1
            if h.count == 0:
                del self._holds[route]
                h.released.set()

    async def terminate(self, branch: str, message: str, *, drain: float = 0.0, route: str | None = None) -> int:
        """End the sessions relayed to ``branch`` with FATAL 57P01 ``message``; returns how many.

        With ``drain``, first wait up to that many seconds for them to end on
        their own. On return none of them can send anything more to the
        compute, and none is counted by ``sessions`` any more; each client
        gets its error at a message boundary a moment later (see
        ``Session.kill``), so a hold can be released at once.

        ``route``: only the sessions that came in through that route (a repoint moves one route:
        sessions that reached the branch by its own name or another route stay where they are).
        """
        def victims() -> list[Session]:
            return [s for s in self._by_branch.get(branch, ()) if route is None or s.route == route]

        deadline = time.monotonic() + drain
        while victims() and time.monotonic() < deadline:
            await asyncio.sleep(min(0.02, max(deadline - time.monotonic(), 0)))
        ending = victims()
        for s in ending:
            s.kill(message, self.boundary_timeout)
        return len(ending)

    # -- bookkeeping used by sessions ----------------------------------------------
    def forget(self, session: Session) -> None:
        """The session no longer talks to its compute (killed or closed)."""
        group = self._by_branch.get(session.branch)
        if group is not None:
            group.discard(session)
            if not group:
                del self._by_branch[session.branch]
        self._last_active[session.branch] = time.monotonic()
        if session.key is not None:
            self.cancel_keys.pop(session.key, None)

    def ended(self, session: Session) -> None:
        self.forget(session)
        self._live.discard(session)

    def send_cancel(self, key: bytes, target: Target) -> None:
        self._spawn(self._forward_cancel(key, target))

    def accepted(self, conn: Inbound) -> asyncio.Task[None]:
        return self._spawn(self._serve(conn))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- one connection's startup ----------------------------------------------------
    async def _serve(self, conn: Inbound) -> None:
        session: Session | None = None
        user, peer = "", _peer(conn)
        try:
            try:
                async with asyncio.timeout(self.startup_timeout):
                    version, payload = await self._read_startup(conn)
                    if version == pq.CANCEL_REQUEST:
                        conn.handed_off = True  # its closing must not cancel this task
                        conn.close()  # the protocol sends nothing back for a cancel
                        await self._forward_cancel(payload, self.cancel_keys.get(payload))
                        return
                    params = pq.parse_parameters(payload)
                    routed = pq.route_startup(params)
                    user = params["user"]
                    self._check_transport(conn, peer)
                    verifier = await self.authority.verifier(user)
                    await scram_exchange(conn, user, verifier, decoy_key=self.decoy_key,
                                         cb_data=self._cb_data if conn.tls else None)
            except TimeoutError:
                raise pq.StartupError("timeout expired while waiting for the startup packet") from None
            target = await self._resolve(routed.route)
            role = await self.authority.authorize(user, routed.route, target.branch, peer)
            assert conn.transport is not None
            session = self._open(routed.route, target, conn.transport)
            await self._connect(conn, session, pq.build_startup(version, {**routed.params, "user": role}))
        except ClientGone:
            conn.close()
        except AuthFailed as err:
            conn.fail(err.message, err.sqlstate)
            await self.authority.failed(user, peer, err.detail)
        except pq.StartupError as err:
            conn.fail(err.message, err.sqlstate, err.hint)
        except RouteError as err:
            hint = err.hint or (UNKNOWN_ROUTE_HINT if err.sqlstate == "3D000" else "")
            conn.fail(err.message, err.sqlstate, hint)
        except asyncio.CancelledError:
            if self._closing:
                conn.fail(SHUTDOWN_MESSAGE, "57P01")
            else:
                conn.close()
            raise
        except Exception as err:
            log.exception("proxy: unexpected error during startup")
            conn.fail(str(err) or type(err).__name__, "XX000")
        finally:
            if session is not None and not conn.handed_off:
                session.drop()

    def _check_transport(self, conn: Inbound, peer: str) -> None:
        """Plain text only from loopback, and only while the setting allows it (TLS otherwise)."""
        if conn.tls or (self.tls is None and _loopback(peer)):
            return
        if self.plain_loopback and _loopback(peer):
            return
        raise pq.StartupError("the tierbase proxy accepts only TLS connections here", "28000",
                              hint="Connect with sslmode=require (or verify-full with the platform's CA: "
                                   "`tierbase tls ca`)")

    async def _read_startup(self, conn: Inbound) -> tuple[int, bytes]:
        """(protocol version or CANCEL_REQUEST, packet body); answers SSL/GSS negotiation."""
        for _ in range(3):  # GSSENCRequest, then SSLRequest, then the real thing
            length, code = pq.read_header(await conn.read(8))
            if length < 8:
                raise pq.StartupError(f"invalid length of startup packet ({length} bytes)")
            if length > self.max_startup_packet:
                raise pq.StartupError(
                    f"startup packet of {length} bytes is over the limit of {self.max_startup_packet} bytes")
            body = await conn.read(length - 8)
            if code == pq.SSL_REQUEST and length == 8 and self._ssl is not None and not conn.tls:
                if conn.buf:  # bytes sent before the handshake must not be taken as if they came over TLS
                    raise pq.StartupError("received unencrypted data after SSL request")
                conn.write(b"S")
                await conn.start_tls(self._ssl)
                continue
            if code in pq.NEGOTIATION_CODES and length == 8:
                conn.write(pq.DECLINE)
                continue
            if code == pq.CANCEL_REQUEST and pq.is_cancel_length(length):
                return code, body
            if code >> 16 != 3:
                raise pq.StartupError(
                    f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: the server supports 3.0", "0A000")
            return code, body
        raise pq.StartupError("too many encryption negotiation requests")

    async def _resolve(self, route: str) -> Target:
        while True:
            while (h := self._holds.get(route)) is not None:
                await h.released.wait()
            epoch = self._epochs.get(route, 0)
            target = await self.resolver.resolve(route)
            if route not in self._holds and self._epochs.get(route, 0) == epoch:
                return target  # the caller registers it before its next await

    def _open(self, route: str, target: Target, client: asyncio.Transport) -> Session:
        session = Session(self, route, target, client)
        self._by_branch.setdefault(target.branch, set()).add(session)
        self._live.add(session)
        self._last_active[target.branch] = time.monotonic()
        return session

    async def _connect(self, conn: Inbound, session: Session, startup: bytes) -> None:
        loop = asyncio.get_running_loop()
        target = session.target
        try:
            if target.host.startswith("/"):
                server, _ = await loop.create_unix_connection(lambda: Backend(session), _socket(target))
            else:
                server, _ = await loop.create_connection(lambda: Backend(session), target.host, target.port)
        except OSError as err:
            raise RouteError(
                f"could not connect to the compute of branch {target.branch!r} at {target.host}:{target.port}: "
                f"{err.strerror or err}", "Check `tierbase branch list`; the compute may have stopped", "08006",
            ) from err
        if session.stopping or conn.gone or session.done.done():
            server.abort()
            return
        conn.handed_off = True
        session.connected(server, startup, conn.take_rest())

    async def _forward_cancel(self, key: bytes, target: Target | None) -> None:
        if target is None:
            return  # like the postmaster: an unknown key is ignored without a word
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT):
                if target.host.startswith("/"):
                    _, writer = await asyncio.open_unix_connection(_socket(target))
                else:
                    _, writer = await asyncio.open_connection(target.host, target.port)
                writer.write(pq.cancel_request(key))
                await writer.drain()
                writer.close()
                await writer.wait_closed()
        except (OSError, TimeoutError) as err:
            log.warning("proxy: could not forward a cancel request to %s:%d: %s", target.host, target.port, err)


def _socket(target: Target) -> str:
    return f"{target.host}/.s.PGSQL.{target.port}"


def _peer(conn: Inbound) -> str:
    info = conn.transport.get_extra_info("peername") if conn.transport is not None else None
    return str(info[0]) if isinstance(info, tuple) and info else "unknown"


def _loopback(peer: str) -> bool:
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop when uvloop is importable, else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class ProxyThread:
    """Runs a Proxy on its own event loop (uvloop if importable) in a daemon thread.

    For a service whose other parts are synchronous, tests and benchmarks:
    ``call`` runs a coroutine on the proxy's loop and returns its result.
    """

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tierbase-proxy", daemon=True)

    def start(self) -> ProxyThread:
        self._thread.start()
        self.call(self.proxy.start())
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self.proxy.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

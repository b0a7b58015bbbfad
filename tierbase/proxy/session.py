"""One client connection through the proxy, from accept to close.

A connection goes through three phases:

``startup``  :class:`Inbound` buffers the client's bytes while the proxy reads
             the startup packet, answers SSL/GSS negotiation and resolves
             the route (see ``server.py``).
``auth``     the rewritten startup packet went to the compute. Client bytes
             are relayed untouched (SCRAM runs end to end); server bytes are
             framed by :class:`~.protocol.BackendScanner` only to pick up
             BackendKeyData and spot the first ReadyForQuery.
``relay``    both directions are bare byte relays. Client -> server has no
             Python code at all: the protocol's ``data_received`` *is* the
             server transport's ``write`` (uvloop caches the bound method
             when the protocol is set). Server -> client only remembers the
             last chunk, so that :meth:`Session.kill` can tell whether the
             client stream stands at a message boundary (measured: no
             difference in pgbench TPS or proxy CPU per transaction against
             a version that does not).

Ending a session with a message (repoint, shutdown) must not cut a server
message in half, or the client would read garbage. From the kill on, what
the client sends is dropped (nothing new reaches the old compute). If the
last chunk the client got ended with ReadyForQuery (or was a run of whole
messages, such as a notification an idle server sent) the stream is at a
boundary; otherwise the relay passes server bytes on until a chunk ends with
ReadyForQuery, and gives up (closing without a message) after ``boundary_timeout``.
See :meth:`Session.kill` for when exactly the error goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from enum import StrEnum
from typing import TYPE_CHECKING, cast

from .protocol import BackendScanner, StartupError, at_boundary, ends_ready, error_response

if TYPE_CHECKING:
    from .server import Proxy, Target

log = logging.getLogger("tierbase.proxy")

#: Bytes a client may send ahead during startup before the proxy stops reading from it.
INBOUND_BUFFER = 64 * 1024
ADMIN_SHUTDOWN = "57P01"
#: How long a killed session, at a message boundary, waits for its client to speak before it says goodbye.
GRACE = 0.2
#: How long a client that got its final error may take to close before it is cut off.
LINGER = 5.0


class ClientGone(Exception):
    """The client closed its socket during the startup phase."""


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    # uvloop and asyncio both set TCP_NODELAY on TCP transports already; be explicit, since
    # one 8 kB Nagle delay per query would cost more than the whole relay.
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Discard(asyncio.Protocol):
    """Reads and drops what a client still sends while its final ErrorResponse goes out.

    Closing a socket with unread input makes the kernel answer with RST, and a
    client receiving RST may lose the ErrorResponse before reading it. So the
    proxy half-closes (FIN after the message), drains the client's input and
    closes when the client does, or after ``LINGER`` seconds.
    """

    def __init__(self) -> None:
        self.timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()


def say_last(transport: asyncio.Transport, message: bytes) -> None:
    """Send ``message`` as the last thing on ``transport``, then close it without risking an RST."""
    if transport.is_closing():
        return
    discard = Discard()
    transport.set_protocol(discard)
    transport.resume_reading()
    transport.write(message)
    if transport.can_write_eof():
        transport.write_eof()
    discard.timer = asyncio.get_running_loop().call_later(LINGER, _abort, transport)


def _abort(transport: asyncio.Transport) -> None:
    if not transport.is_closing():
        transport.abort()


class Inbound(asyncio.Protocol):
    """A client socket in the startup phase: buffers its bytes for the startup task."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.tls = False
        self.gone = False
        self.handed_off = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # -- asyncio callbacks -----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass
        set_nodelay(transport)
        self.task = self.proxy.accepted(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > INBOUND_BUFFER and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.gone = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._wake()
        if self.task is not None and not self.handed_off and not self.task.done():
            self.task.cancel()

    # -- reading for the startup task --------------------------------------------
    async def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.gone:
                raise ClientGone
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self.buf[:n])
        del self.buf[:n]
        if self._paused and len(self.buf) < INBOUND_BUFFER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Upgrade the client connection (after answering SSLRequest with ``S``)."""
        assert self.transport is not None
        try:
            tr = await asyncio.get_running_loop().start_tls(self.transport, self, context, server_side=True,
                                                            ssl_handshake_timeout=10)
        except (OSError, ssl.SSLError, ConnectionError) as err:
            raise ClientGone from err
        if tr is None:
            raise ClientGone
        self.transport = tr
        self.tls = True

    def take_rest(self) -> bytes:
        """What the client sent after the startup packet; reading resumes for the relay."""
        rest = bytes(self.buf)
        self.buf.clear()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return rest

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- answering ----------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def fail(self, message: str, sqlstate: str, hint: str = "") -> None:
        """Send a FATAL ErrorResponse and close: never a dropped socket without a message."""
        if self.transport is not None:
            say_last(self.transport, error_response(message, sqlstate, hint=hint))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Phase(StrEnum):
    CONNECTING = "connecting"  # route resolved, connecting to the compute
    AUTH = "auth"  # startup packet forwarded, waiting for the first ReadyForQuery
    RELAY = "relay"  # bare byte relay
    CLOSED = "closed"


class Session:
    """A client relayed (or about to be relayed) to one branch's compute."""

    def __init__(self, proxy: Proxy, route: str, target: Target, client: asyncio.Transport) -> None:
        self.proxy = proxy
        self.route = route
        self.target = target
        self.branch = target.branch
        self.client = client
        self.server: asyncio.Transport | None = None
        self.phase = Phase.CONNECTING
        self.key: bytes | None = None
        self.stopping = False
        self.downstream: Downstream | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # set while a killed session waits to deliver its error (see kill)
        self.at_boundary = False
        self.client_spoke = False
        self._timer: asyncio.TimerHandle | None = None
        self._message = ""

    def __repr__(self) -> str:
        return f"<Session {self.route}->{self.branch} {self.phase.value}>"

    # -- phase changes ----------------------------------------------------------
    def connected(self, server: asyncio.Transport, startup: bytes, rest: bytes) -> None:
        """The compute accepted the TCP connection: forward the startup packet and relay the client."""
        self.server = server
        self.phase = Phase.AUTH
        set_nodelay(server)
        server.write(startup + rest if rest else startup)
        self.client.set_protocol(Upstream(self, server))

    def learned_key(self, key: bytes) -> None:
        self.key = key
        self.proxy.cancel_keys[key] = self.target

    def to_relay(self, server: asyncio.Transport, forwarded: bytes) -> None:
        self.phase = Phase.RELAY
        self.downstream = Downstream(self, self.client, forwarded)
        server.set_protocol(self.downstream)

    # -- ending -------------------------------------------------------------------
    def close(self) -> None:
        """Either side went away: close the other (after flushing what it still has to send)."""
        if self.phase is Phase.CLOSED:
            return
        self.client.close()
        if self.server is not None:
            self.server.close()
        self._finish()

    def fail(self, message: str, sqlstate: str) -> None:
        """End the session with a FATAL error; only valid at a client message boundary."""
        if self.phase is Phase.CLOSED:
            return
        say_last(self.client, error_response(message, sqlstate))
        if self.server is not None:
            self.server.abort()
        self._finish()

    def drop(self) -> None:
        """The startup task gave up on this session (and answered the client itself)."""
        if self.phase is Phase.CLOSED:
            return
        if self.server is not None:
            self.server.abort()
        self._finish()

    def kill(self, message: str, boundary_timeout: float) -> None:
        """End the session with FATAL 57P01 ``message``; from now on nothing reaches the compute.

        The error is sent at a message boundary of the server stream, and not
        right behind a response the client may not have read yet: libpq parses
        an ErrorResponse that follows ReadyForQuery in the same read as a mere
        notice while idle, and then reports only "server closed the connection
        unexpectedly". So once at a boundary the session waits for the client
        to send its next message (then it is surely waiting for an answer),
        or for ``GRACE`` seconds, whichever comes first.
        """
        if self.phase is Phase.CLOSED or self.stopping:
            return
        self.stopping = True
        self._message = message
        self.proxy.forget(self)  # no longer counted: it cannot reach the compute any more
        if self.phase is not Phase.RELAY:
            self.fail(message, ADMIN_SHUTDOWN)  # startup phase: the client awaits server messages
            return
        assert self.server is not None and self.downstream is not None
        self.client.set_protocol(Hush(self, self.server))
        self.server.set_protocol(Drain(self, self.client))
        if at_boundary(self.downstream.last):
            self.reached_boundary()
        else:
            self._timer = asyncio.get_running_loop().call_later(boundary_timeout, self._abandon)

    def reached_boundary(self) -> None:
        self.at_boundary = True
        if self._timer is not None:
            self._timer.cancel()
        if self.client_spoke:
            self.say_goodbye()
        else:
            self._timer = asyncio.get_running_loop().call_later(GRACE, self.say_goodbye)

    def say_goodbye(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self.key is not None:
            # a query still running on the old compute would otherwise go on, unattended
            self.proxy.send_cancel(self.key, self.target)
        self.fail(self._message, ADMIN_SHUTDOWN)

    def _abandon(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        log.warning("session %r: no message boundary in time; closing without a message", self)
        self.client.abort()
        if self.server is not None:
            self.server.abort()
        self._finish()

    def _finish(self) -> None:
        self.phase = Phase.CLOSED
        if self._timer is not None:
            self._timer.cancel()
        self.proxy.ended(self)
        if not self.done.done():
            self.done.set_result(None)


class _Relay(asyncio.Protocol):
    """Common flow control: this protocol's own transport is written by the other direction.

    ``pause_writing`` here means our transport's send buffer is full, so the
    transport feeding it (``peer``) must stop reading until it drains.
    """

    def __init__(self, session: Session, peer: asyncio.Transport) -> None:
        self.session = session
        self.peer = peer

    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.peer.resume_reading()

    def eof_received(self) -> bool:
        self.session.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.close()


class Upstream(_Relay):
    """Client -> server, for the whole session: not a line of Python per read."""

    def __init__(self, session: Session, server: asyncio.Transport) -> None:
        super().__init__(session, server)
        # An instance attribute shadowing the method: the transport calls server.write directly.
        self.data_received = server.write  # type: ignore[method-assign,assignment]


class Backend(_Relay):
    """Server -> client until the first ReadyForQuery: frames messages to catch BackendKeyData."""

    def __init__(self, session: Session) -> None:
        super().__init__(session, session.client)
        self.scanner = BackendScanner()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        s = self.session
        if s.phase is Phase.CLOSED or self.transport is None:
            return
        try:
            done, rest = self.scanner.feed(data)
        except StartupError as err:
            s.fail(err.message, err.sqlstate)
            return
        if done:
            s.client.write(done)
        if self.scanner.key is not None and s.key is None:
            s.learned_key(self.scanner.key)
        if self.scanner.ready:
            if rest:
                s.client.write(rest)
            s.to_relay(self.transport, done + rest)


class Downstream(_Relay):
    """Server -> client once the session is ready: forward, and remember the last chunk."""

    def __init__(self, session: Session, client: asyncio.Transport, last: bytes) -> None:
        super().__init__(session, client)
        self.write = client.write
        self.last = last

    def data_received(self, data: bytes) -> None:
        self.write(data)
        self.last = data


class Drain(_Relay):
    """Server -> client of a killed session: pass on the rest of a response, up to its end."""

    def data_received(self, data: bytes) -> None:
        s = self.session
        if s.phase is Phase.CLOSED:
            return
        if s.at_boundary:
            s.say_goodbye()  # an answer to a query sent before the kill: the client is waiting, tell it now
            return
        self.peer.write(data)
        if ends_ready(data):
            s.reached_boundary()


class Hush(_Relay):
    """Client -> server of a killed session: drop what the client sends, and note that it did."""

    def data_received(self, data: bytes) -> None:
        s = self.session
        if s.phase is Phase.CLOSED or s.client_spoke:
            return
        s.client_spoke = True
        if s.at_boundary:
            s.say_goodbye()

"""The few pieces of the PostgreSQL wire protocol the proxy reads or writes.

The framing is written by hand with ``struct`` rather than taken from a
protocol library on purpose: the proxy parses only the startup phase (the
startup packet, SSL/GSS negotiation, CancelRequest, and the server's
messages up to the first ReadyForQuery, to learn the BackendKeyData). After
that it relays bytes without looking at them, so a full protocol
implementation would add nothing but weight.

Reference: https://www.postgresql.org/docs/current/protocol-message-formats.html
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

# Request codes carried in the startup packet in place of a protocol version.
PROTOCOL_3 = 3 << 16  # 196608, any 3.x minor is passed on (the server negotiates)
CANCEL_REQUEST = 80877102
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
NEGOTIATION_CODES = (SSL_REQUEST, GSSENC_REQUEST)

#: The answer to SSLRequest / GSSENCRequest: "not supported, continue in plain text".
DECLINE = b"N"
#: ReadyForQuery is always these five bytes followed by the transaction status (I, T or E).
READY_FOR_QUERY_HEAD = b"Z\x00\x00\x00\x05"
READY_STATUSES = b"ITE"

ROUTE_RULE = "lowercase letters, digits and '-'"
_ROUTE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_OPTION_SPLIT = re.compile(r"(?<!\\)\s+")
_HEADER = struct.Struct("!II")
MAX_SECRET = 256


class StartupError(Exception):
    """Input the proxy refuses during the startup phase; becomes a FATAL ErrorResponse."""

    def __init__(self, message: str, sqlstate: str = "08P01", hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.hint = hint


def error_response(message: str, sqlstate: str, *, severity: str = "FATAL", hint: str = "") -> bytes:
    """An ErrorResponse ('E') message."""
    fields = [b"S" + severity.encode(), b"V" + severity.encode(), b"C" + sqlstate.encode(),
              b"M" + message.encode("utf-8", "replace")]
    if hint:
        fields.append(b"H" + hint.encode("utf-8", "replace"))
    body = b"\x00".join(fields) + b"\x00\x00"
    return b"E" + struct.pack("!I", len(body) + 4) + body


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body, by their one-letter code."""
    out: dict[str, str] = {}
    for part in body.split(b"\x00"):
        if part:
            out[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return out


def read_header(head: bytes) -> tuple[int, int]:
    """(length, code) of a startup-phase packet's first eight bytes."""
    length, code = _HEADER.unpack(head)
    return int(length), int(code)


def parse_parameters(body: bytes) -> dict[str, str]:
    """The name/value pairs of a StartupMessage body (after length and version)."""
    if not body.endswith(b"\x00"):
        raise StartupError("invalid startup packet layout: expected terminator as last byte")
    pairs = body[:-1]  # without the list terminator: each name and value ends with its own NUL
    if pairs and not pairs.endswith(b"\x00"):
        raise StartupError("invalid startup packet layout: expected terminator as last byte")
    parts = pairs.split(b"\x00")[:-1]
    if len(parts) % 2:
        raise StartupError("invalid startup packet layout: a parameter has no value")
    params: dict[str, str] = {}
    for name, value in zip(parts[::2], parts[1::2], strict=True):
        if not name:
            raise StartupError("invalid startup packet layout: empty parameter name")
        # surrogateescape keeps any byte sequence intact when the packet is rebuilt
        params[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    if "user" not in params:
        raise StartupError("no PostgreSQL user name specified in startup packet", "28000")
    return params


def build_startup(version: int, params: dict[str, str]) -> bytes:
    body = b"".join(k.encode("utf-8", "surrogateescape") + b"\x00" + v.encode("utf-8", "surrogateescape") + b"\x00"
                    for k, v in params.items()) + b"\x00"
    return _HEADER.pack(len(body) + 8, version) + body


@dataclass(frozen=True)
class Routed:
    """Where a startup packet asks to go, and the parameters to send the compute."""

    route: str
    params: dict[str, str]


def route_startup(params: dict[str, str]) -> Routed:
    """Find the route in the startup parameters and rewrite them for the compute.

    ``options=endpoint=NAME`` (Neon's way) names the route and leaves the
    database alone; otherwise the database name does: ``ROUTE`` means the
    database ``postgres`` of ROUTE, ``ROUTE.DBNAME`` the database DBNAME.
    """
    out = dict(params)
    if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
        raise StartupError("replication connections are not served through the tierbase proxy", "28000",
                           hint="Branch with `tierbase branch create` instead of replicating")
    endpoint, rest = _take_endpoint(params.get("options", ""))
    if endpoint is not None:
        if rest:
            out["options"] = rest
        else:
            out.pop("options", None)
        return Routed(_check_route(endpoint, "the endpoint option"), out)
    database = params.get("database") or params["user"]  # the server's own default
    route, dot, dbname = database.partition(".")
    if dot and not dbname:
        raise StartupError(f"database name {database!r} ends with '.'; use ROUTE or ROUTE.DBNAME", "3D000")
    out["database"] = dbname or "postgres"
    return Routed(_check_route(route, f"the database name {database!r}"), out)


def _take_endpoint(options: str) -> tuple[str | None, str]:
    """Split ``endpoint=NAME`` out of a libpq ``options`` string."""
    if "endpoint=" not in options:
        return None, options
    endpoint = None
    kept = []
    for word in _OPTION_SPLIT.split(options.strip()):
        if word.startswith("endpoint="):
            endpoint = word[len("endpoint="):]
        elif word:
            kept.append(word)
    return endpoint, " ".join(kept)


def _check_route(route: str, where: str) -> str:
    if not _ROUTE_RE.match(route):
        raise StartupError(
            f"{where} does not name a tierbase route: {route!r} is not a route name ({ROUTE_RULE})",
            "3D000",
            hint="Connect with database ROUTE or ROUTE.DBNAME, or options=endpoint=ROUTE; "
                 "run `tierbase branch list` to see routes",
        )
    return route


def is_cancel_length(length: int) -> bool:
    """A CancelRequest carries pid + secret: 4 secret bytes in protocol 3.0, up to 256 in 3.2."""
    return 16 <= length <= 8 + 4 + MAX_SECRET


def cancel_request(key: bytes) -> bytes:
    """A CancelRequest for ``key``: the body of BackendKeyData (pid + secret)."""
    return _HEADER.pack(8 + len(key), CANCEL_REQUEST) + key


def ends_ready(data: bytes) -> bool:
    """True if ``data`` ends with a ReadyForQuery message.

    Used only on the relay's cold paths (to find a message boundary before
    injecting an error); a false positive would need a binary value ending
    in exactly these six bytes at the very end of a TCP read.
    """
    return len(data) >= 6 and data[-6:-1] == READY_FOR_QUERY_HEAD and data[-1] in READY_STATUSES


#: Type bytes of every message a server sends (protocol 3.0 to 3.2).
BACKEND_TYPES = frozenset(b"123ACDEGHIKNRSTVWZcdnstv")
_WHOLE_LIMIT = 64 * 1024


def whole_messages(data: bytes) -> bool:
    """True if ``data``, read from its first byte, is a run of complete server messages.

    For a chunk that may or may not have started at a message boundary this
    is a heuristic; it recognises what an idle server sends on its own
    (NotificationResponse, NoticeResponse, ParameterStatus) as well as a
    whole response. Cold path only; long chunks are not walked.
    """
    n = len(data)
    if not 0 < n <= _WHOLE_LIMIT:
        return False
    pos = 0
    while pos < n:
        if n - pos < 5 or data[pos] not in BACKEND_TYPES:
            return False
        length = int.from_bytes(data[pos + 1:pos + 5], "big")
        if length < 4:
            return False
        pos += 1 + length
    return pos == n


def at_boundary(last: bytes) -> bool:
    """Whether a client that got ``last`` as its latest chunk stands at a message boundary."""
    return ends_ready(last) or whole_messages(last)


class BackendScanner:
    """Frames server messages until the first ReadyForQuery.

    Feed it what the server sends; it returns the bytes that form complete
    messages (to pass on to the client, so the client stream only ever stops
    at a message boundary during the startup phase), remembers the
    BackendKeyData, and sets ``ready`` once ReadyForQuery went by. Bytes after
    that are returned in ``rest`` untouched.
    """

    def __init__(self, max_message: int = 1 << 20) -> None:
        self.buf = bytearray()
        self.key: bytes | None = None
        self.ready = False
        self.max_message = max_message

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Returns (complete messages to forward, bytes after ReadyForQuery)."""
        self.buf += data
        pos, n = 0, len(self.buf)
        while n - pos >= 5:
            kind = self.buf[pos]
            length = int.from_bytes(self.buf[pos + 1:pos + 5], "big")
            if length < 4 or length > self.max_message:
                raise StartupError(f"the compute sent a malformed message (type {kind!r}, length {length})",
                                   "08P01")
            end = pos + 1 + length
            if end > n:
                break
            if kind == ord("R") and (length < 8 or self.buf[pos + 5:pos + 9] != b"\x00\x00\x00\x00"):
                # the proxy logs in by peer auth: a compute asking for a password is misconfigured
                raise StartupError("the compute asked the proxy for a password; its pg_hba.conf is not tierbase's",
                                   "XX000")
            if kind == ord("K") and 12 <= length <= 8 + MAX_SECRET:
                self.key = bytes(self.buf[pos + 5:end])
            pos = end
            if kind == ord("Z"):
                self.ready = True
                break
        done = bytes(self.buf[:pos])
        rest = bytes(self.buf[pos:]) if self.ready else b""
        del self.buf[:pos]
        if self.ready:
            self.buf.clear()
        return done, rest

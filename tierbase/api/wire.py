"""A JSON request to the API over one plain socket: the CLI's transport.

The CLI is a short-lived process that makes one or two calls: importing httpx (and its TLS, proxy and
encoding stack) costs more than the whole `tierbase branch create` may take, and even h11 costs a
tenth of it. The exchange here is the narrow part of HTTP/1.1 our own service speaks: one request
with ``Connection: close``, an answer framed by Content-Length or chunked, read to its end. It serves
``http://`` URLs; the SDK uses httpx for anything else (https, streamed uploads).
"""

from __future__ import annotations

import _socket  # the C module under `socket`: `import socket` spends milliseconds building its enums
import json
from urllib.parse import quote, urlencode, urlsplit

TYPE_CHECKING = False  # not typing's (milliseconds of every CLI call)
if TYPE_CHECKING:
    from typing import Any

#: the characters a path segment may carry as they are (RFC 3986 pchar); anything else is %-escaped
_SAFE = ":@!$&'()*+,;=-._~"
_MAX_HEAD = 64 * 1024


class WireError(OSError):
    """The service could not be reached, or did not answer in HTTP/1.1 as expected."""


class Reply:
    """Status, body and content type of an answer (a plain class: dataclasses is not free to import)."""

    __slots__ = ("body", "content_type", "status")

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        self.status, self.body, self.content_type = status, body, content_type

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def _path(path: str) -> str:
    """Each segment escaped on its own; "." and ".." too, so a name can never climb to another endpoint."""
    return "/".join("%2E" * len(seg) if seg in (".", "..") else quote(seg, safe=_SAFE) for seg in path.split("/"))


def _query(params: dict[str, Any] | None) -> str:
    """The query string as httpx writes it: booleans as true/false, None left out, a list as the key
    repeated (``table=a&table=b``)."""
    if not params:
        return ""

    def text(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else str(v)

    pairs = [(k, text(item)) for k, v in params.items() if v is not None
             for item in (v if isinstance(v, list | tuple) else [v])]
    return "?" + urlencode(pairs) if pairs else ""


def _header_value(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("a header value holds a line break")
    return value


def request(base_url: str, method: str, path: str, *, headers: dict[str, str], params: dict[str, Any] | None = None,
            json_body: Any = None, timeout: float = 600) -> Reply:
    """One request on a fresh connection (closed after it): loopback connects cost microseconds."""
    url = urlsplit(base_url)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"wire serves http:// URLs only, not {base_url!r}")
    target = _path(url.path.rstrip("/") + path) + _query(params)
    body = b"" if json_body is None else json.dumps(json_body).encode()
    hdrs = {"Host": url.netloc, "Connection": "close", "Accept": "application/json",
            "Content-Length": str(len(body)), **headers}
    if json_body is not None:
        hdrs["Content-Type"] = "application/json"
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {_header_value(v)}\r\n" for k, v in hdrs.items())
    try:
        sock = _connect(url.hostname, url.port or 80, timeout)
        try:
            sock.sendall(head.encode("latin-1") + b"\r\n" + body)
            return _read(sock)
        finally:
            sock.close()
    except WireError:
        raise
    except OSError as err:
        raise WireError(str(err) or type(err).__name__) from err
    except ValueError as err:  # a size or status that does not parse
        raise WireError(f"the service's answer does not parse ({err})") from err


def _connect(hostname: str, port: int, timeout: float) -> _socket.socket:
    """socket.create_connection's loop: each address of the host in turn, the last error if none answers."""
    # an ASCII host as bytes: a str would be run through the idna codec (unicodedata) by getaddrinfo
    host: str | bytes = hostname.encode() if hostname.isascii() else hostname
    last: OSError = WireError(f"{hostname} has no address")
    for family, kind, proto, _, addr in _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM):
        sock = _socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(addr)
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            return sock
        except OSError as err:
            sock.close()
            last = err
    raise last


class _Reader:
    """Bytes of one connection, read as they are needed."""

    def __init__(self, sock: _socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def _fill(self, what: str) -> None:
        got = self.sock.recv(1 << 16)
        if not got:
            raise WireError(f"the service closed the connection before the end of {what}")
        self.buf += got

    def line(self, what: str) -> bytes:
        while b"\r\n" not in self.buf:
            if len(self.buf) > _MAX_HEAD:
                raise WireError(f"the service sent an oversized {what}")
            self._fill(what)
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def take(self, n: int, what: str) -> bytes:
        while len(self.buf) < n:
            self._fill(what)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def to_end(self) -> bytes:
        while got := self.sock.recv(1 << 16):
            self.buf += got
        out, self.buf = self.buf, b""
        return out


def _read(sock: _socket.socket) -> Reply:
    r = _Reader(sock)
    while True:
        status_line = r.line("its answer").decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise WireError(f"the service answered something other than HTTP/1.1: {status_line[:80]!r}")
        fields: dict[str, str] = {}
        while line := r.line("the answer's headers").decode("latin-1"):
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        status = int(parts[1])
        if not 100 <= status < 200:  # an interim answer (1xx) is followed by the real one
            break
    if "chunked" in fields.get("transfer-encoding", "").lower():
        body = b"".join(_chunks(r))
    elif "content-length" in fields:
        body = r.take(int(fields["content-length"]), "the answer")
    else:
        body = r.to_end()  # framed by the end of the connection (we asked for Connection: close)
    return Reply(status, body, fields.get("content-type", ""))


def _chunks(r: _Reader) -> list[bytes]:
    """A chunked body (RFC 9112 7.1): a size line, that many bytes and CRLF, ... up to the zero-size chunk."""
    out = []
    while size := int(r.line("a chunk size").split(b";", 1)[0].strip() or b"0", 16):
        out.append(r.take(size, "a chunk"))
        r.take(2, "a chunk")  # its CRLF
    while r.line("the trailers"):  # trailers, up to the empty line
        pass
    return out

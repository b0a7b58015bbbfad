"""A JSON request to the API over one plain socket, framed by h11 (the HTTP/1.1 library under httpx).

The CLI is a short-lived process that makes one or two calls: importing httpx (and its TLS, proxy and
encoding stack) costs more than the whole `tierbase branch create` may take. This module pays for a
socket and h11 only. It serves ``http://`` URLs; the SDK uses httpx for anything else (https, uploads).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import h11

#: the characters a path segment may carry as they are (RFC 3986 pchar); anything else is %-escaped
_SAFE = ":@!$&'()*+,;=-._~"


class WireError(OSError):
    """The service could not be reached, or did not speak HTTP/1.1 as expected."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def _path(path: str) -> str:
    """Each segment escaped on its own; "." and ".." too, so a name can never climb to another endpoint."""
    return "/".join("%2E" * len(seg) if seg in (".", "..") else quote(seg, safe=_SAFE) for seg in path.split("/"))


def _query(params: dict[str, Any] | None) -> str:
    """The query string as httpx writes it: booleans as true/false, None left out."""
    if not params:
        return ""
    pairs = [(k, ("true" if v else "false") if isinstance(v, bool) else str(v))
             for k, v in params.items() if v is not None]
    return "?" + urlencode(pairs) if pairs else ""


def request(base_url: str, method: str, path: str, *, headers: dict[str, str], params: dict[str, Any] | None = None,
            json_body: Any = None, timeout: float = 600) -> Reply:
    """One request on a fresh connection (closed after it): loopback connects cost microseconds."""
    url = urlsplit(base_url)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"wire serves http:// URLs only, not {base_url!r}")
    target = _path(url.path.rstrip("/") + path) + _query(params)
    body = b"" if json_body is None else json.dumps(json_body).encode()
    hdrs = [("Host", url.netloc), ("Connection", "close"), ("Accept", "application/json"),
            ("Content-Length", str(len(body))), *headers.items()]
    if json_body is not None:
        hdrs.append(("Content-Type", "application/json"))
    conn = h11.Connection(h11.CLIENT)
    try:
        with socket.create_connection((url.hostname, url.port or 80), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            out = conn.send(h11.Request(method=method, target=target, headers=hdrs)) or b""
            if body:
                out += conn.send(h11.Data(data=body)) or b""
            sock.sendall(out + (conn.send(h11.EndOfMessage()) or b""))
            return _read(conn, sock)
    except (OSError, h11.ProtocolError) as err:
        if isinstance(err, WireError):
            raise
        raise WireError(str(err) or type(err).__name__) from err


def _read(conn: h11.Connection, sock: socket.socket) -> Reply:
    status, ctype, chunks = 0, "", []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(1 << 16))
        elif isinstance(event, h11.Response):
            status = event.status_code
            ctype = next((v.decode() for k, v in event.headers if k == b"content-type"), "")
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return Reply(status, b"".join(chunks), ctype)
        elif isinstance(event, h11.ConnectionClosed):
            raise WireError("the service closed the connection before it answered")
        # an InformationalResponse (1xx) is followed by the real one

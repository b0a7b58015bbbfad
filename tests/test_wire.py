"""The CLI's HTTP transport (api/wire.py) reads every framing an HTTP/1.1 server may use, and fails clearly.

The service itself is exercised through the CLI in test_cli.py; here a socket that answers canned
bytes stands for servers (or proxies in front of one) that frame differently.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tierbase.api import wire
from tierbase.api.wire import WireError, request


@contextmanager
def answering(raw: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """A one-connection server on loopback that records the request and answers ``raw``, then closes."""
    srv = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            seen.append(data)
            conn.sendall(raw)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}", seen
    finally:
        t.join(5)
        srv.close()


@pytest.mark.parametrize("raw", [
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"ok": true}',
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n'
    b'4\r\n{"ok\r\n8;ext=1\r\n": true}\r\n0\r\nX-Trailer: y\r\n\r\n',
    b'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"ok": true}',
])
def test_every_framing_gives_the_same_answer(raw: bytes) -> None:
    with answering(raw) as (url, seen):
        reply = request(url, "GET", "/v1/x", headers={"Authorization": "Bearer t"}, params={"a": True, "b": None})
    assert reply.status == 200 and reply.json() == {"ok": True}
    assert seen[0].startswith(b"GET /v1/x?a=true HTTP/1.1\r\n") and b"Authorization: Bearer t\r\n" in seen[0]


def test_a_name_stays_one_segment_and_cannot_climb() -> None:
    with answering(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n") as (url, seen):
        assert request(url, "DELETE", "/v1/branches/../x?y=1#z", headers={}).status == 404
    assert seen[0].startswith(b"DELETE /v1/branches/%2E%2E/x%3Fy=1%23z HTTP/1.1\r\n")


@pytest.mark.parametrize(("raw", "says"), [
    (b"", "closed the connection"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "other than HTTP/1.1"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort", "closed the connection"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "does not parse"),
])
def test_a_broken_answer_is_a_clear_error(raw: bytes, says: str) -> None:
    with answering(raw) as (url, _), pytest.raises(WireError, match=says):
        request(url, "GET", "/v1/x", headers={})


def test_nothing_listening_and_header_injection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    with pytest.raises(WireError):
        request(f"http://127.0.0.1:{port}", "GET", "/v1/x", headers={}, timeout=5)
    with pytest.raises(ValueError, match="line break"):
        request(f"http://127.0.0.1:{port}", "GET", "/", headers={"Authorization": "Bearer t\r\nX-Evil: 1"})
    with pytest.raises(ValueError, match="http:// URLs only"):
        request("https://example.com", "GET", "/", headers={})


def test_query_strings_are_written_as_httpx_writes_them() -> None:
    """A list is the key repeated (FastAPI reads it back as a list), booleans are true/false, None is left out:
    `diff --data --table a --table b` once sent `table=['a', 'b']` and matched no table."""
    got = wire._query({"table": ["a", "b c"], "bytes": False, "none": None, "n": 3})
    assert got == "?table=a&table=b+c&bytes=false&n=3"
    assert wire._query({}) == "" and wire._query({"x": None}) == ""

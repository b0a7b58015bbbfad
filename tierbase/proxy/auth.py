"""Client authentication at the proxy: SCRAM-SHA-256 (and -PLUS over TLS) against stored verifiers.

The proxy is the one door to every compute, so it authenticates each client
itself: the startup packet's ``user`` is a principal, its password is the
principal's Postgres password (derived from its token), and the proxy holds
only the SCRAM verifier (salt, StoredKey, ServerKey), never the password.
Verifiers are made by scramp (``governance/principals.py``). The server side
of the exchange is written here, over hashlib/hmac, because scramp 1.4.11 and
later refuse the client-first message every libpq sends (``n=,r=...``: an
empty user name, since Postgres takes the user from the startup packet);
it follows RFC 5802 / 7677 and Postgres's own ``auth-scram.c`` behaviour.

An unknown or revoked user runs the same exchange against a made-up verifier
and fails at the same step with the same message as a wrong password, so the
proxy does not tell which principals exist.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import ssl
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import Inbound

SCRAM = "SCRAM-SHA-256"
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
#: A SASL message from a client is a few hundred bytes; anything much longer is not one.
MAX_AUTH_MESSAGE = 16 * 1024
# Authentication request codes (the int32 after 'R').
AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 10, 11, 12


class AuthFailed(Exception):
    """The client did not prove who it said it is; becomes a FATAL ErrorResponse."""

    def __init__(self, message: str, sqlstate: str = "28P01", *, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        #: why, for the audit trail only (the client is told no more than Postgres would tell it)
        self.detail = detail or message


@dataclass(frozen=True)
class Verifier:
    salt: bytes
    stored_key: bytes
    server_key: bytes
    iterations: int

    @classmethod
    def parse(cls, text: str) -> Verifier:
        """Postgres's format: ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (base64)."""
        try:
            mech, rest = text.split("$", 1)
            head, keys = rest.split("$", 1)
            iterations, salt = head.split(":", 1)
            stored, server = keys.split(":", 1)
            if mech != SCRAM:
                raise ValueError(mech)
            return cls(base64.b64decode(salt), base64.b64decode(stored), base64.b64decode(server), int(iterations))
        except ValueError as err:
            raise ValueError("not a SCRAM-SHA-256 verifier") from err

    @classmethod
    def decoy(cls, user: str, key: bytes) -> Verifier:
        """A stable made-up verifier for a user that does not exist (same salt on every try)."""
        seed = hmac.new(key, user.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        return cls(seed[:16], hashlib.sha256(seed + b"stored").digest(), hashlib.sha256(seed + b"server").digest(),
                   4096)


def auth_request(code: int, data: bytes = b"") -> bytes:
    return b"R" + struct.pack("!II", 8 + len(data), code) + data


def sasl_mechanisms(names: list[str]) -> bytes:
    return auth_request(AUTH_SASL, b"".join(n.encode() + b"\x00" for n in names) + b"\x00")


async def read_message(conn: Inbound) -> tuple[int, bytes]:
    """One frontend message (type byte, body) during authentication, with a sane size limit."""
    head = await conn.read(5)
    kind, length = head[0], int.from_bytes(head[1:5], "big")
    if length < 4 or length > MAX_AUTH_MESSAGE:
        raise AuthFailed(f"invalid message length {length} during authentication", "08P01")
    return kind, await conn.read(length - 4)


def parse_initial_response(body: bytes) -> tuple[str, bytes]:
    """SASLInitialResponse: mechanism name, then int32 length (-1: none) and the data."""
    end = body.find(b"\x00")
    if end < 0 or len(body) < end + 5:
        raise AuthFailed("malformed SASLInitialResponse", "08P01")
    mech = body[:end].decode("ascii", "replace")
    n = int.from_bytes(body[end + 1:end + 5], "big", signed=True)
    data = body[end + 5:]
    if n != len(data):
        raise AuthFailed("malformed SASLInitialResponse: wrong length", "08P01")
    return mech, data


def _attributes(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if len(key) != 1 or not eq:
            raise AuthFailed("malformed SCRAM message", "08P01")
        out.setdefault(key, value)
    return out


def channel_binding_data(certificate_pem: str) -> bytes:
    """tls-server-end-point (RFC 5929): the hash of the server certificate, SHA-256 for our ECDSA-SHA256 one."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(certificate_pem)).digest()


class ScramServer:
    """The server's half of one SCRAM-SHA-256(-PLUS) exchange."""

    def __init__(self, mechanism: str, verifier: Verifier, cb_data: bytes | None) -> None:
        self.mechanism = mechanism
        self.v = verifier
        self.cb_data = cb_data
        self.nonce = ""
        self.gs2 = ""
        self.client_first_bare = ""
        self.server_first = ""

    def client_first(self, message: str) -> str:
        """Take the client-first message; returns server-first."""
        flag, _, rest = message.partition(",")
        authzid, _, bare = rest.partition(",")
        if authzid:
            raise AuthFailed("client uses authorization identity, but it is not supported", "28000")
        if flag == "p=tls-server-end-point":
            if self.mechanism != SCRAM_PLUS or self.cb_data is None:
                raise AuthFailed("channel binding requested, but not offered with this mechanism", "28000")
        elif flag.startswith("p="):
            raise AuthFailed(f"unsupported SCRAM channel-binding type {flag[2:]!r}", "28000")
        elif flag in ("n", "y"):
            if self.mechanism == SCRAM_PLUS:
                raise AuthFailed("channel binding is required with SCRAM-SHA-256-PLUS", "28000")
            if flag == "y" and self.cb_data is not None:
                # the client could bind but believes we cannot: someone stripped -PLUS from the offer
                raise AuthFailed("SCRAM channel binding negotiation error", "28000")
        else:
            raise AuthFailed("malformed SCRAM message", "08P01")
        attrs = _attributes(bare)
        if "m" in attrs or not attrs.get("r"):
            raise AuthFailed("malformed SCRAM message", "08P01")
        self.gs2 = f"{flag},{authzid},"
        self.client_first_bare = bare
        self.nonce = attrs["r"] + base64.b64encode(secrets.token_bytes(18)).decode()
        self.server_first = f"r={self.nonce},s={base64.b64encode(self.v.salt).decode()},i={self.v.iterations}"
        return self.server_first

    def client_final(self, message: str) -> str:
        """Check the client's proof; returns server-final. AuthFailed on a wrong password."""
        without_proof, sep, proof_b64 = message.rpartition(",p=")
        if not sep:
            raise AuthFailed("malformed SCRAM message", "08P01")
        attrs = _attributes(without_proof)
        expected_cb = self.gs2.encode() + (self.cb_data if self.gs2.startswith("p=") and self.cb_data else b"")
        try:
            cb = base64.b64decode(attrs.get("c", ""), validate=True)
            proof = base64.b64decode(proof_b64, validate=True)
        except ValueError as err:
            raise AuthFailed("malformed SCRAM message", "08P01") from err
        if not hmac.compare_digest(cb, expected_cb):
            raise AuthFailed("SCRAM channel binding check failed", "28000", detail="channel binding mismatch")
        if attrs.get("r") != self.nonce:
            raise AuthFailed("SCRAM nonce mismatch", "08P01")
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        signature = hmac.new(self.v.stored_key, auth_message, hashlib.sha256).digest()
        if len(proof) != len(signature):
            raise AuthFailed("malformed SCRAM proof", "08P01")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self.v.stored_key):
            raise AuthFailed("wrong password", detail="wrong password")
        return "v=" + base64.b64encode(hmac.new(self.v.server_key, auth_message, hashlib.sha256).digest()).decode()


async def scram_exchange(conn: Inbound, user: str, verifier: Verifier | None, *, decoy_key: bytes,
                         cb_data: bytes | None) -> None:
    """Run SCRAM with the client; returns when it proved the password, raises AuthFailed otherwise.

    ``cb_data``: the channel-binding data of the proxy's TLS certificate when
    the connection is encrypted; then SCRAM-SHA-256-PLUS is offered first.
    """
    offered = [SCRAM_PLUS, SCRAM] if cb_data else [SCRAM]
    conn.write(sasl_mechanisms(offered))
    kind, body = await read_message(conn)
    if kind != ord("p"):
        raise AuthFailed(f"expected a SASL response, got message type {chr(kind)!r}", "08P01")
    mech, first = parse_initial_response(body)
    if mech not in offered:
        raise AuthFailed(f"client selected an invalid SASL authentication mechanism {mech!r}", "28000")
    server = ScramServer(mech, verifier or Verifier.decoy(user, decoy_key), cb_data)
    failed = f'password authentication failed for user "{user}"'
    try:
        conn.write(auth_request(AUTH_SASL_CONTINUE, server.client_first(first.decode("utf-8")).encode()))
        kind, body = await read_message(conn)
        if kind != ord("p"):
            raise AuthFailed(f"expected a SASL response, got message type {chr(kind)!r}", "08P01")
        final = server.client_final(body.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise AuthFailed("malformed SCRAM message", "08P01") from err
    except AuthFailed as err:
        if err.detail == "wrong password":
            raise AuthFailed(failed, detail="wrong password" if verifier else "no such principal, or revoked") from None
        raise
    if verifier is None:
        raise AuthFailed(failed, detail="no such principal, or revoked")
    conn.write(auth_request(AUTH_SASL_FINAL, final.encode()))

"""Principals (humans, agents, CI) and their API tokens.

A token is shown once, at creation; only its SHA-256 is stored. Tokens carry
256 bits of randomness, so a plain (unsalted) digest is enough to make the
stored table useless to whoever reads it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from scramp import ScramMechanism

from ..control.store import Store
from ..errors import InvalidInput, TierbaseError, Unauthorized
from ..names import check_name

TOKEN_PREFIX = "tbt_"

SCRAM_ITERATIONS = 4096  # what Postgres itself stores; the client pays the PBKDF2, the proxy only HMACs


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    created_at: float
    created_by: str
    revoked_at: float | None

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "role": self.role, "created_at": self.created_at,
                "created_by": self.created_by, "revoked": self.revoked_at is not None}


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def db_password(token: str) -> str:
    """The Postgres password of a token's principal, derived from the token.

    Whoever holds the token can compute it (the CLI and SDK fill it into URLs),
    the platform stores only its SCRAM verifier, and a leaked database URL does
    not give away the API token (HMAC is one-way).
    """
    mac = hmac.new(token.encode(), b"tierbase postgres login", "sha256").digest()
    return "tbp_" + base64.urlsafe_b64encode(mac).decode().rstrip("=")[:40]


def scram_verifier(password: str, salt: bytes | None = None) -> str:
    """Postgres's own verifier format: ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``."""
    salt_, stored, server, i = ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=SCRAM_ITERATIONS, salt=salt or secrets.token_bytes(16))
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${i}:{b64(salt_).decode()}${b64(stored).decode()}:{b64(server).decode()}"


class PrincipalExists(TierbaseError):
    code = "principal_exists"
    http_status = 409


class Principals:
    def __init__(self, store: Store) -> None:
        self.store = store

    def create(self, name: str, role: str, created_by: str, token: str | None = None) -> tuple[Principal, str]:
        check_name(name, "principal")
        token = token or new_token()
        with self.store.write() as db:
            if db.execute("SELECT 1 FROM principals WHERE name=?", (name,)).fetchone():
                raise PrincipalExists(f"principal {name!r} already exists",
                                      "Pick another name, or revoke the old one and create it again")
            db.execute("INSERT INTO principals(name, role, token_hash, created_at, created_by, scram) "
                       "VALUES(?,?,?,?,?,?)",
                       (name, role, digest(token), time.time(), created_by, scram_verifier(db_password(token))))
        return self.get(name), token

    def get(self, name: str) -> Principal:
        row = self.store.db.execute("SELECT name, role, created_at, created_by, revoked_at FROM principals "
                                    "WHERE name=?", (name,)).fetchone()
        if row is None:
            raise InvalidInput(f"principal {name!r} does not exist", "Run `tierbase principal list` to see them")
        return Principal(*row)

    def all(self) -> list[Principal]:
        rows = self.store.db.execute("SELECT name, role, created_at, created_by, revoked_at FROM principals "
                                     "ORDER BY created_at")
        return [Principal(*r) for r in rows]

    def revoke(self, name: str) -> Principal:
        p = self.get(name)
        with self.store.write() as db:
            db.execute("UPDATE principals SET revoked_at=? WHERE name=? AND revoked_at IS NULL", (time.time(), name))
        return self.get(p.name)

    def authenticate(self, token: str | None) -> Principal:
        """The principal holding ``token``; Unauthorized for unknown, revoked or malformed tokens."""
        if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            raise Unauthorized("the API token is missing or malformed",
                               "Set TIERBASE_TOKEN to a token from `tierbase principal create`")
        row = self.store.db.execute("SELECT name FROM principals WHERE token_hash=?", (digest(token),)).fetchone()
        if row is None:
            raise Unauthorized("the API token is not known", "Ask a platform engineer for a token")
        p = self.get(row[0])
        if p.revoked_at is not None:
            raise Unauthorized(f"the API token of {p.name!r} was revoked", "Ask a platform engineer for a new token")
        if self.verifier(p.name) is None:  # made before verifiers existed: the token is here, derive it now
            with self.store.write() as db:
                db.execute("UPDATE principals SET scram=? WHERE name=? AND scram IS NULL",
                           (scram_verifier(db_password(token)), p.name))
        return p

    def verifier(self, name: str) -> str | None:
        """The SCRAM verifier a live principal logs in to Postgres with; None if unknown or revoked."""
        row = self.store.db.execute("SELECT scram FROM principals WHERE name=? AND revoked_at IS NULL",
                                    (name,)).fetchone()
        return str(row[0]) if row and row[0] else None

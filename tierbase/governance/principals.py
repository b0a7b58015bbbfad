"""Principals (humans, agents, CI) and their API tokens.

A token is shown once, at creation; only its SHA-256 is stored. Tokens carry
256 bits of randomness, so a plain (unsalted) digest is enough to make the
stored table useless to whoever reads it.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from ..control.store import Store
from ..errors import InvalidInput, TierbaseError, Unauthorized
from ..names import check_name

TOKEN_PREFIX = "tbt_"

SCHEMA = """
CREATE TABLE IF NOT EXISTS principals (
    name        TEXT PRIMARY KEY,
    role        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    created_by  TEXT NOT NULL,
    revoked_at  REAL
);
"""


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


class PrincipalExists(TierbaseError):
    code = "principal_exists"
    http_status = 409


class Principals:
    def __init__(self, store: Store) -> None:
        self.store = store
        store.db.executescript(SCHEMA)

    def create(self, name: str, role: str, created_by: str, token: str | None = None) -> tuple[Principal, str]:
        check_name(name, "principal")
        token = token or new_token()
        with self.store.write() as db:
            if db.execute("SELECT 1 FROM principals WHERE name=?", (name,)).fetchone():
                raise PrincipalExists(f"principal {name!r} already exists",
                                      "Pick another name, or revoke the old one and create it again")
            db.execute("INSERT INTO principals(name, role, token_hash, created_at, created_by) VALUES(?,?,?,?,?)",
                       (name, role, digest(token), time.time(), created_by))
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
        return p

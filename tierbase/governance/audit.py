"""The audit trail: append-only, hash-chained, keyed.

Each record stores ``hash = HMAC(key, prev_hash || canonical JSON of the record)``.
Editing, inserting or removing a row breaks the chain at that row, and without
the key (a 0600 file of the data dir, not in the SQLite file) nobody can
recompute a consistent chain after tampering. ``verify`` names the first bad
record.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from ..control.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id        INTEGER PRIMARY KEY,
    ts        REAL NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    decision  TEXT NOT NULL,      -- allowed | denied
    reason    TEXT NOT NULL,
    outcome   TEXT NOT NULL,      -- ok | error: ... | refused
    before    TEXT,               -- JSON
    after     TEXT,               -- JSON
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL
);
"""
GENESIS = "0" * 64
FIELDS = ("id", "ts", "actor", "action", "target", "decision", "reason", "outcome", "before", "after")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    first_bad: int | None = None
    problem: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "first_bad": self.first_bad, "problem": self.problem}


class AuditLog:
    def __init__(self, store: Store, key: bytes) -> None:
        self.store = store
        self.key = key
        store.db.executescript(SCHEMA)

    def _hash(self, prev: str, rec: dict[str, Any]) -> str:
        body = json.dumps([rec[f] for f in FIELDS], separators=(",", ":"), sort_keys=True, default=str)
        return hmac.new(self.key, (prev + body).encode(), hashlib.sha256).hexdigest()

    def append(self, *, actor: str, action: str, target: str, allowed: bool, reason: str, outcome: str = "ok",
               before: Any = None, after: Any = None) -> int:
        """Write one record; called after the action committed (or was refused)."""
        with self.store.write() as db:
            last = db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
            rec: dict[str, Any] = {"id": (last[0] + 1) if last else 1, "ts": round(time.time(), 6), "actor": actor,
                   "action": action, "target": target, "decision": "allowed" if allowed else "denied",
                   "reason": reason, "outcome": outcome,
                   "before": None if before is None else json.dumps(before, sort_keys=True, default=str),
                   "after": None if after is None else json.dumps(after, sort_keys=True, default=str)}
            prev = last[1] if last else GENESIS
            db.execute("INSERT INTO audit(id, ts, actor, action, target, decision, reason, outcome, before, after,"
                       " prev_hash, hash) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                       (*[rec[f] for f in FIELDS], prev, self._hash(prev, rec)))
        return int(rec["id"])

    def verify(self) -> Verdict:
        prev, expected_id, n = GENESIS, 1, 0
        for row in self.store.db.execute("SELECT * FROM audit ORDER BY id"):
            n += 1
            rec = dict(row)
            if rec["id"] != expected_id:
                return Verdict(False, n, expected_id, f"record {expected_id} is missing (next is {rec['id']})")
            if rec["prev_hash"] != prev:
                return Verdict(False, n, rec["id"], f"record {rec['id']} does not follow record {rec['id'] - 1}: "
                                                    "a record was removed or inserted before it")
            if not hmac.compare_digest(rec["hash"], self._hash(prev, rec)):
                return Verdict(False, n, rec["id"], f"record {rec['id']} was altered after it was written")
            prev, expected_id = rec["hash"], expected_id + 1
        return Verdict(True, n)

    def after(self, last_id: int) -> list[dict[str, Any]]:
        """Raw records after ``last_id`` (JSON columns as text), for the SQL mirror."""
        return [dict(r) for r in self.store.db.execute("SELECT * FROM audit WHERE id > ? ORDER BY id", (last_id,))]

    def query(self, *, actor: str | None = None, action: str | None = None, target: str | None = None,
              denied: bool | None = None, since: float | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        where: list[str] = []
        args: list[Any] = []
        for col, val in (("actor", actor), ("target", target)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if action is not None:
            where.append("(action = ? OR action LIKE ?)")
            args += [action, f"{action}.%"]
        if denied is not None:
            where.append("decision = ?")
            args.append("denied" if denied else "allowed")
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        sql = "SELECT * FROM audit" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY id DESC LIMIT ?"
        rows = self.store.db.execute(sql, (*args, limit)).fetchall()
        return [_public(r) for r in reversed(rows)]


def _public(row: sqlite3.Row) -> dict[str, Any]:
    rec = dict(row)
    for k in ("before", "after"):
        rec[k] = json.loads(rec[k]) if rec[k] else None
    return rec

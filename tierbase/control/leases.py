"""The ``sessions`` table: who leases which branch for how long (the facade's sessions, app_sessions.py).

A lease's expiry is its branch's own ``expires_at``, so renewing one writes both rows in one
transaction; ending one only marks it (the history of sessions is kept).
"""

from __future__ import annotations

import time
from typing import Any

from .store import Store


class Leases:
    def __init__(self, store: Store) -> None:
        self.store = store

    def add(self, sid: str, principal: str, branch: str, seconds: int) -> None:
        now = time.time()
        with self.store.write() as db:
            db.execute("INSERT INTO sessions(id, principal, branch, ttl_seconds, started_at, renewed_at) "
                       "VALUES(?,?,?,?,?,?)", (sid, principal, branch, seconds, now, now))

    def get(self, sid: str) -> dict[str, Any] | None:
        row = self.store.db.execute("SELECT * FROM sessions WHERE id = ?", (sid,)).fetchone()
        return dict(row) if row is not None else None

    def live(self, principal: str | None = None) -> list[str]:
        """Ids of the sessions not ended, oldest first (of one principal, or everyone's)."""
        sql = "SELECT id FROM sessions WHERE ended_at IS NULL" + ("" if principal is None else " AND principal = ?")
        args = () if principal is None else (principal,)
        return [str(r[0]) for r in self.store.db.execute(sql + " ORDER BY started_at", args).fetchall()]

    def live_rows(self) -> list[tuple[str, str, str]]:
        """(id, principal, branch) of every session not ended."""
        rows = self.store.db.execute("SELECT id, principal, branch FROM sessions WHERE ended_at IS NULL").fetchall()
        return [(str(r[0]), str(r[1]), str(r[2])) for r in rows]

    def on_branch(self, branch: str) -> tuple[str, int] | None:
        """(id, ttl seconds) of the live session leasing ``branch``, if any."""
        row = self.store.db.execute("SELECT id, ttl_seconds FROM sessions WHERE branch = ? AND ended_at IS NULL",
                                    (branch,)).fetchone()
        return (str(row[0]), int(row[1])) if row is not None else None

    def push(self, branch: str, seconds: int, sid: str) -> None:
        """Renew: the branch expires ``seconds`` from now, and the session says it was renewed."""
        now = time.time()
        with self.store.write() as db:
            db.execute("UPDATE branches SET expires_at = ?, ttl_seconds = ? WHERE name = ?",
                       (now + seconds, seconds, branch))
            db.execute("UPDATE sessions SET renewed_at = ?, ttl_seconds = ? WHERE id = ?", (now, seconds, sid))

    def end(self, sid: str, reason: str) -> None:
        with self.store.write() as db:
            db.execute("UPDATE sessions SET ended_at = ?, end_reason = ? WHERE id = ? AND ended_at IS NULL",
                       (time.time(), reason, sid))

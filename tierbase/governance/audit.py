"""The audit trail: append-only, hash-chained, keyed.

Each record stores ``hash = HMAC(key, prev_hash || canonical JSON of the record)``.
Editing, inserting or removing a row breaks the chain at that row, and without
the key (a 0600 file of the data dir, not in the SQLite file) nobody can
recompute a consistent chain after tampering. ``verify`` names the first bad
record.

A valid chain can still have lost its tail (newest rows deleted, or meta.db
put back from an older copy). So the head is kept twice more: in the table
``audit_head`` (same transaction as the record) and in ``audit.head`` beside
the database, signed with the key (anchor.py says how and in which order).
``verify`` compares the three: a database head ahead of the chain means rows
were deleted; a consistent database behind the file means the database was
replaced by an older copy; a file one record behind is a crash between
commit and head write, and nothing else is accepted.

Failed attempts (unauthenticated requests) go through ``note_failure``,
which folds a flood into one record per source and minute (floods.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..control.store import Store
from ..errors import TierbaseError
from ..failpoints import failpoint
from ..settings import default
from .anchor import Head, HeadFile, HeadRead
from .floods import FailureAggregator

GENESIS = "0" * 64
FIELDS = ("id", "ts", "actor", "action", "target", "decision", "reason", "outcome", "before", "after")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    first_bad: int | None = None
    problem: str = ""
    head: int | None = None     # the newest record the head file anchors
    note: str = ""              # a state that is fine but worth saying (the head lags after a crash)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "first_bad": self.first_bad, "problem": self.problem,
                "head": self.head, "note": self.note}


class AuditLog:
    def __init__(self, store: Store, key: bytes, head: Path | None = None, *,
                 window: float = default("audit_window")) -> None:
        self.store = store
        self.key = key
        self.head = HeadFile(head or store.path.with_name("audit.head"), key)
        self.failures = FailureAggregator(self.append, window=window)
        self._catch_up()

    def _catch_up(self) -> None:
        """On open: the head file one record behind after a crash is brought up to the chain, which closes
        the window in which deleting that record would go unseen; and a chain written before heads were
        kept is anchored as it is now (trust on first use)."""
        with self.head.locked(exclusive=True) as fd:
            f = self.head.read(fd).head
            row = self.store.db.execute("SELECT * FROM audit ORDER BY id DESC LIMIT 1").fetchone()
            has_db_head = self.store.db.execute("SELECT 1 FROM audit_head").fetchone() is not None
            if row is None or (has_db_head and f is not None and f.id == row["id"]):
                return  # the common case: nothing to do
            last = dict(row)
            genuine = hmac.compare_digest(last["hash"], self._hash(last["prev_hash"], last))
            if not has_db_head:
                with self.store.write() as db:
                    db.execute("INSERT INTO audit_head(one, id, hash) VALUES(1, ?, ?) ON CONFLICT(one) DO NOTHING",
                               (last["id"], last["hash"]))
            lagging = f is not None and f.id == last["id"] - 1 and f.hash == last["prev_hash"]
            # never lower a head, never anchor a record the key did not sign: that is what verify must see
            if genuine and (lagging or (f is None and not has_db_head)):
                self.head.write(fd, Head(int(last["id"]), str(last["hash"])))

    def _hash(self, prev: str, rec: dict[str, Any]) -> str:
        body = json.dumps([rec[f] for f in FIELDS], separators=(",", ":"), sort_keys=True, default=str)
        return hmac.new(self.key, (prev + body).encode(), hashlib.sha256).hexdigest()

    def append(self, *, actor: str, action: str, target: str, allowed: bool, reason: str, outcome: str = "ok",
               before: Any = None, after: Any = None) -> int:
        """Write one record; called after the action committed (or was refused).

        The head file's lock is held from before the transaction to after the head write, so appenders in
        every thread and process take turns, and the head is written after the COMMIT (see anchor.py).
        """
        with self.head.locked(exclusive=True) as fd:
            digest = self._insert(actor=actor, action=action, target=target, allowed=allowed, reason=reason,
                                  outcome=outcome, before=before, after=after)
            failpoint("audit:committed")
            try:
                self.head.write(fd, digest)
            except OSError as err:
                raise TierbaseError(f"audit record {digest.id} was committed but its head could not be written"
                                    f" to {self.head.path}: {err.strerror}",
                                    "Fix the disk; `tierbase audit verify` shows the head one record behind "
                                    "until the next append") from err
        return digest.id

    def _insert(self, *, actor: str, action: str, target: str, allowed: bool, reason: str, outcome: str,
                before: Any, after: Any) -> Head:
        with self.store.write() as db:
            last = db.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
            rec: dict[str, Any] = {"id": (last[0] + 1) if last else 1, "ts": round(time.time(), 6), "actor": actor,
                   "action": action, "target": target, "decision": "allowed" if allowed else "denied",
                   "reason": reason, "outcome": outcome,
                   "before": None if before is None else json.dumps(before, sort_keys=True, default=str),
                   "after": None if after is None else json.dumps(after, sort_keys=True, default=str)}
            prev = last[1] if last else GENESIS
            digest = Head(int(rec["id"]), self._hash(prev, rec))
            db.execute("INSERT INTO audit(id, ts, actor, action, target, decision, reason, outcome, before, after,"
                       " prev_hash, hash) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                       (*[rec[f] for f in FIELDS], prev, digest.hash))
            db.execute("INSERT INTO audit_head(one, id, hash) VALUES(1, ?, ?)"
                       " ON CONFLICT(one) DO UPDATE SET id=excluded.id, hash=excluded.hash", (digest.id, digest.hash))
        return digest

    # -- failed attempts, folded ----------------------------------------------------------
    def note_failure(self, source: str, actor: str, action: str, reason: str) -> None:
        """A refused attempt by an unauthenticated client: one record per (source, action) and minute."""
        self.failures.note(source, actor, action, reason)

    def flush(self) -> int:
        """Write the pending summaries of folded failures now (at shutdown); returns how many records."""
        return self.failures.flush()

    # -- verification ---------------------------------------------------------------------
    def verify(self) -> Verdict:
        """The chain record by record, then its end against both heads.

        Under a shared lock of the head file, so no append is between its commit and its head write.
        """
        with self.head.locked(exclusive=False) as fd:
            broken, n, tail = self._walk()
            if broken is not None:
                return broken
            row = self.store.db.execute("SELECT id, hash FROM audit_head").fetchone()
            return self._check_end(n, tail, Head(int(row[0]), str(row[1])) if row else None, self.head.read(fd))

    def _walk(self) -> tuple[Verdict | None, int, dict[int, str]]:
        """Check each record; returns (what broke, how many records, the hashes of the last two)."""
        prev, expected_id, n = GENESIS, 1, 0
        tail: dict[int, str] = {}
        for row in self.store.db.execute("SELECT * FROM audit ORDER BY id"):
            n += 1
            rec = dict(row)
            if rec["id"] != expected_id:
                return Verdict(False, n, expected_id, f"record {expected_id} is missing (next is {rec['id']})"), n, tail
            if rec["prev_hash"] != prev:
                return Verdict(False, n, rec["id"], f"record {rec['id']} does not follow record {rec['id'] - 1}: "
                                                    "a record was removed or inserted before it"), n, tail
            if not hmac.compare_digest(rec["hash"], self._hash(prev, rec)):
                return Verdict(False, n, rec["id"], f"record {rec['id']} was altered after it was written"), n, tail
            tail = {rec["id"] - 1: prev, rec["id"]: rec["hash"]}
            prev, expected_id = rec["hash"], expected_id + 1
        return None, n, tail

    def _check_end(self, n: int, tail: dict[int, str], db_head: Head | None, read: HeadRead) -> Verdict:
        """An intact chain of ``n`` records against the database's head and the head file's."""
        f = read.head
        fid = f.id if f else None
        if db_head is not None and db_head.id > n:
            return Verdict(False, n, n + 1, f"the chain ends at record {n} but the head says {db_head.id} "
                                            f"({_span(n + 1, db_head.id)} missing)", fid)
        if db_head is not None and (db_head.id < n or db_head.hash != tail.get(n)):
            return Verdict(False, n, db_head.id + 1, f"the database's head says record {db_head.id} but the chain "
                                                     f"ends at {n}: the head or the records were edited", fid)
        if f is None:
            if n == 0 and not read.bad:
                return Verdict(True, 0)
            return Verdict(False, n, None, f"the head file {self.head.path} is missing, empty or not signed with "
                                           f"the audit key, but the chain has {n} records: it was deleted or "
                                           "replaced")
        if f.id > n:
            return Verdict(False, n, n + 1, f"the database was replaced by an older copy: its chain ends at record "
                                            f"{n} but the head says {f.id} ({_span(n + 1, f.id)} missing)", f.id)
        if f.id < n - 1:
            return Verdict(False, n, f.id + 1, f"the head file was replaced by an older copy: it says record {f.id} "
                                               f"but the chain ends at {n}", f.id)
        if not hmac.compare_digest(f.hash, tail.get(f.id, "")):
            return Verdict(False, n, f.id, f"the database was replaced: record {f.id} is not the one the head file "
                                           "anchors (a different history)", f.id)
        if f.id == n - 1:
            return Verdict(True, n, head=f.id, note=f"the head file lags by the last record ({n}): a crash between "
                                                    "its commit and the head write; the next append or start "
                                                    "catches up")
        return Verdict(True, n, head=f.id)

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


def _span(first: int, last: int) -> str:
    return f"record {first} is" if first == last else f"records {first}..{last} are"


def _public(row: sqlite3.Row) -> dict[str, Any]:
    rec = dict(row)
    for k in ("before", "after"):
        rec[k] = json.loads(rec[k]) if rec[k] else None
    return rec

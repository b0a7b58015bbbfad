"""Rollback replay by logical decoding: which rows the replaced branch wrote since the promotion, from its WAL.

The data diff (datadiff.py) finds the rows written since a promotion by reading
every table that may have changed on both branches: O(rows of those tables). A
logical replication slot made at the promotion, just before the pre-promotion
snapshot, keeps the WAL since then; decoding it (the wal2json plugin) names the
keys written, O(writes). The replay then compares only those keys on both
branches (datadiff.diff_keys) and applies what differs exactly as the diff path
does (replay.apply): same report, same conflicts, same SQL for the rows left.

The stream is used for *which* keys changed, never for the values: the rows are
read from the replaced branch itself, so types wal2json prints lossily (NaN,
TOAST columns an update left alone) do not matter, and replaying a transaction
the snapshot already holds is a no-op (the slot's start is before the snapshot).

Slots retain WAL, so none may outlive its use: a tier's compute bounds them with
``max_slot_wal_keep_size``; the next promotion drops them, a rollback drops the
promotion's slot once the route has switched, deleting a branch deletes its
volume (the slot lives in it), and a copy of a branch (fork, reset, snapshot
child) drops the slots it inherited before it first starts (postgres.py). A
rollback reads a *temporary copy* of the promotion's slot, held by one session:
a rollback that dies (kill -9 included) loses the copy with its session, and the
promotion's slot is still whole for the next attempt.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from ..provider import PLATFORM_SLOTS
from ..settings import value
from .datadiff import Key, Shape

#: every slot the platform makes is named so; a promotion drops the others of its tier's branch
PREFIX = PLATFORM_SLOTS
PLUGIN = "wal2json"
#: wal2json format 2: one JSON object per row change; the ledger's schema is not ours to replay
OPTIONS = ("format-version", "2", "include-types", "0", "include-typmod", "0", "include-transaction", "0",
           "filter-tables", "tierbase_meta.*")
#: a slot's creation waits for the transactions running then; a promotion does not wait longer than this
CREATE_TIMEOUT_MS = 5000


def enabled() -> bool:
    """The ``rollback_replay`` setting: logical decoding first, or the data diff only."""
    return bool(value("rollback_replay") == "logical")


def compute_settings(tier_kind: bool) -> dict[str, str] | None:
    """A tier's compute (and a rollback copy's) runs with wal_level=logical so that a promotion can make a
    slot; the slot's WAL is bounded so that a forgotten one cannot fill the disk."""
    if not tier_kind or not enabled():
        return None
    return {"wal_level": "logical", "max_slot_wal_keep_size": str(value("rollback_slot_max_wal"))}


def slot_name(promotion: int) -> str:
    return f"{PREFIX}{promotion}"


class SlotLog:
    """The slot each promotion made (or why it made none), in meta.db."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def begin(self, promotion: int, branch: str) -> str:
        """Recorded before the slot is made, so that a kill in between leaves a record naming it."""
        name = slot_name(promotion)
        with self.store.write() as db:
            db.execute("INSERT OR REPLACE INTO rollback_slots(promotion, branch, slot, created_at) VALUES(?,?,?,?)",
                       (promotion, branch, name, time.time()))
        return name

    def made(self, promotion: int, lsn: str | None, note: str | None = None) -> None:
        with self.store.write() as db:
            db.execute("UPDATE rollback_slots SET lsn=?, note=? WHERE promotion=?", (lsn, note, promotion))

    def get(self, promotion: int) -> dict[str, Any] | None:
        row = self.store.db.execute("SELECT * FROM rollback_slots WHERE promotion=?", (promotion,)).fetchone()
        return dict(row) if row else None

    def dropped(self, slots: Iterable[str], why: str) -> None:
        with self.store.write() as db:
            for s in slots:
                db.execute("UPDATE rollback_slots SET dropped_at=?, note=coalesce(note || '; ', '') || ? "
                           "WHERE slot=? AND dropped_at IS NULL", (time.time(), why, s))

    def live(self, branch: str) -> list[str]:
        return [str(r[0]) for r in self.store.db.execute(
            "SELECT slot FROM rollback_slots WHERE branch=? AND lsn IS NOT NULL AND dropped_at IS NULL", (branch,))]


# -- on a compute (platform superuser, its unix socket) -----------------------------------------------------
def create_slot(conn: psycopg.Connection[Any], name: str) -> str:
    """A logical slot decoding from now; its start LSN. Raises psycopg.Error (wal_level, no plugin, timeout)."""
    conn.execute(f"SET statement_timeout = {CREATE_TIMEOUT_MS}")
    try:
        row = conn.execute("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, %s)",
                           (name, PLUGIN)).fetchone()
    finally:
        conn.execute("RESET statement_timeout")
    return str(row[0]) if row else ""


def drop_slots(conn: psycopg.Connection[Any], keep: str | None = None) -> list[str]:
    """Drop the platform's slots on this compute (all, or all but ``keep``); the names dropped."""
    rows = conn.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s AND NOT temporary "
                        "AND NOT active", (PREFIX.replace("_", "\\_") + "%",)).fetchall()
    out = []
    for (name,) in rows:
        if name != keep:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
            out.append(str(name))
    return out


def slot_state(conn: psycopg.Connection[Any], name: str) -> tuple[str, str] | None:
    """(wal_status, confirmed_flush_lsn) of a slot, None if there is none."""
    row = conn.execute("SELECT coalesce(wal_status, ''), coalesce(confirmed_flush_lsn::text, '') "
                       "FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone()
    return (str(row[0]), str(row[1])) if row else None


def usable(conn: psycopg.Connection[Any], name: str, lsn: str) -> str | None:
    """Why the slot cannot serve a replay (None: it can)."""
    state = slot_state(conn, name)
    if state is None:
        return f"slot {name} is gone"
    status, confirmed = state
    if status == "lost":
        return f"slot {name} was invalidated (more WAL than max_slot_wal_keep_size since the promotion)"
    if confirmed != lsn:
        return f"slot {name} was read past its start ({confirmed}, made at {lsn})"
    return None


def open_copy(conn: psycopg.Connection[Any], name: str, copy: str) -> None:
    """A temporary copy of the promotion's slot, owned by this session (gone with it, kill -9 included)."""
    conn.execute("SELECT pg_copy_logical_replication_slot(%s, %s, true)", (name, copy))


@dataclass
class Changes:
    """What a read of the slot found: keys written per table; tables that need a whole diff (a TRUNCATE,
    no primary key, a table the stream names that the branch no longer has)."""

    keys: dict[str, set[Key]] = field(default_factory=dict)
    whole: set[str] = field(default_factory=set)
    changes: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def tables(self) -> set[str]:
        return set(self.keys) | self.whole

    def add(self, other: Changes, tables: Iterable[str]) -> None:
        """Take ``other``'s keys of ``tables`` too (a later pass re-compares what an earlier one left)."""
        for t in tables:
            if t in other.whole:
                self.whole.add(t)
            elif t in other.keys:
                self.keys.setdefault(t, set()).update(other.keys[t])

    def to_dict(self) -> dict[str, Any]:
        return {"changes": self.changes, "keys": sum(len(k) for k in self.keys.values()),
                "whole_tables": sorted(self.whole), "bytes": self.bytes, "seconds": round(self.seconds, 3)}


def _text(v: Any, typ: str) -> str:
    """A key value as Postgres's text form (the diff casts it back to the key's type): wal2json prints
    booleans as JSON and bytea as bare hex (no ``\\x``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if typ == "bytea":
        return "\\x" + str(v)
    return str(v)


def read_changes(conn: psycopg.Connection[Any], slot: str, shapes: dict[str, Shape]) -> Changes:
    """Consume everything committed on ``slot`` so far (the caller's temporary copy), as keys per table.

    A transactional message first: its commit (synchronous) flushes the WAL of every transaction
    acknowledged before it, asynchronous commits included, and decoding reads only flushed WAL."""
    t0 = time.perf_counter()
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = on")
        conn.execute("SELECT pg_logical_emit_message(true, 'tierbase', 'rollback')")
    out = Changes()
    cur = conn.execute("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, VARIADIC %s::text[])",
                       (slot, list(OPTIONS)))
    for (data,) in cur:
        out.bytes += len(data)
        ch = json.loads(data, parse_float=str, parse_int=str)
        action = ch.get("action")
        if action not in ("I", "U", "D", "T"):
            continue  # messages (ours), transaction markers
        out.changes += 1
        table = f"{ch['schema']}.{ch['table']}"
        shape = shapes.get(table)
        if action == "T" or shape is None or not shape.pk:
            out.whole.add(table)
            continue
        keys: list[Key] = []
        for part in ("columns", "identity"):
            if part in ch:
                vals = {c["name"]: c.get("value") for c in ch[part]}
                if not all(k in vals and vals[k] is not None for k in shape.pk):
                    keys = []
                    break
                keys.append(tuple(_text(vals[k], t) for k, t in zip(shape.pk, shape.key_types(), strict=True)))
        if not keys:  # a key it did not print (a TOASTed key an update left alone): compare the table whole
            out.whole.add(table)
            continue
        out.keys.setdefault(table, set()).update(keys)
    for t in out.whole:
        out.keys.pop(t, None)
    out.seconds = time.perf_counter() - t0
    return out

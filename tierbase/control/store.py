"""The metadata store: one SQLite file per data dir, safe across processes.

Writers take ``BEGIN IMMEDIATE`` so that name reservation and port allocation
are serialised between concurrent CLI/API callers; WAL lets readers proceed.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..errors import BranchExists, BranchNotFound, TierbaseError
from ..procs import pid_alive
from ..provider import COMPUTE_PORTS, PORT_BASE
from .lifecycle import Op, State, check_op, check_transition
from .schema import migrate


class Kind(StrEnum):
    TIER = "tier"
    FEATURE = "feature"
    SNAPSHOT = "snapshot"
    SYSTEM = "system"    # tierbase's own clusters (the SQL mirror of the audit trail); never forked


@dataclass
class Branch:
    name: str
    parent: str | None
    kind: Kind
    state: State
    volume: str
    port: int
    created_at: float
    fork_lsn: str | None
    creator: str
    ttl_seconds: int | None
    expires_at: float | None
    protected: bool
    masking: str | None
    owner: str | None
    actor: str | None = None

    @property
    def masked_by(self) -> list[str]:
        return list(json.loads(self.masking)) if self.masking else []

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Branch:
        d = dict(row)
        d["kind"], d["state"], d["protected"] = Kind(d["kind"]), State(d["state"]), bool(d["protected"])
        return cls(**d)


def process_token(pid: int | None = None) -> str:
    """Identify a process across pid reuse: its pid plus its start time."""
    pid = pid or os.getpid()
    try:
        with open(f"/proc/{pid}/stat") as fh:
            start = fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "0"
    return f"{pid}:{start}"


def token_alive(token: str | None) -> bool:
    """True while the process named by ``token`` runs. A zombie (killed, not yet reaped: where PID 1
    never reaps, for ever) is dead: it will never finish what it started."""
    if not token:
        return False
    pid = int(token.split(":")[0])
    return process_token(pid) == token and pid_alive(pid)


class Store:
    PORTS = COMPUTE_PORTS

    def __init__(self, path: Path, default_port_base: int = PORT_BASE) -> None:
        self.path = path
        self.default_port_base = default_port_base
        # one connection per thread: the API serves requests from a thread pool, and a
        # transaction must never interleave with another thread's on a shared connection
        self._local = threading.local()
        self._all: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        migrate(self._conn)  # every table of meta.db, this module's and the layers' above (schema.py)

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection, for the layers above that keep tables of their own."""
        return self._conn

    @property
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA busy_timeout=60000")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._reap()
                self._all.append((threading.current_thread(), conn))
        return conn

    def _reap(self) -> None:
        """Close the connections of threads that ended: the API's worker threads come and go (anyio
        retires idle ones), and each new one opens its own connection (the soak saw 98 open files of
        meta.db after 12 minutes before this)."""
        alive = []
        for thread, conn in self._all:
            if thread.is_alive():
                alive.append((thread, conn))
            else:
                conn.close()
        self._all = alive

    def close(self) -> None:
        with self._lock:
            for _thread, conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A serialised write transaction."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")

    # -- settings ------------------------------------------------------------
    def get_setting(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set_setting(self, key: str, value: Any) -> None:
        with self.write() as db:
            db.execute("INSERT INTO settings(key, value) VALUES(?, ?)"
                       " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, json.dumps(value)))

    # -- branches ------------------------------------------------------------
    def get(self, name: str) -> Branch:
        row = self._conn.execute("SELECT * FROM branches WHERE name=?", (name,)).fetchone()
        if row is None:
            raise BranchNotFound(name)
        return Branch.from_row(row)

    def find(self, name: str) -> Branch | None:
        row = self._conn.execute("SELECT * FROM branches WHERE name=?", (name,)).fetchone()
        return Branch.from_row(row) if row else None

    def all(self) -> list[Branch]:
        return [Branch.from_row(r) for r in self._conn.execute("SELECT * FROM branches ORDER BY created_at, name")]

    def children(self, name: str) -> list[Branch]:
        rows = self._conn.execute("SELECT * FROM branches WHERE parent=? ORDER BY created_at", (name,))
        return [Branch.from_row(r) for r in rows]

    def reserve(self, *, name: str, parent: str | None, kind: Kind, volume: str, creator: str,
                ttl_seconds: int | None, protected: bool, port: int | None = None,
                actor: str | None = None) -> Branch:
        """Insert a branch in state 'creating' (the intent), with a port of its own."""
        now = time.time()
        with self.write() as db:
            if db.execute("SELECT 1 FROM branches WHERE name=?", (name,)).fetchone():
                raise BranchExists(name)
            if parent is not None:
                prow = db.execute("SELECT state FROM branches WHERE name=?", (parent,)).fetchone()
                if prow is None:
                    raise BranchNotFound(parent)
                if prow[0] != State.READY.value:
                    raise TierbaseError(f"parent branch {parent!r} is {prow[0]}",
                                        "Wait for its operation to finish, then try again")
            check_transition(name, None, State.CREATING)
            db.execute(
                "INSERT INTO branches(name, parent, kind, state, volume, port, created_at, creator, ttl_seconds,"
                " expires_at, protected, owner, actor) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (name, parent, kind.value, State.CREATING.value, volume, port or self._free_port(db), now, creator,
                 ttl_seconds, now + ttl_seconds if ttl_seconds else None, int(protected), process_token(),
                 actor or creator),
            )
        return self.get(name)

    def _free_port(self, db: sqlite3.Connection, also_used: int | None = None) -> int:
        used = {r[0] for r in db.execute("SELECT port FROM branches")} | {also_used}
        lo = int(self.get_setting("port_base", self.default_port_base))
        hi = min(lo + self.PORTS, 65536)
        for port in range(lo, hi):
            if port not in used and port_free(port):
                return port
        raise TierbaseError(f"no free compute port in {lo}-{hi}", "Delete unused branches or widen the port range")

    def _state(self, db: sqlite3.Connection, name: str) -> State:
        row = db.execute("SELECT state FROM branches WHERE name=?", (name,)).fetchone()
        if row is None:
            raise BranchNotFound(name)
        return State(row[0])

    def commit_created(self, name: str, fork_lsn: str | None, masking: list[str] | None = None) -> None:
        with self.write() as db:
            check_transition(name, self._state(db, name), State.READY)
            db.execute("UPDATE branches SET state=?, fork_lsn=?, masking=?, owner=NULL WHERE name=?",
                       (State.READY.value, fork_lsn, json.dumps(masking) if masking is not None else None, name))

    def mark_deleting(self, names: list[str], actor: str | None = None, *, drop_routes: bool = False) -> None:
        """Mark a whole subtree ``deleting`` in one transaction, or none of it; ``drop_routes``: the routes
        that point into it go in the same transaction (a kept state's own ``<tier>-replaced-N``)."""
        with self.write() as db:
            marks = ",".join("?" * len(names))
            late = db.execute(f"SELECT name FROM branches WHERE parent IN ({marks}) AND name NOT IN ({marks})",
                              (*names, *names)).fetchall()
            if late:  # a child was created after the caller looked at the subtree
                raise TierbaseError(f"branch {late[0][0]!r} was just created under {names[-1]!r}",
                                    "Run the delete again (with --recursive to take it too)")
            for name in names:
                check_op(name, self._state(db, name), Op.DELETE)
                check_transition(name, State.READY, State.DELETING)
                db.execute("UPDATE branches SET state=?, owner=?, actor=? WHERE name=?",
                           (State.DELETING.value, process_token(), actor, name))
            if drop_routes:
                db.execute(f"DELETE FROM routes WHERE branch IN ({marks})", names)

    def begin_reset(self, name: str, volume: str, actor: str | None = None) -> None:
        """The reset's intent, in one transaction: the branch is ``resetting`` and the new volume is known
        before it exists (reconcile removes it if the process dies before the swap)."""
        with self.write() as db:
            check_op(name, self._state(db, name), Op.RESET)
            check_transition(name, State.READY, State.RESETTING)
            db.execute("UPDATE branches SET state=?, owner=?, actor=? WHERE name=?",
                       (State.RESETTING.value, process_token(), actor, name))
            db.execute("INSERT INTO intents(op, branch, volume, owner, started_at, actor) VALUES(?,?,?,?,?,?)",
                       ("reset", name, volume, process_token(), time.time(), actor))

    def end_reset(self, name: str, volume: str | None) -> None:
        """Undo a reset that did not swap: the branch is ``ready`` on its old volume again."""
        with self.write() as db:
            check_transition(name, self._state(db, name), State.READY)
            db.execute("UPDATE branches SET state=?, owner=NULL, actor=NULL WHERE name=?", (State.READY.value, name))
            if volume is not None:
                db.execute("DELETE FROM intents WHERE volume=?", (volume,))

    def reassign_port(self, name: str) -> int:
        """Give a branch another free port (its own is taken by something else); returns it."""
        with self.write() as db:
            row = db.execute("SELECT port FROM branches WHERE name=?", (name,)).fetchone()
            if row is None:
                raise BranchNotFound(name)
            port = self._free_port(db, int(row[0]))
            db.execute("UPDATE branches SET port=? WHERE name=?", (port, name))
        return port

    def set_protected(self, name: str, protected: bool) -> None:
        with self.write() as db:
            db.execute("UPDATE branches SET protected=? WHERE name=?", (int(protected), name))

    def remove(self, name: str) -> None:
        with self.write() as db:
            db.execute("DELETE FROM branches WHERE name=?", (name,))

    def swap_volume(self, name: str, volume: str, fork_lsn: str | None, masking: list[str] | None = None) -> str:
        """Point a branch at a new volume (reset) and settle it ``ready``; return the old volume."""
        with self.write() as db:
            old = db.execute("SELECT volume, state FROM branches WHERE name=?", (name,)).fetchone()
            if old is None:
                raise BranchNotFound(name)
            check_transition(name, State(old[1]), State.READY)
            db.execute("UPDATE branches SET volume=?, fork_lsn=?, masking=?, state=?, owner=NULL, actor=NULL "
                       "WHERE name=?", (volume, fork_lsn, json.dumps(masking) if masking is not None else None,
                                        State.READY.value, name))
            db.execute("DELETE FROM intents WHERE volume=?", (volume,))
        return str(old[0])

    # -- routes: every branch answers to its own name; these are the extra, movable ones --
    def routes(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self._conn.execute("SELECT name, branch FROM routes ORDER BY name")}

    def resolve_route(self, name: str) -> str | None:
        row = self._conn.execute("SELECT branch FROM routes WHERE name=?", (name,)).fetchone()
        if row:
            return str(row[0])
        return name if self.find(name) else None

    def set_route(self, name: str, branch: str) -> str | None:
        """Point ``name`` at ``branch``; returns the previous target."""
        with self.write() as db:
            check_op(branch, self._state(db, branch), Op.REPOINT)
            old = db.execute("SELECT branch FROM routes WHERE name=?", (name,)).fetchone()
            db.execute("INSERT INTO routes(name, branch, updated_at) VALUES(?,?,?) ON CONFLICT(name) DO UPDATE"
                       " SET branch=excluded.branch, updated_at=excluded.updated_at", (name, branch, time.time()))
        return str(old[0]) if old else None

    # -- intents for volumes not yet referenced by a branch ---------------------
    def add_intent(self, op: str, branch: str, volume: str, actor: str | None = None) -> int:
        with self.write() as db:
            cur = db.execute("INSERT INTO intents(op, branch, volume, owner, started_at, actor) VALUES(?,?,?,?,?,?)",
                             (op, branch, volume, process_token(), time.time(), actor))
            return int(cur.lastrowid or 0)

    def drop_intent(self, volume: str) -> None:
        with self.write() as db:
            db.execute("DELETE FROM intents WHERE volume=?", (volume,))

    def intents(self) -> list[sqlite3.Row]:
        return list(self._conn.execute("SELECT * FROM intents"))


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

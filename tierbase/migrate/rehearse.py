"""Promotion rehearsal: the exact migration files on an O(1) branch of the tier, under a write load.

While the migrations run on the rehearsal branch, one writer per hot table (a
table the migrations name, with a primary key) keeps updating rows in place,
one short transaction each, the way an application does; a sampler watches
``pg_stat_activity``. Recorded: the writers' longest stall (the longest gap
between two of a writer's completed writes), the longest lock wait and the
migration statement running during it, the duration and the rows the writers
touched. A stall over the tier's ``max_stall`` is the statement that would
have stalled production.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from .datadiff import shapes

Connect = Callable[[], psycopg.Connection[Any]]


@dataclass
class Rehearsal:
    longest_stall_s: float = 0.0
    stall_table: str | None = None
    longest_lock_wait_s: float = 0.0
    statement: str | None = None  # the migration statement running when the writers waited longest
    duration_s: float = 0.0
    writes: int = 0
    tables: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"longest_stall_s": round(self.longest_stall_s, 3), "stall_table": self.stall_table,
                "longest_lock_wait_s": round(self.longest_lock_wait_s, 3), "statement": self.statement,
                "duration_s": round(self.duration_s, 3), "writes": self.writes, "hot_tables": self.tables,
                "error": self.error}


class _Writer(threading.Thread):
    def __init__(self, connect: Connect, table: str, pk: str, column: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.connect, self.table, self.pk, self.column, self.stop = connect, table, pk, column, stop
        self.longest = 0.0
        self.writes = 0

    def run(self) -> None:
        schema, name = self.table.split(".", 1)
        t, k, c = sql.Identifier(schema, name), sql.Identifier(self.pk), sql.Identifier(self.column)
        with self.connect() as conn:
            keys = [r[0] for r in conn.execute(sql.SQL("SELECT {} FROM {} ORDER BY random() LIMIT 200").format(k, t))]
            if not keys:
                return
            stmt = sql.SQL("UPDATE {t} SET {c} = {c} WHERE {k} = %s").format(t=t, c=c, k=k)
            last, i = time.perf_counter(), 0
            while not self.stop.is_set():
                # the migration may change the table under us: a write refused is not a stall
                with contextlib.suppress(psycopg.Error):
                    conn.execute(stmt, (keys[i % len(keys)],))
                now = time.perf_counter()
                self.longest = max(self.longest, now - last)
                last, i = now, i + 1
                self.writes += 1
                time.sleep(0.005)
            self.longest = max(self.longest, time.perf_counter() - last)


def rehearse(connect: Connect, hot: set[str], apply: Callable[[psycopg.Connection[Any]], Any]) -> Rehearsal:
    """Run ``apply`` (the migrations) on one connection while writers load the ``hot`` tables."""
    out = Rehearsal()
    with connect() as probe:
        found = shapes(probe)
    writers: list[_Writer] = []
    stop = threading.Event()
    for name in sorted(hot):
        s = found.get(name)
        if s is None or len(s.pk) != 1:
            continue
        other = next((col for col, _ in s.columns if col not in s.pk and col not in s.generated), s.pk[0])
        writers.append(_Writer(connect, name, s.pk[0], other, stop))
    out.tables = [w.table for w in writers]
    for w in writers:
        w.start()
    time.sleep(0.2)  # the writers are writing before the migration starts
    with connect() as mig, connect() as watch:
        pid = mig.info.backend_pid
        done = threading.Event()
        sampler = threading.Thread(target=_sample, args=(watch, pid, done, out), daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        try:
            apply(mig)
        except Exception as err:  # the rehearsal reports; the real promotion decides what to do
            out.error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        out.duration_s = time.perf_counter() - t0
        time.sleep(0.1)
        done.set()
        sampler.join(timeout=5)
    stop.set()
    for w in writers:
        w.join(timeout=10)
        out.writes += w.writes
        if w.longest > out.longest_stall_s:
            out.longest_stall_s, out.stall_table = w.longest, w.table
    return out


def _sample(conn: psycopg.Connection[Any], pid: int, done: threading.Event, out: Rehearsal) -> None:
    """Every 20 ms: how long has a backend waited for a lock, and what was the migration running then."""
    q = ("SELECT coalesce(max(extract(epoch FROM now() - a.state_change)) FILTER (WHERE a.wait_event_type = 'Lock' "
         "AND a.pid <> %s), 0), max(a.query) FILTER (WHERE a.pid = %s) FROM pg_stat_activity a "
         "WHERE a.datname = current_database()")
    started: str | None = None  # the migration's statement when the current wait began: the one that locked
    previous = 0.0
    while not done.is_set():
        try:
            row = conn.execute(q, (pid, pid)).fetchone()
        except psycopg.Error:
            return
        wait = float(row[0] or 0) if row else 0.0
        if wait <= 0 or wait < previous:
            started = None
        if wait > 0 and started is None:
            started = row[1] if row else None
        if wait > out.longest_lock_wait_s:
            out.longest_lock_wait_s, out.statement = wait, started
        previous = wait
        time.sleep(0.02)

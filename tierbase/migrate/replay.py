"""Rollback that keeps the writes: replay what the replaced branch received onto the snapshot's copy.

A rollback makes a writable copy of the pre-promotion snapshot (``new``) and
repoints the tier to it. Whatever the application wrote to the branch it
replaces (``old``) since the fork would be lost; this module carries it over:

    rows = data diff new -> old (chunked key-range hashing, datadiff.py)
    -> tables the rolled-back migrations changed (their shape, or named by their statements) and
       tables without a primary key: not replayed, *left* on old, with a ready-made SQL file
    -> the rest: upserted / deleted on new, as the platform (superuser, session_replication_role =
       replica, so no trigger of the owner's runs and foreign keys do not reorder the rows), one
       transaction per pass; a row that fails is a conflict, left like the others
    -> sequences on new advanced past every value old handed out

A rollback runs it twice: once while old still serves (most rows), then inside
the proxy's hold of the route after old's sessions are ended (a second diff,
of what changed since: fast when little did), so that every write old
acknowledged is on new when the route switches.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from ..control.store import process_token, token_alive
from .datadiff import DataDiff, Shape, delete_sql, render, upsert_sql

#: never replayed: the migrations ledger belongs to the schema being rolled back
EXCLUDED_SCHEMAS = ("tierbase_meta",)



def touched_tables(sources: Iterable[str]) -> set[str]:
    """Every table a migration's statements name ('schema.table'; unqualified names are public's),
    found by pglast: DML on a table whose shape stays is a change the rollback undoes too."""
    import pglast

    found: set[str] = set()
    for text in sources:
        try:
            tree = pglast.parse_sql(text)
        except pglast.parser.ParseError:
            continue  # the ledger refused it when it ran: it changed nothing
        for node in _walk(tree):
            if type(node).__name__ == "RangeVar" and node.relname:
                found.add(f"{node.schemaname or 'public'}.{node.relname}")
    return found


def _walk(node: Any) -> Iterable[Any]:
    from pglast import ast

    if isinstance(node, (list, tuple)):
        for item in node:
            yield from _walk(item)
    elif isinstance(node, ast.Node):
        yield node
        for name in node:
            yield from _walk(getattr(node, name))


@dataclass
class ReplayReport:
    replayed: dict[str, int] = field(default_factory=dict)
    left: dict[str, dict[str, Any]] = field(default_factory=dict)  # table -> {rows, why}
    statements: dict[str, list[str]] = field(default_factory=dict)  # table -> SQL for its rows left
    sequences: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: the tables the last pass (inside the hold) replayed rows into
    final_tables: list[str] = field(default_factory=list)
    #: the migrations the rollback took away (a later promotion may bring them back)
    migrations_undone: list[str] = field(default_factory=list)
    #: how the rows written since were found: "logical" (the promotion's slot) or "diff"; and why not logical
    method: str = "diff"
    fallback: str | None = None
    #: what each read of the slot found (logical only)
    decoded: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rows_replayed(self) -> int:
        return sum(self.replayed.values())

    @property
    def rows_left(self) -> int:
        return sum(int(v.get("rows") or 0) for v in self.left.values())

    def then(self, later: ReplayReport, compared: Iterable[str]) -> None:
        """Fold in a later pass that compared ``compared`` again: rows replayed add up; for those tables
        what is left now is the later pass's word (its diff saw every row still differing)."""
        for t, n in later.replayed.items():
            self.replayed[t] = self.replayed.get(t, 0) + n
        for t in compared:
            self.left.pop(t, None)
            self.statements.pop(t, None)
        self.left.update(later.left)
        self.statements.update(later.statements)
        self.sequences.update(later.sequences)
        self.seconds += later.seconds

    def to_dict(self) -> dict[str, Any]:
        return {"rows_replayed": self.rows_replayed, "rows_left": self.rows_left, "replayed": self.replayed,
                "left": self.left, "sequences_advanced": self.sequences, "seconds": round(self.seconds, 3),
                "final_pass_tables": self.final_tables, "migrations_undone": self.migrations_undone,
                "method": self.method, "fallback": self.fallback, "decoded": self.decoded}

    def left_sql(self, replaced: str, target: str) -> str | None:
        body = [s for t in sorted(self.statements) for s in self.statements[t]]
        if not body:
            return None
        head = [f"-- rows written on {replaced!r} that the rollback did not replay onto {target!r}",
                "-- (tables the rolled-back migrations changed, and conflicts); review, then apply on the tier",
                "BEGIN;"]
        return "\n".join(head + body + ["COMMIT;"]) + "\n"


def current_xmin(conn: psycopg.Connection[Any]) -> str:
    """The oldest transaction running now: every row committed from here on has an xmin at or after it."""
    row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()
    return str(row[0]) if row else "0"


def written_since(old: psycopg.Connection[Any], new: psycopg.Connection[Any], xmin: str) -> set[str]:
    """Tables of ``old`` that may have rows written since transaction ``xmin``: a row version whose xmin
    is that recent (an insert or an update; freezing keeps the raw xmin since PostgreSQL 9.4), or a row
    count that differs from ``new``'s (a delete). Scans without hashing, both sides at once, so that a
    replay diffs only those tables."""
    horizon = "(%s::bigint %% 4294967296)::text::xid"
    tables = [str(r[0]) for r in old.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND n.nspname NOT LIKE 'pg\\_%%'",
        ())]

    def ident(name: str) -> sql.Identifier:
        return sql.Identifier(*name.split(".", 1))

    def theirs() -> dict[str, tuple[int, int]]:
        out = {}
        for t in tables:
            got = old.execute(sql.SQL("SELECT count(*), count(*) FILTER (WHERE age(xmin) <= age(" + horizon + "))"
                                      " FROM {}").format(ident(t)), (int(xmin),)).fetchone()
            out[t] = (int(got[0]), int(got[1])) if got else (0, 0)
        return out

    def mine() -> dict[str, int]:
        present = {str(r[0]) for r in new.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p')")}
        out = {}
        for t in tables:
            if t in present:
                got = new.execute(sql.SQL("SELECT count(*) FROM {}").format(ident(t))).fetchone()
                out[t] = int(got[0]) if got else 0
        return out

    with ThreadPoolExecutor(2) as pool:
        fo, fn = pool.submit(theirs), pool.submit(mine)
        counts_old, counts_new = fo.result(), fn.result()
    return {t for t, (n, recent) in counts_old.items() if recent or counts_new.get(t) != n}


def end_sessions(conn: psycopg.Connection[Any]) -> int:
    """End every client session on the replaced compute but ours: what they wrote is then final."""
    row = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE backend_type = "
                       "'client backend' AND pid <> pg_backend_pid()").fetchone()
    # a terminated backend flushes its statistics as it exits; wait for them to be gone
    for _ in range(200):
        left = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                            "AND pid <> pg_backend_pid()").fetchone()
        if not left or not left[0]:
            break
        time.sleep(0.01)
    return int(row[0]) if row else 0


def apply(diff: DataDiff, new: psycopg.Connection[Any], *, changed: set[str], replaced: str) -> ReplayReport:
    """Make ``new``'s rows equal to ``old``'s (diff A=new -> B=old) for the tables the rollback may touch;
    ``new`` is a superuser connection of the snapshot's copy. One transaction: all of a pass or nothing."""
    t0 = time.perf_counter()
    rep = ReplayReport()
    with new.transaction():
        new.execute("SET LOCAL session_replication_role = replica")
        new.execute("SET LOCAL search_path = pg_catalog")
        for t in diff.tables:
            if t.status == "same":
                continue
            if t.status not in ("differs", "shape-differs") or (t.status == "shape-differs" and not t.changed_rows):
                if t.status != "shape-differs":  # a changed shape with no row written since: nothing left
                    rep.left[t.table] = {"rows": None, "why": f"{t.status}{': ' + t.note if t.note else ''}"}
                continue
            shape = diff.shapes_a[t.table]
            rows_up = t.inserted + [after for _, after in t.updated]
            if t.table in changed or t.status == "shape-differs":
                rep.left[t.table] = {"rows": t.changed_rows, "why": "changed by the rolled-back migrations"}
                rep.statements[t.table] = _statements(shape, diff.shapes_b.get(t.table), rows_up, t.deleted)
                continue
            done, failed = _apply_table(new, shape, rows_up, t.deleted)
            if done:
                rep.replayed[t.table] = done
            if failed:
                rep.left[t.table] = {"rows": len(failed), "why": "conflict: " + failed[0][1]}
                rep.statements[t.table] = [s for row, _ in failed for s in _statements(shape, shape, [row], [])]
    rep.seconds = time.perf_counter() - t0
    return rep


def _apply_table(conn: psycopg.Connection[Any], shape: Shape, upserts: list[dict[str, Any]],
                 deletes: list[dict[str, Any]]) -> tuple[int, list[tuple[dict[str, Any], str]]]:
    """Rows applied, and the rows that failed with why (each in a savepoint of its own after a batch fails)."""
    up = upsert_sql(shape, batch=True)
    de = delete_sql(shape, batch=True)
    failed: list[tuple[dict[str, Any], str]] = []
    done = 0
    for stmt, rows in ((de, deletes), (up, upserts)):
        for i in range(0, len(rows), 2000):
            part = rows[i:i + 2000]
            try:
                with conn.transaction():
                    conn.execute(stmt, (json.dumps(part, default=str),))
                done += len(part)
            except psycopg.Error:
                for row in part:
                    try:
                        with conn.transaction():
                            conn.execute(stmt, (json.dumps([row], default=str),))
                        done += 1
                    except psycopg.Error as err:
                        failed.append((row, str(err).strip().splitlines()[0]))
    return done, failed


def _statements(target: Shape, source: Shape | None, upserts: list[dict[str, Any]],
                deletes: list[dict[str, Any]]) -> list[str]:
    """SQL for the rows left: upserts naming the columns both shapes share (the tier's shape is the
    snapshot's), deletes by key."""
    have = {c for c, _ in source.columns} if source is not None else set()
    cols = [c for c in target.writable() if c in have] or target.writable()
    out = [render(upsert_sql(target, cols), r) + ";" for r in upserts]
    if set(target.pk) <= have:
        out += [render(delete_sql(target), r) + ";" for r in deletes]
    return out


def advance_sequences(old: psycopg.Connection[Any], new: psycopg.Connection[Any]) -> dict[str, int]:
    """Every sequence both have: new's moves to at least old's last value, so no id old handed out is
    handed out again (sequences are not transactional: old may have used values no row kept)."""
    q = ("SELECT schemaname || '.' || sequencename, last_value FROM pg_sequences WHERE last_value IS NOT NULL")
    theirs = {str(k): int(v) for k, v in old.execute(q)}
    mine = {str(k): (int(v) if v is not None else None) for k, v in
            new.execute("SELECT schemaname || '.' || sequencename, last_value FROM pg_sequences")}
    moved: dict[str, int] = {}
    for name, value in theirs.items():
        if name in mine and (mine[name] is None or int(mine[name] or 0) < value):
            schema, seq = name.split(".", 1)
            new.execute(sql.SQL("SELECT setval({}, %s, true)").format(
                sql.Literal(sql.Identifier(schema, seq).as_string(new))), (value,))
            moved[name] = value
    return moved


# -- the record of rollbacks -----------------------------------------------------------------------------------
class RollbackLog:
    """Every rollback (manual, automatic, reconcile): what it replaced, what it replayed and left, its cost."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def note_touches(self, promotion: int, sources: Iterable[str], fork_xmin: str | None = None) -> None:
        with self.store.write() as db:
            db.execute("INSERT OR REPLACE INTO promotion_touches(promotion, tables, fork_xmin) VALUES(?,?,?)",
                       (promotion, json.dumps(sorted(touched_tables(sources))), fork_xmin))

    def fork_xmin(self, promotion: int) -> str | None:
        row = self.store.db.execute("SELECT fork_xmin FROM promotion_touches WHERE promotion=?",
                                    (promotion,)).fetchone()
        return str(row[0]) if row and row[0] else None

    def touches(self, promotions: Iterable[int]) -> set[str]:
        out: set[str] = set()
        for p in promotions:
            row = self.store.db.execute("SELECT tables FROM promotion_touches WHERE promotion=?", (p,)).fetchone()
            if row:
                out |= set(json.loads(row[0]))
        return out

    def begin(self, **fields: Any) -> int:
        """Record a running rollback. A manual one is refused while a promotion of the tier runs (a failed
        promotion's own rollback runs inside it), and a promotion while one runs (promote.PromotionLog):
        both checks and inserts happen in one write transaction of the store."""
        from ..errors import Refused

        fields.update(status="running", started_at=time.time(), owner=process_token())
        cols = ", ".join(fields)
        with self.store.write() as db:
            busy = db.execute("SELECT id FROM promotions WHERE tier=? AND status='running'",
                              (fields["tier"],)).fetchone() if fields.get("kind") == "manual" else None
            other = db.execute("SELECT id FROM rollbacks WHERE tier=? AND status='running'",
                               (fields["tier"],)).fetchone()
            live = other is not None and token_alive(
                db.execute("SELECT owner FROM rollbacks WHERE id=?", (other[0],)).fetchone()[0])
            if busy or live:
                what = f"promotion #{busy[0]}" if busy else f"rollback #{other[0]}"
                raise Refused(f"a {what.split(' ')[0]} of {fields['tier']!r} is running ({what})",
                              "Wait for it to finish (`tierbase promotions`, `tierbase rollbacks`), then look "
                              "again at what a rollback would undo", tier=fields["tier"])
            cur = db.execute(f"INSERT INTO rollbacks({cols}) VALUES({', '.join('?' * len(fields))})",
                             tuple(fields.values()))
            return int(cur.lastrowid or 0)

    def update(self, rid: int, **fields: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.store.write() as db:
            db.execute(f"UPDATE rollbacks SET {cols} WHERE id=?", (*fields.values(), rid))

    def get(self, rid: int) -> dict[str, Any]:
        row = self.store.db.execute("SELECT * FROM rollbacks WHERE id=?", (rid,)).fetchone()
        return _public(row)

    def history(self, tier: str | None = None) -> list[dict[str, Any]]:
        sql_ = "SELECT * FROM rollbacks" + (" WHERE tier=?" if tier else "") + " ORDER BY id"
        return [_public(r) for r in self.store.db.execute(sql_, (tier,) if tier else ())]

    def replaced_count(self, tier: str) -> int:
        row = self.store.db.execute("SELECT count(*) FROM rollbacks WHERE tier=? AND replaced_route IS NOT NULL",
                                    (tier,)).fetchone()
        return int(row[0]) if row else 0

    def dead(self) -> list[dict[str, Any]]:
        rows = self.store.db.execute("SELECT * FROM rollbacks WHERE status='running' ORDER BY id").fetchall()
        return [_public(r) | {"_owner": r["owner"]} for r in rows if not token_alive(r["owner"])]


def _public(row: Any) -> dict[str, Any]:
    rec = dict(row)
    rec["report"] = json.loads(rec["report"]) if rec.get("report") else None
    rec.pop("owner", None)
    return rec

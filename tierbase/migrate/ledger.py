"""The ledger of applied migrations, kept in each branch's own database, and applying/undoing files.

The ledger is a table in the branch (``tierbase_meta.schema_migrations``), so it forks with the branch:
a feature branch knows what it inherited from its tier, and a snapshot knows what it held.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pglast
import psycopg
from psycopg.rows import dict_row

from .files import (
    Migration,
    MigrationBusy,
    MigrationDrift,
    MigrationError,
    MigrationFailed,
    MissingUndo,
    is_transactional,
)

# Not a schema named "tierbase": that is the superuser's name, so with the default search_path
# ("$user", public) it would come first, and unqualified CREATE TABLEs would land in it.
LEDGER_SCHEMA = "tierbase_meta"
LEDGER = f"{LEDGER_SCHEMA}.schema_migrations"
_CREATE = f"""
CREATE SCHEMA IF NOT EXISTS {LEDGER_SCHEMA};
CREATE TABLE IF NOT EXISTS {LEDGER} (
    version int PRIMARY KEY,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    applied_by text NOT NULL,
    duration_ms int NOT NULL
)"""
_INSERT = (f"INSERT INTO {LEDGER} (version, name, checksum, applied_at, applied_by, duration_ms) "
           "VALUES (%s, %s, %s, clock_timestamp(), %s, %s)")
_LOCK_KEY = (0x74696572, 0x6D696772)  # "tier", "migr": one migration run per database at a time
_TIMEOUT_STATES = {"57014": "statement_timeout", "55P03": "lock_timeout"}


@dataclass
class Status:
    applied: list[dict[str, Any]]
    pending: list[Migration]
    drift: list[tuple[Migration, dict[str, Any]]] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)

    @property
    def current_version(self) -> int | None:
        return max((int(r["version"]) for r in self.applied), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "current_version": self.current_version,
            "applied": self.applied,
            "pending": [m.to_dict() for m in self.pending],
            "drift": [_drift_dict(m, row) for m, row in self.drift],
            "missing": self.missing,
        }


def _drift_dict(m: Migration, row: dict[str, Any]) -> dict[str, Any]:
    return {"version": m.version, "label": m.label(), "file": str(m.path), "applied_checksum": row["checksum"],
            "file_checksum": m.checksum, "applied_at": row["applied_at"], "applied_by": row["applied_by"]}


# -- statements ---------------------------------------------------------------------------------------
class StatementError(Exception):
    """A statement of a file failed; ``line`` is the line in the file (None if unknown)."""

    def __init__(self, error: psycopg.Error, line: int | None, statement: str, index: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.line = line
        self.statement = statement
        self.index = index  # 0-based: how many statements of the file ran before it


def split_statements(sql: str) -> list[tuple[int, str]]:
    """(character offset, text) of each statement. Uses the real Postgres parser (pglast), so
    dollar quotes and BEGIN ATOMIC bodies are handled; a file it cannot parse is one piece, and
    Postgres reports the syntax error with a position in the whole file."""
    try:
        slices = pglast.split(sql, with_parser=True, only_slices=True)
    except pglast.parser.ParseError:
        return [(0, sql)] if sql.strip() else []
    return [(int(s.start), sql[s]) for s in slices]


def run_file(conn: psycopg.Connection[Any], sql: str) -> int:
    """Execute a file's statements one by one on ``conn``; returns how many ran."""
    pieces = split_statements(sql)
    for index, (offset, statement) in enumerate(pieces):
        try:
            conn.execute(statement.encode(), prepare=False)
        except psycopg.Error as err:
            raise StatementError(err, _line_of(sql, offset, err), statement, index) from err
    return len(pieces)


def _line_of(sql: str, offset: int, err: psycopg.Error) -> int | None:
    position = err.diag.statement_position
    if position and position.isdigit():
        return sql.count("\n", 0, offset + int(position) - 1) + 1
    return sql.count("\n", 0, offset) + 1


_TXN_WORDS = {0: "BEGIN", 1: "START TRANSACTION", 2: "COMMIT", 3: "ROLLBACK", 7: "PREPARE TRANSACTION",
              8: "COMMIT PREPARED", 9: "ROLLBACK PREPARED"}  # savepoints are fine inside our transaction


def transaction_conflicts(sql: str) -> list[tuple[int, str]]:
    """(line, what) for each statement that cannot run inside the one transaction tierbase wraps a
    migration in: its own BEGIN/COMMIT, and statements Postgres refuses in a transaction block."""
    try:
        slices = pglast.split(sql, with_parser=True, only_slices=True)
        stmts = pglast.parse_sql(sql)
    except pglast.parser.ParseError:
        return []  # Postgres will report the syntax error with its line
    out: list[tuple[int, str]] = []
    for piece, raw in zip(slices, stmts, strict=False):
        what = _outside_transaction(raw.stmt)
        if what:
            out.append((sql.count("\n", 0, piece.start) + 1, what))
    return out


def _outside_transaction(node: Any) -> str | None:
    ast = pglast.ast
    if isinstance(node, ast.TransactionStmt):
        return _TXN_WORDS.get(int(node.kind or 0))
    if isinstance(node, ast.IndexStmt | ast.DropStmt) and node.concurrent:
        return "CREATE INDEX CONCURRENTLY" if isinstance(node, ast.IndexStmt) else "DROP INDEX CONCURRENTLY"
    if isinstance(node, ast.ReindexStmt) and any(getattr(p, "defname", "") == "concurrently"
                                                 for p in node.params or ()):
        return "REINDEX CONCURRENTLY"
    if isinstance(node, ast.VacuumStmt) and node.is_vacuumcmd:
        return "VACUUM"
    names = {"CreatedbStmt": "CREATE DATABASE", "DropdbStmt": "DROP DATABASE", "AlterSystemStmt": "ALTER SYSTEM",
             "CreateTableSpaceStmt": "CREATE TABLESPACE", "DropTableSpaceStmt": "DROP TABLESPACE"}
    return names.get(type(node).__name__)


# -- the ledger -----------------------------------------------------------------------------------------
def _require_autocommit(conn: psycopg.Connection[Any]) -> None:
    if not conn.autocommit:
        raise MigrationError("the migration connection is not in autocommit mode",
                             "Open it with psycopg.connect(url, autocommit=True)")


def ensure_ledger(conn: psycopg.Connection[Any]) -> None:
    try:
        conn.execute(_CREATE.encode())
    except psycopg.Error as err:
        raise MigrationError(f"cannot create the migration ledger {LEDGER}: {err.diag.message_primary or err}",
                             "Connect as the branch owner (`tierbase branch url NAME --direct`); "
                             "a read-only snapshot cannot take migrations") from err


def ledger_rows(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        found = cur.execute("SELECT to_regclass(%s) AS t", (LEDGER,)).fetchone()
        if found is None or found["t"] is None:
            return []
        rows = cur.execute(f"SELECT version, name, checksum, applied_at, applied_by, duration_ms FROM {LEDGER} "
                           "ORDER BY version").fetchall()
    for row in rows:
        row["applied_at"] = row["applied_at"].isoformat()
    return rows


def status(conn: psycopg.Connection[Any], migrations: list[Migration]) -> Status:
    """What is applied, pending, edited after applying (drift) and applied but gone from disk (missing)."""
    rows = ledger_rows(conn)
    by_version = {int(r["version"]): r for r in rows}
    on_disk = {m.version for m in migrations}
    return Status(
        applied=rows,
        pending=[m for m in migrations if m.version not in by_version],
        drift=[(m, by_version[m.version]) for m in migrations
               if m.version in by_version and by_version[m.version]["checksum"] != m.checksum],
        missing=[r for r in rows if int(r["version"]) not in on_disk],
    )


def _refuse_drift(st: Status) -> None:
    if not st.drift:
        return
    labels = ", ".join(m.label() for m, _ in st.drift)
    raise MigrationDrift(
        f"applied migration(s) were edited after they were applied on this branch: {labels}; nothing was applied",
        "Never edit an applied migration: restore the file (e.g. `git checkout -- FILE`) and put the change "
        "in a new migration (`tierbase migrate new NAME`)",
        drift=[_drift_dict(m, row) for m, row in st.drift],
    )


@contextmanager
def _migration_lock(conn: psycopg.Connection[Any]) -> Iterator[None]:
    got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", _LOCK_KEY).fetchone()
    if not got or not got[0]:
        raise MigrationBusy("another migration run is in progress on this database",
                            "Wait for it to finish, then run the command again")
    try:
        yield
    finally:
        with suppress(psycopg.Error):
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", _LOCK_KEY)


@contextmanager
def _session_settings(conn: psycopg.Connection[Any], settings: dict[str, str]) -> Iterator[None]:
    before: dict[str, str] = {}
    try:
        for name, value in settings.items():
            row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
            before[name] = str(row[0]) if row else ""
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
    except psycopg.Error as err:
        raise MigrationError(f"invalid setting: {err.diag.message_primary or err}",
                             "Give durations like '30s', '5min' or '1h'", settings=settings) from err
    try:
        yield
    finally:
        with suppress(psycopg.Error):
            for name, value in before.items():
                conn.execute("SELECT set_config(%s, %s, false)", (name, value))


def _preflight(migrations: list[Migration]) -> None:
    for m in migrations:
        found = transaction_conflicts(m.sql) if m.transactional else []
        if found:
            where = ", ".join(f"{what} at line {line}" for line, what in found)
            raise MigrationError(
                f"{m.label()} runs in a transaction but contains {where}; nothing was applied",
                "tierbase runs each migration in one transaction itself: remove BEGIN/COMMIT, and move "
                "statements that cannot run in a transaction (CREATE INDEX CONCURRENTLY, VACUUM) to a file "
                "of their own with the line `-- tierbase:no-transaction`",
                version=m.version, file=str(m.path), lines=[line for line, _ in found],
            )


def apply(conn: psycopg.Connection[Any], migrations: list[Migration], *, actor: str,
          statement_timeout: str = "5min", lock_timeout: str = "10s",
          target_version: int | None = None) -> list[dict[str, Any]]:
    """Apply the pending migrations in order (up to ``target_version``); one dict per migration applied."""
    _require_autocommit(conn)
    with _migration_lock(conn):
        ensure_ledger(conn)
        st = status(conn, migrations)
        _refuse_drift(st)
        todo = [m for m in st.pending if target_version is None or m.version <= target_version]
        _preflight(todo)
        done: list[dict[str, Any]] = []
        with _session_settings(conn, {"statement_timeout": statement_timeout, "lock_timeout": lock_timeout}):
            for m in todo:
                try:
                    done.append(_apply_one(conn, m, actor))
                except StatementError as err:
                    raise _failed(m, err, done, settings={"statement_timeout": statement_timeout,
                                                          "lock_timeout": lock_timeout}) from err.error
        return done


def _apply_one(conn: psycopg.Connection[Any], m: Migration, actor: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    if m.transactional:
        with conn.transaction():
            run_file(conn, m.sql)
            ms = round((time.perf_counter() - t0) * 1000)
            conn.execute(_INSERT, (m.version, m.name, m.checksum, actor, ms))
    else:
        run_file(conn, m.sql)  # autocommit: statement by statement, as CREATE INDEX CONCURRENTLY needs
        ms = round((time.perf_counter() - t0) * 1000)
        conn.execute(_INSERT, (m.version, m.name, m.checksum, actor, ms))
    return {"version": m.version, "name": m.name, "label": m.label(), "checksum": m.checksum, "duration_ms": ms}


def _failed(m: Migration, err: StatementError, done: list[dict[str, Any]], *, settings: dict[str, str],
            undo: bool = False) -> MigrationFailed:
    diag = err.error.diag
    what = m.undo_label() if undo else m.label()
    path = m.undo_path if undo else m.path
    transactional = is_transactional(m.undo_sql or "") if undo else m.transactional
    sqlstate = err.error.sqlstate
    message = diag.message_primary or str(err.error).strip()
    where = f" at line {err.line}" if err.line else ""
    said = [f"{what} failed{where}: {message} (SQLSTATE {sqlstate})"]
    if sqlstate in _TIMEOUT_STATES:
        name = _TIMEOUT_STATES[sqlstate]
        said.append(f"it exceeded {name}={settings.get(name)}")
    hint: list[str] = []
    if transactional:
        hint.append(f"Nothing of {what} was applied (it ran in one transaction with its ledger row)")
    elif err.index:
        hint.append(f"{what} runs without a transaction: its first {err.index} statement(s) ran and stay, "
                    "and it is not in the ledger; make its statements re-runnable (IF NOT EXISTS) or clean up")
    else:
        hint.append(f"Nothing of {what} was applied (its first statement failed)")
    if done:
        one = len(done) == 1
        hint.append(f"{', '.join(d['label'] for d in done)} {'was' if one else 'were'} applied before it "
                    f"and {'stays' if one else 'stay'} applied")
    hint.append(f"Fix {path} and run the command again")
    return MigrationFailed(
        "; ".join(said), ". ".join(hint),
        version=m.version, label=what, file=str(path), line=err.line, error=message, sqlstate=sqlstate,
        detail=diag.message_detail, pg_hint=diag.message_hint, statement=err.statement[:500],
        statements_run=err.index, transactional=transactional, applied=[d["version"] for d in done],
    )


def undo(conn: psycopg.Connection[Any], migration: Migration, *, actor: str,
         statement_timeout: str = "5min", lock_timeout: str = "10s") -> dict[str, Any]:
    """Run the migration's undo file and remove its ledger row (the latest applied migration only)."""
    m = migration
    if m.undo_sql is None:
        raise MissingUndo(f"{m.label()} has no undo file",
                          f"Write {m.path.with_name(m.undo_label() + '.sql')} that reverts it "
                          "(`tierbase migrate new NAME --undo` creates both files for new migrations)",
                          version=m.version, file=str(m.path))
    _require_autocommit(conn)
    with _migration_lock(conn):
        st = status(conn, [m])
        _refuse_drift(st)
        applied = {int(r["version"]) for r in st.applied}
        if m.version not in applied:
            raise MigrationError(f"{m.label()} is not applied on this database", "Nothing to undo",
                                 version=m.version)
        later = sorted(v for v in applied if v > m.version)
        if later:
            raise MigrationError(f"{m.label()} is not the latest applied migration (later: {later})",
                                 "Undo the later migrations first, newest first", version=m.version, later=later)
        settings = {"statement_timeout": statement_timeout, "lock_timeout": lock_timeout}
        t0 = time.perf_counter()
        with _session_settings(conn, settings):
            try:
                if is_transactional(m.undo_sql):
                    with conn.transaction():
                        run_file(conn, m.undo_sql)
                        conn.execute(f"DELETE FROM {LEDGER} WHERE version = %s", (m.version,))
                else:
                    run_file(conn, m.undo_sql)
                    conn.execute(f"DELETE FROM {LEDGER} WHERE version = %s", (m.version,))
            except StatementError as err:
                raise _failed(m, err, [], settings=settings, undo=True) from err.error
    return {"version": m.version, "name": m.name, "label": m.undo_label(), "undone_by": actor,
            "duration_ms": round((time.perf_counter() - t0) * 1000)}

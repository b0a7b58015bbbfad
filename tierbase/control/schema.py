"""Every table of meta.db, created and upgraded in one place, versioned by ``PRAGMA user_version``.

Each migration runs in one ``BEGIN IMMEDIATE`` transaction together with the version bump, so a
crash leaves the file at the version before or after it, and two processes opening a data dir at
once migrate it once (the second re-reads the version under the write lock). A data dir made before
versions were kept is at version 0: migration 1 creates the tables it lacks (``IF NOT EXISTS``)
and migration 2 adds the columns that the hand-written upgrades used to add, so it upgrades in
place with its data. Add a table or a column as a new migration at the end; never edit one that
has shipped. A meta.db from a newer tierbase is refused, unchanged.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import TierbaseError

#: the tables as they are now (a fresh data dir gets them whole from migration 1)
TABLES = """
-- the control plane: settings, branches, routes, intents (control/store.py)
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS branches (
    name        TEXT PRIMARY KEY,
    parent      TEXT REFERENCES branches(name),
    kind        TEXT NOT NULL,
    state       TEXT NOT NULL,
    volume      TEXT NOT NULL UNIQUE,
    port        INTEGER NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    fork_lsn    TEXT,
    creator     TEXT NOT NULL,
    ttl_seconds INTEGER,
    expires_at  REAL,
    protected   INTEGER NOT NULL DEFAULT 0,
    masking     TEXT,           -- JSON list of the masking rules its data went through; NULL: unmasked
    owner       TEXT,           -- process doing an unfinished operation, "pid:starttime"
    actor       TEXT            -- the principal that operation acts for (reconcile audits in its name)
);
CREATE TABLE IF NOT EXISTS routes (
    name        TEXT PRIMARY KEY,   -- a stable name clients connect to
    branch      TEXT NOT NULL REFERENCES branches(name),
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS intents (
    id          INTEGER PRIMARY KEY,
    op          TEXT NOT NULL,
    branch      TEXT NOT NULL,
    volume      TEXT NOT NULL,
    owner       TEXT NOT NULL,
    started_at  REAL NOT NULL,
    actor       TEXT
);
-- principals and their tokens (governance/principals.py)
CREATE TABLE IF NOT EXISTS principals (
    name        TEXT PRIMARY KEY,
    role        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  REAL NOT NULL,
    created_by  TEXT NOT NULL,
    revoked_at  REAL,
    scram       TEXT            -- SCRAM-SHA-256 verifier of the principal's Postgres password (never the password)
);
-- the audit chain and its head (governance/audit.py)
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
CREATE TABLE IF NOT EXISTS audit_head (   -- the newest record, moved in the same transaction as the append
    one  INTEGER PRIMARY KEY CHECK (one = 1),
    id   INTEGER NOT NULL,
    hash TEXT NOT NULL
);
-- promotions (migrate/promote.py)
CREATE TABLE IF NOT EXISTS promotions (
    id          INTEGER PRIMARY KEY,
    tier        TEXT NOT NULL,
    source      TEXT NOT NULL,
    actor       TEXT NOT NULL,
    status      TEXT NOT NULL,          -- running | succeeded | rolled-back | failed
    started_at  REAL NOT NULL,
    finished_at REAL,
    duration_ms INTEGER,
    served_by   TEXT,                   -- the branch that served the tier when the promotion began
    snapshot    TEXT,                   -- the read-only pre-promotion snapshot
    serving_now TEXT,                   -- the branch serving the tier when the promotion ended
    migrations  TEXT NOT NULL DEFAULT '[]',
    reason      TEXT,
    owner       TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS one_running_promotion ON promotions(tier) WHERE status = 'running';
-- the workflow's history (workflow/history.py)
CREATE TABLE IF NOT EXISTS flow_events (
    id          INTEGER PRIMARY KEY,
    feature     TEXT NOT NULL,
    transition  TEXT NOT NULL,
    state       TEXT NOT NULL,      -- the state after the transition
    actor       TEXT NOT NULL,
    at          REAL NOT NULL,
    evidence    TEXT NOT NULL       -- JSON
);
CREATE INDEX IF NOT EXISTS flow_events_feature ON flow_events(feature, id);
-- the workflow's tiers, workspaces and CI jobs (workflow/commands.py)
CREATE TABLE IF NOT EXISTS flow_tiers (
    tier        TEXT PRIMARY KEY,
    git_branch  TEXT NOT NULL,
    sha         TEXT NOT NULL,      -- the tier's accepted commit: set at registration, moved by merges
    at          REAL NOT NULL,
    by          TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS flow_workspaces (
    workspace   TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    at          REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ci_jobs (
    id           INTEGER PRIMARY KEY,
    feature      TEXT NOT NULL,
    sha          TEXT NOT NULL,
    state        TEXT NOT NULL,      -- queued | running | done
    requested_by TEXT NOT NULL,
    runner       TEXT,
    requested_at REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    result       TEXT,               -- JSON: green, failures, counts
    log          TEXT
);
"""

#: columns added to tables of the first builds, before versions were kept: (table, column, type)
ADDED_COLUMNS = (
    ("branches", "masking", "TEXT"),
    ("branches", "actor", "TEXT"),
    ("intents", "actor", "TEXT"),
    ("principals", "scram", "TEXT"),
)


@dataclass(frozen=True)
class Migration:
    version: int
    what: str
    apply: Callable[[sqlite3.Connection], None]


def statements(script: str) -> list[str]:
    """Split a script into statements (a ';' inside a comment or string does not end one)."""
    out, acc = [], ""
    for piece in script.split(";"):
        acc += piece + ";"
        if sqlite3.complete_statement(acc):
            if acc.strip(" \n;"):
                out.append(acc.strip())
            acc = ""
    return out


def _create(script: str) -> Callable[[sqlite3.Connection], None]:
    """A migration that runs the CREATE ... IF NOT EXISTS statements of ``script``."""
    def apply(db: sqlite3.Connection) -> None:
        for stmt in statements(script):
            db.execute(stmt)
    return apply


def _columns(db: sqlite3.Connection) -> None:
    for table, column, kind in ADDED_COLUMNS:
        if column not in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


#: leased branches of agents' sessions (app_sessions.py)
SESSIONS = """
CREATE TABLE IF NOT EXISTS sessions (
    id          TEXT PRIMARY KEY,      -- ses_<hex>
    principal   TEXT NOT NULL,
    branch      TEXT NOT NULL,
    ttl_seconds INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    renewed_at  REAL NOT NULL,
    ended_at    REAL,
    end_reason  TEXT                   -- ended | expired | gone
);
CREATE INDEX IF NOT EXISTS sessions_live ON sessions(branch) WHERE ended_at IS NULL;
"""


#: where masked data went through migrations: derived, renamed, dropped columns (governance/lineage.py)
MASKING_LINEAGE = """
CREATE TABLE IF NOT EXISTS masking_lineage (
    col TEXT PRIMARY KEY,          -- schema.table.column
    kind TEXT NOT NULL,            -- derived | renamed | dropped
    method TEXT NOT NULL,          -- the rule it inherits ('' when dropped)
    source TEXT NOT NULL,          -- the masked column it came from (its old name, for a rename)
    origin TEXT NOT NULL,          -- file:line of the migration
    at REAL NOT NULL,
    by TEXT NOT NULL
);
"""


PITR = """
CREATE TABLE IF NOT EXISTS pitr_archives (
    key         TEXT PRIMARY KEY,
    branch      TEXT NOT NULL,
    volume      TEXT NOT NULL,      -- the branch's volume this lineage continues (a restore moves it)
    created_at  REAL NOT NULL,
    retired_at  REAL                -- set when no branch continues it; its files are removed
);
CREATE TABLE IF NOT EXISTS pitr_bases (
    id          INTEGER PRIMARY KEY,
    key         TEXT NOT NULL,
    volume      TEXT NOT NULL UNIQUE,
    taken_at    REAL NOT NULL,
    lsn         TEXT NOT NULL,      -- WAL position read after the snapshot: valid from here on
    redo_lsn    TEXT NOT NULL,      -- where recovery from it starts (its checkpoint's REDO)
    timeline    INTEGER NOT NULL,
    reason      TEXT NOT NULL       -- schedule | promotion | first
);
"""

#: the logical replication slot each promotion made for its rollback (migrate/logical.py)
ROLLBACK_SLOTS = """
CREATE TABLE IF NOT EXISTS rollback_slots (
    promotion  INTEGER PRIMARY KEY,
    branch     TEXT NOT NULL,      -- the branch that served the tier when the slot was made
    slot       TEXT NOT NULL,
    lsn        TEXT,               -- where decoding starts (NULL: not made, see note)
    created_at REAL NOT NULL,
    dropped_at REAL,
    note       TEXT                -- why there is no slot, or why it went
);
"""


ROLLBACKS = """
CREATE TABLE IF NOT EXISTS promotion_touches (
    promotion INTEGER PRIMARY KEY,
    tables    TEXT NOT NULL,                -- JSON list of 'schema.table' the promoted migrations name
    fork_xmin TEXT                          -- the oldest transaction running when the snapshot was taken
);
CREATE TABLE IF NOT EXISTS rollbacks (
    id          INTEGER PRIMARY KEY,
    tier        TEXT NOT NULL,
    kind        TEXT NOT NULL,              -- manual | automatic | reconcile
    snapshot    TEXT NOT NULL,
    branch      TEXT NOT NULL,              -- the snapshot's writable copy that takes over the route
    replaced    TEXT NOT NULL,              -- the branch that served the tier before
    replaced_route TEXT,                    -- <tier>-replaced-<n>: the route that reaches it afterwards
    actor       TEXT NOT NULL,
    status      TEXT NOT NULL,              -- running | done | failed | abandoned
    started_at  REAL NOT NULL,
    finished_at REAL,
    discard     INTEGER NOT NULL DEFAULT 0,
    replayed    INTEGER NOT NULL DEFAULT 0,
    left_rows   INTEGER NOT NULL DEFAULT 0,
    added_ms    INTEGER NOT NULL DEFAULT 0,
    hold_ms     INTEGER NOT NULL DEFAULT 0,
    report      TEXT,                       -- JSON: per table replayed / left and why
    left_sql    TEXT,
    owner       TEXT
);
"""

MIGRATIONS = (
    Migration(1, "the tables (IF NOT EXISTS: a data dir from before versions keeps its own)", _create(TABLES)),
    Migration(2, "columns added before versions were kept: " + ", ".join(f"{t}.{c}" for t, c, _ in ADDED_COLUMNS),
              _columns),
    Migration(3, "sessions: leased branches with a TTL (app_sessions.py)", _create(SESSIONS)),
    Migration(4, "masking_lineage: where masked columns went through migrations (governance/lineage.py)",
              _create(MASKING_LINEAGE)),
    Migration(5, "pitr_archives, pitr_bases: tiers' WAL histories and base snapshots (control/history.py)",
              _create(PITR)),
    Migration(6, "promotion_touches, rollbacks: what a rollback must not replay; every rollback (migrate/replay.py)",
              _create(ROLLBACKS)),
    Migration(7, "rollback_slots: the slot each promotion made for its rollback's replay (migrate/logical.py)",
              _create(ROLLBACK_SLOTS)),
)
LATEST = MIGRATIONS[-1].version


def version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection) -> list[int]:
    """Bring ``db`` (a connection in autocommit mode) to LATEST; the versions applied."""
    if version(db) > LATEST:
        raise _too_new(db)
    done = []
    for m in MIGRATIONS:
        if version(db) >= m.version:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            current = version(db)  # another process may have migrated while this one waited
            if current > LATEST:
                raise _too_new(db)
            if current < m.version:
                m.apply(db)
                db.execute(f"PRAGMA user_version = {m.version}")
                done.append(m.version)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    return done


def _too_new(db: sqlite3.Connection) -> TierbaseError:
    return TierbaseError(f"the data dir's meta.db has schema version {version(db)}, newer than this tierbase's "
                         f"{LATEST}; nothing was changed", "Use the tierbase version that wrote it (or newer)")

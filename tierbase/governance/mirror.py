"""The audit trail as SQL: table ``audit_log`` on tierbase's own cluster, writable by no role.

The platform superuser owns the table and is the only one that inserts (the
sync, over the platform's own connection). Readers get SELECT through the
role ``tb_reader``; every other privilege is revoked from everyone, and
triggers refuse UPDATE, DELETE and TRUNCATE even to the owner, so that
changing a row takes a deliberate act (dropping the triggers, or
``session_replication_role = replica``) - and ``check`` still finds it,
because ``audit verify`` compares the mirror row by row with the chain.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import psycopg

from ..control.store import Store
from ..provider import READER_ROLE

DDL = """
CREATE TABLE IF NOT EXISTS audit_log (
    id bigint PRIMARY KEY, ts timestamptz NOT NULL, actor text NOT NULL, action text NOT NULL,
    target text NOT NULL, decision text NOT NULL, reason text NOT NULL, outcome text NOT NULL,
    before jsonb, after jsonb, prev_hash text NOT NULL, hash text NOT NULL
);
COMMENT ON TABLE audit_log IS 'tierbase audit trail: a read-only mirror; `tierbase audit verify` checks the chain';
"""
GUARD = f"""
DO $$
DECLARE r record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{READER_ROLE}') THEN
        CREATE ROLE {READER_ROLE};
    END IF;
    -- grants made by earlier versions (SELECT straight to principals' roles) keep SELECT only
    FOR r IN SELECT DISTINCT a.grantee::regrole::text AS who
             FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = 'audit_log'::regclass AND a.grantee <> 0 AND a.grantee <> c.relowner
    LOOP
        EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON audit_log FROM %s', r.who);
    END LOOP;
END $$;
REVOKE ALL ON audit_log FROM PUBLIC;
GRANT SELECT ON audit_log TO {READER_ROLE};
CREATE OR REPLACE FUNCTION audit_log_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege', HINT = 'The audit trail is changed by nobody';
END $$;
REVOKE ALL ON FUNCTION audit_log_refuse() FROM PUBLIC;
CREATE OR REPLACE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse();
CREATE OR REPLACE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse();
"""
COLUMNS = ("id", "ts", "actor", "action", "target", "decision", "reason", "outcome", "before", "after",
           "prev_hash", "hash")
MAX_PROBLEMS = 20


def ensure(conn: psycopg.Connection[Any]) -> None:
    """The table and its guard; the guard only once (it takes locks a reader's sync should not wait for)."""
    conn.execute(DDL)
    guarded = conn.execute("SELECT 1 FROM pg_trigger WHERE tgname = 'audit_log_no_truncate'"
                           " AND tgrelid = 'audit_log'::regclass").fetchone()
    if not guarded:
        with conn.transaction():
            conn.execute(GUARD)


def sync(conn: psycopg.Connection[Any], records_after: Callable[[int], list[dict[str, Any]]]) -> tuple[int, int]:
    """Copy the records the mirror does not have; returns (how many, the newest id in the mirror)."""
    ensure(conn)
    row = conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()
    new = records_after(int(row[0]) if row else 0)
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO audit_log VALUES (%s, to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (id) DO NOTHING", [tuple(r[c] for c in COLUMNS) for r in new])
    top = conn.execute("SELECT coalesce(max(id), 0) FROM audit_log").fetchone()
    return len(new), int(top[0]) if top else 0


def check(conn: psycopg.Connection[Any], chain_after: Callable[[int], list[dict[str, Any]]],
          synced_to: int) -> list[str]:
    """How the mirror differs from the chain (raw records); empty when it is an unchanged prefix of it.

    ``synced_to`` is the newest id a sync saw in the mirror: rows up to it must be there; the rest of the
    chain is copied on the next sync, so a mirror that merely lags is fine. The mirror is read before the
    chain: a sync in between can only add to the chain, never make a mirror row look foreign.
    """
    if conn.execute("SELECT to_regclass('audit_log')").fetchone() in (None, (None,)):
        return [f"the mirror table audit_log is gone (it had rows up to {synced_to})"] if synced_to else []
    rows = {int(r[0]): r for r in conn.execute(
        "SELECT id, extract(epoch FROM ts)::float8, actor, action, target, decision, reason, outcome, before,"
        " after, prev_hash, hash FROM audit_log ORDER BY id")}
    by_id = {int(r["id"]): r for r in chain_after(0)}
    problems: list[str] = []
    for id in sorted(set(rows) | {i for i in by_id if i <= synced_to}):
        if id not in by_id:
            problems.append(f"mirror row {id} is not in the chain")
        elif id not in rows:
            problems.append(f"mirror row {id} is missing")
        else:
            fields = _differ(rows[id], by_id[id])
            if fields:
                problems.append(f"mirror row {id} differs from the chain ({', '.join(fields)})")
        if len(problems) >= MAX_PROBLEMS:
            break
    return problems


def _differ(mirror: tuple[Any, ...], rec: dict[str, Any]) -> list[str]:
    out = []
    for col, got in zip(COLUMNS, mirror, strict=True):
        want = rec[col]
        if col == "ts":
            same = math.isclose(float(got), float(want), abs_tol=2e-6)   # timestamptz keeps microseconds
        elif col in ("before", "after"):
            same = got == (json.loads(want) if want is not None else None)
        else:
            same = got == want
        if not same:
            out.append(col)
    return out


def sync_at(dsn: str, records_after: Callable[[int], list[dict[str, Any]]]) -> tuple[int, int]:
    """``sync`` over a connection of the platform's own to the mirror's cluster at ``dsn``."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        return sync(conn, records_after)


def check_at(dsn: str, chain_after: Callable[[int], list[dict[str, Any]]], synced_to: int) -> list[str]:
    """``check`` over a connection to ``dsn``; a mirror that cannot be read is a problem, said so."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            return check(conn, chain_after, synced_to)
    except psycopg.Error as err:
        return [f"the SQL mirror could not be read: {str(err).strip()}"]


def note_synced(store: Store, top: int) -> None:
    """Remember the newest id the mirror held: rows up to it missing later were deleted, not yet to come."""
    with store.write() as db:
        row = db.execute("SELECT value FROM settings WHERE key = 'audit_mirror_to'").fetchone()
        if row is None or int(row[0]) < top:  # concurrent syncs: never lower it
            db.execute("INSERT INTO settings(key, value) VALUES('audit_mirror_to', ?)"
                       " ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(top),))

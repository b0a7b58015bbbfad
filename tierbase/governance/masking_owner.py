"""Hand a masked branch's objects to its owner role, so that the branch's owner can work on it.

A production loaded by the platform (a restore as the superuser, a bulk load) holds objects the
branch owner role does not own: DDL fails (``must be owner of table customer``) and so do
`migrate verify` and `flow ready`. Masking runs as the superuser on a private compute anyway, so it
gives the project database and every object in it to the owner role first and then masks *as
that role*: no function an index, a CHECK or a default calls runs with the superuser's rights,
and a ``SECURITY DEFINER`` function that the superuser owned on the parent runs as the owner role
on the branch (no escape to the superuser through old definitions).

What is handed over: the database, its schemas, relations (tables, partitions, views, materialized
views, sequences not owned by a column, foreign tables), routines and stand-alone types and
domains, outside ``pg_catalog``/``information_schema``/``pg_toast`` and outside extensions (whose
members keep the extension's owner).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

# every object below is in a user schema and is no member of an extension
_USER = """n.nspname NOT LIKE 'pg\\_%%' AND n.nspname <> 'information_schema'
  AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = {cls}::regclass AND e.objid = {oid}
                  AND e.deptype = 'e')"""

_OBJECTS = f"""
SELECT 'SCHEMA', format('%%I', n.nspname) FROM pg_namespace n
 WHERE n.nspowner <> %(role)s::regrole AND {_USER.format(cls="'pg_namespace'", oid="n.oid")}
UNION ALL
SELECT CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE'
                      WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END, format('%%I.%%I', n.nspname, c.relname)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND c.relowner <> %(role)s::regrole
   AND {_USER.format(cls="'pg_class'", oid="c.oid")}
   -- a sequence owned by a column follows its table (ALTER SEQUENCE ... OWNER refuses it)
   AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
            AND d.objid = c.oid AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')))
UNION ALL
SELECT 'ROUTINE', p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE p.proowner <> %(role)s::regrole AND {_USER.format(cls="'pg_proc'", oid="p.oid")}
UNION ALL
SELECT CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, t.oid::regtype::text
  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
 WHERE t.typowner <> %(role)s::regrole AND t.typtype IN ('b', 'c', 'd', 'e', 'r')
   AND (t.typrelid = 0 OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')
   AND NOT EXISTS (SELECT 1 FROM pg_type a WHERE a.typarray = t.oid)  -- implicit array types follow
   AND {_USER.format(cls="'pg_type'", oid="t.oid")}
"""


def hand_over(conn: psycopg.Connection[Any], role: str) -> int:
    """Give the connected database and its user objects to ``role`` (a superuser session, in the
    caller's transaction); returns how many objects changed owner."""
    db = conn.execute("SELECT current_database()::text, (SELECT datdba::regrole::text FROM pg_database "
                      "WHERE datname = current_database())").fetchone()
    assert db is not None
    changed = 0
    if db[1] != role:
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(db[0]), sql.Identifier(role)))
        changed += 1
    rows = conn.execute(_OBJECTS, {"role": role}).fetchall()
    for kind, name in rows:  # names come from the catalog, already quoted by format()/regclass output
        conn.execute(sql.SQL("ALTER {} {} OWNER TO {}").format(sql.SQL(kind), sql.SQL(name), sql.Identifier(role)))
    return changed + len(rows)

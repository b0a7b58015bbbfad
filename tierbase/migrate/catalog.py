"""Read a database's schema from the system catalogs into a JSON-able snapshot.

The snapshot is what ``diff`` compares, so it must not depend on anything but
the schema: no oids, no data (sequence values), no session settings. Names are
quoted the way SQL would need them (``quote_ident``) and joined with dots; the
catalog functions run with ``search_path = pg_catalog`` and fixed date/time
settings so their output is fully qualified and identical on every connection.
Objects that are derived from another object are left out, because they change
with it: indexes that back a constraint, identity sequences (folded into their
column), array types, table row types, range constructors, and the members of
extensions (the extension is listed). Indexes, constraints and triggers that
Postgres cloned onto partitions (or inheriting tables) are kept, marked
``inherited``, so that ``diff`` can tell them apart from the table's own.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

#: Bumped when the snapshot's shape changes, so stored snapshots can be told apart.
FORMAT = 1

#: Never part of an application's schema; ``tierbase_meta`` holds tierbase's own migration ledger.
EXCLUDED_SCHEMAS = ("information_schema", "tierbase", "tierbase_meta")

# Settings that change how pg_get_*def and format_type render names and constants.
_PINNED = {
    "search_path": "pg_catalog",
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
}


def _qualified(ns: str, name: str) -> str:
    return f"quote_ident({ns}) || '.' || quote_ident({name})"


def _not_extension_member(catalog: str, oid: str, deptypes: str = "'e'") -> str:
    return (f"NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = '{catalog}'::regclass "
            f"AND x.objid = {oid} AND x.deptype IN ({deptypes}))")


_SCHEMAS = """
SELECT oid, quote_ident(nspname) AS name FROM pg_namespace
WHERE CASE WHEN %(only)s::text[] IS NULL
           THEN nspname NOT LIKE 'pg\\_%%' AND nspname <> ALL(%(excluded)s::text[])
           ELSE nspname = ANY(%(only)s::text[]) END
"""

_EXTENSIONS = """
SELECT quote_ident(e.extname) AS name, e.extversion AS version, quote_ident(n.nspname) AS schema
FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE n.oid = ANY(%(ns)s::oid[])
"""

_TABLES = f"""
SELECT c.oid, {_qualified('n.nspname', 'c.relname')} AS name, c.relkind::text AS relkind, c.relispartition,
       c.relpersistence::text AS persistence, c.relrowsecurity, c.relforcerowsecurity, c.reloptions,
       CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END AS partition_key,
       CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, c.oid) END AS partition_bound,
       ARRAY(SELECT {_qualified('pn.nspname', 'p.relname')}
               FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent
               JOIN pg_namespace pn ON pn.oid = p.relnamespace
              WHERE i.inhrelid = c.oid ORDER BY i.inhseqno) AS parents
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'f') AND n.oid = ANY(%(ns)s::oid[]) AND {_not_extension_member('pg_class', 'c.oid')}
"""

_COLUMNS = """
SELECT a.attrelid AS relid, quote_ident(a.attname) AS name, format_type(a.atttypid, a.atttypmod) AS type,
       a.attnotnull AS not_null, a.attidentity::text AS identity, a.attgenerated::text AS generated,
       pg_get_expr(d.adbin, d.adrelid) AS expr,
       CASE WHEN a.attcollation <> t.typcollation
            THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END AS collation
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_collation co ON co.oid = a.attcollation
LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
WHERE a.attrelid = ANY(%(rels)s::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""

_SEQUENCES = f"""
SELECT {_qualified('n.nspname', 'c.relname')} AS name, format_type(s.seqtypid, NULL) AS type,
       s.seqstart AS start, s.seqincrement AS increment, s.seqmin AS min, s.seqmax AS max,
       s.seqcache AS cache, s.seqcycle AS cycle, c.relpersistence = 'u' AS unlogged,
       dep.deptype::text AS deptype, {_qualified('tn.nspname', 'tc.relname')} AS owner_table,
       quote_ident(att.attname) AS owner_column
FROM pg_sequence s
JOIN pg_class c ON c.oid = s.seqrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_depend dep ON dep.classid = 'pg_class'::regclass AND dep.objid = c.oid
     AND dep.refclassid = 'pg_class'::regclass AND dep.deptype IN ('a', 'i')
LEFT JOIN pg_class tc ON tc.oid = dep.refobjid
LEFT JOIN pg_namespace tn ON tn.oid = tc.relnamespace
LEFT JOIN pg_attribute att ON att.attrelid = dep.refobjid AND att.attnum = dep.refobjsubid
WHERE n.oid = ANY(%(ns)s::oid[]) AND {_not_extension_member('pg_class', 'c.oid')}
"""

# Constraints cloned onto partitions (conparentid) or inherited without a local
# definition (conislocal) follow their parent's.
_CONSTRAINTS = f"""
SELECT {_qualified('n.nspname', 'r.relname')} AS table, quote_ident(k.conname) AS name,
       k.contype::text AS contype, pg_get_constraintdef(k.oid) AS definition,
       k.conparentid <> 0 OR NOT k.conislocal AS inherited
FROM pg_constraint k
JOIN pg_class r ON r.oid = k.conrelid
JOIN pg_namespace n ON n.oid = r.relnamespace
WHERE k.contype IN ('p', 'u', 'c', 'f', 'x')
  AND n.oid = ANY(%(ns)s::oid[]) AND {_not_extension_member('pg_class', 'r.oid')}
"""

_INDEXES = f"""
SELECT {_qualified('n.nspname', 'ic.relname')} AS name, {_qualified('tn.nspname', 'tc.relname')} AS table,
       pg_get_indexdef(i.indexrelid) AS definition, i.indisvalid AS valid, ic.relispartition AS inherited
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_namespace n ON n.oid = ic.relnamespace
JOIN pg_class tc ON tc.oid = i.indrelid
JOIN pg_namespace tn ON tn.oid = tc.relnamespace
WHERE n.oid = ANY(%(ns)s::oid[]) AND tc.relkind IN ('r', 'p', 'm')
  AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid
                  AND k.conrelid = i.indrelid AND k.contype IN ('p', 'u', 'x'))
  AND {_not_extension_member('pg_class', 'tc.oid')}
"""

_VIEWS = f"""
SELECT {_qualified('n.nspname', 'c.relname')} AS name, c.relkind::text AS relkind,
       pg_get_viewdef(c.oid, true) AS definition, c.reloptions
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm') AND n.oid = ANY(%(ns)s::oid[]) AND {_not_extension_member('pg_class', 'c.oid')}
"""

_FUNCTIONS = f"""
SELECT {_qualified('n.nspname', 'p.proname')} || '(' || oidvectortypes(p.proargtypes) || ')' AS name,
       {_qualified('n.nspname', 'p.proname')} AS bare_name, p.prokind::text AS prokind,
       l.lanname AS language, pg_get_function_arguments(p.oid) AS arguments,
       CASE WHEN p.prokind <> 'p' THEN pg_get_function_result(p.oid) END AS returns,
       CASE WHEN p.prokind <> 'a' THEN pg_get_functiondef(p.oid) END AS definition,
       concat_ws(', ', 'SFUNC = ' || a.aggtransfn::text,
                 'STYPE = ' || format_type(a.aggtranstype, NULL),
                 CASE WHEN a.aggfinalfn::oid <> 0 THEN 'FINALFUNC = ' || a.aggfinalfn::text END,
                 CASE WHEN a.aggcombinefn::oid <> 0 THEN 'COMBINEFUNC = ' || a.aggcombinefn::text END,
                 CASE WHEN a.agginitval IS NOT NULL THEN 'INITCOND = ' || quote_literal(a.agginitval) END,
                 CASE WHEN a.aggsortop <> 0 THEN 'SORTOP = ' || a.aggsortop::regoperator::text END
       ) AS aggregate
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
JOIN pg_language l ON l.oid = p.prolang
LEFT JOIN pg_aggregate a ON a.aggfnoid = p.oid
WHERE n.oid = ANY(%(ns)s::oid[]) AND {_not_extension_member('pg_proc', 'p.oid', "'e', 'i'")}
"""

_TRIGGERS = f"""
SELECT {_qualified('n.nspname', 'c.relname')} AS table, quote_ident(t.tgname) AS name,
       pg_get_triggerdef(t.oid) AS definition, t.tgenabled::text AS enabled, {{cloned}} AS inherited
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE NOT t.tgisinternal AND n.oid = ANY(%(ns)s::oid[])
  AND {_not_extension_member('pg_class', 'c.oid')}
"""

# Array types and table row types come with their element type or table; multiranges with their range
# (an internal dependency, like a range's constructor functions).
_TYPES = f"""
SELECT t.oid, {_qualified('n.nspname', 't.typname')} AS name, t.typtype::text AS typtype,
       ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder) AS labels,
       format_type(t.typbasetype, t.typtypmod) AS base, t.typnotnull AS not_null,
       pg_get_expr(t.typdefaultbin, 0) AS default,
       CASE WHEN t.typtype = 'd' AND t.typcollation <> bt.typcollation
            THEN quote_ident(cn.nspname) || '.' || quote_ident(co.collname) END AS collation,
       (SELECT format_type(r.rngsubtype, NULL) FROM pg_range r WHERE r.rngtypid = t.oid) AS subtype,
       ARRAY(SELECT quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod)
               FROM pg_attribute a WHERE a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum) AS attributes
FROM pg_type t
JOIN pg_namespace n ON n.oid = t.typnamespace
LEFT JOIN pg_type bt ON bt.oid = t.typbasetype
LEFT JOIN pg_class rc ON rc.oid = t.typrelid
LEFT JOIN pg_collation co ON co.oid = t.typcollation
LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
WHERE n.oid = ANY(%(ns)s::oid[]) AND t.typtype IN ('b', 'c', 'd', 'e', 'r')
  AND (t.typtype <> 'c' OR rc.relkind = 'c')
  AND NOT EXISTS (SELECT 1 FROM pg_type el WHERE el.typarray = t.oid)
  AND {_not_extension_member('pg_type', 't.oid', "'e', 'i'")}
"""

_DOMAIN_CONSTRAINTS = """
SELECT k.contypid AS typid, quote_ident(k.conname) AS name, pg_get_constraintdef(k.oid) AS definition
FROM pg_constraint k WHERE k.contypid = ANY(%(types)s::oid[]) AND k.contype = 'c'
"""

_TABLE_KINDS = {"r": "table", "p": "partitioned table", "f": "foreign table"}
_CONSTRAINT_KINDS = {"p": "primary key", "u": "unique", "c": "check", "f": "foreign key", "x": "exclusion"}
_FUNCTION_KINDS = {"f": "function", "p": "procedure", "a": "aggregate", "w": "window"}
_TYPE_KINDS = {"b": "base", "c": "composite", "d": "domain", "e": "enum", "r": "range"}
_TRIGGER_STATES = {"O": "enabled", "D": "disabled", "R": "replica", "A": "always"}
_IDENTITY = {"a": "always", "d": "by default"}

Rows = list[dict[str, Any]]


def snapshot(conn: psycopg.Connection[Any], schemas: list[str] | None = None) -> dict[str, Any]:
    """Describe the schema of the database behind ``conn``: a dict of sections, each ``{name: definition}``.

    ``schemas`` limits it to those schemas; by default every schema except the
    system ones and ``tierbase`` is read. Reading happens in one read-only
    transaction (a savepoint if the caller has one open), leaving the session as it was.
    """
    fresh = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if fresh:  # only the first statement of a transaction may set these
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        saved = _pin_settings(conn)
        out = _read(conn, schemas)
        for name, value in saved.items():
            conn.execute("SELECT set_config(%s, %s, true)", (name, value))
    result: dict[str, Any] = _sorted(out)
    return result


def _pin_settings(conn: psycopg.Connection[Any]) -> dict[str, str]:
    saved: dict[str, str] = {}
    for name, value in _PINNED.items():
        row = conn.execute("SELECT current_setting(%s), set_config(%s, %s, true)", (name, name, value)).fetchone()
        saved[name] = str(row[0]) if row else ""
    return saved


def _rows(conn: psycopg.Connection[Any], query: str, **params: Any) -> Rows:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall()


def _read(conn: psycopg.Connection[Any], only: list[str] | None) -> dict[str, Any]:
    namespaces = _rows(conn, _SCHEMAS, only=only, excluded=list(EXCLUDED_SCHEMAS))
    ns = [r["oid"] for r in namespaces]
    tables = _tables(conn, ns)
    types = _types(conn, ns)
    cloned = "t.tgparentid <> 0" if conn.info.server_version >= 130000 else "false"
    return {
        "format": FORMAT,
        "schemas": {r["name"]: {} for r in namespaces},
        "extensions": {r["name"]: {"version": r["version"], "schema": r["schema"]}
                       for r in _rows(conn, _EXTENSIONS, ns=ns)},
        "tables": tables,
        "sequences": _sequences(conn, ns, tables),
        "constraints": {f"{r['table']}.{r['name']}": {"table": r["table"], "type": _CONSTRAINT_KINDS[r["contype"]],
                                                       "definition": r["definition"], "inherited": r["inherited"]}
                        for r in _rows(conn, _CONSTRAINTS, ns=ns)},
        "indexes": {r["name"]: {"table": r["table"], "definition": r["definition"], "valid": r["valid"],
                                "inherited": r["inherited"]}
                    for r in _rows(conn, _INDEXES, ns=ns)},
        "views": {r["name"]: {"kind": "materialized view" if r["relkind"] == "m" else "view",
                              "definition": r["definition"], "options": sorted(r["reloptions"] or [])}
                  for r in _rows(conn, _VIEWS, ns=ns)},
        "functions": {r["name"]: _function(r) for r in _rows(conn, _FUNCTIONS, ns=ns)},
        "triggers": {f"{r['table']}.{r['name']}": {"table": r["table"], "definition": r["definition"],
                                                    "enabled": _TRIGGER_STATES.get(r["enabled"], r["enabled"]),
                                                    "inherited": r["inherited"]}
                     for r in _rows(conn, _TRIGGERS.replace("{cloned}", cloned), ns=ns)},
        "types": types,
    }


def _tables(conn: psycopg.Connection[Any], ns: list[int]) -> dict[str, Any]:
    rows = _rows(conn, _TABLES, ns=ns)
    columns: dict[int, dict[str, Any]] = {r["oid"]: {} for r in rows}
    for col in _rows(conn, _COLUMNS, rels=list(columns)):
        columns[col["relid"]][col["name"]] = _column(col)
    out: dict[str, Any] = {}
    for r in rows:
        partition = bool(r["relispartition"])
        parents: list[str] = list(r["parents"] or [])
        out[r["name"]] = {
            "kind": _TABLE_KINDS[r["relkind"]],
            "columns": columns[r["oid"]],
            "partition_key": r["partition_key"],
            "partition_of": parents[0] if partition and parents else None,
            "partition_bound": r["partition_bound"],
            "inherits": [] if partition else parents,
            "unlogged": r["persistence"] == "u",
            "row_security": ("forced" if r["relforcerowsecurity"] else "enabled") if r["relrowsecurity"] else None,
            "options": sorted(r["reloptions"] or []),
        }
    return out


def _column(col: dict[str, Any]) -> dict[str, Any]:
    generated = col["generated"] == "s"
    return {
        "type": col["type"],
        "not_null": bool(col["not_null"]),
        "default": None if generated else col["expr"],
        "generated": col["expr"] if generated else None,
        "identity": _IDENTITY[col["identity"]] if col["identity"] else None,
        "collation": col["collation"],
    }


def _sequences(conn: psycopg.Connection[Any], ns: list[int], tables: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in _rows(conn, _SEQUENCES, ns=ns):
        params = {k: r[k] for k in ("type", "start", "increment", "min", "max", "cache", "cycle")}
        if r["deptype"] == "i":
            # an identity column's sequence is part of the column: its options go there
            column = tables.get(r["owner_table"], {}).get("columns", {}).get(r["owner_column"])
            if column is not None:
                column["identity"] = {"generation": column["identity"], **params}
            continue
        owned = [r["owner_table"], r["owner_column"]] if r["deptype"] == "a" else None
        out[r["name"]] = {**params, "unlogged": bool(r["unlogged"]), "owned_by": owned}
    return out


def _function(r: dict[str, Any]) -> dict[str, Any]:
    kind = _FUNCTION_KINDS[r["prokind"]]
    definition = r["definition"]
    if kind == "aggregate":  # pg_get_functiondef refuses aggregates
        definition = f"CREATE AGGREGATE {r['bare_name']}({r['arguments']}) ({r['aggregate']})"
    return {"kind": kind, "language": r["language"], "arguments": r["arguments"], "returns": r["returns"],
            "definition": definition}


def _types(conn: psycopg.Connection[Any], ns: list[int]) -> dict[str, Any]:
    rows = _rows(conn, _TYPES, ns=ns)
    checks: dict[int, dict[str, str]] = {r["oid"]: {} for r in rows}
    for k in _rows(conn, _DOMAIN_CONSTRAINTS, types=list(checks)):
        checks[k["typid"]][k["name"]] = k["definition"]
    out: dict[str, Any] = {}
    for r in rows:
        kind = _TYPE_KINDS[r["typtype"]]
        entry: dict[str, Any] = {"kind": kind}
        if kind == "enum":
            entry["labels"] = list(r["labels"])
        elif kind == "domain":
            entry.update(base=r["base"], not_null=bool(r["not_null"]), default=r["default"],
                         collation=r["collation"], constraints=checks[r["oid"]])
        elif kind == "composite":
            entry["attributes"] = list(r["attributes"])
        elif kind == "range":
            entry["subtype"] = r["subtype"]
        out[r["name"]] = entry
    return out


def _sorted(value: Any) -> Any:
    """Dicts with sorted keys all the way down, so equal schemas serialise identically."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value

"""Deterministic, keyed column masking, run inside Postgres on a branch before anyone connects.

Rules come from the ``[masking]`` table of tierbase.toml (``"customer.email" = "email"``).
Every mask derives from HMAC-SHA256(key, method || ':' || value::text), computed by Postgres
itself (``sha256()``, no pgcrypto), under a key derived from the project's secret: the same
input gives the same output on every branch and in every table (joins and unique keys
hold), and nobody without the key can precompute a dictionary of masks. NULL stays NULL.

* ``email``   a valid address (EMAIL_VALID) becomes ``'u' || <hex of the HMAC> || '@example.invalid'``
  with as many hex digits as keep its length (13 to 64: 30 to 81 characters); a malformed one is
  masked like ``partial``, so it stays malformed in the same way.
* ``hash``    the HMAC's 64 hex digits, cut to n for varchar(n)/char(n).
* ``partial`` same length and shape: the last 2 characters stay (if the value has 6 or more),
  ASCII punctuation and spaces stay; each digit becomes a keyed digit, each ASCII letter a keyed
  letter of the same case, any other character a keyed lower-case ASCII letter. The new
  characters come from the HMAC of the whole value, so they tell nothing about the old ones.
* ``noise``   numbers: x factor in [0.9, 1.1] from the HMAC of the value and the row's primary
  key, rounded to the column's scale and clamped to its range. Sign kept, non-zero stays
  non-zero, so checks like ``amount >= 0`` or ``> 0`` keep holding.
* ``null``    NULL (nullable columns).  ``redact``: ``'REDACTED'`` (cut to n for varchar(n)).
* ``shift``   dates and timestamps: moved back by a keyed number of whole days in [0, 30], the same for
  every shifted column of a row (keyed by its primary key), so the order of a row's dates holds.
* ``safe``    declared safe: kept as it is (classification, see classify.py).
* ``hash`` also masks ``boolean`` (a keyed bit from the value and the primary key) and ``uuid`` (a keyed uuid).

One transaction, one UPDATE per table, with ``session_replication_role = replica`` so user
(and foreign-key) triggers stay quiet; then the foreign keys and deferrable unique keys on
masked columns are checked again, materialized views reading masked tables are refreshed,
and the masked tables analyzed, so ``pg_stats`` keeps no original value.

This module applies; the rest is below it: the rules and their parsing (masking_rules.py), the live
schema and the check of rules against it (masking_schema.py), the SQL of each method (masking_sql.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from ..errors import InvalidInput, TierbaseError
from .masking_owner import hand_over
from .masking_rules import (
    EMAIL_LENGTH,
    HASH_LENGTH,
    INJECTIVE,
    METHODS,
    NUMERIC_TYPES,
    TEXT_TYPES,
    TIME_TYPES,
    MaskRule,
    describe,
    masking_key,
    parse_rules,
)
from .masking_schema import Column, ForeignKey, Rel, Table, _check, check_rules, foreign_keys, load_table
from .masking_sql import _pads, update_statement

#: the face of masking: what callers import from here (the rules, the schema, the SQL live in
#: masking_rules.py, masking_schema.py and masking_sql.py, which import downward in that order)
__all__ = [
    "EMAIL_LENGTH", "HASH_LENGTH", "INJECTIVE", "METHODS", "NUMERIC_TYPES", "TEXT_TYPES", "TIME_TYPES", "Column",
    "ForeignKey", "MaskRule", "Rel", "Table", "apply_masking", "check_rules", "describe", "foreign_keys",
    "load_table", "masking_key", "parse_rules", "update_statement",
]


def apply_masking(conn: psycopg.Connection[Any], rules: list[MaskRule], key: bytes,
                  owner: str | None = None) -> dict[str, Any]:
    """Mask ``rules`` in one transaction on ``conn`` (a superuser session on the branch) and commit.

    With ``owner`` (the branch owner role), the database and its objects are first handed to that
    role and the masking itself runs as it (masking_owner.py), so the owner can work on the branch
    and no user-defined code runs with the superuser's rights.

    Refuses (InvalidInput, nothing changed) when check_rules finds a problem; any failure
    rolls everything back and raises TierbaseError.
    """
    pads = _pads(key)
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise TierbaseError("masking needs a connection with no transaction open",
                            "Commit or roll back first: masking runs in its own transaction")
    t0 = time.perf_counter()
    report: dict[str, Any] = {"rules": describe(rules), "tables": {}, "timings": {}}
    try:
        with conn.transaction():
            _prepare_session(conn)
            if owner is not None:
                report["handed_over"] = hand_over(conn, owner)
                # row_security off: a FORCE ROW LEVEL SECURITY policy must fail loudly, not hide rows
                conn.execute(sql.SQL("SET LOCAL ROLE {}; SET LOCAL row_security = off").format(sql.Identifier(owner)))
            problems, tables = _check(conn, rules)
            if problems:
                raise InvalidInput("; ".join(problems), "Fix the [masking] rules of tierbase.toml; "
                                   "nothing was masked", problems=problems)
            masked = _mask_tables(conn, rules, tables, pads, report)
            report["checked"] = _validate(conn, rules, masked)
            report["refreshed"] = _refresh_views(conn, [oid for t in masked for oid in t.tree])
            for t in masked:
                conn.execute(sql.SQL("ANALYZE {}").format(t.ident))  # pg_stats must not keep original values
            for view in report["refreshed"]:
                conn.execute(sql.SQL("ANALYZE {}").format(sql.SQL(view)))
            # what masking rewrote, as quoted names: an image freezes them before it is snapshotted
            report["relations"] = [t.ident.as_string(conn) for t in masked] + list(report["refreshed"])
    except psycopg.Error as err:
        from .masking_rows import primary_message

        raise TierbaseError(f"masking failed and was rolled back: {primary_message(err)}",
                            "Fix the rule or the data it trips over; the branch holds unmasked data, "
                            "so delete it") from err
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def _prepare_session(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if not (row and row[0]):
        raise TierbaseError("masking needs a superuser connection",
                            "Connect as the compute's superuser (branch_url(..., direct=True))")
    # user and FK triggers stay quiet (constraints: see _validate); no user function can shadow sha256();
    # the key (as bind parameters) must not reach the server log, whatever the parent's logging settings
    conn.execute("SET LOCAL session_replication_role = replica; SET LOCAL statement_timeout = 0; "
                 "SET LOCAL lock_timeout = 0; SET LOCAL search_path = pg_catalog, pg_temp; "
                 "SET LOCAL log_statement = 'none'; SET LOCAL log_min_duration_statement = -1; "
                 "SET LOCAL log_parameter_max_length = 0; SET LOCAL log_parameter_max_length_on_error = 0")


def _mask_tables(conn: psycopg.Connection[Any], rules: list[MaskRule],
                 tables: Mapping[tuple[str, str], Table | None], pads: dict[str, bytes],
                 report: dict[str, Any]) -> list[Table]:
    masked: list[Table] = []
    for qualified, t in tables.items():
        assert t is not None  # check_rules passed
        mine = [r for r in rules if r.qualified == qualified and r.method != "safe"]
        if not mine:
            continue
        t1 = time.perf_counter()
        widths = {r.column: _longest(conn, t, r.column) for r in mine if r.method == "partial"}
        try:
            with conn.transaction():  # a savepoint: on failure, the transaction stays usable to find the row
                cur = conn.execute(update_statement(t, mine, widths), pads)
        except psycopg.Error as err:
            from .masking_rows import failing_row, primary_message  # (it imports this module)

            def update(where: sql.Composable, t: Table = t, mine: list[MaskRule] = mine,
                       widths: dict[str, int] = widths) -> sql.Composed:
                return update_statement(t, mine, widths, where)

            row = failing_row(conn, t, update, pads)
            at = f", row {row}" if row else ""
            raise TierbaseError(f"masking failed and was rolled back: {primary_message(err)} (table "
                                f"{t.schema}.{t.name}{at})", "Fix the rule or the data it trips over; nothing "
                                "was masked and the branch was not made", table=f"{t.schema}.{t.name}",
                                row=row) from None
        name = mine[0].table
        report["tables"][name] = cur.rowcount
        report["timings"][name] = round(time.perf_counter() - t1, 3)
        masked.append(t)
    return masked


def _longest(conn: psycopg.Connection[Any], t: Table, column: str) -> int:
    row = conn.execute(sql.SQL("SELECT max(length({}::text)) FROM {}").format(sql.Identifier(column), t.ident))
    return int((row.fetchone() or [0])[0] or 0)


def _validate(conn: psycopg.Connection[Any], rules: list[MaskRule], masked: list[Table]) -> list[str]:
    """Re-check what replica mode does not: foreign keys and deferrable unique keys on masked columns."""
    checked: list[str] = []
    cols = {(*r.qualified, r.column) for r in rules if r.method != "safe"}
    for fk in foreign_keys(conn, {oid: t for t in masked for oid in t.tree}):
        if not fk.validated or not (any((*fk.child.root, c) in cols for c in fk.child_cols)
                                    or any((*fk.parent.root, c) in cols for c in fk.parent_cols)):
            continue  # NOT VALID keys promise nothing about existing rows
        match = sql.SQL(" AND ").join(sql.SQL("p.{} = c.{}").format(sql.Identifier(p), sql.Identifier(c))
                                      for c, p in zip(fk.child_cols, fk.parent_cols, strict=True))
        present = sql.SQL(" AND ").join(sql.SQL("c.{} IS NOT NULL").format(sql.Identifier(c)) for c in fk.child_cols)
        if _exists(conn, sql.SQL("SELECT 1 FROM {} c WHERE {} AND NOT EXISTS (SELECT 1 FROM {} p WHERE {})").format(
                fk.child.scan, present, fk.parent.scan, match)):
            raise TierbaseError(f"masking broke foreign key {fk.name}: rows reference values that no longer exist",
                                "Mask both sides of the key with the same method (email or hash)")
        checked.append(f"foreign key {fk.name}")
    for t in masked:  # deferrable unique keys are rechecked by a trigger, which replica mode silences
        rows = conn.execute(
            "SELECT c.conname::text, n.nspname::text, r.relname::text, r.relkind::text, ARRAY(SELECT a.attname::text "
            " FROM unnest(c.conkey) k(n) JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n) "
            "FROM pg_constraint c JOIN pg_class r ON r.oid = c.conrelid JOIN pg_namespace n ON n.oid = r.relnamespace "
            "WHERE c.contype IN ('p', 'u') AND c.condeferrable AND c.conparentid = 0 AND c.conrelid = ANY(%s::oid[])",
            (t.tree,)).fetchall()
        for name, schema, table, relkind, keys in rows:
            if not any((t.schema, t.name, k) in cols for k in keys):
                continue
            rel = Rel(schema, table, relkind, (t.schema, t.name))
            if _exists(conn, sql.SQL("SELECT 1 FROM {} GROUP BY {} HAVING count(*) > 1").format(
                    rel.scan, sql.SQL(", ").join(map(sql.Identifier, keys)))):
                raise TierbaseError(f"masking made duplicates in unique key {name}",
                                    "Use email or hash on columns of a unique key")
            checked.append(f"unique key {name}")
    return checked


def _exists(conn: psycopg.Connection[Any], query: sql.Composable) -> bool:
    row = conn.execute(sql.SQL("SELECT EXISTS ({})").format(query)).fetchone()
    return bool(row and row[0])


_VIEWS = """
WITH RECURSIVE dep(oid, relkind, depth) AS (
    SELECT c.oid, c.relkind, 0 FROM pg_class c WHERE c.oid = ANY(%(oids)s::oid[])
  UNION
    SELECT v.oid, v.relkind, dep.depth + 1 FROM dep
    JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
                    AND d.refobjid = dep.oid
    JOIN pg_rewrite r ON r.oid = d.objid
    JOIN pg_class v ON v.oid = r.ev_class AND v.oid <> dep.oid
    WHERE v.relkind IN ('v', 'm') AND dep.depth < 20
)
SELECT format('%%I.%%I', n.nspname, c.relname) FROM dep
JOIN pg_class c ON c.oid = dep.oid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE dep.relkind = 'm' AND c.relispopulated GROUP BY n.nspname, c.relname ORDER BY max(dep.depth), 1
"""


def _refresh_views(conn: psycopg.Connection[Any], oids: list[int]) -> list[str]:
    """Refresh populated materialized views that read masked tables: they hold copies of the originals."""
    views = [str(r[0]) for r in conn.execute(_VIEWS, {"oids": oids})]
    for view in views:
        conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(sql.SQL(view)))
    return views

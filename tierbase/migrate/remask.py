"""Incremental refresh of a masked image: re-mask only the rows (and apply only the migrations) that changed.

A masked image ``I`` is ``mask(S)``: the masking of a read-only snapshot ``S`` of the branch serving a
sensitive tier. When the tier moves on to ``S'`` and the masking rules did not change, ``mask(S')``
differs from ``I`` only where ``S'`` differs from ``S``, because every mask is a function of the row
alone (its values, its primary key and the platform's key; masking.py). So the next image is a
copy-on-write clone of ``I`` brought forward:

    migrations in S' ledger and not in S -> applied to the clone as the owner role (DDL only)
    rows: data diff S -> S' (datadiff.py) -> per table: delete by key, upsert the new rows, then the
          masking UPDATE of the image's rules restricted to those keys, in one transaction
    sequences set to S' values; materialized views reading touched tables refreshed

Whatever this cannot carry over exactly falls back to the full re-mask, with the reason: rules that
changed (the caller compares digests), a ledger that went back (a rollback) or a migration whose text
is not at hand, a migration statement that may write rows (its effect on masked rows would differ),
a table whose shape changed, a table without a primary key whose rows changed, a table whose primary
key is masked (its rows cannot be found by their unmasked key).

The caller opens the connections: superuser sessions over private unix sockets of platform-only
computes (the old and new sources' scratch clones, the new image); this module never connects.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from ..governance.masking import MaskRule, _prepare_session, _refresh_views, load_table, update_statement
from ..governance.masking_sql import _pads
from . import ledger
from .datadiff import DataDiff, Shape, data_diff, delete_sql, shapes, stable_session, upsert_sql
from .files import Migration
from .replay import written_since

#: the migrations ledger differs by construction (applied_at, applied_by) and is no data of the tier's
EXCLUDED_SCHEMAS = (ledger.LEDGER_SCHEMA,)
#: statements a migration may hold and still be applied to the masked image: they change the schema,
#: never rows (a row a migration writes is written from unmasked data on the tier, from masked data here)
DDL_ONLY = frozenset({
    "AlterDomainStmt", "AlterEnumStmt", "AlterFunctionStmt", "AlterSeqStmt", "AlterTableStmt", "CommentStmt",
    "CompositeTypeStmt", "CreateDomainStmt", "CreateEnumStmt", "CreateExtensionStmt", "CreateFunctionStmt",
    "CreateSchemaStmt", "CreateSeqStmt", "CreateStmt", "CreateTrigStmt", "DefineStmt", "DropStmt", "GrantStmt",
    "IndexStmt", "RenameStmt", "TransactionStmt", "VariableSetStmt", "ViewStmt", "AlterOwnerStmt",
    "AlterObjectSchemaStmt", "CreatePolicyStmt", "AlterPolicyStmt", "RuleStmt",
})
BATCH = 2000


class FullRemask(Exception):  # a signal to the caller, not an error a user sees
    """The incremental refresh cannot give what a full re-mask gives; ``why`` says what."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass
class Plan:
    """What the incremental refresh will do, found before anything is written."""

    diff: DataDiff
    migrations: list[Migration] = field(default_factory=list)
    new_tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # table -> every row of S'
    sequences: dict[str, tuple[int, bool]] = field(default_factory=dict)
    shapes: dict[str, Shape] = field(default_factory=dict)  # S' shapes

    def changed(self) -> dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
        """table -> (rows to upsert, rows to delete by key)."""
        out = {t.table: (t.inserted + [after for _, after in t.updated], t.deleted)
               for t in self.diff.tables if t.status == "differs" and t.changed_rows}
        out.update({t: (rows, []) for t, rows in self.new_tables.items() if rows})
        return out


def rules_of(masked_by: list[str]) -> list[MaskRule]:
    """The rules an image was masked with, from its record (``customer.email=email``; marks skipped)."""
    out = []
    for entry in masked_by:
        target, _, method = entry.partition("=")
        table, _, column = target.rpartition(".")
        if method and table and column != "*":
            out.append(MaskRule(table, column, method))
    return out


def new_migrations(old: list[dict[str, Any]], new: list[dict[str, Any]], files: list[Migration]) -> list[Migration]:
    """The migrations ``new``'s ledger has and ``old``'s has not, as files (raises FullRemask when the
    ledger went back, a checksum changed, or a file's text is not at hand)."""
    had = {int(r["version"]): str(r["checksum"]) for r in old}
    now = {int(r["version"]): (str(r["checksum"]), f"V{int(r['version']):04d}__{r['name']}") for r in new}
    gone = [v for v in had if v not in now or now[v][0] != had[v]]
    if gone:
        raise FullRemask(f"the tier's migration ledger went back since the image (version {gone[0]}: a rollback)")
    by_version = {m.version: m for m in files}
    out = []
    for v in sorted(set(now) - set(had)):
        m = by_version.get(v)
        if m is None or m.checksum != now[v][0]:
            raise FullRemask(f"migration {now[v][1]} reached the tier since the image and its text is not at "
                             "hand here (a scheduled refresh)")
        out.append(m)
    return out


def writing_statement(m: Migration) -> str | None:
    """The first statement of ``m`` that is not schema-only (pglast), as ``file:line KIND``; else None."""
    import pglast

    try:
        tree = pglast.parse_sql(m.sql)
    except pglast.parser.ParseError:
        return f"{m.path.name}: does not parse"
    for raw in tree:
        kind = type(raw.stmt).__name__
        if kind not in DDL_ONLY:
            line = m.sql.count("\n", 0, raw.stmt_location or 0) + 1
            return f"{m.path.name}:{line} {kind}"
    return None


def plan(old: psycopg.Connection[Any], new: psycopg.Connection[Any], rules: list[MaskRule],
         files: list[Migration], sensitive: Collection[tuple[str, str]] = (), since: str | None = None) -> Plan:
    """Compare the image's source ``old`` with the tier's state now ``new`` (both unmasked, read only);
    raises FullRemask with the reason when the incremental refresh would not be exact. ``sensitive``:
    the tables declared sensitive (a new one needs its defaults worked out: a full re-mask). ``since``:
    the oldest transaction running on the same branch when ``old`` was taken; then only tables with a
    row version that recent or another row count are diffed (the rest cannot have changed)."""
    migrations = new_migrations(ledger.ledger_rows(old), ledger.ledger_rows(new), files)
    for m in migrations:
        if (bad := writing_statement(m)) is not None:
            raise FullRemask(f"migration {m.label()} may write rows ({bad}); a full re-mask writes them masked")
    diff = data_diff(old, new, a_label="image source", b_label="tier now", exclude_schemas=EXCLUDED_SCHEMAS,
                     tables=None if since is None else _written(old, new, since))
    masked_keys = {(*r.qualified, r.column) for r in rules if r.method != "safe"}
    out = Plan(diff, migrations, shapes=shapes(new, EXCLUDED_SCHEMAS))
    for t in diff.tables:
        if t.status == "same":
            continue
        if t.status == "shape-differs":
            raise FullRemask(f"the shape of {t.table} changed ({t.note.split(';')[0]})")
        if t.status == "no-primary-key":
            raise FullRemask(f"{t.table} has no primary key and its rows changed")
        if t.status == "only-in-a" and not migrations:
            raise FullRemask(f"{t.table} is gone and no migration dropped it")
        if t.status == "only-in-b":
            if not migrations:
                raise FullRemask(f"{t.table} is new and no migration made it")
            shape = out.shapes[t.table]
            if (shape.schema, shape.name) in sensitive or any(r.qualified == (shape.schema, shape.name)
                                                              for r in rules):
                raise FullRemask(f"{t.table} is new and masked: its rules and defaults are worked out whole")
            if not shape.pk:
                raise FullRemask(f"{t.table} is new and has no primary key")
            out.new_tables[t.table] = [r[0] for r in new.execute(
                sql.SQL("SELECT to_jsonb(t.*) FROM {} t").format(shape.ident))]
    for name in out.changed():
        shape = out.shapes[name]
        if any((shape.schema, shape.name, k) in masked_keys for k in shape.pk):
            raise FullRemask(f"the primary key of {name} is masked: its changed rows cannot be found by key")
    out.sequences = {str(k): (int(v), bool(c)) for k, v, c in new.execute(
        "SELECT format('%I.%I', schemaname, sequencename), coalesce(last_value, start_value), "
        "last_value IS NOT NULL FROM pg_sequences")}
    return out


def _written(old: psycopg.Connection[Any], new: psycopg.Connection[Any], since: str) -> list[str]:
    """Tables that may differ: written since ``since`` on ``new`` (replay.written_since), or on one side
    only, or of another shape."""
    sa, sb = shapes(old, EXCLUDED_SCHEMAS), shapes(new, EXCLUDED_SCHEMAS)
    moved = {t for t in set(sa) | set(sb) if t not in sa or t not in sb or sa[t].columns != sb[t].columns
             or sa[t].pk != sb[t].pk}
    return sorted({t for t in written_since(new, old, since) if t in sb} | moved)


def apply_migrations(image: psycopg.Connection[Any], migrations: list[Migration], owner: str) -> list[str]:
    """Apply ``migrations`` to the image as the owner role (as they ran on the tier); their labels."""
    if not migrations:
        return []
    image.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(owner)))
    try:
        done = ledger.apply(image, migrations, actor="tierbase")
    finally:
        image.execute("RESET ROLE")
    return [str(d["label"]) for d in done]


def apply(image: psycopg.Connection[Any], p: Plan, rules: list[MaskRule], key: bytes, owner: str) -> dict[str, Any]:
    """Bring the image's rows to the tier's state now, masked: one transaction, all or nothing."""
    t0 = time.perf_counter()
    pads = _pads(key)
    # the session keeps the compute's own settings (timezone, datestyle): masks that key on a row's text
    # (noise, shift, hash of a bool) must see what a full re-mask sees; rows travel as to_jsonb's JSON
    report: dict[str, Any] = {"tables": {}, "rows_upserted": 0, "rows_deleted": 0, "rows_remasked": 0}
    touched: list[int] = []
    with image.transaction():
        _prepare_session(image)
        image.execute(sql.SQL("SET LOCAL ROLE {}; SET LOCAL row_security = off").format(sql.Identifier(owner)))
        for name, (upserts, deletes) in sorted(p.changed().items()):
            shape = p.shapes[name]
            for i in range(0, len(deletes), BATCH):
                image.execute(delete_sql(shape, batch=True), (json.dumps(deletes[i:i + BATCH], default=str),))
            for i in range(0, len(upserts), BATCH):
                image.execute(upsert_sql(shape, batch=True), (json.dumps(upserts[i:i + BATCH], default=str),))
            remasked = _remask(image, shape, [r for r in rules if r.qualified == (shape.schema, shape.name)],
                               upserts, pads)
            t = load_table(image, shape.schema, shape.name)
            if t is not None:
                touched += t.tree
            report["tables"][name] = {"upserted": len(upserts), "deleted": len(deletes), "remasked": remasked}
            report["rows_upserted"] += len(upserts)
            report["rows_deleted"] += len(deletes)
            report["rows_remasked"] += remasked
        report["sequences"] = _sequences(image, p.sequences)
        report["refreshed"] = _refresh_views(image, touched) if touched else []
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def relations(conn: psycopg.Connection[Any], p: Plan) -> list[str]:
    """The tables ``apply`` wrote rows of, as quoted names (to freeze them afterwards)."""
    return [p.shapes[name].ident.as_string(conn) for name in sorted(p.changed())]


def _remask(conn: psycopg.Connection[Any], shape: Shape, rules: list[MaskRule], rows: list[dict[str, Any]],
            pads: dict[str, bytes]) -> int:
    """The masking UPDATE of one table's rules, on the rows just upserted only (by key)."""
    mine = [r for r in rules if r.method != "safe"]
    if not mine or not rows:
        return 0
    t = load_table(conn, shape.schema, shape.name)
    if t is None:
        return 0
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in shape.pk)
    mine = [r for r in mine if r.column in t.columns]
    total = 0
    for i in range(0, len(rows), BATCH):
        part = json.dumps(rows[i:i + BATCH], default=str)
        where = sql.SQL("({}) IN (SELECT {} FROM jsonb_populate_recordset(NULL::{}, {}::jsonb))").format(
            sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(k)) for k in shape.pk), keys, shape.ident,
            sql.Placeholder("rows"))
        widths = {r.column: _longest(conn, shape, r.column, where, part) for r in mine if r.method == "partial"}
        cur = conn.execute(update_statement(t, mine, widths, where), {**pads, "rows": part})
        total += cur.rowcount
    return total


def _longest(conn: psycopg.Connection[Any], shape: Shape, column: str, where: sql.Composable, rows: str) -> int:
    """The longest value of ``column`` among the rows re-masked (the unrolled partial mask needs it)."""
    got = conn.execute(sql.SQL("SELECT max(length(t.{}::text)) FROM {} t WHERE {}").format(
        sql.Identifier(column), shape.ident, where), {"rows": rows}).fetchone()
    return int(got[0] or 0) if got else 0


def _sequences(conn: psycopg.Connection[Any], values: dict[str, tuple[int, bool]]) -> int:
    """Every sequence as on the tier now (a full re-mask copies them as they are)."""
    n = 0
    for name, (value, called) in values.items():
        if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone() == (None,):
            continue
        conn.execute("SELECT setval(%s::regclass, %s, %s)", (name, value, called))
        n += 1
    return n


def contents(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """table -> a hash of its rows (order-free), for tests and checks: two images of one tier state must
    agree table by table."""
    stable_session(conn)
    out = {}
    for name, shape in shapes(conn, EXCLUDED_SCHEMAS).items():
        row = conn.execute(sql.SQL("SELECT count(*), coalesce(sum(hashtextextended((t.*)::text, 0)::numeric), 0) "
                                   "FROM {} t").format(shape.ident)).fetchone()
        out[name] = f"{row[0]}:{row[1]}" if row else "0:0"
    return out

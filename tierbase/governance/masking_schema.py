"""The live schema masking works on (tables, columns, keys, foreign keys, read from the catalog), and
the check of rules against it: every problem names the rule's key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from .masking_rules import (
    EMAIL_LENGTH,
    HASH_LENGTH,
    HASHABLE,
    INJECTIVE,
    METHODS,
    NUMERIC_TYPES,
    TEXT_TYPES,
    TIME_TYPES,
    MaskRule,
)


@dataclass(frozen=True)
class Column:
    name: str
    type_sql: str  # format_type, for messages
    base: str  # base type name, domains resolved
    typmod: int
    not_null: bool
    generated: bool
    identity_always: bool

    @property
    def length(self) -> int | None:
        """n of varchar(n)/char(n)."""
        return self.typmod - 4 if self.base in ("varchar", "bpchar") and self.typmod >= 4 else None

    @property
    def precision_scale(self) -> tuple[int, int] | None:
        if self.base != "numeric" or self.typmod < 4:
            return None
        mod = self.typmod - 4
        scale = mod & 0x7FF
        return (mod >> 16) & 0xFFFF, scale - 0x800 if scale & 0x400 else scale  # scale may be negative


@dataclass
class Table:
    oid: int
    schema: str
    name: str
    relkind: str
    partition_of: str | None
    columns: dict[str, Column]
    tree: list[int]  # itself and every partition / inheritance child
    primary_key: list[str] = field(default_factory=list)
    unique: set[str] = field(default_factory=set)  # in a unique index: key, expression or predicate
    partition_key: set[str] = field(default_factory=set)
    firing_triggers: list[str] = field(default_factory=list)  # ENABLE ALWAYS / REPLICA: fire in replica mode

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


@dataclass(frozen=True)
class Rel:
    schema: str
    name: str
    relkind: str
    root: tuple[str, str]  # (schema, name) at the top of its partition tree

    @property
    def scan(self) -> sql.Composed:
        """The relation in a FROM: ONLY for a plain table (a foreign key does not cover its inheritors)."""
        return sql.SQL("{}{}").format(sql.SQL("ONLY " if self.relkind == "r" else ""),
                                      sql.Identifier(self.schema, self.name))


@dataclass(frozen=True)
class ForeignKey:
    name: str
    child: Rel
    parent: Rel
    child_cols: tuple[str, ...]
    parent_cols: tuple[str, ...]
    validated: bool


_COLUMNS = """
WITH RECURSIVE chain(attnum, typid, typmod, nn, depth) AS (
    SELECT a.attnum, a.atttypid, a.atttypmod, false, 0
    FROM pg_attribute a WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
    SELECT c.attnum, t.typbasetype, t.typtypmod, t.typnotnull, c.depth + 1
    FROM chain c JOIN pg_type t ON t.oid = c.typid WHERE t.typtype = 'd'
)
SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), bt.typname::text,
       (SELECT max(typmod) FROM chain c WHERE c.attnum = a.attnum),
       a.attnotnull OR (SELECT bool_or(nn) FROM chain c WHERE c.attnum = a.attnum),
       a.attgenerated <> '', a.attidentity = 'a'
FROM pg_attribute a
JOIN LATERAL (SELECT typid FROM chain c WHERE c.attnum = a.attnum ORDER BY depth DESC LIMIT 1) b ON true
JOIN pg_type bt ON bt.oid = b.typid
WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

# primary key; every column a unique index of the tree uses (key, expression or predicate);
# partition key columns; triggers that replica mode does not silence
_KEYS = """
SELECT
  ARRAY(SELECT a.attname::text FROM pg_constraint c, unnest(c.conkey) WITH ORDINALITY k(n, o), pg_attribute a
        WHERE c.conrelid = %(oid)s AND c.contype = 'p' AND a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o),
  ARRAY(SELECT DISTINCT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid
        WHERE i.indisunique AND i.indrelid = ANY(%(tree)s::oid[]) AND a.attnum > 0 AND (a.attnum = ANY(i.indkey::int2[])
          OR EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                     AND d.refobjid = i.indrelid AND d.refobjsubid = a.attnum))),
  ARRAY(SELECT DISTINCT a.attname::text FROM pg_partitioned_table p JOIN pg_attribute a ON a.attrelid = p.partrelid
        WHERE p.partrelid = ANY(%(tree)s::oid[]) AND a.attnum > 0 AND (a.attnum = ANY(p.partattrs::int2[])
          OR EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = p.partrelid
                     AND d.objsubid = 0 AND d.refobjid = p.partrelid AND d.refobjsubid = a.attnum))),
  ARRAY(SELECT DISTINCT t.tgname::text FROM pg_trigger t
        WHERE t.tgrelid = ANY(%(tree)s::oid[]) AND NOT t.tgisinternal AND t.tgenabled IN ('A', 'R'))
"""

_REL = """(SELECT ARRAY[r.oid::text, n.nspname, r.relname, r.relkind::text, rn.nspname, rc.relname]
  FROM pg_class r JOIN pg_namespace n ON n.oid = r.relnamespace
  JOIN pg_class rc ON rc.oid = coalesce(pg_partition_root(r.oid), r.oid)
  JOIN pg_namespace rn ON rn.oid = rc.relnamespace WHERE r.oid = {})"""

_FOREIGN_KEYS = f"""
SELECT c.conname::text, {_REL.format("c.conrelid")}, {_REL.format("c.confrelid")},
    ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
          JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o),
    ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, o)
          JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o), c.convalidated
FROM pg_constraint c WHERE c.contype = 'f' AND c.conparentid = 0
  AND (c.conrelid = ANY(%(oids)s::oid[]) OR c.confrelid = ANY(%(oids)s::oid[]))
"""


def load_table(conn: psycopg.Connection[Any], schema: str, name: str) -> Table | None:
    row = conn.execute(
        "SELECT c.oid::bigint, c.relkind::text, (SELECT format('%%I.%%I', pn.nspname, p.relname) FROM pg_inherits i "
        " JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace "
        " WHERE i.inhrelid = c.oid AND c.relispartition LIMIT 1), "
        " ARRAY(WITH RECURSIVE tree(oid) AS (SELECT c.oid UNION "
        "  SELECT i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.oid) SELECT oid::bigint FROM tree) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (schema, name)).fetchone()
    if row is None:
        return None
    oid, tree = int(row[0]), [int(x) for x in row[3]]
    cols = {str(r[0]): Column(str(r[0]), str(r[1]), str(r[2]), int(r[3] if r[3] is not None else -1),
                              bool(r[4]), bool(r[5]), bool(r[6]))
            for r in conn.execute(_COLUMNS, {"oid": oid})}
    keys = conn.execute(_KEYS, {"oid": oid, "tree": tree}).fetchone()
    assert keys is not None
    return Table(oid, schema, name, str(row[1]), row[2], cols, tree, primary_key=list(keys[0]), unique=set(keys[1]),
                 partition_key=set(keys[2]), firing_triggers=list(keys[3]))


def foreign_keys(conn: psycopg.Connection[Any], owner: Mapping[int, Table]) -> list[ForeignKey]:
    """Every foreign key from or to a table of ``owner`` (its clones on partitions left out).

    A relation's root is the table of ``owner`` whose tree holds it, else its partition root.
    """
    def rel(v: list[str]) -> Rel:
        t = owner.get(int(v[0]))
        return Rel(v[1], v[2], v[3], (t.schema, t.name) if t else (v[4], v[5]))

    rows = conn.execute(_FOREIGN_KEYS, {"oids": list(owner)}).fetchall()
    return [ForeignKey(str(r[0]), rel(r[1]), rel(r[2]), tuple(r[3]), tuple(r[4]), bool(r[5])) for r in rows]


# -- checking rules against the schema ------------------------------------------------------------
def check_rules(conn: psycopg.Connection[Any], rules: list[MaskRule], database: str = "") -> list[str]:
    """Problems of ``rules`` against the live schema, each naming its key; empty when they fit."""
    idle = conn.info.transaction_status == TransactionStatus.IDLE
    try:
        return _check(conn, rules, database)[0]
    finally:  # read only: leave no transaction open behind a caller that had none
        if idle and conn.info.transaction_status != TransactionStatus.IDLE:
            conn.rollback()


def _check(conn: psycopg.Connection[Any], rules: list[MaskRule],
           database: str = "") -> tuple[list[str], dict[tuple[str, str], Table | None]]:
    where = f" in database {database}" if database else ""
    tables = {q: load_table(conn, *q) for q in dict.fromkeys(r.qualified for r in rules)}
    problems = [p for r in rules for p in _rule_problems(r, tables[r.qualified], where)]
    problems += _foreign_key_problems(conn, rules, tables)
    return list(dict.fromkeys(problems)), tables


def _rule_problems(rule: MaskRule, t: Table | None, where: str) -> list[str]:
    key, (schema, name) = rule.key, rule.qualified
    if rule.method not in METHODS:
        return [f"{key}: unknown method {rule.method!r} (use one of {', '.join(METHODS)})"]
    if t is None:
        return [f"{key}: there is no table {schema}.{name}{where}"]
    if t.relkind not in ("r", "p"):
        kind = {"v": "a view", "m": "a materialized view", "f": "a foreign table"}.get(t.relkind, "not a table")
        return [f"{key}: {schema}.{name} is {kind}; mask the tables it reads (materialized views are refreshed)"]
    if t.partition_of:
        return [f"{key}: {schema}.{name} is a partition of {t.partition_of}; put the rule on {t.partition_of}"]
    col = t.columns.get(rule.column)
    if col is None:
        return [f"{key}: table {schema}.{name} has no column {rule.column!r}{where}"]
    return _column_problems(rule, t, col)


def _column_problems(rule: MaskRule, t: Table, col: Column) -> list[str]:
    key, m, out = rule.key, rule.method, []
    if col.generated:
        out.append(f"{key}: {col.name} is a generated column; mask the columns it is computed from")
    if col.identity_always:
        out.append(f"{key}: {col.name} is an identity column (GENERATED ALWAYS) and cannot be updated")
    if m == "null" and col.not_null:
        out.append(f"{key}: null on a NOT NULL column; use redact or hash")
    if m == "noise" and col.base not in NUMERIC_TYPES:
        out.append(f"{key}: noise needs a numeric column, {col.name} is {col.type_sql}")
    if col.base not in (HASHABLE if m == "hash" else TEXT_TYPES) and m in ("email", "hash", "partial", "redact"):
        out.append(f"{key}: {m} needs a text column, {col.name} is {col.type_sql}")
    if m == "shift" and col.base not in TIME_TYPES:
        out.append(f"{key}: shift needs a date or timestamp column, {col.name} is {col.type_sql}")
    n = col.length
    if col.base in TEXT_TYPES and n is not None:
        if m == "email" and n < EMAIL_LENGTH:
            out.append(f"{key}: email writes at least {EMAIL_LENGTH} characters, {col.name} is {col.type_sql}")
        if m == "hash" and n < 8:
            out.append(f"{key}: hash needs at least 8 characters to stay unguessable, {col.name} is {col.type_sql}")
        if m == "hash" and n < 16 and rule.column in t.unique:
            out.append(f"{key}: hash of a unique column needs at least 16 characters, {col.name} is {col.type_sql}")
    if rule.column in t.unique and (m not in (*INJECTIVE, "safe") or (m == "hash" and col.base == "bool")):
        what = "the primary key" if rule.column in t.primary_key else "a unique key"
        out.append(f"{key}: {col.name} is part of {what} and {m} would make duplicates; use email or hash")
    if rule.column in t.partition_key:
        out.append(f"{key}: {col.name} is a partition key column; masking it would move rows between partitions")
    if t.firing_triggers:
        out.append(f"{key}: triggers {', '.join(t.firing_triggers)} on {t.schema}.{t.name} are enabled ALWAYS or "
                   "REPLICA and would fire during masking; set them to plain ENABLE")
    return out


def _foreign_key_problems(conn: psycopg.Connection[Any], rules: list[MaskRule],
                          tables: Mapping[tuple[str, str], Table | None]) -> list[str]:
    """A masked column linked by a foreign key needs the same injective method on the other side."""
    owner = {oid: t for t in tables.values() if t is not None for oid in t.tree}
    by_col = {(*r.qualified, r.column): r for r in rules if r.method != "safe"}
    found: dict[tuple[str, str], list[str]] = {}  # (key, other column) -> foreign keys (one per partition)
    for fk in foreign_keys(conn, owner):
        child, parent = fk.child.root, fk.parent.root
        for cc, pc in zip(fk.child_cols, fk.parent_cols, strict=True):
            a, b = by_col.get((*child, cc)), by_col.get((*parent, pc))
            if (a is None and b is None) or (a is not None and b is None and a.method == "null"):
                continue  # unmasked, or a NULL reference, which satisfies any foreign key
            if a is not None and b is not None and a.method == b.method and a.method in INJECTIVE \
                    and _out_length(a, tables) == _out_length(b, tables):
                continue
            rule = a or b
            assert rule is not None
            other = f"{parent[0]}.{parent[1]}.{pc}" if rule is a else f"{child[0]}.{child[1]}.{cc}"
            found.setdefault((rule.key, other), []).append(fk.name)
    return [f"{key}: foreign key {names[0]}{f' (and {len(names) - 1} more)' if len(names) > 1 else ''} links it "
            f"to {other}; mask both columns with the same method, email or hash (and the same length)"
            for (key, other), names in found.items()]


def _out_length(rule: MaskRule, tables: Mapping[tuple[str, str], Table | None]) -> int:
    t = tables.get(rule.qualified)
    col = t.columns.get(rule.column) if t else None
    n = col.length if col else None
    return min(n, HASH_LENGTH) if n is not None and rule.method == "hash" else HASH_LENGTH

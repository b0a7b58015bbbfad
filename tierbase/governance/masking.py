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
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from ..errors import InvalidInput, TierbaseError
from .masking_owner import hand_over

METHODS = ("email", "hash", "partial", "noise", "null", "redact", "shift", "safe")
#: methods that map distinct values to distinct values (with negligible collision odds)
INJECTIVE = ("email", "hash")
TEXT_TYPES = ("text", "varchar", "bpchar", "citext")
INT_RANGES = {"int2": (-(2**15), 2**15 - 1), "int4": (-(2**31), 2**31 - 1), "int8": (-(2**63), 2**63 - 1)}
NUMERIC_TYPES = (*INT_RANGES, "numeric", "float4", "float8")
TIME_TYPES = ("date", "timestamp", "timestamptz")
HASHABLE = (*TEXT_TYPES, "bool", "uuid")  # hash on bool: a keyed bit per row; on uuid: a keyed uuid
SHIFT_DAYS = 30  # shift: dates and timestamps move back by a keyed whole number of days in [0, 30]
#: what ``email`` counts as a valid address (the HTML living standard's): those become
#: ``u<16 hex>@example.invalid``; any other value keeps its shape (``partial``), so it stays malformed
#: (``\x25`` is ``%``, which psycopg would take for a placeholder)
EMAIL_VALID = (r"^[A-Za-z0-9.!#$\x25&'*+/=?^_`{|}~-]+@[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
               r"(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+$")
EMAIL_LENGTH = 30  # the shortest mask of a valid address: 'u' + 13 hex + '@example.invalid' (else as long)
HASH_LENGTH = 64
UNROLL = 64  # partial: values up to this many characters get the fast, unrolled expression
KEY_CONTEXT = b"tierbase masking v1"


@dataclass(frozen=True)
class MaskRule:
    table: str  # "customer" or "schema.table" (default schema public)
    column: str
    method: str

    @property
    def key(self) -> str:
        """The rule's key in tierbase.toml, for messages: ``masking.customer.email``."""
        return f"masking.{self.table}.{self.column}"

    @property
    def qualified(self) -> tuple[str, str]:
        schema, _, table = self.table.rpartition(".")
        return schema or "public", table


def parse_rules(mapping: Mapping[str, Any]) -> list[MaskRule]:
    """Rules from the ``[masking]`` table; nested tables (TOML dotted keys) are flattened.

    Raises InvalidInput naming every bad key: a key that is not ``table.column`` or
    ``schema.table.column``, an unknown method, or two keys for the same column.
    """
    problems: list[str] = []
    rules: list[MaskRule] = []
    seen: dict[tuple[str, str, str], str] = {}
    for key, method in _flatten({k: v for k, v in mapping.items() if k not in ("sensitive", "image")}):  # classify.py
        parts = key.split(".")
        if len(parts) not in (2, 3) or not all(p and p == p.strip() and '"' not in p for p in parts):
            problems.append(f"masking.{key}: a rule's key is table.column or schema.table.column")
            continue
        if not isinstance(method, str) or method not in METHODS:
            problems.append(f"masking.{key}: unknown method {method!r} (use one of {', '.join(METHODS)})")
            continue
        rule = MaskRule(".".join(parts[:-1]), parts[-1], method)
        ident = (*rule.qualified, rule.column)
        if ident in seen:
            problems.append(f"masking.{key}: the same column as masking.{seen[ident]}")
            continue
        seen[ident] = key
        rules.append(rule)
    if problems:
        raise InvalidInput("; ".join(problems), "Fix the [masking] table of tierbase.toml", problems=problems)
    return rules


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def describe(rules: Iterable[MaskRule]) -> list[str]:
    """One line per rule for `branch show`: ``customer.email=email``."""
    return [f"{r.table}.{r.column}={r.method}" for r in rules]


def masking_key(secret: bytes) -> bytes:
    """The HMAC key masking uses, derived from the project's secret (never used raw)."""
    if not secret:
        raise InvalidInput("the masking key is empty", "Give the project's secret as the masking key")
    return hmac.new(secret, KEY_CONTEXT, hashlib.sha256).digest()


# -- the live schema ---------------------------------------------------------------------------------
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


# -- SQL for each method ----------------------------------------------------------------------------------
def _mac(method: str, value: sql.Composable) -> sql.Composed:
    """HMAC-SHA256(key, method || ':' || value) in SQL: sha256(opad || sha256(ipad || message))."""
    return sql.SQL("sha256({o} || sha256({i} || convert_to({tag} || {v}, 'UTF8')))").format(
        o=sql.Placeholder("opad"), i=sql.Placeholder("ipad"), tag=sql.Literal(method + ":"), v=value)


def _pads(secret: bytes) -> dict[str, bytes]:
    key = masking_key(secret).ljust(64, b"\0")
    return {"ipad": bytes(b ^ 0x36 for b in key), "opad": bytes(b ^ 0x5C for b in key)}


def _expression(rule: MaskRule, t: Table, col: Column, width: int | None = None) -> sql.Composable:
    c = sql.SQL("t.{}").format(sql.Identifier(col.name))
    text = sql.SQL("{}::text").format(c)
    n = col.length
    if rule.method == "email":  # a valid address stays valid, a malformed one keeps its defect (see EMAIL_VALID)
        # (an address with capitals gets capitals: checks like ``email = lower(email)`` keep their outcome)
        return sql.SQL("CASE WHEN {v} ~ {re} THEN CASE WHEN {v} = lower({v}) THEN {e} ELSE upper({e}) END "
                       "ELSE {p} END").format(
            v=text, re=sql.Literal(EMAIL_VALID), p=_partial(text, None),
            e=sql.SQL("'u' || substr(encode({m}, 'hex'), 1, least(64, greatest(13, char_length({v}) - 17))) "
                      "|| '@example.invalid'").format(m=_mac("email", text), v=text))
    if rule.method == "hash" and col.base == "uuid":
        return sql.SQL("substr(encode({}, 'hex'), 1, 32)::uuid").format(_mac("hash", text))
    if rule.method == "hash" and col.base == "bool":
        return sql.SQL("CASE WHEN {} IS NULL THEN NULL ELSE mod({}, 2) = 1 END").format(c, _row_u32(t, col, c, "hash"))
    if rule.method == "shift":  # back only (nothing moves into the future), and by the row's key alone, so the
        # columns of one row move together: checks like ``return_date >= rental_date`` keep their outcome
        days = sql.SQL("(-mod({}, {}))::int").format(_row_u32(t, col, c, "shift", by_key=True),
                                                     sql.Literal(SHIFT_DAYS + 1))
        step = days if col.base == "date" else sql.SQL("{} * interval '1 day'").format(days)
        return sql.SQL("CASE WHEN {c} IS NULL THEN NULL ELSE {c} + {s} END").format(c=c, s=step)
    if rule.method == "safe":
        return c
    if rule.method == "hash":  # '' stays '' (an empty value is a shape tests look for)
        return sql.SQL("CASE WHEN {v} = '' THEN '' ELSE left(encode({m}, 'hex'), {n}) END").format(
            v=text, m=_mac("hash", text), n=sql.Literal(min(n or HASH_LENGTH, HASH_LENGTH)))
    if rule.method == "partial":
        return _partial(text, width)
    if rule.method == "noise":
        return _noise(t, col, c)
    if rule.method == "redact":
        return sql.SQL("CASE WHEN {} IS NULL THEN NULL ELSE {} END").format(c, sql.Literal("REDACTED"[:n]))
    return sql.SQL("NULL")


def _partial(v: sql.Composable, width: int | None) -> sql.Composed:
    """Shape-keeping mask. Values up to UNROLL characters (the common case: phones, cards) are
    done with one expression per position, about 4x faster than a per-row set-returning subquery."""
    keep = sql.SQL("length({v}) - CASE WHEN length({v}) >= 6 THEN 2 ELSE 0 END").format(v=v)
    if width is not None and width <= UNROLL:
        terms = [_partial_char(sql.SQL("k.c[{}]").format(sql.Literal(i)), sql.Literal(i), sql.Literal((i - 1) % 32))
                 for i in range(1, max(width, 1) + 1)]
        return sql.SQL("(SELECT {} FROM (SELECT {} AS h, string_to_array({}, NULL) AS c, {} AS n OFFSET 0) k)").format(
            sql.SQL(" || ").join(terms), _mac("partial", v), v, keep)
    char = _partial_char(sql.SQL("u.ch"), sql.SQL("u.i"), sql.SQL("mod(u.i::int - 1, 32)"))
    return sql.SQL(
        "CASE WHEN {v} IS NULL THEN NULL ELSE coalesce((SELECT string_agg({char}, '' ORDER BY u.i)"
        " FROM (SELECT {mac} AS h, {keep} AS n OFFSET 0) k,"
        " unnest(string_to_array({v}, NULL)) WITH ORDINALITY u(ch, i)), '') END"
    ).format(v=v, char=char, mac=_mac("partial", v), keep=keep)


def _partial_char(ch: sql.Composable, i: sql.Composable, offset: sql.Composable) -> sql.Composed:
    """One character of ``partial``: digits and letters from the HMAC's bytes, ASCII punctuation kept."""
    b = sql.SQL("get_byte(k.h, {})").format(offset)
    return sql.SQL(
        "CASE WHEN {i} > k.n THEN coalesce({ch}, '')"
        " WHEN ascii({ch}) BETWEEN 48 AND 57 THEN chr(48 + mod({b}, 10))"
        " WHEN ascii({ch}) BETWEEN 65 AND 90 THEN chr(65 + mod({b}, 26))"
        " WHEN ascii({ch}) BETWEEN 97 AND 122 OR ascii({ch}) > 127 THEN chr(97 + mod({b}, 26))"
        " ELSE {ch} END").format(i=i, ch=ch, b=b)


def _row_u32(t: Table, col: Column, c: sql.Composable, method: str, by_key: bool = False) -> sql.Composed:
    """32 keyed bits from the value and the row's primary key (so equal values of two rows differ);
    ``by_key``: from the key alone when there is one (every column of the row gets the same bits)."""
    keys = [sql.SQL("t.{}::text").format(sql.Identifier(k)) for k in t.primary_key if k != col.name]
    parts = keys if by_key and keys else [sql.SQL("{}::text").format(c), *keys]
    message = sql.SQL("concat_ws(chr(31), {})").format(sql.SQL(", ").join(parts))
    return sql.SQL("('x' || substr(encode({}, 'hex'), 1, 8))::bit(32)::bigint").format(_mac(method, message))


def _noise(t: Table, col: Column, c: sql.Composable) -> sql.Composed:
    u32 = _row_u32(t, col, c, "noise")
    factor = sql.SQL("(0.9 + 0.2 * {}::numeric / 4294967295)").format(u32)
    if col.base in ("float4", "float8"):
        return sql.SQL("{} * {}::float8").format(c, factor)
    if col.base in INT_RANGES:
        lo, hi = INT_RANGES[col.base]
        return _clamp(sql.SQL("round({} * {})").format(c, factor), Decimal(lo), Decimal(hi))
    ps = col.precision_scale
    if ps is None:
        return sql.SQL("round({c} * {f}, scale({c}))").format(c=c, f=factor)
    precision, scale = ps
    top = Decimal(10) ** (precision - scale) - Decimal(10) ** (-scale)
    return _clamp(sql.SQL("round({} * {}, {})").format(c, factor, sql.Literal(scale)), -top, top)


def _clamp(value: sql.Composable, lo: Decimal, hi: Decimal) -> sql.Composed:
    return sql.SQL("least(greatest({}, {}::numeric), {}::numeric)").format(value, *map(sql.Literal, (str(lo), str(hi))))


def update_statement(t: Table, rules: list[MaskRule], widths: Mapping[str, int] | None = None,
                     where: sql.Composable | None = None) -> sql.Composed:
    """One UPDATE for the rules of one table (``widths``: longest value of each partial column, see _partial)."""
    rules = [r for r in rules if r.method != "safe"]
    sets = [sql.SQL("{} = {}").format(sql.Identifier(r.column),
                                      _expression(r, t, t.columns[r.column], (widths or {}).get(r.column)))
            for r in rules]
    touched = [sql.SQL("t.{} IS NOT NULL").format(sql.Identifier(r.column)) for r in rules]
    cond = sql.SQL("({})").format(sql.SQL(" OR ").join(touched))
    if where is not None:
        cond = sql.SQL("{} AND ({})").format(cond, where)
    return sql.SQL("UPDATE {} AS t SET {} WHERE {}").format(t.ident, sql.SQL(", ").join(sets), cond)


# -- applying -------------------------------------------------------------------------------------------------
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

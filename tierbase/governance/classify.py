"""Classification: every column of a table declared sensitive is masked by a rule or declared safe.

``[masking] sensitive = ["customer", "public.address"]`` declares tables whose every column is
personal unless said otherwise. A column of such a table is *classified* by a rule
(``customer.email = "email"``) or declared safe (``customer.store_id = "safe"``); a column nobody
classified is masked with a default for its type, never shown raw:

=====================================  ==========================================================
column                                 default
=====================================  ==========================================================
non-text primary/foreign key, identity ``safe``: a surrogate key is no personal data, and masking it
                                       would break every reference and sequence
text in a unique or foreign key        ``hash`` (injective, the same on both sides of a key)
other text                             ``partial`` (length, case and punctuation kept)
numbers                                ``noise``;  dates, timestamps: ``shift``
boolean, uuid                          ``hash`` (a keyed bit per row; a keyed uuid)
generated columns                      recomputed from the masked columns
anything else, nullable                ``null``
=====================================  ==========================================================

Where no default fits (a unique number, a NOT NULL json, a partition key), loading the config
is refused naming the column's key, so that somebody decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import psycopg

from ..errors import InvalidInput
from .masking_rules import HASH_LENGTH, NUMERIC_TYPES, TEXT_TYPES, TIME_TYPES, MaskRule
from .masking_schema import Column, Table, _column_problems, foreign_keys, load_table

Col3 = tuple[str, str, str]
MARK = "*=sensitive"  # recorded on a branch for each sensitive table its defaults were applied to


def sensitive_tables(masking: Mapping[str, Any]) -> list[str]:
    """The ``sensitive`` list of the ``[masking]`` table; InvalidInput naming the key when malformed."""
    raw = masking.get("sensitive", [])
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise InvalidInput("masking.sensitive: a list of table names is expected",
                           'Write `sensitive = ["customer", "public.address"]` in the [masking] table')
    bad = [x for x in raw if len(x.split(".")) not in (1, 2) or not all(p and p == p.strip() for p in x.split("."))]
    if bad:
        raise InvalidInput(f"masking.sensitive: {', '.join(map(repr, bad))} is not a table or schema.table name",
                           "Name each table as `customer` or `schema.customer`")
    return list(dict.fromkeys(raw))


def image_tiers(masking: Mapping[str, Any]) -> list[str]:
    """The ``image`` list of the ``[masking]`` table: tiers that keep a masked image (app_images.py)."""
    raw = masking.get("image", [])
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise InvalidInput("masking.image: a list of tier names is expected",
                           'Write `image = ["production"]` in the [masking] table')
    return list(dict.fromkeys(raw))


def qualified(table: str) -> tuple[str, str]:
    schema, _, name = table.rpartition(".")
    return schema or "public", name


def masked_columns(entries: Iterable[str]) -> set[tuple[str, str, str]]:
    """(schema, table, column) of every column an applied-rules list (``Branch.masked_by``) names."""
    out = set()
    for entry in entries:
        target = entry.partition("=")[0]
        table, _, column = target.rpartition(".")
        if table and column != "*":
            out.add((*qualified(table), column))
    return out


def default_rules(conn: psycopg.Connection[Any], rules: list[MaskRule], sensitive: list[str],
                  done: Iterable[str] = (), database: str = "") -> tuple[list[MaskRule], list[str]]:
    """Rules for the unclassified columns of ``sensitive`` tables (none for columns ``rules`` or an
    earlier masking, ``done``, covered), and the problems found, each naming its key."""
    where = f" in database {database}" if database else ""
    covered = {(*r.qualified, r.column) for r in rules} | masked_columns(done)
    out: list[MaskRule] = []
    problems: list[str] = []
    for name in sensitive:
        schema, table = qualified(name)
        t = load_table(conn, schema, table)
        if t is None or t.relkind not in ("r", "p") or t.partition_of:
            why = "there is no table" if t is None else "it is not a table (nor the root of its partitions):"
            problems.append(f"masking.sensitive: {why} {schema}.{table}{where}")
            continue
        keys = _key_columns(conn, t)
        for col in t.columns.values():
            if (schema, table, col.name) in covered:
                continue
            method, why = default_method(t, col, keys)
            if method is None:
                problems.append(f"masking.{name}.{col.name}: unclassified column of the sensitive table "
                                f"{schema}.{table} and no default mask fits ({why}); declare it safe "
                                f"(`{name}.{col.name} = \"safe\"`) or give it a rule")
            elif method != "generated":
                out.append(MaskRule(name, col.name, method))
    return out, problems


def default_method(t: Table, col: Column, keys: set[str]) -> tuple[str | None, str]:
    """The default mask of an unclassified column, or None and why no default fits."""
    unique = col.name in t.unique
    if col.generated:
        return "generated", ""
    if col.name in t.partition_key:
        return None, "a partition key column"
    if col.identity_always or (col.name in keys | set(t.primary_key) and col.base not in TEXT_TYPES):
        return "safe", "surrogate key"
    if col.base in TEXT_TYPES:
        if unique or col.name in keys:
            n = col.length
            return ("hash", "") if n is None or n >= min(16, HASH_LENGTH) else (None, f"unique {col.type_sql}")
        return "partial", ""
    if unique:
        return None, f"a unique {col.type_sql} column"
    if col.base in NUMERIC_TYPES:
        return "noise", ""
    if col.base in TIME_TYPES:
        return "shift", ""
    if col.base in ("bool", "uuid"):
        return "hash", ""
    if not col.not_null:
        return "null", ""
    return None, f"NOT NULL {col.type_sql}"


def _key_columns(conn: psycopg.Connection[Any], t: Table) -> set[str]:
    """Columns of ``t`` on either side of a foreign key."""
    out: set[str] = set()
    for fk in foreign_keys(conn, {oid: t for oid in t.tree}):
        if fk.child.root == (t.schema, t.name):
            out.update(fk.child_cols)
        if fk.parent.root == (t.schema, t.name):
            out.update(fk.parent_cols)
    return out


def fit_rules(conn: psycopg.Connection[Any], rules: list[MaskRule], retired: Mapping[Col3, str],
              inherited: set[Col3]) -> tuple[list[MaskRule], list[str]]:
    """The rules that apply to the live schema, and notes on the others.

    A rule for a column that is gone is skipped when a migration retired it (dropped, renamed:
    ``retired`` says why) or when it was inherited (a derivation recorded on a branch that never got
    here); any other missing column stays, for check_rules to name. An inherited rule that does not
    fit the column's type (``length(email)`` into an integer) becomes that type's default.
    """
    out: list[MaskRule] = []
    notes: list[str] = []
    tables: dict[tuple[str, str], Table | None] = {}
    for r in rules:
        col = (*r.qualified, r.column)
        if r.qualified not in tables:
            tables[r.qualified] = load_table(conn, *r.qualified)
        t = tables[r.qualified]
        if t is not None and col in inherited and r.column.startswith("#"):
            # `INSERT INTO t SELECT ...` without a column list fills t by position: the N-th column
            names = list(t.columns)
            n = int(r.column[1:]) if r.column[1:].isdigit() else 0
            if 0 < n <= len(names):
                if any(x.qualified == r.qualified and x.column == names[n - 1] for x in rules):
                    continue  # a rule of its own for that column wins
                r = MaskRule(r.table, names[n - 1], r.method)
        c = t.columns.get(r.column) if t is not None else None
        if c is None or t is None:
            if col in retired:
                notes.append(f"{r.key} is stale and was skipped: {retired[col]}")
                continue
            if col in inherited:
                continue
            out.append(r)
            continue
        if col in inherited and _column_problems(r, t, c):
            method, _ = default_method(t, c, _key_columns(conn, t))
            fitted = method is not None and method != "generated"
            out.append(MaskRule(r.table, r.column, str(method)) if fitted else r)  # unfitted: check_rules names it
            continue
        out.append(r)
    return out, notes

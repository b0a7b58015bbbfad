"""Which row a failing mask trips over, named by its key, never by its content.

Postgres' own error for a failing UPDATE carries the row's content (``DETAIL: Failing row contains
(...)``), which is the unmasked data: it must reach neither the caller nor the audit trail. When a
table's masking UPDATE fails, the platform bisects the table's primary key range (each try in a
savepoint that is always rolled back) to the first row that fails and names that row by its primary
key, or by its ``ctid`` when the key itself is text (which may be the personal data).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from .masking_rules import TEXT_TYPES
from .masking_schema import Table


def primary_message(err: psycopg.Error) -> str:
    """The error's first line without DETAIL/CONTEXT (which can quote row content)."""
    diag = getattr(err, "diag", None)
    msg = diag.message_primary if diag is not None and diag.message_primary else str(err).splitlines()[0]
    return str(msg).strip()


def failing_row(conn: psycopg.Connection[Any], t: Table, update: Callable[[sql.Composable], sql.Composed],
                params: dict[str, Any]) -> str | None:
    """The id of the first row (in primary key order) on which ``update(condition)`` fails; None when
    the table has no primary key or the failure does not reproduce row by row."""
    if not t.primary_key:
        return None
    cols = [sql.Identifier(k) for k in t.primary_key]
    keys = [tuple(r) for r in conn.execute(sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
        sql.SQL(", ").join(cols), t.ident, sql.SQL(", ").join(cols)))]
    if not keys:
        return None
    row = sql.SQL("ROW({})").format(sql.SQL(", ").join(sql.SQL("t.{}").format(c) for c in cols))

    def fails(i: int, j: int) -> bool:
        lo = [f"lo{n}" for n in range(len(cols))]
        hi = [f"hi{n}" for n in range(len(cols))]
        cond = sql.SQL("{r} >= ROW({lo}) AND {r} <= ROW({hi})").format(
            r=row, lo=sql.SQL(", ").join(map(sql.Placeholder, lo)), hi=sql.SQL(", ").join(map(sql.Placeholder, hi)))
        args = {**params, **dict(zip(lo, keys[i], strict=True)), **dict(zip(hi, keys[j], strict=True))}
        try:
            with conn.transaction():
                conn.execute(update(cond), args)
                raise psycopg.Rollback()
        except psycopg.Error:
            return True
        return False

    lo, hi = 0, len(keys) - 1
    if not fails(lo, hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if fails(lo, mid):
            hi = mid
        else:
            lo = mid + 1
    if any(t.columns[k].base in TEXT_TYPES for k in t.primary_key if k in t.columns):
        got = conn.execute(sql.SQL("SELECT ctid::text FROM {} t WHERE {} = ROW({})").format(
            t.ident, row, sql.SQL(", ").join(sql.Placeholder() for _ in cols)), keys[lo]).fetchone()
        return f"ctid {got[0]}" if got else None
    return ", ".join(f"{k}={v}" for k, v in zip(t.primary_key, keys[lo], strict=True))

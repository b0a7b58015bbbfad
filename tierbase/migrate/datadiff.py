"""Row-level data diff between two databases (two branches), by chunked key-range hashing.

For every table both sides have with the same shape and a primary key, the
rows are compared range by range of the key, on both computes at once:

    a range's (count, bit_xor of hashtextextended(row text)) on A and on B
    -> equal: the range is the same, nothing more is read
    -> different and small (<= ``leaf`` rows): fetch (key, row hash) of both sides and compare
    -> different and large: split it at keys of the side with more rows, compare each part

So the bytes moved grow with the number of differing rows, not with the size
of the table (a table that did not change costs one aggregate per chunk per
side). Keys are read and passed as their text form and cast back to their
type, so any key type with a btree order works (text, bytea, uuid, composite
keys). Tables without a primary key, tables of different shapes and tables on
one side only are reported as such, never compared row by row.

The caller opens the connections (the platform's own roles over the compute's
unix socket); this module reads, and writes nothing.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import set_json_loads

__all__ = ["DataDiff", "Shape", "TableDiff", "data_diff", "delete_sql", "shapes", "stable_session", "upsert_sql"]

#: rows per range at the top level (small: with scattered changes, few ranges then differ, and only
#: those are hashed again); a range of at most ``LEAF`` rows is compared key by key
CHUNK = 256
#: composite keys are compared range by range, one query each: fewer, larger ranges at the top
COMPOSITE_CHUNK = 4096
FANOUT = 64
LEAF = 32
#: the rows of each kind kept in a report's text form
TEXT_ROWS = 10

_SYSTEM = ("pg_catalog", "information_schema", "pg_toast")

_SHAPES = """
SELECT n.nspname, c.relname, c.relkind::text,
       (SELECT json_agg(json_build_array(a.attname, format_type(a.atttypid, a.atttypmod), a.attgenerated::text,
                                         a.attidentity::text, (SELECT typlen FROM pg_type WHERE oid = a.atttypid))
                         ORDER BY a.attnum)
          FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS cols,
       (SELECT json_agg(a.attname ORDER BY array_position(i.indkey::int2[], a.attnum))
          FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
         WHERE i.indrelid = c.oid AND i.indisprimary) AS pk
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
   AND n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg\\_temp\\_%%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%%'
 ORDER BY 1, 2
"""


@dataclass(frozen=True)
class Shape:
    """A table as the diff sees it: its columns (name, type) in order and its primary key."""

    schema: str
    name: str
    columns: tuple[tuple[str, str], ...]
    pk: tuple[str, ...]
    generated: frozenset[str] = frozenset()
    identity_always: bool = False
    #: the key is one column of a fixed-length type (int, bigint, uuid, timestamp, ...)
    fixed_key: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def ident(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.name)

    def key_types(self) -> list[str]:
        types = dict(self.columns)
        return [types[k] for k in self.pk]

    def writable(self) -> list[str]:
        """Columns an INSERT may name (generated columns are computed)."""
        return [c for c, _ in self.columns if c not in self.generated]


def stable_session(conn: psycopg.Connection[Any]) -> None:
    """Settings that make a row's text form the same on both sides, whatever a branch's defaults say;
    JSON numbers are read as Decimal so that a numeric survives the round trip into SQL exactly."""
    set_json_loads(_loads, conn)
    for stmt in ("SET datestyle = 'ISO, MDY'", "SET intervalstyle = 'postgres'", "SET timezone = 'UTC'",
                 "SET extra_float_digits = 1", "SET bytea_output = 'hex'", "SET search_path = pg_catalog"):
        conn.execute(stmt.encode())


def _loads(text: str | bytes) -> Any:
    return json.loads(text, parse_float=Decimal)


def shapes(conn: psycopg.Connection[Any], schemas_excluded: Iterable[str] = ()) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    for schema, name, _kind, cols, pk in conn.execute(_SHAPES, (list(_SYSTEM) + list(schemas_excluded),)):
        cols = cols or []
        out[f"{schema}.{name}"] = Shape(
            schema, name, tuple((c[0], c[1]) for c in cols), tuple(pk or ()),
            generated=frozenset(c[0] for c in cols if c[2]), identity_always=any(c[3] == "a" for c in cols),
            fixed_key=len(pk or ()) == 1 and any(c[0] == pk[0] and int(c[4]) > 0 for c in cols))
    return out


@dataclass
class TableDiff:
    """What differs in one table, A -> B: rows are ``to_jsonb`` objects (B's for inserted and updated)."""

    table: str
    status: str  # same | differs | no-primary-key | shape-differs | only-in-a | only-in-b
    inserted: list[dict[str, Any]] = field(default_factory=list)
    updated: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    deleted: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""
    pk: tuple[str, ...] = ()

    @property
    def changed_rows(self) -> int:
        return len(self.inserted) + len(self.updated) + len(self.deleted)

    def to_dict(self) -> dict[str, Any]:
        return {"table": self.table, "status": self.status, "note": self.note, "primary_key": list(self.pk),
                "counts": {"inserted": len(self.inserted), "updated": len(self.updated),
                           "deleted": len(self.deleted)},
                "inserted": self.inserted, "deleted": self.deleted,
                "updated": [{"before": b, "after": a} for b, a in self.updated]}


@dataclass
class DataDiff:
    a: str
    b: str
    tables: list[TableDiff] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    shapes_a: dict[str, Shape] = field(default_factory=dict)
    shapes_b: dict[str, Shape] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return all(t.status == "same" for t in self.tables)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "empty": self.empty, "stats": self.stats,
                "tables": [t.to_dict() for t in self.tables if t.status != "same"]}

    def to_text(self) -> str:
        lines = [f"data diff {self.a} -> {self.b}"]
        for t in self.tables:
            if t.status == "same":
                continue
            if t.status != "differs":
                lines.append(f"  {t.table}: {t.status}{': ' + t.note if t.note else ''}")
                if not t.changed_rows:
                    continue
            lines.append(f"  {t.table}: +{len(t.inserted)} inserted, ~{len(t.updated)} updated, "
                         f"-{len(t.deleted)} deleted")
            for sign, rows in (("+", t.inserted), ("-", t.deleted)):
                for r in rows[:TEXT_ROWS]:
                    lines.append(f"    {sign} {json.dumps(r, sort_keys=True, default=str)}")
            for before, after in t.updated[:TEXT_ROWS]:
                changed = {k: [before.get(k), v] for k, v in after.items() if before.get(k) != v}
                lines.append(f"    ~ {json.dumps({k: after.get(k) for k in t.pk}, default=str)} "
                             f"{json.dumps(changed, sort_keys=True, default=str)}")
            more = t.changed_rows - min(TEXT_ROWS, len(t.inserted)) - min(TEXT_ROWS, len(t.deleted)) \
                - min(TEXT_ROWS, len(t.updated))
            if more > 0:
                lines.append(f"    ... and {more} more (--format json or sql for all)")
        if self.empty:
            lines.append("  (no differences)")
        s = self.stats
        lines.append(f"{s.get('rows_compared', 0)} rows compared in {s.get('seconds', 0)} s, "
                     f"{s.get('bytes_moved', 0)} bytes moved, {s.get('queries', 0)} queries")
        return "\n".join(lines)

    def to_sql(self) -> str:
        """Statements that make A's data equal to B's, for the tables compared row by row."""
        out = [f"-- data diff {self.a} -> {self.b}: apply on {self.a}", "BEGIN;"]
        for t in self.tables:
            if t.status != "differs":
                if t.status != "same":
                    out.append(f"-- {t.table}: {t.status} (not compared row by row){': ' + t.note if t.note else ''}")
                continue
            shape = self.shapes_a[t.table]
            for row in t.inserted + [after for _, after in t.updated]:
                out.append(render(upsert_sql(shape), row) + ";")
            for row in t.deleted:
                out.append(render(delete_sql(shape), row) + ";")
        out.append("COMMIT;")
        return "\n".join(out) + "\n"


def _rows_of(batch: bool) -> sql.SQL:
    """One row given as a JSON object, or a batch of them as a JSON array (placeholder %s)."""
    return sql.SQL("jsonb_populate_recordset" if batch else "jsonb_populate_record")


def upsert_sql(shape: Shape, columns: list[str] | None = None, *, batch: bool = False) -> sql.Composed:
    """INSERT ... ON CONFLICT (pk) DO UPDATE of one row given as JSON, or of a JSON array of rows."""
    cols = columns or shape.writable()
    names = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
    rest = [c for c in cols if c not in shape.pk]
    action = sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in rest)) if rest else sql.SQL("DO NOTHING")
    return sql.SQL("INSERT INTO {t} ({cols}) {ov}SELECT {cols} FROM {rows}(NULL::{t}, %s::jsonb) "
                   "ON CONFLICT ({pk}) {action}").format(
        t=shape.ident, cols=names, ov=sql.SQL("OVERRIDING SYSTEM VALUE " if shape.identity_always else ""),
        rows=_rows_of(batch), pk=sql.SQL(", ").join(sql.Identifier(k) for k in shape.pk), action=action)


def delete_sql(shape: Shape, *, batch: bool = False) -> sql.Composed:
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in shape.pk)
    return sql.SQL("DELETE FROM {t} WHERE ({k}) IN (SELECT {k} FROM {rows}(NULL::{t}, %s::jsonb))"
                   ).format(t=shape.ident, k=keys, rows=_rows_of(batch))


def render(stmt: sql.Composed, row: dict[str, Any]) -> str:
    return stmt.as_string(None).replace("%s", sql.quote(json.dumps(row, default=str)), 1)  # type: ignore[arg-type]


# -- the comparison -------------------------------------------------------------------------------------------
class _Side:
    """One database: its connection and the counters of what was read from it."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.bytes = 0
        self.queries = 0
        self.rows_hashed = 0

    def rows(self, query: sql.Composed, params: list[Any]) -> list[tuple[Any, ...]]:
        got: list[tuple[Any, ...]] = self.conn.execute(query, params).fetchall()
        self.queries += 1
        self.bytes += sum(len(str(v)) for r in got for v in r if v is not None)
        return got


Key = tuple[str, ...]
Range = tuple[Key | None, Key | None]  # lo inclusive, hi exclusive; None is open


class _Table:
    def __init__(self, shape: Shape, a: _Side, b: _Side, pool: ThreadPoolExecutor, chunk: int, leaf: int,
                 columns: list[str] | None = None) -> None:
        self.shape, self.a, self.b, self.pool, self.chunk, self.leaf = shape, a, b, pool, chunk, leaf
        # the row's text: the whole row, or (tables whose shapes differ) the columns both sides share
        # ``t.*``, not ``t``: a bare ``t`` names a column called t before the row (a table with one lost rows)
        self.row = sql.SQL("(t.*)::text") if columns is None else sql.SQL("ROW({})::text").format(
            sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in columns))
        self.keys = sql.SQL(", ").join(sql.Identifier(k) for k in shape.pk)
        self.key_text = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in shape.pk)
        self.diff = TableDiff(shape.qualified, "same", pk=shape.pk)
        self.only_a: list[Key] = []
        self.only_b: list[Key] = []
        self.changed: list[Key] = []

    def _cond(self, rng: Range) -> tuple[sql.Composable, list[Any]]:
        parts: list[sql.Composable] = []
        params: list[Any] = []
        casts = sql.SQL(", ").join(sql.SQL("%s::" + t) for t in self.shape.key_types())
        for bound, op in ((rng[0], ">="), (rng[1], "<")):
            if bound is not None:
                parts.append(sql.SQL("({}) {} ({})").format(self.keys, sql.SQL(op), casts))
                params.extend(bound)
        return (sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")), params

    def _both(self, fn: Callable[[_Side], Any]) -> tuple[Any, Any]:
        fa, fb = self.pool.submit(fn, self.a), self.pool.submit(fn, self.b)
        return fa.result(), fb.result()

    def _agg(self, side: _Side, rng: Range) -> tuple[int, int]:
        cond, params = self._cond(rng)
        q = sql.SQL("SELECT count(*), coalesce(bit_xor(hashtextextended({}, 0)), 0) "
                    "FROM {} t WHERE {}").format(self.row, self.shape.ident, cond)
        n, h = side.rows(q, params)[0]
        side.rows_hashed += int(n)
        return int(n), int(h)

    def _bounds(self, side: _Side, rng: Range, step: int) -> tuple[list[Key], int]:
        """Every ``step``-th key of ``side`` in the range (split points), and the range's row count."""
        cond, params = self._cond(rng)
        q = sql.SQL("SELECT {kt}, rn, total FROM (SELECT {k}, row_number() OVER (ORDER BY {k}) AS rn, "
                    "count(*) OVER () AS total FROM {t} WHERE {c}) s WHERE rn %% {step} = 1 OR rn = total "
                    "ORDER BY rn").format(kt=self.key_text, k=self.keys, t=self.shape.ident, c=cond,
                                          step=sql.Literal(step))
        got = side.rows(q, params)
        if not got:
            return [], 0
        total = int(got[0][-1])
        n = len(self.shape.pk)
        return [tuple(r[:n]) for r in got if int(r[n]) % step == 1 and int(r[n]) != 1], total

    def _hashes(self, side: _Side, rng: Range) -> dict[Key, str]:
        cond, params = self._cond(rng)
        q = sql.SQL("SELECT {kt}, hashtextextended({r}, 0) FROM {t} t WHERE {c}").format(
            kt=self.key_text, r=self.row, t=self.shape.ident, c=cond)
        n = len(self.shape.pk)
        got = side.rows(q, params)
        side.rows_hashed += len(got)
        return {tuple(r[:n]): r[n] for r in got}

    def run(self) -> TableDiff:
        if len(self.shape.pk) == 1:
            self._levels()
        else:
            # composite keys: range by range (row comparisons; no width_bucket over row values)
            bounds, _ = self._bounds(self.a, (None, None), max(COMPOSITE_CHUNK, self.chunk))
            edges: list[Key | None] = [None, *bounds, None]
            for lo, hi in itertools.pairwise(edges):
                self._range((lo, hi))
        self._fetch_rows()
        return self.diff

    # -- single-column keys: level by level, one query per side for all the ranges of a level -------------
    def _locate(self, ranges: list[Range]) -> tuple[sql.Composable, list[Any]]:
        """SQL for the 0-based index of the range holding a row's key (-1: none), and its params.

        ``ranges`` are sorted and disjoint. Their bounds make one sorted array of edges; width_bucket
        (a binary search over a constant array) gives the interval between two edges a key falls in, and
        a constant int[] maps each interval to its range or to -1 (a gap: a range found equal before).
        Neither array holds a NULL, so each lookup is O(1) or O(log n) per row."""
        edges: list[str] = []
        for lo, hi in ranges:
            for v in (lo, hi):
                if v is not None and (not edges or edges[-1] != v[0]):
                    edges.append(v[0])
        pos = {v: i for i, v in enumerate(edges)}
        range_of = [-1] * (len(edges) + 1)
        for j, (lo, _) in enumerate(ranges):
            range_of[0 if lo is None else pos[lo[0]] + 1] = j
        loc = sql.SQL("(%s::int[])[width_bucket(t.{k}, %s::text[]::{t}[]) + 1]").format(
            k=sql.Identifier(self.shape.pk[0]), t=sql.SQL(self.shape.key_types()[0]))
        return loc, [range_of, edges]

    def _level_agg(self, side: _Side, ranges: list[Range]) -> dict[int, tuple[int, int]]:
        loc, p = self._locate(ranges)
        q = sql.SQL("SELECT {loc}, count(*), coalesce(bit_xor(hashtextextended({r}, 0)), 0) "
                    "FROM {t} t WHERE {loc} >= 0 GROUP BY 1").format(loc=loc, r=self.row, t=self.shape.ident)
        out = {int(i): (int(n), int(h)) for i, n, h in side.rows(q, p + p)}
        side.rows_hashed += sum(n for n, _ in out.values())
        return out

    def _level_bounds(self, side: _Side, ranges: list[Range], steps: list[int]) -> dict[int, list[Key]]:
        key = sql.Identifier(self.shape.pk[0])
        if ranges == [(None, None)]:  # the whole table: an index-only scan in key order, no sort
            q = sql.SQL("SELECT k FROM (SELECT {key}::text AS k, row_number() OVER (ORDER BY {key}) AS rn FROM {t}) s "
                        "WHERE rn > 1 AND rn %% %s = 1 ORDER BY rn").format(key=key, t=self.shape.ident)
            return {0: [(k,) for (k,) in side.rows(q, [steps[0]])]}
        loc, p = self._locate(ranges)
        q = sql.SQL("SELECT i, k FROM (SELECT {loc} AS i, t.{key}::text AS k, row_number() OVER (PARTITION BY {loc} "
                    "ORDER BY t.{key}) AS rn FROM {t} t WHERE {loc} >= 0) s WHERE rn > 1 AND "
                    "rn %% (%s::int[])[i + 1] = 1 ORDER BY i, rn").format(loc=loc, key=key, t=self.shape.ident)
        out: dict[int, list[Key]] = {}
        for i, k in side.rows(q, p + p + p + [steps]):
            out.setdefault(int(i), []).append((k,))
        return out

    def _level_hashes(self, side: _Side, ranges: list[Range]) -> dict[Key, str]:
        loc, p = self._locate(ranges)
        q = sql.SQL("SELECT t.{k}::text, hashtextextended({r}, 0) FROM {t} t WHERE {loc} >= 0").format(
            k=sql.Identifier(self.shape.pk[0]), r=self.row, t=self.shape.ident, loc=loc)
        got = side.rows(q, p)
        side.rows_hashed += len(got)
        return {(str(k),): str(h) for k, h in got}

    def _levels(self) -> None:
        pending: list[tuple[Range, int, int]] = [((None, None), -1, 0)]  # range, rows on A (-1: unknown), on B
        for _ in range(64):
            if not pending:
                return
            fine = self._split(pending)
            aggs_a, aggs_b = self._both(lambda s, f=fine: self._level_agg(s, f))  # type: ignore[misc]
            pending, leaves = [], []
            for i, rng in enumerate(fine):
                (na, ha), (nb, hb) = aggs_a.get(i, (0, 0)), aggs_b.get(i, (0, 0))
                if (na, ha) == (nb, hb):
                    continue
                if max(na, nb) <= self.leaf:
                    leaves.append(rng)
                else:
                    pending.append((rng, na, nb))
            if leaves:
                self._compare_leaves(leaves)
        self._compare_leaves([r for r, _, _ in pending])  # a safety net: never reached in practice

    def _split(self, pending: list[tuple[Range, int, int]]) -> list[Range]:
        """Each pending range cut at every step-th key of the side with more rows in it."""
        cuts: dict[int, list[Key]] = {}
        for side, mine in ((self.a, [j for j, (_, na, nb) in enumerate(pending) if na < 0 or na >= nb]),
                           (self.b, [j for j, (_, na, nb) in enumerate(pending) if 0 <= na < nb])):
            if not mine:
                continue
            ranges = [pending[j][0] for j in mine]
            steps = [self._top_step(side) if pending[j][1] < 0 else max(2, -(-max(pending[j][1:]) // FANOUT))
                     for j in mine]
            for i, keys in self._level_bounds(side, ranges, steps).items():
                cuts[mine[i]] = keys
        fine: list[Range] = []
        for j, (rng, _, _) in enumerate(pending):
            edges: list[Key | None] = [rng[0], *cuts.get(j, []), rng[1]]
            fine += list(itertools.pairwise(edges))
        return fine

    def _top_step(self, side: _Side) -> int:
        """Rows per top-level range: ``chunk``, but at most ~1,000 ranges for keys of variable length
        (width_bucket walks such an array element by element)."""
        if self.shape.fixed_key:
            return max(2, self.chunk)
        got = side.rows(sql.SQL("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass").format(),
                        [self.shape.ident.as_string(side.conn)])
        return max(2, self.chunk, int(got[0][0] or 0) // 1000)

    def _compare_leaves(self, leaves: list[Range]) -> None:
        for i in range(0, len(leaves), 5000):
            part = leaves[i:i + 5000]
            ka, kb = self._both(lambda s, p=part: self._level_hashes(s, p))  # type: ignore[misc]
            self.only_a += [k for k in ka if k not in kb]
            self.only_b += [k for k in kb if k not in ka]
            self.changed += [k for k, h in ka.items() if k in kb and kb[k] != h]

    def _range(self, rng: Range) -> None:
        (na, ha), (nb, hb) = self._both(lambda s: self._agg(s, rng))
        if na == nb and ha == hb:
            return
        if max(na, nb) <= self.leaf:
            ka, kb = self._both(lambda s: self._hashes(s, rng))
            self.only_a += [k for k in ka if k not in kb]
            self.only_b += [k for k in kb if k not in ka]
            self.changed += [k for k, h in ka.items() if k in kb and kb[k] != h]
            return
        big = self.a if na >= nb else self.b
        step = max(2, -(-max(na, nb) // FANOUT))
        bounds, _ = self._bounds(big, rng, step)
        edges: list[Key | None] = [rng[0], *bounds, rng[1]]
        for lo, hi in itertools.pairwise(edges):
            self._range((lo, hi))

    def run_keys(self, keys: Iterable[Key]) -> TableDiff:
        """Compare only ``keys`` (text forms, from elsewhere: a logical decoding stream); keys on neither
        side drop out, and the rows that differ are fetched as by ``run``."""
        wanted = sorted(set(keys))
        for i in range(0, len(wanted), 5000):
            part = wanted[i:i + 5000]
            ka, kb = self._both(lambda s, p=part: self._key_hashes(s, p))  # type: ignore[misc]
            self.only_a += [k for k in ka if k not in kb]
            self.only_b += [k for k in kb if k not in ka]
            self.changed += [k for k, h in ka.items() if k in kb and kb[k] != h]
        self._fetch_rows()
        return self.diff

    def _by_keys(self, what: sql.Composable) -> sql.Composed:
        """SELECT key text, ``what`` of the rows whose key is in the text arrays given as parameters."""
        n = len(self.shape.pk)
        cols = sql.SQL(", ").join(sql.SQL("u.{}::{}").format(sql.Identifier(f"k{i}"), sql.SQL(t))
                                  for i, t in enumerate(self.shape.key_types()))
        arrays = sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in range(n))
        aliases = sql.SQL(", ").join(sql.Identifier(f"k{i}") for i in range(n))
        return sql.SQL("SELECT {kt}, {w} FROM {t} t WHERE ({k}) IN (SELECT {cols} FROM unnest({arrays}) "
                       "AS u({aliases}))").format(kt=self.key_text, w=what, t=self.shape.ident, k=self.keys,
                                                  cols=cols, arrays=arrays, aliases=aliases)

    def _key_hashes(self, side: _Side, keys: list[Key]) -> dict[Key, str]:
        n = len(self.shape.pk)
        q = self._by_keys(sql.SQL("hashtextextended({}, 0)").format(self.row))
        got = side.rows(q, [[k[j] for k in keys] for j in range(n)])
        side.rows_hashed += len(got)
        return {tuple(r[:n]): r[n] for r in got}

    def _fetch_rows(self) -> None:
        """The full rows (as JSON) of the keys that differ: B's inserted and updated, A's deleted and updated."""
        wanted_a = sorted(set(self.only_a) | set(self.changed))
        wanted_b = sorted(set(self.only_b) | set(self.changed))
        rows_a, rows_b = self._rows(self.a, wanted_a), self._rows(self.b, wanted_b)
        self.diff.deleted = [rows_a[k] for k in sorted(self.only_a)]
        self.diff.inserted = [rows_b[k] for k in sorted(self.only_b)]
        self.diff.updated = [(rows_a[k], rows_b[k]) for k in sorted(self.changed)]
        if self.diff.changed_rows:
            self.diff.status = "differs"

    def _rows(self, side: _Side, keys: list[Key]) -> dict[Key, dict[str, Any]]:
        out: dict[Key, dict[str, Any]] = {}
        n = len(self.shape.pk)
        q = self._by_keys(sql.SQL("to_jsonb(t.*)"))
        for i in range(0, len(keys), 1000):
            part = keys[i:i + 1000]
            for r in side.rows(q, [[k[j] for k in part] for j in range(n)]):
                out[tuple(r[:n])] = r[n]
        return out


def data_diff(conn_a: psycopg.Connection[Any], conn_b: psycopg.Connection[Any], *, a_label: str = "a",
              b_label: str = "b", tables: Iterable[str] | None = None, exclude_schemas: Iterable[str] = (),
              chunk: int = CHUNK, leaf: int = LEAF) -> DataDiff:
    """Compare the data of every table (or of ``tables``, 'schema.name' or 'name' for public) A -> B."""
    t0 = time.perf_counter()
    for conn in (conn_a, conn_b):
        stable_session(conn)
    a, b = _Side(conn_a), _Side(conn_b)
    sa, sb = shapes(conn_a, exclude_schemas), shapes(conn_b, exclude_schemas)
    wanted = None if tables is None else {t if "." in t else f"public.{t}" for t in tables}
    out = DataDiff(a_label, b_label, shapes_a=sa, shapes_b=sb)
    with ThreadPoolExecutor(2) as pool:
        for name in sorted(set(sa) | set(sb)):
            if wanted is not None and name not in wanted:
                continue
            out.tables.append(_compare_table(name, sa.get(name), sb.get(name), a, b, pool, chunk, leaf))
    if wanted is not None:
        missing = wanted - set(sa) - set(sb)
        out.tables += [TableDiff(m, "missing", note="on neither side") for m in sorted(missing)]
    out.stats = {"seconds": round(time.perf_counter() - t0, 3), "rows_compared": a.rows_hashed + b.rows_hashed,
                 "bytes_moved": a.bytes + b.bytes, "queries": a.queries + b.queries,
                 "tables": len(out.tables)}
    return out


def diff_keys(conn_a: psycopg.Connection[Any], conn_b: psycopg.Connection[Any], keys: dict[str, set[Key]], *,
              whole: Iterable[str] = (), a_label: str = "a", b_label: str = "b",
              exclude_schemas: Iterable[str] = ()) -> DataDiff:
    """Like ``data_diff`` of the tables of ``keys`` and ``whole``, but comparing only the given keys of the
    former (text forms): O(keys) instead of O(rows) when something else knows which rows were written."""
    t0 = time.perf_counter()
    for conn in (conn_a, conn_b):
        stable_session(conn)
    a, b = _Side(conn_a), _Side(conn_b)
    sa, sb = shapes(conn_a, exclude_schemas), shapes(conn_b, exclude_schemas)
    out = DataDiff(a_label, b_label, shapes_a=sa, shapes_b=sb)
    whole = set(whole)
    with ThreadPoolExecutor(2) as pool:
        for name in sorted(set(keys) | whole):
            if name not in sa and name not in sb:
                continue  # made and dropped since: nothing to carry over
            pa, pb = sa.get(name), sb.get(name)
            if name in whole or pa is None or pb is None or not pa.pk or pa.pk != pb.pk:
                out.tables.append(_compare_table(name, pa, pb, a, b, pool, CHUNK, LEAF))
                continue
            types_b = dict(pb.columns)
            common = [c for c, t in pa.columns if types_b.get(c) == t]
            if pa.columns == pb.columns:
                out.tables.append(_Table(pa, a, b, pool, CHUNK, LEAF).run_keys(keys[name]))
            elif set(pa.pk) <= set(common):
                t = _Table(pa, a, b, pool, CHUNK, LEAF, columns=common).run_keys(keys[name])
                t.status, t.note = "shape-differs", _shape_note(pa, pb) + f"; rows compared on {len(common)} " \
                    "common columns"
                out.tables.append(t)
            else:
                out.tables.append(_compare_table(name, pa, pb, a, b, pool, CHUNK, LEAF))
    out.stats = {"seconds": round(time.perf_counter() - t0, 3), "rows_compared": a.rows_hashed + b.rows_hashed,
                 "bytes_moved": a.bytes + b.bytes, "queries": a.queries + b.queries,
                 "tables": len(out.tables)}
    return out


def _compare_table(name: str, sa: Shape | None, sb: Shape | None, a: _Side, b: _Side, pool: ThreadPoolExecutor,
                   chunk: int, leaf: int) -> TableDiff:
    if sa is None or sb is None:
        return TableDiff(name, "only-in-b" if sa is None else "only-in-a")
    if sa.columns != sb.columns or sa.pk != sb.pk:
        types_b = dict(sb.columns)
        common = [c for c, t in sa.columns if types_b.get(c) == t]
        note = _shape_note(sa, sb)
        if not sa.pk or sa.pk != sb.pk or not set(sa.pk) <= set(common):
            return TableDiff(name, "shape-differs", note=note + "; rows not compared (no common primary key)")
        # rows compared on the columns both sides have with one type: what a rollback could carry over
        t = _Table(sa, a, b, pool, chunk, leaf, columns=common).run()
        t.status, t.note = "shape-differs", note + f"; rows compared on {len(common)} common columns"
        return t
    if not sa.pk:
        same = _whole_table_equal(sa, a, b, pool)
        return TableDiff(name, "same" if same else "no-primary-key",
                         note="" if same else "rows differ; without a primary key rows cannot be matched")
    return _Table(sa, a, b, pool, chunk, leaf).run()


def _whole_table_equal(shape: Shape, a: _Side, b: _Side, pool: ThreadPoolExecutor) -> bool:
    """Equal multisets of rows: count plus the sum (not xor: duplicates must count) of row hashes."""
    q = sql.SQL("SELECT count(*), coalesce(sum(hashtextextended((t.*)::text, 0)::numeric), 0) "
                "FROM {} t").format(shape.ident)
    fa, fb = pool.submit(a.rows, q, []), pool.submit(b.rows, q, [])
    return bool(fa.result() == fb.result())


def _shape_note(sa: Shape, sb: Shape) -> str:
    ca, cb = dict(sa.columns), dict(sb.columns)
    parts = [f"+{c}" for c in cb if c not in ca] + [f"-{c}" for c in ca if c not in cb]
    parts += [f"~{c} {ca[c]} -> {cb[c]}" for c in ca if c in cb and ca[c] != cb[c]]
    if [c for c, _ in sa.columns if c in cb] != [c for c in cb if c in ca]:
        parts.append("column order")
    if sa.pk != sb.pk:
        parts.append(f"primary key ({', '.join(sa.pk)}) -> ({', '.join(sb.pk)})")
    return "columns " + ", ".join(parts) if parts else "shape differs"

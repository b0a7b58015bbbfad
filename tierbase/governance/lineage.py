"""Masking rules that migrate with the schema: what applied migrations derived, renamed and dropped.

When a migration is applied (a feature, a tier, a promotion), the platform reads it
(migrate/sensitivity.py) and records here, platform-wide:

* ``derived``: a column filled from a masked column inherits its rule (unless tierbase.toml
  declares one for it): a copy made in production is masked on every masked branch made after;
* ``renamed``: the rule of a renamed masked column follows the new name;
* ``dropped``: the rule of a dropped masked column is retired. A tierbase.toml rule that names a
  column retired here is *stale*: masking skips it while the column is gone (so masked branches
  never stop being made), and `policy reload` says which migration made it stale.

Rows for columns that do not exist where a branch is masked (an abandoned feature's) are skipped.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from ..migrate.sensitivity import Col, Report

SCHEMA = """
CREATE TABLE IF NOT EXISTS masking_lineage (
    col TEXT PRIMARY KEY,          -- schema.table.column
    kind TEXT NOT NULL,            -- derived | renamed | dropped
    method TEXT NOT NULL,          -- the rule it inherits ('' when dropped)
    source TEXT NOT NULL,          -- the masked column it came from (its old name, for a rename)
    origin TEXT NOT NULL,          -- file:line of the migration
    at REAL NOT NULL,
    by TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Entry:
    col: Col
    kind: str
    method: str
    source: str
    origin: str

    @property
    def why(self) -> str:
        if self.kind == "dropped":
            return f"column {'.'.join(self.col)} was dropped by {self.origin}"
        if self.kind == "renamed":
            return f"column {self.source} was renamed to {'.'.join(self.col)} by {self.origin}"
        return f"{'.'.join(self.col)} is filled from the masked column {self.source} by {self.origin}"

    def to_dict(self) -> dict[str, Any]:
        return {"column": ".".join(self.col), "kind": self.kind, "method": self.method, "source": self.source,
                "origin": self.origin, "why": self.why}


def _col(text: str) -> Col:
    schema, table, column = text.split(".", 2)
    return schema, table, column


class Lineage:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.execute(SCHEMA)  # (not executescript: that would commit a caller's open transaction)

    def entries(self) -> list[Entry]:
        rows = self.db.execute("SELECT col, kind, method, source, origin FROM masking_lineage ORDER BY at, col")
        return [Entry(_col(r[0]), r[1], r[2], r[3], r[4]) for r in rows]

    def masked(self) -> dict[Col, str]:
        """Column -> inherited method, for derived and renamed columns."""
        return {e.col: e.method for e in self.entries() if e.kind != "dropped"}

    def retired(self) -> dict[Col, Entry]:
        """Columns whose rule no longer applies, and why: dropped ones and the old names of renamed ones."""
        out: dict[Col, Entry] = {}
        for e in self.entries():
            if e.kind == "dropped":
                out[e.col] = e
            elif e.kind == "renamed":
                out[_col(e.source)] = e
        return out

    def record(self, report: Report, by: str) -> int:
        """Store what ``report`` found; returns how many rows changed."""
        now = time.time()
        rows: list[tuple[str, str, str, str, str]] = []
        rows += [(".".join(d.target), "derived", d.method, ".".join(d.source), d.where) for d in report.derived]
        rows += [(".".join(new), "renamed", m, ".".join(old), w) for old, new, m, w in report.renamed]
        rows += [(".".join(c), "dropped", "", m, w) for c, m, w in report.dropped]
        if not rows:
            return 0
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for col, kind, method, source, origin in rows:
                self.db.execute("INSERT INTO masking_lineage (col, kind, method, source, origin, at, by) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(col) DO UPDATE SET kind = excluded.kind, "
                                "method = excluded.method, source = excluded.source, origin = excluded.origin, "
                                "at = excluded.at, by = excluded.by", (col, kind, method, source, origin, now, by))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return len(rows)

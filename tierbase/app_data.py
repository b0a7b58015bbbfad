"""Facade methods of data: the row-level diff between two branches.

The platform reads both computes itself, as ``tb_reader`` over each compute's
unix socket (read-only transactions, no superuser): a caller names branches,
never a path or an address. Reading is authorized as ``branch.connect`` on
both, the right to receive credentials for them, so the diff shows nothing a
principal could not read through the proxy.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import psycopg

from .app_base import Core
from .control.store import Branch, Kind
from .errors import InvalidInput
from .governance.policy import Action
from .migrate.datadiff import DataDiff, data_diff
from .provider import READER_ROLE

DATA_FORMATS = ("text", "json", "sql")


class DataDiffs:
    """Takes the core only."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def _read(self, branch: str, dbname: str | None = None) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A read-only connection to a branch as ``tb_reader`` (starting its compute)."""
        return self.core.connect(branch, READER_ROLE, dbname)

    def _pair(self, a: str, b: str) -> tuple[Branch, Branch]:
        """The branches serving ``a`` and ``b``; naming one branch twice (a tier and the branch serving it)
        is refused rather than reported as 'no difference'."""
        left, right = self.core.serving(a), self.core.serving(b)
        if left.name == right.name:
            via = [f"{n!r} is served by {left.name!r}" for n in (a, b) if n != left.name]
            raise InvalidInput(f"{a!r} and {b!r} are the same branch" + (f" ({'; '.join(via)})" if via else ""),
                               "Name two different branches (`tierbase branch list` shows which branch serves "
                               "each tier, and the replaced ones)")
        for br in (left, right):
            if br.kind is Kind.SNAPSHOT:
                raise InvalidInput(f"{br.name!r} is a read-only snapshot without a compute",
                                   f"Create a branch from it and diff that: `tierbase branch create X --parent "
                                   f"{br.name}`")
        return left, right

    def data_diff(self, a: str, b: str, *, table: list[str] | None = None, fmt: str = "text") -> dict[str, Any]:
        """Rows inserted, updated and deleted from A to B, by primary key (chunked key-range hashing)."""
        if fmt not in DATA_FORMATS:
            raise InvalidInput(f"format {fmt!r} is unknown for a data diff", f"Use {', '.join(DATA_FORMATS)}")
        left, right = self._pair(a, b)
        for br in (left, right):
            with self.core.act(Action.BRANCH_CONNECT, self.core.gate.subject(br), quiet=True):
                pass
        d = self._data_diff(left.name, right.name, table)
        out = {**d.to_dict(), "from": left.name, "to": right.name}
        out["text"] = d.to_text() if fmt == "text" else d.to_sql() if fmt == "sql" else None
        return out

    def _data_diff(self, a: str, b: str, tables: list[str] | None = None, *,
                   exclude_schemas: tuple[str, ...] = ()) -> DataDiff:
        with self._read(a) as ca, self._read(b) as cb:
            return data_diff(ca, cb, a_label=a, b_label=b, tables=tables, exclude_schemas=exclude_schemas)

"""The platform's own connections to a branch's compute: over its unix socket, as one of the fixed roles.

Services of the facade name a branch and a role (``tb_owner`` for migrations and smoke checks,
``tb_reader`` for diffs, the superuser only for platform duties such as a rollback's replay); the
address comes from the provider, so nothing above reaches a path or a port of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from ..provider import SUPERUSER
from .branches import Branches


def dsn(branches: Branches, branch: str, dbname: str = "postgres", role: str = SUPERUSER) -> str:
    """A libpq conninfo for ``role`` on the branch's compute (it need not run yet)."""
    return branches.provider.endpoint(branches.store.get(branch).port, dbname, role=role).dsn()


@contextmanager
def connect(branches: Branches, branch: str, dbname: str = "postgres", role: str = SUPERUSER, *,
            timeout: int = 10) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection as ``role`` to the branch's database, starting its compute first."""
    branches.start(branch)
    with psycopg.connect(dsn(branches, branch, dbname, role), autocommit=True, connect_timeout=timeout) as conn:
        yield conn


def answers(branches: Branches, branch: str, dbname: str = "postgres", role: str = SUPERUSER) -> None:
    """The branch answers a query (after a rollback or a restore: the first query works)."""
    with connect(branches, branch, dbname, role) as conn:
        conn.execute("SELECT 1")

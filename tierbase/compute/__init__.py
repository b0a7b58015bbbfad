"""Postgres binaries, clusters and their processes.

``Postgres``/``Endpoint``/``SUPERUSER`` live in ``postgres.py``, which imports psycopg; they are
resolved on first use so that importing this package (the CLI does, through ``home``) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..procs import pid_alive
from .binaries import ComputeUser, PgBinaries, compute_user, find_binaries

if TYPE_CHECKING:
    from .postgres import SUPERUSER, Endpoint, Postgres

__all__ = ["SUPERUSER", "ComputeUser", "Endpoint", "PgBinaries", "Postgres", "compute_user", "find_binaries",
           "pid_alive"]


def __getattr__(name: str) -> Any:
    if name in ("SUPERUSER", "Endpoint", "Postgres"):
        from . import postgres

        return getattr(postgres, name)
    raise AttributeError(f"module 'tierbase.compute' has no attribute {name!r}")

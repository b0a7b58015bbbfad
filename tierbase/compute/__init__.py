"""Postgres binaries, clusters and their processes.

``Postgres`` lives in ``postgres.py``, which imports psycopg; it is resolved on first use so that
importing this package stays cheap. The value types (``Endpoint``, ``ComputeUser``) are the provider
boundary's (provider/types.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..procs import pid_alive
from ..provider.types import SUPERUSER, ComputeUser, Endpoint
from .binaries import PgBinaries, compute_user, find_binaries

if TYPE_CHECKING:
    from .postgres import Postgres

__all__ = ["SUPERUSER", "ComputeUser", "Endpoint", "PgBinaries", "Postgres", "compute_user", "find_binaries",
           "pid_alive"]


def __getattr__(name: str) -> Any:
    if name == "Postgres":
        from . import postgres

        return getattr(postgres, name)
    raise AttributeError(f"module 'tierbase.compute' has no attribute {name!r}")

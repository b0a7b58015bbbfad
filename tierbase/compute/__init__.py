"""Postgres binaries, clusters and their processes."""

from .binaries import ComputeUser, PgBinaries, compute_user, find_binaries
from .postgres import SUPERUSER, Endpoint, Postgres, pid_alive

__all__ = ["SUPERUSER", "ComputeUser", "Endpoint", "PgBinaries", "Postgres", "compute_user", "find_binaries",
           "pid_alive"]

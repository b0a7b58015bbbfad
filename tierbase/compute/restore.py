"""Restoring a pg_dump file into a running cluster, all or nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psycopg
from psycopg import sql

from ..errors import TierbaseError
from .postgres import Endpoint, Postgres


def restore_dump(pg: Postgres, ep: Endpoint, src: Path, dbname: str, *, admin: Endpoint | None = None) -> None:
    """Plain SQL through psql, archives through pg_restore; one transaction either way.

    ``ep`` is the role the dump runs as (the branch owner's); ``admin`` creates a missing database
    (owned by ``ep.user``) and drops it again if the restore fails.
    """
    made = dbname != "postgres" and _ensure_database(admin or ep, dbname, ep.user)
    plain = src.is_file() and src.read_bytes()[:5] != b"PGDMP"
    if plain:
        args = [pg.bins["psql"], "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-f", str(src)]
    else:
        args = [pg.bins["pg_restore"], "--no-owner", "--exit-on-error", "--single-transaction", str(src)]
    args += ["-h", ep.host, "-p", str(ep.port), "-U", ep.user, "-d", dbname]
    got = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, PGPASSWORD=ep.password))
    if got.returncode != 0:
        if made:
            with psycopg.connect((admin or ep).dsn("postgres"), autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))
        raise TierbaseError(f"restoring {src} failed: {got.stderr.strip()[-800:]}",
                            "Fix the dump and try again; nothing was restored")


def _ensure_database(ep: Endpoint, dbname: str, owner: str) -> bool:
    """Create ``dbname`` (owned by ``owner``) if missing; True if it was created."""
    with psycopg.connect(ep.dsn("postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname=%s", (dbname,)).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(dbname), sql.Identifier(owner)))
        return True

"""The fixed Postgres roles every cluster has, and who logs in as which.

Nobody but the platform holds a superuser. The proxy authenticates each
client as a principal, asks the policy engine, and then logs in to the
compute over its private unix socket (``peer`` auth, the service's OS user
only) as one of these roles, chosen by the platform for that principal on
that branch:

``tierbase``   the platform's superuser: masking, role upkeep, checkpoints.
``tb_owner``   the branch owner's role: owns the project databases and every
               object in them (DDL and DML), but is no superuser, has no
               CREATEROLE, no ``pg_read_server_files`` /
               ``pg_execute_server_program``, no ``ALTER SYSTEM``.
``tb_reader``  read-only: ``pg_read_all_data`` and read-only transactions.

Fixed roles rather than one per principal: they live in the catalog of the
root cluster and travel into every branch with the snapshot, so a branch
costs no role upkeep and ``pg_ident.conf`` can name them statically.
"""

from __future__ import annotations

# the names live with the boundary's value types, shared with the layers above
from ..provider.types import DIRECT_GROUP, OWNER_ROLE, PLATFORM_ROLES, READER_ROLE, SUPERUSER

__all__ = ["DIRECT_GROUP", "OWNER_ROLE", "PLATFORM_ROLES", "READER_ROLE", "SUPERUSER", "direct_login"]


def direct_login(admin_dsn: str, principal: str, verifier: str) -> str:
    """A platform engineer's own TCP login role (``pe_<principal>``, member of tb_owner and tb_direct) on
    the compute at ``admin_dsn`` (the superuser's socket), its password set to ``verifier``."""
    import psycopg  # here: pooler.py imports this module for the role names alone
    from psycopg import sql

    role = f"pe_{principal}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        ident = sql.Identifier(role)
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname=%s", (role,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOCREATEROLE NOREPLICATION IN ROLE {}, {}")
                         .format(ident, sql.Identifier(OWNER_ROLE), sql.Identifier(DIRECT_GROUP)))
            # objects it makes belong to tb_owner, like everything the proxy's owners make
            conn.execute(sql.SQL("ALTER ROLE {} SET role = {}").format(ident, sql.Literal(OWNER_ROLE)))
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(ident, sql.Literal(verifier)))
    return role

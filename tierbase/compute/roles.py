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

__all__ = ["DIRECT_GROUP", "OWNER_ROLE", "PLATFORM_ROLES", "READER_ROLE", "SUPERUSER"]

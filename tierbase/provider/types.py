"""The value types of the provider boundary, shared by both sides of it.

The control plane above and storage/compute below speak these; neither side
imports the other's modules for them. Kept free of heavy imports (psycopg is
loaded only when a DSN is built), since the CLI reaches this module through
``home``.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path

#: the platform's superuser on every compute (peer auth only, never a principal's)
SUPERUSER = "tierbase"
#: the branch owner's role: DDL and DML on the project databases, no superuser powers
OWNER_ROLE = "tb_owner"
#: read-only: pg_read_all_data and read-only transactions
READER_ROLE = "tb_reader"
#: group of the login roles that may connect over TCP (platform engineers' ``--direct`` URLs)
DIRECT_GROUP = "tb_direct"
PLATFORM_ROLES = (SUPERUSER, OWNER_ROLE, READER_ROLE)
#: the replication slots the platform makes (a promotion's, for a rollback: migrate/logical.py) are named so
PLATFORM_SLOTS = "tierbase_rb_"


@dataclass(frozen=True)
class Endpoint:
    """How to reach one compute: a unix socket directory (peer auth, no password) or a TCP host."""

    host: str
    port: int
    user: str
    password: str = ""
    dbname: str = "postgres"

    def dsn(self, dbname: str | None = None) -> str:
        from psycopg.conninfo import make_conninfo  # only when a connection is made: keeps imports light

        return make_conninfo("", host=self.host, port=self.port, user=self.user, dbname=dbname or self.dbname,
                             **({"password": self.password} if self.password else {}))

    @property
    def socket(self) -> str | None:
        """The unix socket file, when ``host`` is a socket directory."""
        return f"{self.host}/.s.PGSQL.{self.port}" if self.host.startswith("/") else None


@dataclass(frozen=True)
class ComputeUser:
    """The OS user postgres runs as. Postgres refuses root, so root delegates."""

    name: str
    uid: int
    gid: int

    @classmethod
    def current(cls) -> ComputeUser:
        """This process's own OS user."""
        entry = pwd.getpwuid(os.geteuid())
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()

    def run_kwargs(self) -> dict[str, object]:
        """subprocess keyword arguments that drop to this user when needed."""
        if self.is_self:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        if not self.is_self:
            os.chown(path, self.uid, self.gid)


@dataclass(frozen=True)
class ForkPoint:
    """Where in the parent's history a fork starts: its WAL position or a wall-clock time (epoch
    seconds). No point (``fork(at=None)``) means the parent as it is now."""

    lsn: str | None = None
    time: float | None = None

    def __str__(self) -> str:
        return f"LSN {self.lsn}" if self.lsn else f"time {self.time}"


@dataclass(frozen=True)
class PoolSpace:
    """The storage pool's room: what branches share, and the feature branches' hard limit if any."""

    total: int
    free: int
    #: bytes feature branches hold together, and the most they may (None: no hard limit)
    features_used: int | None = None
    features_limit: int | None = None


@dataclass(frozen=True)
class Health:
    """What a provider says about itself (``tierbase status``)."""

    #: the storage kind: btrfs, copy, fake, or a remote provider's name
    driver: str
    copy_on_write: bool
    #: the OS user computes run as ("" where there is none, e.g. a remote provider)
    compute_user: str
    #: the postgres server in use: bindir, major
    postgres: dict[str, object] = field(default_factory=dict)

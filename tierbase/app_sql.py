"""SQL through the platform: one call runs statements on a branch as the caller's compute role.

For agents (the MCP server) and scripts that want rows as JSON rather than a Postgres connection.
The call is decided as ``branch.sql`` (the rules of ``branch.connect``: what a principal may read
through the proxy it may read here, and nothing more), runs as the role the proxy would give it
(``tb_owner`` on its own branches, ``tb_reader`` elsewhere and for read-only roles), never as the
superuser, in one transaction with a per-statement ``statement_timeout`` and a watchdog that
cancels on the compute when the whole call runs past its limit (control/statements.py). Rows are
streamed and cut at the row cap or the byte cap, and the answer says so.
"""

from __future__ import annotations

import time
from typing import Any

from .app_base import Core
from .app_leases import Quotas, Renewals
from .app_logins import Logins
from .control.statements import execute
from .control.store import Kind
from .errors import BranchNotFound, InvalidInput
from .governance.policy import Action
from .migrate.ledger import split_statements
from .names import check_name
from .provider import READER_ROLE

MAX_ROWS = 10_000
MAX_TIMEOUT_S = 300.0


class SqlRunner:
    """Takes the core, the logins (the role the proxy would give the caller), the quotas (a stopped
    compute of one's own counts when it starts) and the renewals (activity renews a lease)."""

    def __init__(self, core: Core, logins: Logins, quotas: Quotas, renewals: Renewals) -> None:
        self.core = core
        self.logins = logins
        self.quotas = quotas
        self.renewals = renewals

    def run_sql(self, name: str, sql: str, params: list[Any] | None = None, *, database: str | None = None,
                max_rows: int = 1000, timeout_s: float = 30.0, read_only: bool = False) -> dict[str, Any]:
        """Run ``sql`` on branch ``name``; the last statement's rows come back as JSON-ready lists.

        ``read_only``: run as ``tb_reader`` even where the caller could write (the MCP server's
        ``--read-only`` mode asks for it, so its leash does not rest on the client alone).
        """
        check_name(name)
        if not 1 <= max_rows <= MAX_ROWS:
            raise InvalidInput(f"max_rows {max_rows} is out of range", f"Use 1 to {MAX_ROWS}")
        if not 0 < timeout_s <= MAX_TIMEOUT_S:
            raise InvalidInput(f"timeout_s {timeout_s} is out of range",
                               f"Use more than 0 and at most {MAX_TIMEOUT_S:g}")
        pieces = [p for _, p in split_statements(sql)]
        if not pieces:
            raise InvalidInput("no SQL statement was sent", "Send at least one statement")
        if params and len(pieces) > 1:
            raise InvalidInput("parameters need a single statement",
                               f"Send one statement with %s placeholders, or no params ({len(pieces)} were sent)")
        target = self.core.store.resolve_route(name)
        if target is None:
            raise BranchNotFound(name)
        branch = self.core.store.get(target)
        if branch.kind is Kind.SNAPSHOT:
            raise InvalidInput(f"branch {name!r} is a read-only snapshot without a compute",
                               f"Create a branch from it and query that: `tierbase branch create X --parent {name}`")
        dbname = database or self.core.database
        with self.core.act(Action.BRANCH_SQL, self.core.gate.subject(branch)) as rec:
            who = self.core.principal().name
            role = READER_ROLE if read_only else self.logins.connect_role(who, branch.name, audit=False)
            b = self.core.store.get(target)
            if b.creator == who and not self.core.branches.provider.running_pid(b.volume):
                self.quotas.check_quota(self.core.principal(), compute=True)
            self.core.branches.start(target)
            ep = self.core.branches.provider.endpoint(self.core.store.get(target).port, dbname, role=role)
            t0 = time.perf_counter()
            out = execute(ep.dsn(), pieces, params, max_rows=max_rows, timeout_s=timeout_s)
            out.update(branch=target, database=dbname, role=role,
                       elapsed_ms=round((time.perf_counter() - t0) * 1000, 1))
            rec.after = {"sql": sql[:500], "statements": len(pieces), "role": role, "rows": out["row_count"],
                         "truncated": out["truncated"]}
        self.renewals.renew_on_activity(target)  # activity renews a session's lease
        return out



"""Sessions: a branch leased to one principal for a while, and the per-principal quotas.

A session is a feature branch with a TTL plus a ``sessions`` row naming who holds it. The lease is
the branch's own expiry, so the sweeper that deletes expired branches is the one that reclaims
idle sessions (audited as ``branch.expire`` and ``session.expire``, naming the holder). Activity
renews it: SQL through the API and every proxy login on the branch push the expiry to now + TTL,
at most once per ``RENEW_EVERY`` seconds per branch, so 500 connections cost one SQLite write.

Quotas (``[quotas.ROLE]`` or ``[quotas.default]`` in tierbase.toml) bound what one principal holds:
``branches`` alive (that it created), running ``computes`` of those branches, and their own ``bytes``.
A creation or start past one is refused (exit 2) naming the quota and what to do.

``Sessions`` takes the branch operations it creates and deletes leased branches with, and the
renewals; ``Renewals`` and ``Quotas`` (app_leases.py) take the core only, so that the branch
operations can use them too.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from .app_base import Core
from .app_branches import BranchOps
from .app_leases import Renewals
from .control.leases import Leases
from .errors import InvalidInput, Refused, SessionNotFound
from .names import check_name, format_duration, parse_ttl

DEFAULT_TTL = "30m"
MAX_TTL = 7 * 86400



class Sessions:
    """Takes the core, the branch operations (a session's branch is made and deleted through the
    policy like any other) and the renewals."""

    def __init__(self, core: Core, branch_ops: BranchOps, renewals: Renewals) -> None:
        self.core = core
        self.branch_ops = branch_ops
        self.renewals = renewals

    @property
    def leases(self) -> Leases:
        return Leases(self.core.store)

    def session_start(self, branch: str | None = None, parent: str | None = None,
                      ttl: str | None = None) -> dict[str, Any]:
        """Lease a new branch (named ``branch``, default ``<principal>-<hex>``) off ``parent`` (the entry tier)."""
        seconds = parse_ttl(ttl or DEFAULT_TTL)
        if seconds > MAX_TTL:
            raise InvalidInput(f"a session's ttl of {ttl} is longer than {format_duration(MAX_TTL)}",
                               "Use a shorter ttl and renew it (activity renews it too)")
        who = self.core.principal()
        name = check_name(branch) if branch else f"{who.name[:50]}-{secrets.token_hex(3)}"
        made = self.branch_ops.create_branch(name, parent, ttl=f"{seconds}s")
        sid = "ses_" + secrets.token_hex(8)
        self.leases.add(sid, who.name, name, seconds)
        self.core.gate.audit.append(actor=who.name, action="session.start", target=name, allowed=True,
                                    reason="owner: the session's branch was created by its holder",
                                    after={"session": sid, "ttl_seconds": seconds})
        return {**self._session(sid), "branch_info": made}

    def session_renew(self, sid: str, ttl: str | None = None) -> dict[str, Any]:
        row = self._own_session(sid)
        seconds = parse_ttl(ttl) if ttl else int(row["ttl_seconds"])
        if seconds > MAX_TTL:
            raise InvalidInput(f"a session's ttl of {ttl} is longer than {format_duration(MAX_TTL)}",
                               "Use a shorter ttl")
        self.leases.push(str(row["branch"]), seconds, sid)
        self.core.gate.audit.append(actor=self.core.principal().name, action="session.renew",
                                    target=str(row["branch"]), allowed=True, reason="owner: its holder renewed it",
                                    after={"session": sid, "ttl_seconds": seconds})
        return self._session(sid)

    def session_end(self, sid: str) -> dict[str, Any]:
        """End the lease and delete its branch (through the policy, like any delete)."""
        row = self._own_session(sid)
        gone: list[str] = []
        if self.core.store.find(str(row["branch"])) is not None:
            gone = self.branch_ops.delete_branch(str(row["branch"]), recursive=True)
        self.leases.end(sid, "ended")
        self.core.gate.audit.append(actor=self.core.principal().name, action="session.end",
                                    target=str(row["branch"]), allowed=True, reason="owner: its holder ended it",
                                    after={"session": sid, "deleted": gone})
        return {**self._session(sid), "deleted": gone}

    def session_list(self, *, everyone: bool = False) -> list[dict[str, Any]]:
        """Live sessions: one's own, or (a platform engineer's ``everyone``) all of them."""
        self.renewals.sessions_reclaimed()
        who = self.core.principal()
        if everyone and self.core.config.base_role(who.role) != "platform-engineer":
            raise Refused("only platform engineers list everyone's sessions", "Drop --all to list yours")
        return [self._session(sid) for sid in self.leases.live(None if everyone else who.name)]

    def _own_session(self, sid: str) -> dict[str, Any]:
        row = self.leases.get(sid)
        who = self.core.principal()
        mine = row is not None and (row["principal"] == who.name
                                    or self.core.config.base_role(who.role) == "platform-engineer")
        if row is None or not mine:  # another's session is as unknown as a missing one: ids are not for probing
            raise SessionNotFound(sid)
        if row["ended_at"] is not None:
            raise SessionNotFound(sid, ended=str(row["end_reason"]))
        return row

    def _session(self, sid: str) -> dict[str, Any]:
        row = self.leases.get(sid)
        assert row is not None  # every caller has just made or found it
        b = self.core.store.find(str(row["branch"]))
        now = time.time()
        row["live"] = row["ended_at"] is None and b is not None
        row["expires_at"] = b.expires_at if b is not None else None
        row["expires_in"] = format_duration(b.expires_at - now) if b is not None and b.expires_at else None
        return row

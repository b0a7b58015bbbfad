"""Sessions: a branch leased to one principal for a while, and the per-principal quotas.

A session is a feature branch with a TTL plus a ``sessions`` row naming who holds it. The lease is
the branch's own expiry, so the sweeper that deletes expired branches is the one that reclaims
idle sessions (audited as ``branch.expire`` and ``session.expire``, naming the holder). Activity
renews it: SQL through the API and every proxy login on the branch push the expiry to now + TTL,
at most once per ``RENEW_EVERY`` seconds per branch, so 500 connections cost one SQLite write.

Quotas (``[quotas.ROLE]`` or ``[quotas.default]`` in tierbase.toml) bound what one principal holds:
``branches`` alive (that it created), running ``computes`` of those branches, and their own ``bytes``.
A creation or start past one is refused (exit 2) naming the quota and what to do.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from .app_base import FacadeBase
from .control.store import Kind
from .errors import InvalidInput, QuotaExceeded, Refused, SessionNotFound, TierbaseError
from .governance.principals import Principal
from .names import check_name, format_duration, parse_ttl

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id          TEXT PRIMARY KEY,      -- ses_<hex>
    principal   TEXT NOT NULL,
    branch      TEXT NOT NULL,
    ttl_seconds INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    renewed_at  REAL NOT NULL,
    ended_at    REAL,
    end_reason  TEXT                   -- ended | expired | gone
);
CREATE INDEX IF NOT EXISTS sessions_live ON sessions(branch) WHERE ended_at IS NULL;
"""
DEFAULT_TTL = "30m"
MAX_TTL = 7 * 86400
#: activity renews a lease at most this often per branch (a proxy storm must not become a write storm)
RENEW_EVERY = 15.0

_renewed: dict[str, float] = {}
_renewed_lock = threading.Lock()


#: the meta.db files whose sessions table this process made sure of
_made: set[str] = set()


class SessionOps(FacadeBase):
    def _sessions_db(self) -> None:
        if str(self.home.db) not in _made:
            self.store.db.executescript(SCHEMA)
            _made.add(str(self.home.db))

    # -- sessions ------------------------------------------------------------------------------
    def session_start(self, branch: str | None = None, parent: str | None = None,
                      ttl: str | None = None) -> dict[str, Any]:
        """Lease a new branch (named ``branch``, default ``<principal>-<hex>``) off ``parent`` (the entry tier)."""
        self._sessions_db()
        seconds = parse_ttl(ttl or DEFAULT_TTL)
        if seconds > MAX_TTL:
            raise InvalidInput(f"a session's ttl of {ttl} is longer than {format_duration(MAX_TTL)}",
                               "Use a shorter ttl and renew it (activity renews it too)")
        who = self.gate.principal(self.actor)
        name = check_name(branch) if branch else f"{who.name[:50]}-{secrets.token_hex(3)}"
        made = self.create_branch(name, parent, ttl=f"{seconds}s")  # type: ignore[attr-defined]
        sid = "ses_" + secrets.token_hex(8)
        now = time.time()
        with self.store.write() as db:
            db.execute("INSERT INTO sessions(id, principal, branch, ttl_seconds, started_at, renewed_at) "
                       "VALUES(?,?,?,?,?,?)", (sid, who.name, name, seconds, now, now))
        self.gate.audit.append(actor=who.name, action="session.start", target=name, allowed=True,
                               reason="owner: the session's branch was created by its holder",
                               after={"session": sid, "ttl_seconds": seconds})
        return {**self._session(sid), "branch_info": made}

    def session_renew(self, sid: str, ttl: str | None = None) -> dict[str, Any]:
        row = self._own_session(sid)
        seconds = parse_ttl(ttl) if ttl else int(row["ttl_seconds"])
        if seconds > MAX_TTL:
            raise InvalidInput(f"a session's ttl of {ttl} is longer than {format_duration(MAX_TTL)}",
                               "Use a shorter ttl")
        self._push_expiry(str(row["branch"]), seconds, sid)
        self.gate.audit.append(actor=self.gate.principal(self.actor).name, action="session.renew",
                               target=str(row["branch"]), allowed=True, reason="owner: its holder renewed it",
                               after={"session": sid, "ttl_seconds": seconds})
        return self._session(sid)

    def session_end(self, sid: str) -> dict[str, Any]:
        """End the lease and delete its branch (through the policy, like any delete)."""
        row = self._own_session(sid)
        gone: list[str] = []
        if self.store.find(str(row["branch"])) is not None:
            gone = self.delete_branch(str(row["branch"]), recursive=True)  # type: ignore[attr-defined]
        self._end(sid, "ended")
        self.gate.audit.append(actor=self.gate.principal(self.actor).name, action="session.end",
                               target=str(row["branch"]), allowed=True, reason="owner: its holder ended it",
                               after={"session": sid, "deleted": gone})
        return {**self._session(sid), "deleted": gone}

    def session_list(self, *, everyone: bool = False) -> list[dict[str, Any]]:
        """Live sessions: one's own, or (a platform engineer's ``everyone``) all of them."""
        self._sessions_db()
        self.sessions_reclaimed()
        who = self.gate.principal(self.actor)
        if everyone and self.config.base_role(who.role) != "platform-engineer":
            raise Refused("only platform engineers list everyone's sessions", "Drop --all to list yours")
        sql = "SELECT id FROM sessions WHERE ended_at IS NULL" + ("" if everyone else " AND principal = ?")
        rows = self.store.db.execute(sql + " ORDER BY started_at", () if everyone else (who.name,)).fetchall()
        return [self._session(r[0]) for r in rows]

    def renew_on_activity(self, branch: str, later: Callable[[Callable[[], None]], None] | None = None) -> None:
        """A connection or an API call used ``branch``: push its session's expiry (throttled)."""
        now = time.monotonic()
        with _renewed_lock:
            if now - _renewed.get(branch, -RENEW_EVERY) < RENEW_EVERY:
                return
            _renewed[branch] = now
        self._sessions_db()
        row = self.store.db.execute("SELECT id, ttl_seconds FROM sessions WHERE branch = ? AND ended_at IS NULL",
                                    (branch,)).fetchone()
        if row is None:
            return
        (later or (lambda f: f()))(lambda: self._push_expiry(branch, int(row[1]), str(row[0])))

    def sessions_reclaimed(self) -> list[str]:
        """Sessions whose branch is gone (the sweeper reclaimed it, or it was deleted): ended, audited."""
        self._sessions_db()
        rows = self.store.db.execute("SELECT id, principal, branch FROM sessions WHERE ended_at IS NULL").fetchall()
        out = []
        for sid, principal, branch in rows:
            if self.store.find(branch) is None:
                self._end(sid, "expired")
                self.gate.audit.append(actor="tierbase", action="session.expire", target=branch, allowed=True,
                                       reason="ttl: the session's lease ran out (or its branch was deleted)",
                                       after={"session": sid, "principal": principal})
                out.append(sid)
        return out

    def _push_expiry(self, branch: str, seconds: int, sid: str) -> None:
        now = time.time()
        with self.store.write() as db:
            db.execute("UPDATE branches SET expires_at = ?, ttl_seconds = ? WHERE name = ?",
                       (now + seconds, seconds, branch))
            db.execute("UPDATE sessions SET renewed_at = ?, ttl_seconds = ? WHERE id = ?", (now, seconds, sid))

    def _end(self, sid: str, reason: str) -> None:
        with self.store.write() as db:
            db.execute("UPDATE sessions SET ended_at = ?, end_reason = ? WHERE id = ? AND ended_at IS NULL",
                       (time.time(), reason, sid))

    def _own_session(self, sid: str) -> dict[str, Any]:
        self._sessions_db()
        row = self.store.db.execute("SELECT * FROM sessions WHERE id = ?", (sid,)).fetchone()
        who = self.gate.principal(self.actor)
        mine = row is not None and (row["principal"] == who.name
                                    or self.config.base_role(who.role) == "platform-engineer")
        if not mine:  # another's session is as unknown as a missing one: ids are not for probing
            raise SessionNotFound(sid)
        if row["ended_at"] is not None:
            raise SessionNotFound(sid, ended=str(row["end_reason"]))
        return dict(row)

    def _session(self, sid: str) -> dict[str, Any]:
        row = dict(self.store.db.execute("SELECT * FROM sessions WHERE id = ?", (sid,)).fetchone())
        b = self.store.find(str(row["branch"]))
        now = time.time()
        row["live"] = row["ended_at"] is None and b is not None
        row["expires_at"] = b.expires_at if b is not None else None
        row["expires_in"] = format_duration(b.expires_at - now) if b is not None and b.expires_at else None
        return row

    # -- quotas -----------------------------------------------------------------------------------
    def check_quota(self, who: Principal, *, branch: bool = False, compute: bool = False) -> None:
        """Refuse a new branch or a new running compute past the principal's quota (QuotaExceeded, exit 2)."""
        limits = self.config.quota(who.role)
        if not limits:
            return
        source = f"quotas.{who.role}" if who.role in self.config.quotas else "quotas.default"
        mine = [b for b in self.store.all() if b.creator == who.name and b.kind in (Kind.FEATURE, Kind.SNAPSHOT)]
        provider = self.branches.provider
        if branch and "branches" in limits and len(mine) >= limits["branches"]:
            raise _over(source, "branches", f"{who.name!r} has {len(mine)} branches alive",
                        "Delete one you no longer need (`tierbase branch list --mine`)")
        if compute and "computes" in limits:
            running = sum(1 for b in mine if provider.running_pid(b.volume))
            if running >= limits["computes"]:
                raise _over(source, "computes", f"{who.name!r} has {running} computes running",
                            "Stop one (`tierbase branch stop NAME`) or end a session")
        if branch and "bytes" in limits:
            used = 0
            for b in mine:
                try:
                    used += provider.own_bytes(b.volume)
                except TierbaseError:
                    continue  # a branch whose size cannot be read now does not block the others
            if used >= limits["bytes"]:
                raise _over(source, "bytes", f"{who.name!r}'s branches own {used} bytes",
                            "Delete or reset branches you no longer need")


def _over(source: str, key: str, what: str, todo: str) -> QuotaExceeded:
    return QuotaExceeded(f"quota {source}.{key} exceeded: {what}, the limit is reached",
                         f"{todo}, or ask a platform engineer to raise {source}.{key} in tierbase.toml",
                         quota=f"{source}.{key}", rule=f"{source}.{key}")

"""Below the branch operations: activity renews a session's lease, the sweep ends the leases whose
branch went (``Renewals``), and the per-principal quotas (``Quotas``). Both take the core only.

Activity renews a lease at most once per ``RENEW_EVERY`` seconds per branch, so 500 connections
cost one SQLite write. Quotas (``[quotas.ROLE]`` or ``[quotas.default]`` in tierbase.toml) bound what
one principal holds: ``branches`` alive (that it created), running ``computes`` of those branches,
and their own ``bytes``; a creation or start past one is refused (exit 2) naming the quota.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .app_base import Core
from .control.leases import Leases
from .control.store import Kind
from .errors import QuotaExceeded, TierbaseError
from .governance.principals import Principal

#: activity renews a lease at most this often per branch (a proxy storm must not become a write storm)
RENEW_EVERY = 15.0

_renewed: dict[str, float] = {}
_renewed_lock = threading.Lock()


class Renewals:
    """Leases that activity renews and the sweep ends (below the branch operations, which use it)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    @property
    def leases(self) -> Leases:
        return Leases(self.core.store)

    def renew_on_activity(self, branch: str, later: Callable[[Callable[[], None]], None] | None = None) -> None:
        """A connection or an API call used ``branch``: push its session's expiry (throttled)."""
        now = time.monotonic()
        with _renewed_lock:
            if now - _renewed.get(branch, -RENEW_EVERY) < RENEW_EVERY:
                return
            _renewed[branch] = now
        leases = self.leases
        live = leases.on_branch(branch)
        if live is None:
            return
        sid, seconds = live
        (later or (lambda f: f()))(lambda: leases.push(branch, seconds, sid))

    def sessions_reclaimed(self) -> list[str]:
        """Sessions whose branch is gone (the sweeper reclaimed it, or it was deleted): ended, audited."""
        leases, store, gate = self.leases, self.core.store, self.core.gate
        out = []
        for sid, principal, branch in leases.live_rows():
            if store.find(branch) is None:
                leases.end(sid, "expired")
                gate.audit.append(actor="tierbase", action="session.expire", target=branch, allowed=True,
                                  reason="ttl: the session's lease ran out (or its branch was deleted)",
                                  after={"session": sid, "principal": principal})
                out.append(sid)
        return out


class Quotas:
    """What one principal may hold (takes the core only: branch operations, SQL and time travel use it)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def check_quota(self, who: Principal, *, branch: bool = False, compute: bool = False) -> None:
        """Refuse a new branch or a new running compute past the principal's quota (QuotaExceeded, exit 2)."""
        config = self.core.config
        limits = config.quota(who.role)
        if not limits:
            return
        source = f"quotas.{who.role}" if who.role in config.quotas else "quotas.default"
        mine = [b for b in self.core.store.all() if b.creator == who.name and b.kind in (Kind.FEATURE, Kind.SNAPSHOT)]
        provider = self.core.branches.provider
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

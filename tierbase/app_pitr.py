"""Facade methods of time travel: branch at a past time or LSN, restore a tier in place, its history.

Tiers keep a history (``[tiers.X] history = "7d"``; features none): their computes archive
WAL (compute/archive.py) and the sweeper takes read-only base snapshots every
``base_interval`` (and promotion takes one) and prunes what the window no longer needs
(control/history.py). Recovery itself is in pitr.py.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from .app_base import FacadeBase
from .compute import archive
from .control import space as spacectl
from .control.branches import new_volume
from .control.history import History
from .control.lifecycle import Op, State, check_op, check_transition
from .control.store import Branch, Kind
from .errors import InvalidInput, OutsideHistory, TierbaseError
from .failpoints import failpoint
from .governance.policy import Action, Subject
from .names import check_name, check_unreserved, parse_ttl
from .pitr import PointInTime, parse_target
from .provider import LocalProvider

log = logging.getLogger("tierbase.history")
DEFAULT_HISTORY = "7d"
DEFAULT_BASE_INTERVAL = "1h"


class PitrOps(FacadeBase):
    # -- wiring ---------------------------------------------------------------------
    @property
    def _keeps_history(self) -> bool:
        """Only the local substrate keeps a history here (status and the sweeper skip it elsewhere)."""
        return isinstance(self.branches.provider, LocalProvider)

    @property
    def _pitr_host(self) -> LocalProvider:
        """Time travel is built on this host's substrate (btrfs snapshots, an archive on the pool)."""
        p = self.branches.provider
        if not isinstance(p, LocalProvider):
            raise InvalidInput("this platform's provider keeps no WAL history here",
                               "Time travel needs the local provider (btrfs snapshots and a WAL archive)")
        return p

    @property
    def history_log(self) -> History:
        h: History | None = getattr(self, "_history", None)
        if h is None or h.store is not self.store:
            h = History(self.store, self._pitr_host, self.home.root / "bin")
            self._history = h
        return h

    def _pit(self) -> PointInTime:
        return PointInTime(self.history_log, self._pitr_host)

    def _tier_setting(self, tier: str, key: str, default: str | None) -> str | None:
        spec = self.config.raw.get("tiers", {}).get(tier, {})
        value = spec.get(key, default)
        return None if value in (None, "", "none", "0") else str(value)

    def history_window(self, tier: str) -> int | None:
        """Seconds of history the tier keeps (None: none)."""
        if tier not in self.config.tiers:
            return None
        text = self._tier_setting(tier, "history", DEFAULT_HISTORY)
        return parse_ttl(text) if text else None

    def _served_tier(self, b: Branch) -> str | None:
        """The declared tier whose route ``b`` serves now."""
        if b.kind is not Kind.TIER:
            return None
        return next((t for t in self.config.tiers if self.store.resolve_route(t) == b.name), None)

    def _compute_settings(self, b: Branch) -> dict[str, str] | None:
        """Branches.start's hook: a compute serving a tier with a history archives its WAL."""
        tier = self._served_tier(b)
        if tier is None or not self.history_window(tier) or not isinstance(self.branches.provider, LocalProvider):
            return None
        try:
            return self.history_log.archive_settings(b)
        except (OSError, TierbaseError) as err:  # a full pool must not keep the tier from serving
            log.warning("%s starts without WAL archiving: %s", b.name, err)
            return None

    def _history_key(self, b: Branch, what: str) -> str:
        key = self.history_log.key(b)
        if key is None or not self.history_log.bases(key):
            tier = self._served_tier(b)
            raise OutsideHistory(f"{what} {b.name!r} has no history to go back in"
                                 + ("" if key else " (it keeps none, or its compute has not archived yet)"),
                                 f"Tiers keep one (`history = \"7d\"` under [tiers.{tier or 'NAME'}] in "
                                 "tierbase.toml); it starts with the first base snapshot")
        return key

    # -- branch at a point in time --------------------------------------------------------
    def create_branch_at(self, name: str, parent: str | None = None, *, at: str | None = None,
                         lsn: str | None = None, inclusive: bool = True, ttl: str | None = None,
                         start: bool = True) -> dict[str, Any]:
        """A writable branch holding ``parent`` exactly as committed at ``at`` (or at ``lsn``)."""
        check_name(name)
        ttl_seconds = parse_ttl(ttl) if ttl else None
        parent = parent or self.config.entry
        parent = self.store.resolve_route(check_name(parent, "parent")) or parent
        with self.gate.act(self.actor, Action.BRANCH_CREATE, self._subject(parent),
                           intent={"op": "create", "branch": name, "parent": parent, "at": at, "lsn": lsn}) as rec:
            check_unreserved(name)
            target, ts = parse_target(at, lsn, inclusive=inclusive)
            self.check_quota(self.gate.principal(self.actor), branch=True, compute=True)  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            spacectl.check_room(self.provider, self.store)  # refused (DiskFull) below the pool's reserve
            pb = self.store.get(parent)
            key = self._history_key(pb, "branch")
            self.history_log.choose(key, at=ts, lsn=target.lsn)  # before the window: refused before any work
            hook = self._mask_hook(name, pb, self._masking_plan(pb))  # type: ignore[attr-defined]
            self.branches.start(parent)  # its archiver must copy the WAL up to the target
            pit = self._pit()
            pit.reach(self.store.get(parent), key, target, ts)
            phases = {"archive_ms": round((time.perf_counter() - t0) * 1000, 1)}

            def fork(b: Branch) -> str:
                t1 = time.perf_counter()
                end = pit.recover(b, key, target, ts, private=hook is not None)
                phases["recover_ms"] = round((time.perf_counter() - t1) * 1000, 1)
                phases["base_id"] = self.history_log.choose(key, at=ts, lsn=target.lsn).id
                if hook is not None:  # masking runs on a compute of its own, before anyone connects
                    self.branches.provider.stop(b.name, b.volume)
                return end

            who = self.gate.principal(self.actor).name
            b = self.branches.create(name, parent, kind=Kind.FEATURE, creator=who, ttl_seconds=ttl_seconds,
                                     start=start, prepare=hook, actor=who, fork=fork)
            rec.after = info = self.describe(b)  # type: ignore[attr-defined]
        info["target"] = {"time": target.time, "lsn": target.lsn, "inclusive": target.inclusive}
        info["phases"] = phases
        info["elapsed_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        return dict(info)

    # -- restore a tier in place ------------------------------------------------------------
    def restore(self, tier: str, *, at: str | None = None, lsn: str | None = None,
                inclusive: bool = True) -> dict[str, Any]:
        """The tier's route serves its past state; the state replaced is kept as ``TIER-before-restore-N``
        (protected, listed). A tier operation: authorized like promotion (agents never)."""
        spec = self.config.tiers.get(tier)
        subject = Subject(name=tier, kind="tier" if spec else "none", protected=bool(spec and spec.protected),
                          tier=tier if spec else None)
        serving = self.store.resolve_route(check_name(tier, "tier"))
        with self.gate.act(self.actor, Action.PROMOTE, subject, before={"serving": serving},
                           intent={"op": "restore", "tier": tier, "at": at, "lsn": lsn}) as rec:
            if spec is None:
                raise InvalidInput(f"{tier!r} is not a declared tier",
                                   f"Declared tiers: {', '.join(self.config.tier_order())}")
            target, ts = parse_target(at, lsn, inclusive=inclusive)
            t0 = time.perf_counter()
            s = self.store.get(str(serving))
            key = self._history_key(s, "tier")
            self.history_log.choose(key, at=ts, lsn=target.lsn)
            self.branches.start(s.name)
            pit = self._pit()
            pit.reach(self.store.get(s.name), key, target, ts)
            keep = self._before_restore_name(tier)
            who = self.gate.principal(self.actor).name
            x = self.store.reserve(name=keep, parent=s.name, kind=Kind.TIER, volume=new_volume(keep),
                                   creator=self.gate.owner, ttl_seconds=None, protected=True, actor=who)
            failpoint("restore:reserved")
            try:
                end = pit.recover(x, key, target, ts)
                _mark_history_ready(self._pitr_host.datadir(x.volume))
                self.branches.provider.stop(x.name, x.volume)
            except BaseException:
                self.branches.provider.delete(x.name, x.volume)
                self.store.remove(x.name)
                raise
            failpoint("restore:recovered")
            out = self._swap_in(tier, s.name, x.name, key, end)
            self._connect_check(s.name)
            rec.after = result = {
                "tier": tier, "serving": s.name, "kept_as": keep, "restored_to": end,
                "target": {"time": target.time, "lsn": target.lsn, "inclusive": target.inclusive},
                "seconds_to_first_query": round(time.perf_counter() - t0, 3),
                "switch_ms": out.get("switch_ms"),
                "hint": f"the state replaced is kept as {keep!r} (protected): `tierbase branch url {keep}`",
            }
        return result

    def _before_restore_name(self, tier: str) -> str:
        pat = re.compile(rf"^{re.escape(tier)}-before-restore-(\d+)$")
        used = [int(m.group(1)) for b in self.store.all() if (m := pat.match(b.name))]
        return f"{tier}-before-restore-{max(used, default=0) + 1}"

    def _swap_in(self, tier: str, serving: str, kept: str, key: str, end: str) -> dict[str, Any]:
        """Exchange the volumes of the serving branch and the kept one in one transaction, with the
        compute stopped, inside the one repoint path's hold of the route (Service.switch): new
        connections wait, then reach the restored state; the same name, port and URL."""
        def change() -> dict[str, Any]:
            with self.branches.lock(serving), self.branches.lock(kept):
                s, x = self.store.get(serving), self.store.get(kept)
                check_op(serving, s.state, Op.REPOINT)
                check_transition(kept, x.state, State.READY)
                self.branches.provider.stop(serving, s.volume)
                failpoint("restore:stopped")
                with self.store.write() as db:  # volume is UNIQUE: through a placeholder
                    db.execute("UPDATE branches SET volume=? WHERE name=?", (f"{s.volume}.swap", serving))
                    db.execute("UPDATE branches SET volume=?, state=?, owner=NULL, fork_lsn=? WHERE name=?",
                               (s.volume, State.READY.value, s.fork_lsn, kept))
                    db.execute("UPDATE branches SET volume=?, fork_lsn=? WHERE name=?", (x.volume, end, serving))
                    db.execute("UPDATE pitr_archives SET volume=? WHERE key=?", (x.volume, key))
                failpoint("restore:swapped")
                self.branches.start(serving)
            return {"route": tier, "branch": serving, "previous": serving}

        if self.router is not None:
            return dict(self.router.switch(tier, change, 0.0))
        return change()

    def _connect_check(self, name: str) -> None:
        import psycopg

        b = self.store.get(name)
        with psycopg.connect(self.branches.provider.endpoint(b.port).dsn(), connect_timeout=10) as conn:
            conn.execute("SELECT 1")

    # -- what can be reached --------------------------------------------------------------
    def history(self, tier: str, *, with_bytes: bool = True) -> dict[str, Any]:
        check_name(tier, "tier")
        serving = self.store.resolve_route(tier)
        if serving is None:
            raise InvalidInput(f"{tier!r} is neither a tier nor a branch", "Run `tierbase branch list`")
        self._require(Action.BRANCH_CONNECT, self._subject(serving), quiet=True)
        b = self.store.get(serving)
        key = self.history_log.key(b)
        out: dict[str, Any] = {"tier": tier, "serving": serving, "window": self._tier_setting(tier, "history",
                               DEFAULT_HISTORY) if tier in self.config.tiers else None,
                               "base_interval": self._tier_setting(tier, "base_interval", DEFAULT_BASE_INTERVAL),
                               "kept_states": [x.name for x in self.store.all()
                                               if x.name.startswith(f"{tier}-before-restore-")]}
        if key is None:
            return {**out, "oldest": None, "newest": None, "bases": [], "wal": {"segments": 0, "bytes": 0}}
        out.update(self.history_log.describe(key, with_bytes=with_bytes))
        newest: dict[str, Any] | None = None
        if out["oldest"] is not None:
            if self.branches.provider.running_pid(b.volume) is not None:
                newest = {"time": "now", "lsn": self._current_lsn(b)}
            else:
                segs = [s for s in archive.segments(self.history_log.wal_dir(key)) if archive.segment_range(s.name)]
                newest = {"time": _iso(max([s.mtime for s in segs], default=time.time())), "lsn": None}
        out["newest"] = newest
        out["archiver"] = self._archiver(b)
        return out

    def _archiver(self, b: Branch) -> dict[str, Any] | None:
        """pg_stat_archiver of a running tier: is archiving keeping up (a full pool makes it fail while
        the tier goes on serving; WAL then waits in pg_wal and is archived once there is room)."""
        import psycopg

        if self.branches.provider.running_pid(b.volume) is None:
            return None
        try:
            with psycopg.connect(self.branches.provider.endpoint(b.port).dsn(), autocommit=True,
                                 connect_timeout=5) as conn:
                row = conn.execute("SELECT archived_count, last_archived_wal, failed_count, last_failed_wal, "
                                   "coalesce(last_failed_time > coalesce(last_archived_time, 'epoch'), false) "
                                   "FROM pg_stat_archiver").fetchone()
        except psycopg.Error:
            return None
        if row is None:
            return None
        return {"archived": row[0], "last_archived": row[1], "failed": row[2], "last_failed": row[3],
                "failing": bool(row[4])}

    def history_warnings(self) -> list[str]:
        """For `status`: tiers whose archiver is failing (their history has a gap until it catches up)."""
        out: list[str] = []
        if not self._keeps_history:
            return out
        for tier in self.config.tiers:
            serving = self.store.resolve_route(tier)
            b = self.store.find(serving) if serving else None
            if b is None or not self.history_window(tier) or self.history_log.key(b) is None:
                continue
            arch = self._archiver(b)
            if arch and arch["failing"]:
                out.append(f"{tier}: WAL archiving is failing at {arch['last_failed']} (is the pool full?); "
                           "the tier keeps serving and the archive catches up once it can write again")
        return out

    def _current_lsn(self, b: Branch) -> str | None:
        import psycopg

        try:
            with psycopg.connect(self.branches.provider.endpoint(b.port).dsn(), autocommit=True,
                                 connect_timeout=5) as conn:
                row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            return str(row[0]) if row else None
        except psycopg.Error:
            return None

    # -- the sweeper's part ------------------------------------------------------------------
    def take_base_snapshot(self, tier: str, reason: str = "manual") -> dict[str, Any]:
        """A base snapshot of the branch serving ``tier`` now (the schedule and promotions call this)."""
        serving = self.store.resolve_route(check_name(tier, "tier"))
        if serving is None:
            raise InvalidInput(f"{tier!r} is not a tier", "Run `tierbase branch list`")
        return self.history_log.take_base(serving, reason).to_dict()

    def history_tick(self, now: float | None = None) -> list[str]:
        """Base snapshots when due, retention, and the removal of histories no branch continues."""
        now = time.time() if now is None else now
        said: list[str] = []
        if not self._keeps_history:
            return said
        for tier in self.config.tiers:
            window = self.history_window(tier)
            serving = self.store.resolve_route(tier)
            b = self.store.find(serving) if serving else None
            if not window or b is None or b.state is not State.READY:
                continue
            key = self.history_log.key(b)
            if key is None:
                continue  # its compute has not run with archiving yet
            every = parse_ttl(self._tier_setting(tier, "base_interval", DEFAULT_BASE_INTERVAL) or "1h")
            bases = self.history_log.bases(key)
            try:
                if not bases or now - bases[-1].taken_at >= every:
                    base = self.history_log.take_base(b.name, "schedule" if bases else "first")
                    said.append(f"base snapshot #{base.id} of {tier!r} ({b.name})")
                said += self.history_log.prune(key, window, now)
            except TierbaseError as err:
                said.append(f"history of {tier!r}: {err.message}")
        said += self.history_log.retire_unused()
        return said


def _mark_history_ready(datadir: Any) -> None:
    """The timeline a recovery started is archived once the tier serves it (its compute recovered with
    archiving off, so that a restore given up never leaves an abandoned timeline in the archive)."""
    wal = datadir / "pg_wal"
    for p in wal.glob("*.history"):
        ready, done = wal / "archive_status" / f"{p.name}.ready", wal / "archive_status" / f"{p.name}.done"
        if not ready.exists() and not done.exists():
            ready.write_text("")
            st = p.stat()
            import os

            os.chown(ready, st.st_uid, st.st_gid)


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")

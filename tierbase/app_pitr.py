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

from .app_base import Core
from .app_leases import Quotas
from .app_masking import Masking
from .control import connect
from .control import space as spacectl
from .control.branches import Branches, new_volume
from .control.history import History, archiver_status, current_lsn, mark_timeline_ready
from .control.lifecycle import Op, State, check_op, check_transition
from .control.store import Branch, Kind, Store
from .errors import InvalidInput, OutsideHistory, TierbaseError
from .failpoints import failpoint
from .governance.config import Config
from .governance.policy import Action, Subject
from .names import check_name, check_unreserved, parse_ttl
from .pitr import PointInTime, parse_target
from .provider import LocalProvider

log = logging.getLogger("tierbase.history")
DEFAULT_HISTORY = "7d"
DEFAULT_BASE_INTERVAL = "1h"


class TierHistory:
    """A tier's history as the other services see it (takes the core only): whether this platform
    keeps one, each tier's window, the archive settings of a compute's start, a base at promotion."""

    def __init__(self, core: Core) -> None:
        self.core = core

    @property
    def keeps_history(self) -> bool:
        """Only the local substrate keeps a history here (status and the sweeper skip it elsewhere)."""
        return isinstance(self.core.branches.provider, LocalProvider)

    @property
    def host(self) -> LocalProvider:
        """Time travel is built on this host's substrate (btrfs snapshots, an archive on the pool)."""
        p = self.core.branches.provider
        if not isinstance(p, LocalProvider):
            raise InvalidInput("this platform's provider keeps no WAL history here",
                               "Time travel needs the local provider (btrfs snapshots and a WAL archive)")
        return p

    @property
    def history_log(self) -> History:
        wires = self.core.wires  # one per platform, made again for a store opened anew
        h = wires.history
        if h is None or h.store is not self.core.store:
            h = History(self.core.store, self.host, self.core.home.root / "bin")
            wires.history = h
        return h

    def pit(self) -> PointInTime:
        return PointInTime(self.history_log, self.host)

    def tier_setting(self, tier: str, key: str, default: str | None) -> str | None:
        spec = self.core.config.raw.get("tiers", {}).get(tier, {})
        value = spec.get(key, default)
        return None if value in (None, "", "none", "0") else str(value)

    def history_window(self, tier: str) -> int | None:
        """Seconds of history the tier keeps (None: none)."""
        if tier not in self.core.config.tiers:
            return None
        text = self.tier_setting(tier, "history", DEFAULT_HISTORY)
        return parse_ttl(text) if text else None

    def served_tier(self, b: Branch) -> str | None:
        """The declared tier whose route ``b`` serves now."""
        if b.kind is not Kind.TIER:
            return None
        return next((t for t in self.core.config.tiers if self.core.store.resolve_route(t) == b.name), None)

    def compute_settings(self, b: Branch) -> dict[str, str] | None:
        """Branches.start's hook: a compute serving a tier with a history archives its WAL."""
        tier = self.served_tier(b)
        if tier is None or not self.history_window(tier) or not self.keeps_history:
            return None
        try:
            return self.history_log.archive_settings(b)
        except (OSError, TierbaseError) as err:  # a full pool must not keep the tier from serving
            log.warning("%s starts without WAL archiving: %s", b.name, err)
            return None

    def history_key(self, b: Branch, what: str) -> str:
        key = self.history_log.key(b)
        if key is None or not self.history_log.bases(key):
            tier = self.served_tier(b)
            raise OutsideHistory(f"{what} {b.name!r} has no history to go back in"
                                 + ("" if key else " (it keeps none, or its compute has not archived yet)"),
                                 f"Tiers keep one (`history = \"7d\"` under [tiers.{tier or 'NAME'}] in "
                                 "tierbase.toml); it starts with the first base snapshot")
        return key

    def base_at_promotion(self, serving: Branch) -> None:
        """A base snapshot of the tier's history before a promotion's migrations run, when it keeps one."""
        if self.keeps_history and self.history_log.key(serving) is not None:
            self.history_log.take_base(serving.name, "promotion")


class Pitr:
    """Time travel: takes the core, the tier history, the masking service (a branch at a point in time
    is masked like any other) and the quotas."""

    def __init__(self, core: Core, tiers: TierHistory, masking: Masking, quotas: Quotas) -> None:
        self.core = core
        self.tiers = tiers
        self.masking = masking
        self.quotas = quotas

    @property
    def config(self) -> Config:
        return self.core.config

    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def branches(self) -> Branches:
        return self.core.branches

    @property
    def history_log(self) -> History:
        return self.tiers.history_log

    # -- branch at a point in time --------------------------------------------------------
    def create_branch_at(self, name: str, parent: str | None = None, *, at: str | None = None,
                         lsn: str | None = None, inclusive: bool = True, ttl: str | None = None,
                         start: bool = True) -> dict[str, Any]:
        """A writable branch holding ``parent`` exactly as committed at ``at`` (or at ``lsn``)."""
        check_name(name)
        ttl_seconds = parse_ttl(ttl) if ttl else None
        parent = parent or self.config.entry
        parent = self.store.resolve_route(check_name(parent, "parent")) or parent
        with self.core.act(Action.BRANCH_CREATE, self.core.subject(parent),
                           intent={"op": "create", "branch": name, "parent": parent, "at": at, "lsn": lsn}) as rec:
            check_unreserved(name)
            target, ts = parse_target(at, lsn, inclusive=inclusive)
            self.quotas.check_quota(self.core.principal(), branch=True, compute=True)
            t0 = time.perf_counter()
            spacectl.check_room(self.core.provider, self.store)  # refused (DiskFull) below the pool's reserve
            pb = self.store.get(parent)
            key = self.tiers.history_key(pb, "branch")
            self.history_log.choose(key, at=ts, lsn=target.lsn)  # before the window: refused before any work
            hook = self.masking.hook(name, pb, self.masking.plan(pb))
            self.branches.start(parent)  # its archiver must copy the WAL up to the target
            pit = self.tiers.pit()
            pit.reach(self.store.get(parent), key, target, ts)
            phases: dict[str, Any] = {"archive_ms": round((time.perf_counter() - t0) * 1000, 1)}

            def fork(b: Branch) -> str:
                t1 = time.perf_counter()
                end = pit.recover(b, key, target, ts, private=hook is not None)
                phases["recover_ms"] = round((time.perf_counter() - t1) * 1000, 1)
                phases.update(pit.phases)
                phases["base_id"] = self.history_log.choose(key, at=ts, lsn=target.lsn).id
                if hook is not None:  # masking runs on a compute of its own, before anyone connects
                    self.branches.provider.stop(b.name, b.volume)
                return end

            who = self.core.principal().name
            b = self.branches.create(name, parent, kind=Kind.FEATURE, creator=who, ttl_seconds=ttl_seconds,
                                     start=start, prepare=hook, actor=who, fork=fork)
            rec.after = info = self.core.describe(b)
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
        with self.core.act(Action.PROMOTE, subject, before={"serving": serving},
                           intent={"op": "restore", "tier": tier, "at": at, "lsn": lsn}) as rec:
            if spec is None:
                raise InvalidInput(f"{tier!r} is not a declared tier",
                                   f"Declared tiers: {', '.join(self.config.tier_order())}")
            target, ts = parse_target(at, lsn, inclusive=inclusive)
            t0 = time.perf_counter()
            s = self.store.get(str(serving))
            key = self.tiers.history_key(s, "tier")
            self.history_log.choose(key, at=ts, lsn=target.lsn)
            self.branches.start(s.name)
            pit = self.tiers.pit()
            pit.reach(self.store.get(s.name), key, target, ts)
            keep = self._before_restore_name(tier)
            who = self.core.principal().name
            x = self.store.reserve(name=keep, parent=s.name, kind=Kind.TIER, volume=new_volume(keep),
                                   creator=self.core.gate.owner, ttl_seconds=None, protected=True, actor=who)
            failpoint("restore:reserved")
            try:
                end = pit.recover(x, key, target, ts)
                mark_timeline_ready(self.tiers.host.datadir(x.volume))
                self.branches.provider.stop(x.name, x.volume)
            except BaseException:
                self.branches.provider.delete(x.name, x.volume)
                self.store.remove(x.name)
                raise
            failpoint("restore:recovered")
            out = self._swap_in(tier, s.name, x.name, key, end)
            connect.answers(self.branches, s.name)
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
                self.history_log.swap(s, x, key, end)
                failpoint("restore:swapped")
                self.branches.start(serving)
            return {"route": tier, "branch": serving, "previous": serving}

        return self.core.switch(tier, change)

    # -- what can be reached --------------------------------------------------------------
    def history(self, tier: str, *, with_bytes: bool = True) -> dict[str, Any]:
        check_name(tier, "tier")
        serving = self.store.resolve_route(tier)
        if serving is None:
            raise InvalidInput(f"{tier!r} is neither a tier nor a branch", "Run `tierbase branch list`")
        self.core.require(Action.BRANCH_CONNECT, self.core.subject(serving), quiet=True)
        b = self.store.get(serving)
        key = self.history_log.key(b)
        out: dict[str, Any] = {"tier": tier, "serving": serving, "window": self.tiers.tier_setting(tier, "history",
                               DEFAULT_HISTORY) if tier in self.config.tiers else None,
                               "base_interval": self.tiers.tier_setting(tier, "base_interval", DEFAULT_BASE_INTERVAL),
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
                newest = {"time": _iso(self.history_log.newest_archived(key)), "lsn": None}
        out["newest"] = newest
        out["archiver"] = self._archiver(b)
        return out

    def _archiver(self, b: Branch) -> dict[str, Any] | None:
        """pg_stat_archiver of a running tier: is archiving keeping up (a full pool makes it fail while
        the tier goes on serving; WAL then waits in pg_wal and is archived once there is room)."""
        if self.branches.provider.running_pid(b.volume) is None:
            return None
        return archiver_status(self.branches.provider.endpoint(b.port).dsn())

    def history_warnings(self) -> list[str]:
        """For `status`: tiers whose archiver is failing (their history has a gap until it catches up)."""
        out: list[str] = []
        if not self.tiers.keeps_history:
            return out
        for tier in self.config.tiers:
            serving = self.store.resolve_route(tier)
            b = self.store.find(serving) if serving else None
            if b is None or not self.tiers.history_window(tier) or self.history_log.key(b) is None:
                continue
            arch = self._archiver(b)
            if arch and arch["failing"]:
                out.append(f"{tier}: WAL archiving is failing at {arch['last_failed']} (is the pool full?); "
                           "the tier keeps serving and the archive catches up once it can write again")
        return out

    def _current_lsn(self, b: Branch) -> str | None:
        return current_lsn(self.branches.provider.endpoint(b.port).dsn())

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
        if not self.tiers.keeps_history:
            return said
        for tier in self.config.tiers:
            window = self.tiers.history_window(tier)
            serving = self.store.resolve_route(tier)
            b = self.store.find(serving) if serving else None
            if not window or b is None or b.state is not State.READY:
                continue
            key = self.history_log.key(b)
            if key is None:
                continue  # its compute has not run with archiving yet
            every = parse_ttl(self.tiers.tier_setting(tier, "base_interval", DEFAULT_BASE_INTERVAL) or "1h")
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


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")

"""The rollback's repoint: a writable copy of a pre-promotion snapshot takes over a tier's route, with
the writes the replaced branch received replayed onto it first (migrate/replay.py).

``Repoints`` takes the core only: the automatic rollback of a failed promotion (migrations), a
rollback by hand and a reconcile (rollbacks) all go through it, so neither of those services needs
the other. The replay runs twice: while the replaced branch still serves, then inside the proxy's
hold of the route once its sessions are ended, so that every write it acknowledged reaches the
branch that serves the route next.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import psycopg

from .app_base import Core
from .control.branches import Branches
from .control.store import Kind, Store
from .failpoints import failpoint
from .migrate.datadiff import data_diff
from .migrate.promote import PromotionLog
from .migrate.replay import (
    EXCLUDED_SCHEMAS,
    ReplayReport,
    RollbackLog,
    advance_sequences,
    apply,
    current_xmin,
    end_sessions,
    written_since,
)
from .provider import SUPERUSER


class Repoints:
    def __init__(self, core: Core) -> None:
        self.core = core

    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def branches(self) -> Branches:
        return self.core.branches

    def _platform(self, branch: str) -> AbstractContextManager[psycopg.Connection[Any]]:
        """The platform's own session on a branch's project database (superuser, unix socket): a replay
        writes rows as they were, without the owner's triggers, which only a superuser may switch off."""
        return self.core.connect(branch, SUPERUSER)

    def _undone_labels(self, tier: str, snapshot: str) -> list[str]:
        """The migrations a rollback to ``snapshot`` takes away: of the promotion that took it (also when it
        failed: some of them may have run) and of every promotion since."""
        history = PromotionLog(self.store).history(tier)
        origin = next((p for p in history if p["snapshot"] == snapshot), None)
        return [m for p in history if origin is not None and p["id"] >= origin["id"] for m in p["migrations"]]

    def _undone_tables(self, tier: str, snapshot: str) -> set[str]:
        """The tables the migrations a rollback to ``snapshot`` undoes name in their statements."""
        history = PromotionLog(self.store).history(tier)
        origin = next((p for p in history if p["snapshot"] == snapshot), None)
        ids = [p["id"] for p in history if origin is not None and p["id"] >= origin["id"]]
        return RollbackLog(self.store).touches(ids)

    def to_snapshot(self, tier: str, snapshot: str, name: str,
                    why: str = "rollback: the tier returns to its pre-promotion snapshot", *,
                    kind: str = "automatic", discard: bool = False) -> str:
        """A writable copy of ``snapshot`` takes over the tier's route, with the writes the replaced branch
        received replayed onto it first (unless ``discard``); audited before and after the switch."""
        old = self.core.serving(tier).name
        log = RollbackLog(self.store)
        rid = log.begin(tier=tier, kind=kind, snapshot=snapshot, branch=name, replaced=old, discard=int(discard),
                        actor=self.core.principal().name if kind == "manual" else "tierbase")
        self.core.gate.audit.append(actor="tierbase", action="route.repoint", target=tier, allowed=True, reason=why,
                                    outcome="intent", before={"branch": old},
                                    after={"branch": name, "from": snapshot, "rollback": rid})
        t0 = time.perf_counter()
        try:
            if self.store.find(name) is None:  # a reconcile may finish a rollback whose branch was made
                # protected only once it serves the tier: until then a reconcile may delete a half-replayed copy
                self.branches.create(name, snapshot, kind=Kind.TIER, creator=self.core.gate.owner, protected=False,
                                     actor="tierbase")
            self.branches.start(name)
            report, prepare, hold = ReplayReport(), None, [0.0]
            if not discard and self.store.get(old).kind is not Kind.SNAPSHOT:
                prepare = self._replay(tier, snapshot, old, name, report, hold)
            self.core.move_route(tier, name, prepare=prepare)
        except BaseException as err:
            log.update(rid, status="failed", finished_at=time.time(), owner=None,
                       report=json.dumps({"error": str(err)}))
            raise
        route = self.keep_replaced(tier, name, old)
        left = report.left_sql(route, tier)
        log.update(rid, status="done", finished_at=time.time(), owner=None, replaced_route=route,
                   replayed=report.rows_replayed, left_rows=report.rows_left, left_sql=left,
                   added_ms=int((time.perf_counter() - t0) * 1000), hold_ms=int(hold[0] * 1000),
                   report=json.dumps(report.to_dict(), default=str))
        audit = self.core.gate.audit
        audit.append(actor="tierbase", action="route.repoint", target=tier, allowed=True, reason=why,
                     before={"branch": old},
                     after={"branch": name, "replaced_route": route, "rows_replayed": report.rows_replayed,
                            "rows_left": report.rows_left, "discard_writes": discard})
        return name

    def keep_replaced(self, tier: str, branch: str, old: str) -> str:
        """After the switch: the new branch is the tier's (protected like it), the replaced one gets a
        route of its own, ``<tier>-replaced-<n>``, so that hints can name a URL that reaches it."""
        self.store.set_protected(branch, self.core.config.tiers[tier].protected)
        route = f"{tier}-replaced-{RollbackLog(self.store).replaced_count(tier) + 1}"
        self.store.set_route(route, old)
        return route

    def _replay(self, tier: str, snapshot: str, old: str, new: str, report: ReplayReport,
                hold: list[float]) -> Callable[[], None]:
        """Replay pass 1 now (the replaced branch still serves); returns pass 2, for inside the hold.

        Pass 2 compares every table again, once the replaced branch's sessions are ended: its write
        counters (pg_stat_user_tables) looked like a cheaper guide to the tables written since, but a
        live backend flushes them only about once a second, and tests lost rows by trusting them."""
        changed = self._undone_tables(tier, snapshot)
        report.migrations_undone = self._undone_labels(tier, snapshot)
        with self._platform(old) as oc, self._platform(new) as nc:
            later = current_xmin(oc)  # pass 2 looks only at what was written after this
            fork = self._fork_xmin(tier, snapshot)
            first = written_since(oc, nc, fork) if fork else None
        report.then(self._replay_pass(old, new, changed, first), [])
        failpoint("rollback:replayed")

        def final() -> None:
            t0 = time.perf_counter()
            with self._platform(old) as oc, self._platform(new) as nc:
                end_sessions(oc)
                tables = written_since(oc, nc, later)
            again = self._replay_pass(old, new, changed, tables)
            report.then(again, tables)
            report.final_tables = sorted(tables)
            with self._platform(old) as oc, self._platform(new) as nc:
                report.sequences = advance_sequences(oc, nc)
            failpoint("rollback:final")
            hold[0] = time.perf_counter() - t0
        return final

    def _fork_xmin(self, tier: str, snapshot: str) -> str | None:
        origin = next((p for p in PromotionLog(self.store).history(tier) if p["snapshot"] == snapshot), None)
        return RollbackLog(self.store).fork_xmin(int(origin["id"])) if origin else None

    def _replay_pass(self, old: str, new: str, changed: set[str], tables: set[str] | None) -> ReplayReport:
        """One diff of ``tables`` (None: all) from the snapshot's copy to the replaced branch, applied."""
        if tables is not None and not tables:
            return ReplayReport()
        with self._platform(new) as nc, self._platform(old) as oc:
            d = data_diff(nc, oc, a_label=new, b_label=old, tables=tables, exclude_schemas=EXCLUDED_SCHEMAS)
            return apply(d, nc, changed=changed, replaced=old)

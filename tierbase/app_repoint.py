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
import logging
import secrets
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import psycopg

from .app_base import Core, StartSettings
from .control.branches import Branches
from .control.store import Branch, Kind, Store
from .failpoints import failpoint
from .migrate import logical
from .migrate.datadiff import data_diff, diff_keys, shapes, stable_session
from .migrate.logical import Changes, SlotLog
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

log = logging.getLogger(__name__)


def with_decoding(base: StartSettings) -> StartSettings:
    """Branches.start's hook: ``base``'s settings (WAL archiving) plus logical decoding on tier branches."""
    def settings(b: Branch) -> dict[str, str] | None:
        got = {**(base(b) or {}), **(logical.compute_settings(b.kind is Kind.TIER) or {})}
        return got or None
    return settings


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
            with ExitStack() as held:  # the replay's session on the replaced branch (its slot copy), if any
                if not discard and self.store.get(old).kind is not Kind.SNAPSHOT:
                    prepare = self._replay(tier, snapshot, old, name, report, hold, held)
                self.core.move_route(tier, name, prepare=prepare)
        except BaseException as err:
            log.update(rid, status="failed", finished_at=time.time(), owner=None,
                       report=json.dumps({"error": str(err)}))
            raise
        route = self.keep_replaced(tier, name, old)
        self._close_slots(old, f"dropped at rollback #{rid}")
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

    # -- the promotion's slot (migrate/logical.py) ------------------------------------------------------
    def open_slot(self, promotion: int, serving: str) -> None:
        """Just before a promotion's snapshot: drop the slots of earlier promotions on the tier's branch
        and make this one's, so that a rollback decodes only the writes made since. Never fatal to the
        promotion: without a slot, a rollback uses the data diff (and says why)."""
        if not logical.enabled():
            return
        slots = SlotLog(self.store)
        name = slots.begin(promotion, serving)
        try:
            with self._platform(serving) as conn:
                gone = logical.drop_slots(conn)
                slots.dropped(gone, f"dropped at promotion #{promotion}")
                lsn = logical.create_slot(conn, name)
        except psycopg.Error as err:
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            slots.made(promotion, None, f"no slot: {why}")
            log.warning("promotion #%s: no logical slot on %s (%s); a rollback will use the data diff",
                        promotion, serving, why)
            return
        slots.made(promotion, lsn)

    def _close_slots(self, branch: str, why: str) -> None:
        """The replaced branch holds WAL for nobody now: drop its slots (bounded anyway, see logical.py)."""
        if not logical.enabled() and not SlotLog(self.store).live(branch):
            return
        b = self.store.find(branch)
        if b is None or b.kind is Kind.SNAPSHOT:
            return
        try:
            with self._platform(branch) as conn:
                SlotLog(self.store).dropped(logical.drop_slots(conn), why)
        except psycopg.Error as err:
            log.warning("slots of %s not dropped (%s): max_slot_wal_keep_size bounds them", branch, err)

    def _slot_for(self, tier: str, snapshot: str, old: str) -> tuple[str | None, str | None]:
        """The promotion's slot if a replay can decode from it, else why not."""
        if not logical.enabled():
            return None, None
        origin = next((p for p in PromotionLog(self.store).history(tier) if p["snapshot"] == snapshot), None)
        if origin is None:
            return None, f"no promotion took {snapshot!r}"
        rec = SlotLog(self.store).get(int(origin["id"]))
        if rec is None or rec["lsn"] is None:
            return None, f"promotion #{origin['id']} made no slot" + (f" ({rec['note']})" if rec else "")
        if rec["dropped_at"] is not None:
            return None, f"slot {rec['slot']} is gone ({rec['note']})"
        if rec["branch"] != old:
            return None, f"slot {rec['slot']} is on {rec['branch']!r}, not on the replaced branch {old!r}"
        try:
            with self._platform(old) as conn:
                why = logical.usable(conn, str(rec["slot"]), str(rec["lsn"]))
        except psycopg.Error as err:
            why = f"slot {rec['slot']} unreadable: {err}"
        return (None, why) if why else (str(rec["slot"]), None)

    def _replay(self, tier: str, snapshot: str, old: str, new: str, report: ReplayReport,
                hold: list[float], held: ExitStack) -> Callable[[], None]:
        """Pass 1 now, pass 2 returned for inside the hold: by logical decoding when the promotion's slot
        serves, else (said in the report) by the data diff."""
        changed = self._undone_tables(tier, snapshot)
        report.migrations_undone = self._undone_labels(tier, snapshot)
        slot, why = self._slot_for(tier, snapshot, old)
        if slot is not None:
            try:
                return self._replay_logical(old, new, changed, slot, report, hold, held)
            except psycopg.Error as err:  # before anything was applied: the diff does it all
                why = f"decoding failed: {str(err).strip().splitlines()[0] if str(err).strip() else err!r}"
        report.method, report.fallback = "diff", why
        return self._replay_diff(tier, snapshot, old, new, changed, report, hold)

    def _replay_logical(self, old: str, new: str, changed: set[str], slot: str, report: ReplayReport,
                        hold: list[float], held: ExitStack) -> Callable[[], None]:
        """Pass 1: a temporary copy of the promotion's slot, held by one session on the replaced branch
        (``held``), names the keys written so far; those keys are compared and applied. Pass 2, in the
        hold: that session ends the others, and the copy gives only what came after pass 1."""
        reader = ExitStack()
        conn = reader.enter_context(self._platform(old))
        try:
            stable_session(conn)  # key text forms as the diff reads them (time zone, bytea, ...)
            later = current_xmin(conn)  # the diff's starting point if decoding fails inside the hold
            copy = f"{slot}_r{secrets.token_hex(3)}"
            logical.open_copy(conn, slot, copy)
            first = logical.read_changes(conn, copy, shapes(conn, EXCLUDED_SCHEMAS))
        except BaseException:
            reader.close()
            raise
        held.push(reader)
        report.method = "logical"
        report.decoded.append(first.to_dict())
        rep1 = self._keys_pass(old, new, changed, first)
        report.then(rep1, [])
        failpoint("rollback:replayed")

        def final() -> None:
            t0 = time.perf_counter()
            try:
                end_sessions(conn)
                again = logical.read_changes(conn, copy, shapes(conn, EXCLUDED_SCHEMAS))
                again.add(first, rep1.left)  # what pass 1 left is compared again, so pass 2's word is whole
                report.decoded.append(again.to_dict())
                tables = again.tables()
                later_pass = self._keys_pass(old, new, changed, again)
            except psycopg.Error as err:  # the diff of what was written after pass 1 began
                report.fallback = f"decoding failed inside the hold, the data diff finished: {err}"
                with self._platform(old) as oc, self._platform(new) as nc:
                    end_sessions(oc)
                    tables = written_since(oc, nc, later)
                later_pass = self._replay_pass(old, new, changed, tables)
            reader.close()  # the copy of the slot goes with its session
            report.then(later_pass, tables)
            report.final_tables = sorted(tables)
            with self._platform(old) as oc, self._platform(new) as nc:
                report.sequences = advance_sequences(oc, nc)
            failpoint("rollback:final")
            hold[0] = time.perf_counter() - t0
        return final

    def _keys_pass(self, old: str, new: str, changed: set[str], ch: Changes) -> ReplayReport:
        """The keys a read of the slot named, compared on both branches and applied (replay.apply)."""
        if not ch.tables():
            return ReplayReport()
        with self._platform(new) as nc, self._platform(old) as oc:
            d = diff_keys(nc, oc, ch.keys, whole=ch.whole, a_label=new, b_label=old,
                          exclude_schemas=EXCLUDED_SCHEMAS)
            return apply(d, nc, changed=changed, replaced=old)

    def _replay_diff(self, tier: str, snapshot: str, old: str, new: str, changed: set[str],
                     report: ReplayReport, hold: list[float]) -> Callable[[], None]:
        """Replay pass 1 now (the replaced branch still serves); returns pass 2, for inside the hold.

        Pass 2 compares every table again, once the replaced branch's sessions are ended: its write
        counters (pg_stat_user_tables) looked like a cheaper guide to the tables written since, but a
        live backend flushes them only about once a second, and tests lost rows by trusting them."""
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

"""Facade methods of rollback: explicit about what it undoes, and keeping the writes by default.

``rollback TIER`` returns the tier to a pre-promotion snapshot by repoint (O(1)),
after replaying onto the snapshot's copy the rows the application wrote since
(migrate/replay.py): first while the replaced branch still serves, then inside
the proxy's hold of the route once its sessions are ended, so that every write
it acknowledged reaches the branch that serves the route next. The replaced
branch keeps a route of its own (``<tier>-replaced-<n>``), is protected until
someone deletes it, and holds whatever was not replayed, with the SQL to apply
it. The same replay runs for the automatic rollback of a failed promotion and
for one a reconcile finishes.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from .app_data import DataOps
from .control.store import Kind
from .errors import InvalidInput, Refused
from .failpoints import failpoint
from .governance.policy import Action
from .migrate.datadiff import data_diff
from .migrate.promote import PromotionLog, rollback_name
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


class RollbackNeedsConfirmation(Refused):
    code = "rollback_needs_confirmation"


class RollbackOps(DataOps):
    @contextmanager
    def _platform(self, branch: str) -> Iterator[psycopg.Connection[Any]]:
        """The platform's own session on a branch's project database (superuser, unix socket): a replay
        writes rows as they were, without the owner's triggers, which only a superuser may switch off."""
        self.branches.start(branch)
        dsn = self.branches.provider.endpoint(self.store.get(branch).port, self._database, role=SUPERUSER).dsn()
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            yield conn

    # -- what a rollback would undo ---------------------------------------------------------------------
    def rollback_plan(self, tier: str, to: str | None = None) -> dict[str, Any]:
        """The snapshot a rollback of TIER returns to, its age, the promotions and migrations it undoes,
        and whether it needs ``--to`` and ``--yes`` (past more than one promotion, or already rolled back)."""
        self._tier_subject(tier)
        history = PromotionLog(self.store).history(tier)
        serving = self._serving(tier)
        taken = [p for p in history if p["snapshot"]]
        if to is None:
            if not taken:
                raise Refused(f"{tier!r} has no pre-promotion snapshot to roll back to",
                              f"Run `tierbase promotions --tier {tier}` to see its history")
            snapshot = str(taken[-1]["snapshot"])
        else:
            snapshot = to
        snap = self.store.find(snapshot)
        if snap is None or snap.kind is not Kind.SNAPSHOT:
            raise InvalidInput(f"{snapshot!r} is not a snapshot",
                               f"Pass a pre-promotion snapshot of {tier!r}: "
                               f"{', '.join(str(p['snapshot']) for p in taken) or '(none yet)'}")
        if self.gate.tier_of(snap) != tier:
            raise Refused(f"{snapshot!r} holds the data of {self.gate.tier_of(snap)!r}, not of {tier!r}",
                          f"Pass a snapshot of {tier!r}: {', '.join(str(p['snapshot']) for p in taken) or '(none)'}")
        origin = next((p for p in history if p["snapshot"] == snapshot), None)
        since = [p for p in history if (p["id"] >= origin["id"] if origin else p["started_at"] >= snap.created_at)]
        undone = [p for p in since if p["status"] == "succeeded"]
        rolled_back = self._rolled_back(tier, serving.name, history)
        reasons = []
        if len(undone) > 1:
            reasons.append(f"it undoes {len(undone)} promotions (#{', #'.join(str(p['id']) for p in undone)})")
        if rolled_back:
            reasons.append(f"{tier!r} is already rolled back (served by {serving.name!r}, {rolled_back})")
        return {"tier": tier, "snapshot": snapshot, "snapshot_age_s": round(time.time() - snap.created_at, 1),
                "serving": serving.name, "promotions_undone": [p["id"] for p in undone],
                "migrations_undone": [m for p in undone for m in p["migrations"]],
                "needs_confirmation": bool(reasons), "why_confirm": reasons}

    def _rolled_back(self, tier: str, serving: str, history: list[dict[str, Any]]) -> str | None:
        """Why the tier counts as rolled back already: its latest event is a rollback (by hand, or of a
        failed promotion) that left ``serving`` in place, not a promotion that succeeded since."""
        events = [(float(p["finished_at"] or 0), p) for p in history if p["status"] == "succeeded"]
        events += [(float(r["finished_at"] or 0), r) for r in RollbackLog(self.store).history(tier)
                   if r["status"] == "done"]
        if not events:
            return None
        _, last = max(events, key=lambda e: e[0])
        if "kind" in last and last["branch"] == serving:
            what = "a failed promotion" if last["kind"] == "automatic" else "rollback"
            return f"{what} #{last['id']} already returned it to {last['snapshot']}" if last["kind"] == "manual" \
                else f"{what} was rolled back to {last['snapshot']}"
        return None

    # -- the rollback ----------------------------------------------------------------------------------
    def rollback(self, tier: str, to: str | None = None, *, discard_writes: bool = False, yes: bool = False,
                 dry_run: bool = False) -> dict[str, Any]:
        """Point TIER's route at a writable copy of a pre-promotion snapshot, replaying the writes made
        since onto it unless ``discard_writes``; keep what it replaces under a route of its own."""
        target = self._tier_subject(tier)
        if not self.gate.decide(self.actor, Action.PROMOTE, target).allowed:
            self._require(Action.PROMOTE, target)  # audits the denial and raises it, before anything is read
        plan = self.rollback_plan(tier, to)
        if dry_run:
            return {**plan, "dry_run": True}
        if plan["needs_confirmation"] and not (to and yes):
            raise RollbackNeedsConfirmation(
                f"rollback of {tier!r} to {plan['snapshot']!r} not done: " + "; ".join(plan["why_confirm"]),
                f"Check `tierbase rollback {tier} --dry-run`, then name the snapshot and confirm: "
                f"`tierbase rollback {tier} --to {plan['snapshot']} --yes`", plan=plan)
        snapshot = str(plan["snapshot"])
        name = rollback_name(tier, secrets.token_hex(3))
        with self.gate.act(self.actor, Action.PROMOTE, target, before={"serving": plan["serving"]},
                           intent={"op": "rollback", "tier": tier, "snapshot": snapshot, "branch": name,
                                   "discard_writes": discard_writes}) as rec:
            t0 = time.perf_counter()
            self._repoint_to_snapshot(tier, snapshot, name, kind="manual", discard=discard_writes)
            with self._connect(name) as conn:
                conn.execute("SELECT 1")
            seconds = round(time.perf_counter() - t0, 3)
            done = self._last_rollback(tier, name)
            rec.after = out = {**plan, **self._rollback_summary(done), "seconds_to_first_query": seconds,
                               "revert": self._revert_proposal(tier, plan["migrations_undone"], int(done["id"]))}
        return out

    def rolled_back_migrations(self, tier: str) -> dict[str, int]:
        """Migration labels a rollback of ``tier`` undid and no promotion has brought back since -> the
        rollback's id: a feature whose commit still holds one of these files would promote it again."""
        events = [(float(p["finished_at"] or 0), "promotion", p) for p in PromotionLog(self.store).history(tier)
                  if p["status"] == "succeeded"]
        # by hand only: an automatic rollback takes away a promotion that never finished, not migrations
        # the tier had
        events += [(float(r["finished_at"] or 0), "rollback", r) for r in RollbackLog(self.store).history(tier)
                   if r["status"] == "done" and r["kind"] == "manual"]
        gone: dict[str, int] = {}
        for _, what, rec in sorted(events, key=lambda e: e[0]):
            if what == "promotion":
                for label in rec["migrations"]:
                    gone.pop(label, None)
            else:
                for label in (rec.get("report") or {}).get("migrations_undone", []):
                    gone[label] = int(rec["id"])
        return gone

    def _revert_proposal(self, tier: str, labels: list[str], rid: int) -> dict[str, Any] | None:
        """The commit that makes the tier's git branch agree with the database again."""
        if not labels:
            return None
        rel = str(self.config.project.get("migrations") or "db/migrations")
        files = [f"{rel}/{label}.sql" for label in labels]
        message = (f"Revert {', '.join(labels)}: rolled back on {tier} (rollback #{rid})\n\n"
                   "The tier no longer has these migrations; write a new migration for the fixed change.")
        return {"files": files, "message": message, "git_branch": self.config.tiers[tier].git_branch,
                "commands": [f"git rm {' '.join(files)}", f"git commit -m {json.dumps(message)}"]}

    def rollbacks(self, tier: str | None = None) -> list[dict[str, Any]]:
        return [self._rollback_summary(r) for r in RollbackLog(self.store).history(tier)]

    def _last_rollback(self, tier: str, branch: str) -> dict[str, Any]:
        return next(r for r in reversed(RollbackLog(self.store).history(tier)) if r["branch"] == branch)

    def _rollback_summary(self, r: dict[str, Any]) -> dict[str, Any]:
        rep = r.get("report") or {}
        route = r.get("replaced_route")
        hint = (f"the replaced branch {r['replaced']!r} is kept (protected) and reached as {route!r}: "
                f"`tierbase branch url {route}`; compare with `tierbase diff {route} {r['tier']} --data`"
                if route else "")
        if r["discard"]:
            hint = (f"WRITES DISCARDED: nothing written on {r['replaced']!r} since the snapshot was carried over. "
                    + hint)
        elif r.get("left_rows"):
            hint = (f"{r['left_rows']} rows were not replayed (tables the rolled-back migrations changed, or "
                    "conflicts); the SQL to apply them is `left_sql`. " + hint)
        return {"rollback": r["id"], "tier": r["tier"], "kind": r["kind"], "status": r["status"],
                "snapshot": r["snapshot"], "serving_now": r["branch"], "replaced": r["replaced"],
                "replaced_route": route, "discard_writes": bool(r["discard"]), "rows_replayed": r["replayed"],
                "rows_left": r["left_rows"], "time_added_ms": r["added_ms"], "hold_ms": r["hold_ms"],
                "replay": rep, "left_sql": r.get("left_sql"), "hint": hint}

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

    def _repoint_to_snapshot(self, tier: str, snapshot: str, name: str,
                             why: str = "rollback: the tier returns to its pre-promotion snapshot", *,
                             kind: str = "automatic", discard: bool = False) -> str:
        """A writable copy of ``snapshot`` takes over the tier's route, with the writes the replaced branch
        received replayed onto it first (unless ``discard``); audited before and after the switch."""
        old = self._serving(tier).name
        log = RollbackLog(self.store)
        rid = log.begin(tier=tier, kind=kind, snapshot=snapshot, branch=name, replaced=old, discard=int(discard),
                        actor=self.gate.principal(self.actor).name if kind == "manual" else "tierbase")
        self.gate.audit.append(actor="tierbase", action="route.repoint", target=tier, allowed=True, reason=why,
                               outcome="intent", before={"branch": old},
                               after={"branch": name, "from": snapshot, "rollback": rid})
        t0 = time.perf_counter()
        try:
            if self.store.find(name) is None:  # a reconcile may finish a rollback whose branch was made
                # protected only once it serves the tier: until then a reconcile may delete a half-replayed copy
                self.branches.create(name, snapshot, kind=Kind.TIER, creator=self.gate.owner, protected=False,
                                     actor="tierbase")
            self.branches.start(name)
            report, prepare, hold = ReplayReport(), None, [0.0]
            if not discard and self.store.get(old).kind is not Kind.SNAPSHOT:
                prepare = self._replay(tier, snapshot, old, name, report, hold)
            self._move_route(tier, name, prepare=prepare)
        except BaseException as err:
            log.update(rid, status="failed", finished_at=time.time(), owner=None,
                       report=json.dumps({"error": str(err)}))
            raise
        route = self._keep_replaced(tier, name, old)
        left = report.left_sql(route, tier)
        log.update(rid, status="done", finished_at=time.time(), owner=None, replaced_route=route,
                   replayed=report.rows_replayed, left_rows=report.rows_left, left_sql=left,
                   added_ms=int((time.perf_counter() - t0) * 1000), hold_ms=int(hold[0] * 1000),
                   report=json.dumps(report.to_dict(), default=str))
        self.gate.audit.append(actor="tierbase", action="route.repoint", target=tier, allowed=True, reason=why,
                               before={"branch": old},
                               after={"branch": name, "replaced_route": route, "rows_replayed": report.rows_replayed,
                                      "rows_left": report.rows_left, "discard_writes": discard})
        return name

    def _keep_replaced(self, tier: str, branch: str, old: str) -> str:
        """After the switch: the new branch is the tier's (protected like it), the replaced one gets a
        route of its own, ``<tier>-replaced-<n>``, so that hints can name a URL that reaches it."""
        self.store.set_protected(branch, self.config.tiers[tier].protected)
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

    def reconcile_rollbacks(self) -> list[str]:
        """Rollbacks whose process died: done if the route had switched (the replay was complete before it
        could), else abandoned: the route still serves the replaced branch, which lost nothing, and the
        half-replayed copy is deleted. Never half: the switch is one transaction after the last replay."""
        log = RollbackLog(self.store)
        out = []
        for r in log.dead():
            rid, tier = int(r["id"]), str(r["tier"])
            switched = self.store.resolve_route(tier) == r["branch"]
            if switched:
                route = self._keep_replaced(tier, str(r["branch"]), str(r["replaced"]))
                log.update(rid, status="done", owner=None, finished_at=time.time(), replaced_route=route)
            else:
                if self.store.find(r["branch"]) is not None:
                    self.branches.delete(r["branch"], actor="tierbase")
                log.update(rid, status="abandoned", owner=None, finished_at=time.time())
            result = "completed (the route had switched)" if switched else "abandoned (the route never moved)"
            self.gate.audit.append(actor="tierbase", action="rollback.reconcile", target=tier, allowed=True,
                                   reason=f"reconcile: rollback #{rid} of {tier!r} was interrupted; {result}",
                                   after={"rollback": rid, "original_actor": r["actor"], "branch": r["branch"],
                                          "switched": switched})
            out.append(f"rollback #{rid} of {tier!r} (by {r['actor']}): {result}")
        return out

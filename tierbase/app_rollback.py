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
from typing import Any

from .app_base import Core
from .app_repoint import Repoints
from .control import connect
from .control.branches import Branches
from .control.store import Kind, Store
from .errors import InvalidInput, Refused
from .governance.policy import Action
from .migrate.promote import PromotionLog, rollback_name
from .migrate.replay import (
    RollbackLog,
)
from .provider import OWNER_ROLE


class RollbackNeedsConfirmation(Refused):
    code = "rollback_needs_confirmation"


class Rollbacks:
    """Takes the core and the repoints (a rollback is the same repoint as a failed promotion's)."""

    def __init__(self, core: Core, repoints: Repoints) -> None:
        self.core = core
        self.repoints = repoints

    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def branches(self) -> Branches:
        return self.core.branches

    # -- what a rollback would undo ---------------------------------------------------------------------
    def rollback_plan(self, tier: str, to: str | None = None) -> dict[str, Any]:
        """The snapshot a rollback of TIER returns to, its age, the promotions and migrations it undoes,
        and whether it needs ``--to`` and ``--yes`` (past more than one promotion, or already rolled back)."""
        self.core.tier_subject(tier)
        history = PromotionLog(self.store).history(tier)
        serving = self.core.serving(tier)
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
        if self.core.gate.tier_of(snap) != tier:
            raise Refused(f"{snapshot!r} holds the data of {self.core.gate.tier_of(snap)!r}, not of {tier!r}",
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
        target = self.core.tier_subject(tier)
        if not self.core.gate.decide(self.core.actor, Action.PROMOTE, target).allowed:
            self.core.require(Action.PROMOTE, target)  # audits the denial and raises it, before anything is read
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
        with self.core.act(Action.PROMOTE, target, before={"serving": plan["serving"]},
                           intent={"op": "rollback", "tier": tier, "snapshot": snapshot, "branch": name,
                                   "discard_writes": discard_writes}) as rec:
            t0 = time.perf_counter()
            self.repoints.to_snapshot(tier, snapshot, name, kind="manual", discard=discard_writes)
            connect.answers(self.branches, name, self.core.database, OWNER_ROLE)
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
        rel = str(self.core.config.project.get("migrations") or "db/migrations")
        files = [f"{rel}/{label}.sql" for label in labels]
        message = (f"Revert {', '.join(labels)}: rolled back on {tier} (rollback #{rid})\n\n"
                   "The tier no longer has these migrations; write a new migration for the fixed change.")
        return {"files": files, "message": message, "git_branch": self.core.config.tiers[tier].git_branch,
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
                "replay_method": None if r["discard"] else rep.get("method", "diff"),
                "replay_fallback": rep.get("fallback"),
                "replay": rep, "left_sql": r.get("left_sql"), "hint": hint}

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
                route = self.repoints.keep_replaced(tier, str(r["branch"]), str(r["replaced"]))
                log.update(rid, status="done", owner=None, finished_at=time.time(), replaced_route=route)
            else:
                if self.store.find(r["branch"]) is not None:
                    self.branches.delete(r["branch"], actor="tierbase")
                log.update(rid, status="abandoned", owner=None, finished_at=time.time())
            result = "completed (the route had switched)" if switched else "abandoned (the route never moved)"
            self.core.gate.audit.append(actor="tierbase", action="rollback.reconcile", target=tier, allowed=True,
                                        reason=f"reconcile: rollback #{rid} of {tier!r} was interrupted; {result}",
                                        after={"rollback": rid, "original_actor": r["actor"], "branch": r["branch"],
                                               "switched": switched})
            out.append(f"rollback #{rid} of {tier!r} (by {r['actor']}): {result}")
        return out

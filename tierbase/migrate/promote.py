"""Promotion as merge, and rollback by repoint: the record of promotions and its rules.

Promoting TIER applies, once, the migrations already validated on the source
(its child tier, or a feature merging into its own tier) to the branch that
serves TIER's route now:

    refuse unless every migration to apply is on the source with the same checksum
    -> read-only pre-promotion snapshot of TIER (O(1))
    -> apply the migrations -> smoke check (SQL or a command with DATABASE_URL)
    -> on failure: a writable branch of the snapshot takes over TIER's route (repoint);
       the failed branch is kept for forensics.

One promotion of a tier at a time: a unique index on running promotions.
The orchestration lives in the facade (app.py); this module keeps the rules.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from ..control.store import Store, process_token, token_alive
from ..errors import Refused


def pre_snapshot_name(tier: str, promotion: int) -> str:
    """The read-only snapshot promotion #``promotion`` takes of ``tier`` first.

    Predictable on purpose (operators find it by the promotion's number), so reserved: no principal
    may create a branch named like it (tierbase.names.RESERVED); only the platform makes it.
    """
    return f"{tier}-pre-{promotion}"


def rollback_name(tier: str, tag: str) -> str:
    """The writable tier branch that takes over ``tier``'s route on a rollback (reserved, as above)."""
    return f"{tier}-rb-{tag}"


class PromotionBusy(Refused):
    code = "promotion_running"
    http_status = 409


class NothingToPromote(Refused):
    code = "nothing_to_promote"


class NotValidatedOnSource(Refused):
    code = "not_validated_on_source"


@dataclass
class PromotionLog:
    store: Store

    def begin(self, tier: str, source: str, actor: str, served_by: str) -> int:
        try:
            with self.store.write() as db:
                cur = db.execute("INSERT INTO promotions(tier, source, actor, status, started_at, served_by, owner)"
                                 " VALUES(?,?,?,?,?,?,?)",
                                 (tier, source, actor, "running", time.time(), served_by, process_token()))
                return int(cur.lastrowid or 0)
        except sqlite3.IntegrityError as err:
            row = self.store.db.execute("SELECT id, actor, started_at FROM promotions WHERE tier=? AND "
                                        "status='running'", (tier,)).fetchone()
            who = f" (#{row[0]} by {row[1]}, started {time.time() - row[2]:.0f}s ago)" if row else ""
            raise PromotionBusy(f"a promotion of {tier!r} is already running{who}",
                                "Wait for it to finish, then run `tierbase promotions` to see its result",
                                tier=tier) from err

    def update(self, pid: int, **fields: Any) -> None:
        if "migrations" in fields:
            fields["migrations"] = json.dumps(fields["migrations"])
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.store.write() as db:
            db.execute(f"UPDATE promotions SET {cols} WHERE id=?", (*fields.values(), pid))

    def finish(self, pid: int, status: str, reason: str, t0: float, **fields: Any) -> dict[str, Any]:
        self.update(pid, status=status, reason=reason, finished_at=time.time(),
                    duration_ms=int((time.perf_counter() - t0) * 1000), owner=None, **fields)
        return self.get(pid)

    def get(self, pid: int) -> dict[str, Any]:
        row = self.store.db.execute("SELECT * FROM promotions WHERE id=?", (pid,)).fetchone()
        return _public(row)

    def history(self, tier: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM promotions" + (" WHERE tier=?" if tier else "") + " ORDER BY id"
        return [_public(r) for r in self.store.db.execute(sql, (tier,) if tier else ())]

    def last_snapshot(self, tier: str) -> str | None:
        row = self.store.db.execute("SELECT snapshot FROM promotions WHERE tier=? AND snapshot IS NOT NULL "
                                    "AND status = 'succeeded' ORDER BY id DESC LIMIT 1", (tier,)).fetchone()
        return str(row[0]) if row else None

    def dead(self) -> list[dict[str, Any]]:
        """Running promotions whose process died (a zombie counts as dead): the facade finishes them
        at start-up (Tierbase.reconcile_promotions: completed or rolled back, and audited)."""
        rows = self.store.db.execute("SELECT * FROM promotions WHERE status='running' ORDER BY id").fetchall()
        return [_public(r) for r in rows if not token_alive(r["owner"])]


def _public(row: sqlite3.Row) -> dict[str, Any]:
    rec = dict(row)
    rec["migrations"] = json.loads(rec["migrations"] or "[]")
    rec.pop("owner", None)
    return rec


def run_smoke(smoke: str | None, smoke_command: str | None, url: str, cwd: str | None) -> str | None:
    """None when the smoke check passes (or there is none); else why it failed."""
    if smoke:
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                cur = conn.execute(smoke.encode())
                row = cur.fetchone() if cur.description else None
        except psycopg.Error as err:
            return f"smoke SQL failed: {str(err).strip()}"
        if row is not None and not row[0]:
            return f"smoke SQL returned {row[0]!r}"
    if smoke_command:
        got = subprocess.run(smoke_command, shell=True, capture_output=True, text=True, cwd=cwd, timeout=600,
                             env=dict(os.environ, DATABASE_URL=url))
        if got.returncode != 0:
            tail = (got.stderr or got.stdout).strip()[-500:]
            return f"smoke command exited {got.returncode}: {tail}"
    return None


def to_promote(target: Any, source: Any, tier: str, source_name: str) -> list[Any]:
    """The migrations to promote (ledger Status of target and source); refuses what is not validated."""
    if target.drift:
        names = ", ".join(m.label() for m, _ in target.drift)
        raise NotValidatedOnSource(f"{tier!r} has migrations whose files changed after they were applied: {names}",
                                   "Restore the original files; write a new migration instead of editing one")
    pending = list(target.pending)
    if not pending:
        raise NothingToPromote(f"nothing to promote into {tier!r}: every migration is already applied there",
                               f"Apply new migrations to {source_name!r} first "
                               f"(`tierbase migrate apply --branch {source_name}`)")
    on_source = {int(r["version"]): r for r in source.applied}
    problems = []
    for m in pending:
        rec = on_source.get(m.version)
        if rec is None:
            problems.append(f"{m.label()} was never applied on {source_name!r}")
        elif rec["checksum"] != m.checksum:
            problems.append(f"{m.label()} was applied on {source_name!r} with another checksum")
    if problems:
        raise NotValidatedOnSource(f"refusing to promote into {tier!r}: " + "; ".join(problems),
                                   f"Validate on {source_name!r} first: "
                                   f"`tierbase migrate apply --branch {source_name}`", problems=problems)
    return pending

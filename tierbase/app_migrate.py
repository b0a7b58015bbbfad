"""Facade methods of migrations: status, apply, lint, verify, promote, rollback, diff."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psycopg

from .app_base import Core
from .app_branches import BranchOps
from .app_images import Images
from .app_masking import Masking
from .app_pitr import TierHistory
from .app_repoint import Repoints
from .control.branches import Branches
from .control.store import Branch, Kind, Store
from .errors import InvalidInput, Refused, TierbaseError
from .failpoints import failpoint
from .governance.config import Config
from .governance.policy import Action, Subject
from .migrate import files as migration_files
from .migrate import ledger
from .migrate.diff import diff_urls
from .migrate.files import Migration
from .migrate.lint import lint
from .migrate.promote import PromotionLog, pre_snapshot_name, rollback_name, run_smoke, to_promote
from .migrate.rehearse import rehearse
from .migrate.replay import RollbackLog, current_xmin, touched_tables
from .migrate.verify import verify
from .names import parse_ttl
from .provider import OWNER_ROLE


class _VerifyPlatform:
    """verify's view of the platform: its throwaway branch is made and deleted as the acting principal,
    and reached as that branch's owner role (never the superuser)."""

    def __init__(self, core: Core, branch_ops: BranchOps) -> None:
        self.core = core
        self.branch_ops = branch_ops

    def create_branch(self, name: str, parent: str | None = None, *, platform_name: bool = False) -> Any:
        return self.branch_ops.create_branch(name, parent, platform_name=platform_name)

    def delete_branch(self, name: str, recursive: bool = False) -> Any:
        return self.branch_ops.delete_branch(name, recursive)

    def branch_url(self, name: str, dbname: str = "postgres", *, direct: bool = False) -> str:
        self.core.branches.start(name)
        return self.core.dsn(name, OWNER_ROLE, dbname)


class Migrations:
    """Takes the core, the branch operations (verify's throwaway branch, as the acting principal), the
    masking service (applied migrations record their lineage), the images (re-made after a promotion),
    the tier history (a base snapshot before a promotion) and the repoints (a failed promotion's
    automatic rollback)."""

    def __init__(self, core: Core, *, branch_ops: BranchOps, masking: Masking, images: Images,
                 history: TierHistory, repoints: Repoints) -> None:
        self.core = core
        self.branch_ops = branch_ops
        self.masking = masking
        self.images = images
        self.history = history
        self.repoints = repoints

    @property
    def config(self) -> Config:
        return self.core.config

    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def branches(self) -> Branches:
        return self.core.branches

    # -- where things are ------------------------------------------------------------
    def _migrations_dir(self, migrations_dir: str | None) -> Path:
        if migrations_dir:
            return Path(migrations_dir).absolute()
        rel = str(self.config.project.get("migrations") or "")
        source = self.store.get_setting("config_source")
        if rel and source:
            return (Path(source).parent / rel).absolute()
        raise InvalidInput("no migrations directory is known",
                           "Pass --dir, or declare `[project] migrations = \"db/migrations\"` in tierbase.toml")

    def _migrations(self, migrations_dir: str | None, contents: Mapping[str, str] | None) -> list[Migration]:
        """From ``contents`` (name -> text) when given: what the API passes, so that no request makes the
        server read a directory; from a directory only in-process (library use, the caller's own files)."""
        if contents is not None:
            return migration_files.from_contents(contents)
        return migration_files.discover(self._migrations_dir(migrations_dir))

    def _connect(self, branch: str) -> AbstractContextManager[psycopg.Connection[Any]]:
        """A connection to a branch's project database as its owner role (starting its compute).

        Never the superuser: migrations, the ledger and smoke checks run with what the branch's
        owner may do in SQL, so a migration can do nothing its author could not do by hand. The
        caller has been authorized (migrate.apply / promote) before it gets here.
        """
        return self.core.connect(branch, OWNER_ROLE)

    def _url(self, branch: str, dbname: str | None = None) -> str:
        """A libpq conninfo for the branch's owner role over the compute's private socket."""
        return self.core.dsn(branch, OWNER_ROLE, dbname)

    # -- migrations on one branch ------------------------------------------------------
    def migrate_status(self, branch: str | None = None, migrations_dir: str | None = None, *,
                       files: Mapping[str, str] | None = None) -> dict[str, Any]:
        b = self.core.serving(branch or self.config.entry)
        migrations = self._migrations(migrations_dir, files)
        with self._connect(b.name) as conn:
            return {"branch": b.name, **ledger.status(conn, migrations).to_dict()}

    def migrate_apply(self, branch: str, migrations_dir: str | None = None, *,
                      files: Mapping[str, str] | None = None) -> dict[str, Any]:
        b = self.core.serving(branch)
        migrations = self._migrations(migrations_dir, files)
        with self.core.act(Action.MIGRATE, self.core.gate.subject(b)) as rec, self._connect(b.name) as conn:
            applied = self._apply(conn, migrations)
            rec.after = {"applied": [a["version"] for a in applied]}
        return {"branch": b.name, "applied": applied}

    def migrate_lint(self, migrations_dir: str | None = None, block: list[str] | None = None, *,
                     files: Mapping[str, str] | None = None) -> dict[str, Any]:
        rules = block if block is not None else self.config.raw.get("migrations", {}).get("lint_block")
        return lint(self._migrations(migrations_dir, files), block=rules).to_dict()

    def migrate_verify(self, parent: str | None = None, migrations_dir: str | None = None, *,
                       files: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Apply pending migrations on a throwaway branch of ``parent``: cleanly, idempotently, reversibly."""
        source = self.core.serving(parent or self.config.entry)
        rules = self.config.raw.get("migrations", {}).get("lint_block")
        migrations = self._migrations(migrations_dir, files)
        report = verify(_VerifyPlatform(self.core, self.branch_ops), source.name, migrations,
                        actor=self.core.principal().name, dbname=self.core.database, lint_block=rules)
        out = report.to_dict()
        if self._settings.get("require_undo"):
            with self._connect(source.name) as conn:
                pending = ledger.status(conn, migrations).pending
            missing = [m.label() for m in pending if m.undo_path is None]
            if missing:
                out["ok"] = False
                out["problems"].append(f"no undo file for {', '.join(missing)} ([migrations] require_undo = true)")
                out["checks"]["reversible"] = "failed: missing undo files"
        return out

    @property
    def _settings(self) -> dict[str, Any]:
        return dict(self.config.raw.get("migrations", {}))

    def _apply(self, conn: psycopg.Connection[Any], migrations: list[Migration]) -> list[dict[str, Any]]:
        """ledger.apply with the declared [migrations] timeouts, as the acting principal."""
        applied = ledger.apply(conn, migrations, actor=self.core.principal().name,
                               statement_timeout=str(self._settings.get("statement_timeout", "5min")),
                               lock_timeout=str(self._settings.get("lock_timeout", "10s")))
        versions = {a["version"] for a in applied}
        # masking rules migrate with the schema: what these derived, renamed, dropped (app_governance.py)
        self.masking.record_lineage([m for m in migrations if m.version in versions])
        return applied

    # -- promotion ---------------------------------------------------------------------------
    def _default_source(self, tier: str) -> str:
        """The child of ``tier`` on the path from the entry tier up to the root."""
        cfg = self.config
        cur = cfg.entry
        while cfg.tiers[cur].parent is not None:
            if cfg.tiers[cur].parent == tier:
                return cur
            cur = str(cfg.tiers[cur].parent)
        raise InvalidInput(f"{tier!r} has no child tier on the promotion path from {cfg.entry!r}",
                           "Name the source: `tierbase promote TIER --from BRANCH`")

    def promote(self, tier: str, source: str | None = None, migrations_dir: str | None = None, *,
                files: Mapping[str, str] | None = None, rehearse: bool = False) -> dict[str, Any]:
        """Apply to TIER the migrations validated on SOURCE; roll back by repoint if anything fails."""
        # authorization before validation: a principal that may not promote into ``tier`` is refused by
        # the policy whatever the platform looks like (no child tier, no such tier, no migrations)
        spec = self.config.tiers.get(tier)
        pre = Subject(name=tier, kind="tier" if spec else "none", protected=bool(spec and spec.protected),
                      tier=tier if spec else None)
        found = self.store.find(source) if source else None
        pre_src = self.core.gate.subject(self.core.serving(source)) if source and found is not None else None
        if not self.core.gate.decide(self.core.actor, Action.PROMOTE, pre, pre_src).allowed:
            with self.core.act(Action.PROMOTE, pre, pre_src):  # audits the denial and raises it
                pass
        target = self.core.tier_subject(tier)
        src_name = source or self._default_source(tier)
        src_branch = self.core.serving(src_name)
        src_subject = self.core.gate.subject(src_branch)
        migrations = self._migrations(migrations_dir, files)
        log = PromotionLog(self.store)
        with self.core.act(Action.PROMOTE, target, src_subject,
                           intent={"op": "promote", "tier": tier, "source": src_name}) as rec:
            serving = self.core.serving(tier)
            rehearsal = None
            if rehearse or self._settings.get("rehearse"):
                rehearsal = self._rehearse(tier, serving, src_branch, migrations)  # refuses over max_stall
            pid = log.begin(tier, src_name, self.core.principal().name, serving.name)
            t0 = time.perf_counter()
            try:
                result = self._promote(pid, log, tier, serving, src_branch, migrations, t0)
            except BaseException as err:
                log.finish(pid, "failed", f"{type(err).__name__}: {err}", t0)
                raise
            if rehearsal is not None:
                result["rehearsal"] = rehearsal
            rec.after = result
        if result["status"] != "succeeded":
            rb = next((r for r in reversed(RollbackLog(self.store).history(tier)) if r["replaced"] == serving.name),
                      None)
            kept = str(rb["replaced_route"]) if rb and rb.get("replaced_route") else serving.name
            replayed = f"; {rb['replayed']} rows written meanwhile were replayed" if rb else ""
            raise Refused(f"promotion #{pid} into {tier!r} failed and was rolled back: {result['reason']}",
                          f"{tier!r} is served by {result['serving_now']!r} again{replayed}; the failed state is "
                          f"kept on branch {serving.name!r}, reached as {kept!r} (`tierbase branch url {kept}`, "
                          f"`tierbase diff {tier} {kept}`)", promotion=result, rollback=rb and rb["id"])
        # the tier's masked image is re-masked once here, not on every masked branch (app_images.py)
        result["masked_images"] = self.images.refresh_quietly([tier], migrations)
        return result

    def _promote(self, pid: int, log: PromotionLog, tier: str, serving: Branch, src: Branch,
                 migrations: list[Migration], t0: float) -> dict[str, Any]:
        with self._connect(serving.name) as tconn, self._connect(src.name) as sconn:
            pending = to_promote(ledger.status(tconn, migrations), ledger.status(sconn, migrations), tier, src.name)
        snapshot = pre_snapshot_name(tier, pid)
        self.core.gate.audit.append(actor="tierbase", action="promote.snapshot", target=tier, allowed=True,
                                    reason=f"promotion #{pid}: the pre-promotion snapshot of {serving.name!r}",
                                    outcome="intent", after={"promotion": pid, "snapshot": snapshot})
        self.repoints.open_slot(pid, serving.name)  # a rollback decodes the writes from here (before the fork)
        with self._connect(serving.name) as conn:  # a rollback replays only rows written after the fork
            fork_xmin = current_xmin(conn)
        self.branches.create(snapshot, serving.name, kind=Kind.SNAPSHOT, creator=self.core.gate.owner)
        log.update(pid, snapshot=snapshot, migrations=[m.label() for m in pending])
        self.history.base_at_promotion(serving)
        RollbackLog(self.store).note_touches(pid, [m.sql for m in pending], fork_xmin)  # what it must not replay
        failpoint("promote:snapshot")
        spec = self.config.tiers[tier]
        try:
            with self._connect(serving.name) as conn:
                self._apply(conn, pending)
            failpoint("promote:applied")
            why = run_smoke(spec.smoke, self.config.raw["tiers"].get(tier, {}).get("smoke_command"),
                            self._url(serving.name), self._project_dir())
        except TierbaseError as err:
            why = f"migration failed: {err.message}"
        if why is None:
            return log.finish(pid, "succeeded", "ok", t0, serving_now=serving.name)
        back = self.repoints.to_snapshot(tier, snapshot, rollback_name(tier, str(pid)))
        return log.finish(pid, "rolled-back", why, t0, serving_now=back)

    def _rehearse(self, tier: str, serving: Branch, src: Branch, migrations: list[Migration]) -> dict[str, Any]:
        """The migrations to promote, applied to an O(1) branch of the tier under a write load on the tables
        they name; refused (naming the statement) when the writers stalled longer than ``max_stall``."""
        with self._connect(serving.name) as tconn, self._connect(src.name) as sconn:
            pending = to_promote(ledger.status(tconn, migrations), ledger.status(sconn, migrations), tier, src.name)
        name = f"verify-rehearse-{secrets.token_hex(3)}"
        self.branches.create(name, serving.name, kind=Kind.FEATURE, creator=self.core.gate.owner, actor="tierbase")
        try:
            self.branches.start(name)
            got = rehearse(lambda: psycopg.connect(self._url(name), autocommit=True, connect_timeout=10),
                           touched_tables(m.sql for m in pending), lambda conn: self._apply(conn, pending))
        finally:
            self.branches.delete(name, actor="tierbase")
        budget_text = str(self.config.raw["tiers"].get(tier, {}).get("max_stall") or "")
        budget = parse_ttl(budget_text) if budget_text else None
        out = {**got.to_dict(), "max_stall_s": budget, "migrations": [m.label() for m in pending]}
        if budget is not None and got.longest_stall_s > budget:
            raise Refused(f"rehearsal of the promotion into {tier!r}: writers to {got.stall_table} stalled "
                          f"{got.longest_stall_s:.1f} s (max_stall {budget_text}), waiting on "
                          f"{(got.statement or 'a migration statement').strip()[:200]!r}",
                          "Split the migration (backfill in batches, CREATE INDEX CONCURRENTLY, NOT VALID "
                          "constraints), then promote again", rehearsal=out)
        return out

    def _project_dir(self) -> str | None:
        source = self.store.get_setting("config_source")
        return str(Path(source).parent) if source else None

    def reconcile_promotions(self) -> list[str]:
        """Promotions whose process died: completed when every migration reached the tier and its smoke
        check passes, else rolled back to their snapshot (when one was taken); each audited in the
        name of the promoting principal. Without a snapshot the tier was never touched: marked failed."""
        log = PromotionLog(self.store)
        done: list[str] = []
        for rec in log.dead():
            pid, tier, actor = int(rec["id"]), str(rec["tier"]), str(rec["actor"])
            result, reason, serving_now = "failed", "the promoting process died before it touched the tier", None
            if rec["snapshot"] and self.store.find(rec["snapshot"]) is not None and tier in self.config.tiers:
                serving = self.core.serving(tier).name
                why = self._promotion_unfinished(tier, serving, rec)
                if why is None:
                    result, serving_now = "succeeded", serving
                    reason = "completed by reconcile: every migration had reached the tier and the smoke check passed"
                else:
                    serving_now = self.repoints.to_snapshot(
                        tier, rec["snapshot"], rollback_name(tier, str(pid)),
                        why=f"reconcile: promotion #{pid} by {actor!r} died unfinished ({why}); the tier returns "
                            "to its pre-promotion snapshot")
                    result, reason = "rolled-back", f"rolled back by reconcile: the promoting process died ({why})"
            log.update(pid, status=result, reason=reason, owner=None, finished_at=time.time(),
                       **({"serving_now": serving_now} if serving_now else {}))
            self.core.gate.audit.append(actor="tierbase", action="promote.reconcile", target=tier, allowed=True,
                                        reason=f"reconcile: promotion #{pid} of {tier!r} by {actor!r} was interrupted; "
                                               f"{result}", after={"promotion": pid, "original_actor": actor,
                                                                   "result": result, "serving_now": serving_now})
            done.append(f"promotion #{pid} of {tier!r} (by {actor}): {result}")
        return done

    def _promotion_unfinished(self, tier: str, serving: str, rec: dict[str, Any]) -> str | None:
        """None if promotion ``rec`` reached its end on ``serving`` (all its migrations in the ledger and the
        smoke check passing); else why not."""
        if serving != rec["served_by"]:
            return f"{tier!r} is served by {serving!r}, not {rec['served_by']!r} as when it began"
        wanted = {int(label[1:].split("__")[0]) for label in rec["migrations"]}
        if not wanted:
            return "it had not chosen its migrations yet"
        try:
            with self._connect(serving) as conn:
                have = {int(r["version"]) for r in ledger.ledger_rows(conn)}
            missing = wanted - have
            if missing:
                return f"migrations {sorted(missing)} were not applied"
            return run_smoke(self.config.tiers[tier].smoke,
                             self.config.raw["tiers"].get(tier, {}).get("smoke_command"),
                             self._url(serving), self._project_dir())
        except (TierbaseError, psycopg.Error) as err:
            return f"cannot check the tier: {err}"

    def promotions(self, tier: str | None = None) -> list[dict[str, Any]]:
        return PromotionLog(self.store).history(tier)

    # -- schema diff ---------------------------------------------------------------------------
    def diff(self, a: str, b: str | None = None, fmt: str = "text") -> dict[str, Any]:
        """Schema diff between two branches: A -> B, or A's parent -> A by default."""
        left = self.core.serving(a)
        if b is None:
            if left.parent is None:
                raise InvalidInput(f"{a!r} has no parent to compare with", "Name a second branch")
            older, newer = self.store.get(left.parent), left
        else:
            older, newer = left, self.core.serving(b)
        for br in (older, newer):
            if br.kind is Kind.SNAPSHOT:
                raise InvalidInput(f"{br.name!r} is a read-only snapshot without a compute",
                                   "Create a branch from it and diff that: "
                                   f"`tierbase branch create X --parent {br.name}`")
            self.branches.start(br.name)
        d = diff_urls(self._url(older.name), self._url(newer.name), a_label=older.name, b_label=newer.name)
        if fmt not in ("text", "markdown", "json"):
            raise InvalidInput(f"format {fmt!r} is unknown", "Use text, markdown or json")
        text = d.to_markdown() if fmt == "markdown" else d.to_text() if fmt == "text" else None
        return {**d.to_dict(), "from": older.name, "to": newer.name, "empty": d.empty, "text": text}

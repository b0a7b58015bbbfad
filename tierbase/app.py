"""The facade: one object that wires the services of a tierbase platform and answers for all of them.

CLI commands and API routes call exactly one method here and render the result; nothing below this
file knows about either. ``Tierbase`` builds one ``Core`` (app_base.py: the shared wires plus the
acting principal) and the services over it in dependency order, each given the core and the other
services it uses, and nothing else:

    Masking(core)                   Images(core, masking)           Governance(core, masking, images)
    Renewals(core)  Quotas(core)    Logins(core, renewals)          TierHistory(core)
    Pitr(core, tiers, masking, quotas)
    BranchOps(core, masking, images, quotas, renewals, logins, pitr)
    Sessions(core, branch_ops, renewals)                            SqlRunner(core, logins, quotas, renewals)
    Repoints(core)                  Rollbacks(core, repoints)       DataDiffs(core)        Imports(core)
    Migrations(core, branch_ops, masking, images, history, repoints)
    Workflow(core, branch_ops, migrations, masking, rollbacks)
    Platform(core, governance, migrations, rollbacks, pitr)

Every public method below is a one-line delegation to the service that owns it, grouped per
service. Every action goes through the gate (``core.act``): the policy's decision with a reason,
then the action, then the audit record.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from .app_base import Core, Wires, home_at
from .app_branches import BranchOps
from .app_data import DataDiffs
from .app_flow import Workflow
from .app_governance import Governance
from .app_images import Images
from .app_import import Imports
from .app_leases import Quotas, Renewals
from .app_logins import Logins
from .app_masking import Masking
from .app_migrate import Migrations
from .app_pitr import Pitr, TierHistory
from .app_platform import ROOT_BRANCH, Platform
from .app_repoint import Repoints, with_decoding
from .app_rollback import Rollbacks
from .app_sessions import Sessions
from .app_sql import SqlRunner
from .control.branches import Branches, Prepare
from .control.history import History
from .control.store import Branch, Store
from .governance.config import Config
from .governance.gate import Gate
from .governance.masking import MaskRule
from .governance.policy import Subject
from .governance.principals import Principal
from .home import Home
from .migrate.files import Migration
from .provider import DEFAULT_IMAGE_SIZE, Provider

if TYPE_CHECKING:
    from . import payloads as P

#: what the facade answers: the JSON object the API serves; each method's type names its payload model
#: (``Annotated[JSON, P.Branch]``: tierbase/payloads.py, the API's response_model and the SDK's return)
JSON = dict[str, Any]

__all__ = ["ROOT_BRANCH", "Tierbase"]


class Tierbase:
    """A tierbase platform rooted at one data dir, acting as one principal."""

    def __init__(self, home: Path | str | None = None, actor: str | None = None, *,
                 provider: Provider | None = None) -> None:
        """``provider``: the substrate to use instead of this host's (LocalProvider), e.g. a FakeProvider
        for the control plane's unit tests; it must be the same at every open of the data dir."""
        self._wire(Core(Wires(home_at(home), provider), actor))

    def _wire(self, core: Core) -> None:
        """The services over ``core``, each given the ones it uses (built in dependency order)."""
        self.core = core
        self.masking = Masking(core)
        self.images = Images(core, self.masking)
        self.governance = Governance(core, self.masking, self.images)
        self.renewals = Renewals(core)
        self.quotas = Quotas(core)
        self.logins = Logins(core, self.renewals)
        self.tier_history = TierHistory(core)
        if core.wires.start_settings is None:  # tiers archive their WAL: settings for each compute start
            core.wires.start_settings = with_decoding(self.tier_history.compute_settings)
        self.pitr = Pitr(core, self.tier_history, self.masking, self.quotas)
        self.branch_ops = BranchOps(core, masking=self.masking, images=self.images, quotas=self.quotas,
                                    renewals=self.renewals, logins=self.logins, pitr=self.pitr)
        self.sessions = Sessions(core, self.branch_ops, self.renewals)
        self.sql = SqlRunner(core, self.logins, self.quotas, self.renewals)
        self.repoints = Repoints(core)
        self.rollback_ops = Rollbacks(core, self.repoints)
        self.data = DataDiffs(core)
        self.imports = Imports(core)
        self.migrations = Migrations(core, branch_ops=self.branch_ops, masking=self.masking, images=self.images,
                                     history=self.tier_history, repoints=self.repoints)
        self.workflow = Workflow(core, branch_ops=self.branch_ops, migrations=self.migrations, masking=self.masking,
                                 rollbacks=self.rollback_ops)
        self.platform = Platform(core, governance=self.governance, migrations=self.migrations,
                                 rollbacks=self.rollback_ops, pitr=self.pitr)

    def as_principal(self, name: str | None, token: str | None = None) -> Tierbase:
        """The same platform, acting as another principal (shares every connection; the services are
        wired again over a core with the other actor, which costs a few small objects)."""
        view = Tierbase.__new__(Tierbase)
        view._wire(self.core.as_principal(name, token))
        return view

    def close(self) -> None:
        self.core.wires.close()

    # -- the wires (app_base.py) --------------------------------------------------------------
    @property
    def home(self) -> Home:
        return self.core.home

    @property
    def actor(self) -> str | None:
        """The principal this facade acts as; None is the data dir's owner (the first platform engineer)."""
        return self.core.actor

    @property
    def token(self) -> str | None:
        """The API token this facade acts with, when known (its Postgres password is derived from it)."""
        return self.core.token

    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def provider(self) -> Provider:
        return self.core.provider

    @property
    def driver(self) -> Provider:
        """The provider under its older name (``.name``, ``.copy_on_write``), for callers from before it."""
        return self.core.provider

    @property
    def branches(self) -> Branches:
        return self.core.branches

    @property
    def gate(self) -> Gate:
        return self.core.gate

    @property
    def config(self) -> Config:
        return self.core.config

    @property
    def router(self) -> Any:
        """Set by the service: moves live proxy sessions when a route is repointed (Service.switch); every
        service of this facade uses it, and views made from it afterwards inherit it."""
        return self.core.router

    @router.setter
    def router(self, router: Any) -> None:
        self.core.router = router

    @property
    def proxy_port(self) -> int:
        return self.core.proxy_port

    @property
    def pool_port(self) -> int:
        return self.core.pool_port

    @property
    def api_port(self) -> int:
        return self.core.api_port

    def describe(self, b: Branch, *, with_bytes: bool = False) -> Annotated[JSON, P.Branch]:
        return self.core.describe(b, with_bytes=with_bytes)

    def _subject(self, name: str) -> Subject:
        return self.core.subject(name)

    def _url(self, branch: str, dbname: str | None = None) -> str:
        """The owner role's conninfo on a branch's project database (tests reach a compute with it)."""
        return self.migrations._url(branch, dbname)

    @property
    def import_limit(self) -> int:
        return self.imports.import_limit

    @property
    def history_log(self) -> History:
        return self.tier_history.history_log

    def _compute_settings(self, b: Branch) -> dict[str, str] | None:
        return self.tier_history.compute_settings(b)

    def _masking_plan(self, parent: Branch, *, force: bool = False,
                      cfg: Config | None = None) -> list[MaskRule] | None:
        return self.masking.plan(parent, force=force, cfg=cfg)

    def _mask_hook(self, name: str, parent: Branch, rules: list[MaskRule] | None, database: str | None = None,
                   cfg: Config | None = None) -> Prepare | None:
        return self.masking.hook(name, parent, rules, database, cfg)

    # -- the platform's lifecycle (app_platform.py) ----------------------------------------------
    def init(self, storage: str = "auto", btrfs_size: str = DEFAULT_IMAGE_SIZE, *, api_port: int | None = None,
             proxy_port: int | None = None, config: str | None = None, space_reserve: str | None = None) -> list[str]:
        return self.platform.init(storage, btrfs_size, api_port=api_port, proxy_port=proxy_port, config=config,
                                  space_reserve=space_reserve)

    def down(self, purge: bool = False) -> list[str]:
        return self.platform.down(purge)

    def reconcile(self) -> list[str]:
        return self.platform.reconcile()

    def space(self) -> Annotated[JSON, P.Space]:
        return self.platform.space()

    def status(self) -> Annotated[JSON, P.Status]:
        return self.platform.status()

    def tls_ca(self) -> Annotated[JSON, P.TlsCa]:
        return self.platform.tls_ca()

    # -- branches and routes (app_branches.py) ---------------------------------------------------
    def create_branch(self, name: str, parent: str | None = None, *, ttl: str | None = None, snapshot: bool = False,
                      start: bool = False, platform_name: bool = False, at: str | None = None, lsn: str | None = None,
                      inclusive: bool = True) -> Annotated[JSON, P.Branch]:
        return self.branch_ops.create_branch(name, parent, ttl=ttl, snapshot=snapshot, start=start,
                                             platform_name=platform_name, at=at, lsn=lsn, inclusive=inclusive)

    def create_ci_branch(self, feature: str, parent: str | None = None, *,
                         ttl: str | None = None) -> Annotated[JSON, P.Branch]:
        return self.branch_ops.create_ci_branch(feature, parent, ttl=ttl)

    def delete_branch(self, name: str, recursive: bool = False) -> list[str]:
        return self.branch_ops.delete_branch(name, recursive)

    def reset_branch(self, name: str) -> Annotated[JSON, P.Branch]:
        return self.branch_ops.reset_branch(name)

    def start_branch(self, name: str) -> Annotated[JSON, P.Branch]:
        return self.branch_ops.start_branch(name)

    def stop_branch(self, name: str) -> Annotated[JSON, P.Branch]:
        return self.branch_ops.stop_branch(name)

    def get_branch(self, name: str, *, with_bytes: bool = True) -> Annotated[JSON, P.Branch]:
        return self.branch_ops.get_branch(name, with_bytes=with_bytes)

    def list_branches(self, *, with_bytes: bool = True) -> list[Annotated[JSON, P.Branch]]:
        return self.branch_ops.list_branches(with_bytes=with_bytes)

    def branch_url(self, name: str, dbname: str = "postgres", *, direct: bool = False, sslmode: str | None = None,
                   pooled: bool = False) -> str:
        return self.branch_ops.branch_url(name, dbname, direct=direct, sslmode=sslmode, pooled=pooled)

    def list_routes(self) -> list[Annotated[JSON, P.Route]]:
        return self.branch_ops.list_routes()

    def set_route(self, route: str, branch: str, *, drain: float = 0.0) -> Annotated[JSON, P.RouteMoved]:
        return self.branch_ops.set_route(route, branch, drain=drain)

    def sweep(self, now: float | None = None) -> list[str]:
        return self.branch_ops.sweep(now)

    # -- the proxy's questions (app_logins.py) ---------------------------------------------------
    def login_verifier(self, user: str) -> str | None:
        return self.logins.login_verifier(user)

    def connect_role(self, user: str, branch: str, *, audit: bool = True,
                     later: Callable[[Callable[[], None]], None] | None = None) -> str:
        return self.logins.connect_role(user, branch, audit=audit, later=later)

    # -- governance (app_governance.py) ----------------------------------------------------------
    def reload_config(self, path: str | Path | None = None, *, dry_run: bool = False) -> Annotated[JSON,
                      P.PolicyApplied]:
        return self.governance.reload_config(path, dry_run=dry_run)

    def apply_config(self, text: str | None, source: str, *, dry_run: bool = False) -> Annotated[JSON, P.PolicyApplied]:
        return self.governance.apply_config(text, source, dry_run=dry_run)

    def show_config(self) -> Annotated[JSON, P.PolicyShown]:
        return self.governance.show_config()

    def explain(self, principal: str, action: str, target: str, source: str | None = None) -> Annotated[JSON,
                P.Explanation]:
        return self.governance.explain(principal, action, target, source)

    def create_principal(self, name: str, role: str) -> Annotated[JSON, P.PrincipalCreated]:
        return self.governance.create_principal(name, role)

    def list_principals(self) -> list[Annotated[JSON, P.Principal]]:
        return self.governance.list_principals()

    def revoke_principal(self, name: str) -> Annotated[JSON, P.Principal]:
        return self.governance.revoke_principal(name)

    def audit_log(self, **filters: Any) -> list[Annotated[JSON, P.AuditRecord]]:
        return self.governance.audit_log(**filters)

    def audit_verify(self) -> Annotated[JSON, P.AuditVerify]:
        return self.governance.audit_verify()

    def audit_sync(self) -> int:
        return self.governance.audit_sync()

    def audit_url(self) -> str:
        return self.governance.audit_url()

    def flow_history(self, feature: str) -> Annotated[JSON, P.FlowHistory]:
        return self.governance.flow_history(feature)

    def whoami(self) -> Annotated[JSON, P.WhoAmI]:
        return self.governance.whoami()

    # -- masking lineage (app_masking.py) --------------------------------------------------------
    def masking_change(self, migrations: list[Migration], masking: dict[str,
                       Any] | None = None) -> Annotated[JSON, P.MaskingChange]:
        return self.masking.masking_change(migrations, masking)

    def masking_lineage(self) -> list[Annotated[JSON, P.LineageEntry]]:
        return self.masking.masking_lineage()

    # -- masked images (app_images.py) -----------------------------------------------------------
    def refresh_masked_images(self, tier: str | None = None, *, full: bool = False) -> list[Annotated[JSON,
                              P.ImageRefreshed]]:
        return self.images.refresh_masked_images(tier, full=full)

    def masked_images(self) -> list[Annotated[JSON, P.ImageState]]:
        return self.images.masked_images()

    def refresh_stale_images(self, max_age: float) -> list[str]:
        return self.images.refresh_stale_images(max_age)

    # -- migrations and promotion (app_migrate.py) -----------------------------------------------
    def migrate_status(self, branch: str | None = None, migrations_dir: str | None = None, *,
                       files: Mapping[str, str] | None = None) -> Annotated[JSON, P.MigrationStatus]:
        return self.migrations.migrate_status(branch, migrations_dir, files=files)

    def migrate_apply(self, branch: str, migrations_dir: str | None = None, *,
                      files: Mapping[str, str] | None = None) -> Annotated[JSON, P.MigrationsApplied]:
        return self.migrations.migrate_apply(branch, migrations_dir, files=files)

    def migrate_lint(self, migrations_dir: str | None = None, block: list[str] | None = None, *,
                     files: Mapping[str, str] | None = None) -> Annotated[JSON, P.LintReport]:
        return self.migrations.migrate_lint(migrations_dir, block, files=files)

    def migrate_verify(self, parent: str | None = None, migrations_dir: str | None = None, *,
                       files: Mapping[str, str] | None = None) -> Annotated[JSON, P.VerifyReport]:
        return self.migrations.migrate_verify(parent, migrations_dir, files=files)

    def promote(self, tier: str, source: str | None = None, migrations_dir: str | None = None, *,
                files: Mapping[str, str] | None = None, rehearse: bool = False) -> Annotated[JSON, P.Promotion]:
        return self.migrations.promote(tier, source, migrations_dir, files=files, rehearse=rehearse)

    def reconcile_promotions(self) -> list[str]:
        return self.migrations.reconcile_promotions()

    def promotions(self, tier: str | None = None) -> list[Annotated[JSON, P.Promotion]]:
        return self.migrations.promotions(tier)

    def diff(self, a: str, b: str | None = None, fmt: str = "text") -> Annotated[JSON, P.SchemaDiff]:
        return self.migrations.diff(a, b, fmt)

    # -- data diff (app_data.py) -----------------------------------------------------------------
    def data_diff(self, a: str, b: str, *, table: list[str] | None = None,
                  fmt: str = "text") -> Annotated[JSON, P.DataDiff]:
        return self.data.data_diff(a, b, table=table, fmt=fmt)

    # -- rollback (app_rollback.py) --------------------------------------------------------------
    def rollback_plan(self, tier: str, to: str | None = None) -> Annotated[JSON, P.RollbackPlan]:
        return self.rollback_ops.rollback_plan(tier, to)

    def rollback(self, tier: str, to: str | None = None, *, discard_writes: bool = False, yes: bool = False,
                 dry_run: bool = False) -> Annotated[JSON, P.RollbackResult]:
        return self.rollback_ops.rollback(tier, to, discard_writes=discard_writes, yes=yes, dry_run=dry_run)

    def rolled_back_migrations(self, tier: str) -> dict[str, int]:
        return self.rollback_ops.rolled_back_migrations(tier)

    def rollbacks(self, tier: str | None = None) -> list[Annotated[JSON, P.RollbackSummary]]:
        return self.rollback_ops.rollbacks(tier)

    def reconcile_rollbacks(self) -> list[str]:
        return self.rollback_ops.reconcile_rollbacks()

    # -- imports (app_import.py) -----------------------------------------------------------------
    def set_import_limit(self, size: str) -> int:
        return self.imports.set_import_limit(size)

    def import_check(self, branch: str, dbname: str = "postgres") -> int:
        return self.imports.import_check(branch, dbname)

    def new_upload(self) -> Path:
        return self.imports.new_upload()

    def clear_uploads(self) -> list[str]:
        return self.imports.clear_uploads()

    def import_dump(self, path: str | os.PathLike[str], branch: str = "production",
                    dbname: str = "postgres") -> Annotated[JSON, P.Imported]:
        return self.imports.import_dump(path, branch, dbname)

    def import_upload(self, upload: Path, branch: str, dbname: str = "postgres") -> Annotated[JSON, P.Imported]:
        return self.imports.import_upload(upload, branch, dbname)

    # -- the workflow (app_flow.py) --------------------------------------------------------------
    def flow_register(self, workspace: str, bundle: str | None = None) -> Annotated[JSON, P.FlowRegistered]:
        return self.workflow.flow_register(workspace, bundle)

    def flow_tiers(self) -> Annotated[JSON, P.TierRefs]:
        return self.workflow.flow_tiers()

    def flow_claim(self, workspace: str, feature: str, parent: str | None = None,
                   local: dict[str, Any] | None = None) -> Annotated[JSON, P.FlowClaimed]:
        return self.workflow.flow_claim(workspace, feature, parent, local)

    def flow_ready(self, feature: str, bundle: str | None, local: dict[str,
                   Any] | None = None) -> Annotated[JSON, P.FlowSaid]:
        return self.workflow.flow_ready(feature, bundle, local)

    def flow_approve_tests(self, feature: str, sha: str) -> Annotated[JSON, P.ApprovedTests]:
        return self.workflow.flow_approve_tests(feature, sha)

    def flow_ci(self, feature: str, local: dict[str, Any] | None = None) -> Annotated[JSON, P.CiRun]:
        return self.workflow.flow_ci(feature, local)

    def flow_ci_run(self, run: int) -> Annotated[JSON, P.CiRun]:
        return self.workflow.flow_ci_run(run)

    def flow_ci_runs(self, feature: str) -> list[Annotated[JSON, P.CiRun]]:
        return self.workflow.flow_ci_runs(feature)

    def ci_take(self) -> dict[str, Any] | None:
        return self.workflow.ci_take()

    def ci_report(self, run: int, junit: str | None, output: str, exit_code: int,
                  duration_s: float) -> Annotated[JSON, P.CiRun]:
        return self.workflow.ci_report(run, junit, output, exit_code, duration_s)

    def flow_merge(self, feature: str, local: dict[str, Any] | None = None) -> Annotated[JSON, P.FlowMerged]:
        return self.workflow.flow_merge(feature, local)

    def flow_abandon(self, feature: str, local: dict[str, Any] | None = None) -> Annotated[JSON, P.FlowAbandoned]:
        return self.workflow.flow_abandon(feature, local)

    def tdd_command(self, feature: str, verb: str, **args: Any) -> Annotated[JSON, P.TddDone]:
        return self.workflow.tdd_command(feature, verb, **args)

    # -- SQL through the platform (app_sql.py) ---------------------------------------------------
    def run_sql(self, name: str, sql: str, params: list[Any] | None = None, *, database: str | None = None,
                max_rows: int = 1000, timeout_s: float = 30.0, read_only: bool = False) -> Annotated[JSON, P.SqlResult]:
        return self.sql.run_sql(name, sql, params, database=database, max_rows=max_rows, timeout_s=timeout_s,
                                read_only=read_only)

    # -- sessions (app_sessions.py) --------------------------------------------------------------
    def session_start(self, branch: str | None = None, parent: str | None = None,
                      ttl: str | None = None) -> Annotated[JSON, P.SessionStarted]:
        return self.sessions.session_start(branch, parent, ttl)

    def session_renew(self, sid: str, ttl: str | None = None) -> Annotated[JSON, P.Session]:
        return self.sessions.session_renew(sid, ttl)

    def session_end(self, sid: str) -> Annotated[JSON, P.SessionEnded]:
        return self.sessions.session_end(sid)

    def session_list(self, *, everyone: bool = False) -> list[Annotated[JSON, P.Session]]:
        return self.sessions.session_list(everyone=everyone)

    # -- leases and quotas (app_leases.py) -------------------------------------------------------
    def renew_on_activity(self, branch: str, later: Callable[[Callable[[], None]], None] | None = None) -> None:
        return self.renewals.renew_on_activity(branch, later)

    def sessions_reclaimed(self) -> list[str]:
        return self.renewals.sessions_reclaimed()

    def check_quota(self, who: Principal, *, branch: bool = False, compute: bool = False) -> None:
        return self.quotas.check_quota(who, branch=branch, compute=compute)

    # -- time travel (app_pitr.py) ---------------------------------------------------------------
    def create_branch_at(self, name: str, parent: str | None = None, *, at: str | None = None, lsn: str | None = None,
                         inclusive: bool = True, ttl: str | None = None,
                         start: bool = True) -> Annotated[JSON, P.Branch]:
        return self.pitr.create_branch_at(name, parent, at=at, lsn=lsn, inclusive=inclusive, ttl=ttl, start=start)

    def restore(self, tier: str, *, at: str | None = None, lsn: str | None = None,
                inclusive: bool = True) -> Annotated[JSON, P.Restored]:
        return self.pitr.restore(tier, at=at, lsn=lsn, inclusive=inclusive)

    def history(self, tier: str, *, with_bytes: bool = True) -> Annotated[JSON, P.TierHistory]:
        return self.pitr.history(tier, with_bytes=with_bytes)

    def history_warnings(self) -> list[str]:
        return self.pitr.history_warnings()

    def take_base_snapshot(self, tier: str, reason: str = "manual") -> Annotated[JSON, P.BaseSnapshot]:
        return self.pitr.take_base_snapshot(tier, reason)

    def history_tick(self, now: float | None = None) -> list[str]:
        return self.pitr.history_tick(now)

    def history_window(self, tier: str) -> int | None:
        return self.tier_history.history_window(tier)

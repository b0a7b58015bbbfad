"""Facade methods of the workflow: transitions as commands the platform executes (tierbase.workflow.commands).

There is no method that appends a client-written event: each one names an
operation, and the platform evaluates it as the acting principal.
"""

from __future__ import annotations

from typing import Any

from .app_base import Core
from .app_branches import BranchOps
from .app_masking import Masking
from .app_migrate import Migrations
from .app_rollback import Rollbacks
from .control.store import Store
from .governance.config import Config
from .governance.gate import Gate
from .home import Home
from .migrate.files import Migration
from .names import check_name
from .workflow.commands import Flow


class _FlowPlatform:
    """The platform as the workflow commands see it (workflow/commands.py ``Platform``): the services
    the workflow was given, acting as its core's principal."""

    def __init__(self, core: Core, branch_ops: BranchOps, migrations: Migrations, masking: Masking,
                 rollbacks: Rollbacks) -> None:
        self.core = core
        self.branch_ops = branch_ops
        self.migrations = migrations
        self.masking = masking
        self.rollbacks = rollbacks

    @property
    def actor(self) -> str | None:
        return self.core.actor

    @property
    def home(self) -> Home:
        return self.core.home

    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def gate(self) -> Gate:
        return self.core.gate

    @property
    def config(self) -> Config:
        return self.core.config

    def create_branch(self, name: str, parent: str | None = None) -> dict[str, Any]:
        return self.branch_ops.create_branch(name, parent)

    def create_ci_branch(self, feature: str, parent: str | None = None, *, ttl: str | None = None) -> dict[str, Any]:
        return self.branch_ops.create_ci_branch(feature, parent, ttl=ttl)

    def delete_branch(self, name: str, recursive: bool = False) -> list[str]:
        return self.branch_ops.delete_branch(name, recursive)

    def migrate_status(self, branch: str | None = None, migrations_dir: str | None = None) -> dict[str, Any]:
        return self.migrations.migrate_status(branch, migrations_dir)

    def migrate_apply(self, branch: str, migrations_dir: str | None = None) -> dict[str, Any]:
        return self.migrations.migrate_apply(branch, migrations_dir)

    def migrate_verify(self, parent: str | None = None, migrations_dir: str | None = None) -> dict[str, Any]:
        return self.migrations.migrate_verify(parent, migrations_dir)

    def promote(self, tier: str, source: str | None = None, migrations_dir: str | None = None) -> dict[str, Any]:
        return self.migrations.promote(tier, source, migrations_dir)

    def diff(self, a: str, b: str | None = None, fmt: str = "text") -> dict[str, Any]:
        return self.migrations.diff(a, b, fmt)

    def masking_change(self, migrations: list[Migration], masking: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.masking.masking_change(migrations, masking)

    def rolled_back_migrations(self, tier: str) -> dict[str, int]:
        return self.rollbacks.rolled_back_migrations(tier)


class Workflow:
    """Takes the core and the services the commands use: branch operations, migrations, masking
    (what a change does to masked data) and rollbacks (migrations a rollback took away)."""

    def __init__(self, core: Core, *, branch_ops: BranchOps, migrations: Migrations, masking: Masking,
                 rollbacks: Rollbacks) -> None:
        self.core = core
        self.branch_ops = branch_ops
        self.migrations = migrations
        self.masking = masking
        self.rollbacks = rollbacks
        self.platform = _FlowPlatform(core, branch_ops, migrations, masking, rollbacks)

    def _flow(self) -> Flow:
        return Flow(self.platform)

    def flow_register(self, workspace: str, bundle: str | None = None) -> dict[str, Any]:
        return self._flow().register(workspace, bundle)

    def flow_tiers(self) -> dict[str, Any]:
        """The tiers' accepted commits and a git bundle of them (every principal may read the code)."""
        self.core.principal()
        return self._flow().tier_refs()

    def flow_claim(self, workspace: str, feature: str, parent: str | None = None,
                   local: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._flow().claim(workspace, feature, parent, dict(local or {}))

    def flow_ready(self, feature: str, bundle: str | None, local: dict[str, Any] | None = None) -> dict[str, Any]:
        f = self._flow()
        with f.lock(f"feature-{check_name(feature, 'feature')}"):  # one command per feature at a time
            return f.ready(feature, bundle, dict(local or {}))

    def flow_approve_tests(self, feature: str, sha: str) -> dict[str, Any]:
        return self._flow().approve_tests(feature, sha)

    def flow_ci(self, feature: str, local: dict[str, Any] | None = None) -> dict[str, Any]:
        f = self._flow()
        with f.lock(f"feature-{check_name(feature, 'feature')}"):  # one command per feature at a time
            return f.ci_request(feature, dict(local or {}))

    def flow_ci_run(self, run: int) -> dict[str, Any]:
        self.core.principal()
        return self._flow().ci_job(run)

    def flow_ci_runs(self, feature: str) -> list[dict[str, Any]]:
        self.core.principal()
        return self._flow().ci_jobs(feature)

    def ci_take(self) -> dict[str, Any] | None:
        return self._flow().ci_next()

    def ci_report(self, run: int, junit: str | None, output: str, exit_code: int, duration_s: float) -> dict[str, Any]:
        f = self._flow()
        f.runner_only("ci-report", f"ci-{run}")  # before looking the run up: a non-runner learns nothing
        with f.lock(f"feature-{f.ci_job(run)['feature']}"):
            return f.ci_report(run, junit, output, exit_code, duration_s)

    def flow_merge(self, feature: str, local: dict[str, Any] | None = None) -> dict[str, Any]:
        f = self._flow()
        with f.lock(f"feature-{check_name(feature, 'feature')}"):  # one command per feature at a time
            return f.merge(feature, dict(local or {}))

    def flow_abandon(self, feature: str, local: dict[str, Any] | None = None) -> dict[str, Any]:
        f = self._flow()
        with f.lock(f"feature-{check_name(feature, 'feature')}"):  # one command per feature at a time
            return f.abandon(feature, dict(local or {}))

    def tdd_command(self, feature: str, verb: str, **args: Any) -> dict[str, Any]:
        """One TDD verb (enable, assign, submit, approve, red, green); the roles are checked here."""
        f = self._flow()
        calls = {"enable": f.tdd_enable, "assign": f.tdd_assign, "submit": f.tdd_submit, "approve": f.tdd_approve,
                 "red": f.tdd_red, "green": f.tdd_green}
        if verb not in calls:
            from .errors import InvalidInput

            raise InvalidInput(f"{verb!r} is not a TDD verb", f"Use one of: {', '.join(calls)}")
        return dict(calls[verb](feature, **args))  # type: ignore[operator]

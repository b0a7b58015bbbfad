"""Facade methods of the workflow: transitions as commands the platform executes (tierbase.workflow.commands).

There is no method that appends a client-written event: each one names an
operation, and the platform evaluates it as the acting principal.
"""

from __future__ import annotations

from typing import Any, cast

from .app_base import FacadeBase
from .names import check_name
from .workflow.commands import Flow


class FlowOps(FacadeBase):
    def _flow(self) -> Flow:
        from .app import Tierbase

        return Flow(cast(Tierbase, self))

    def flow_register(self, workspace: str, bundle: str | None = None) -> dict[str, Any]:
        return self._flow().register(workspace, bundle)

    def flow_tiers(self) -> dict[str, Any]:
        """The tiers' accepted commits and a git bundle of them (every principal may read the code)."""
        self.gate.principal(self.actor)
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
        self.gate.principal(self.actor)
        return self._flow().ci_job(run)

    def flow_ci_runs(self, feature: str) -> list[dict[str, Any]]:
        self.gate.principal(self.actor)
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

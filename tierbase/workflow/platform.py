"""What the workflow kit needs from the platform: satisfied by the facade and by the SDK client alike.

The kit never reaches below this boundary: every database effect (branches,
migrations, promotion) and every record (history, audit) is a platform call,
so policy decides and the audit trail sees it whichever way the kit runs.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

from .errors import Failure


class Platform(Protocol):
    def create_branch(self, name: str, parent: str | None = None, *, ttl: str | None = None,
                      snapshot: bool = False, start: bool = False) -> dict[str, Any]: ...

    # `ci-<feature>` is a name the platform reserves, so the platform makes it
    def create_ci_branch(self, feature: str, parent: str | None = None, *,
                         ttl: str | None = None) -> dict[str, Any]: ...

    def delete_branch(self, name: str, recursive: bool = False) -> list[str]: ...

    def get_branch(self, name: str) -> dict[str, Any]: ...

    def branch_url(self, name: str, dbname: str = "postgres", direct: bool = False) -> str: ...

    def list_branches(self) -> list[dict[str, Any]]: ...

    def whoami(self) -> dict[str, Any]: ...

    # the transitions: commands the platform executes after checking every precondition itself
    def flow_register(self, workspace: str, bundle: str | None = None) -> dict[str, Any]: ...

    def flow_tiers(self) -> dict[str, Any]: ...

    def flow_claim(self, workspace: str, feature: str, parent: str | None = None,
                   local: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def flow_ready(self, feature: str, bundle: str | None, local: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def flow_approve_tests(self, feature: str, sha: str) -> dict[str, Any]: ...

    def flow_ci(self, feature: str, local: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def flow_ci_run(self, run: int) -> dict[str, Any]: ...

    def flow_ci_runs(self, feature: str) -> list[dict[str, Any]]: ...

    def flow_merge(self, feature: str, local: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def flow_abandon(self, feature: str, local: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def tdd_command(self, feature: str, verb: str, **args: Any) -> dict[str, Any]: ...

    def flow_history(self, feature: str) -> dict[str, Any]: ...

    def show_config(self) -> dict[str, Any]: ...

    def apply_config(self, text: str | None, source: str = "", *, dry_run: bool = False) -> dict[str, Any]: ...


class Migrations(Protocol):
    """Migration, diff and promotion calls (issue 5); reached through :func:`migrations`."""

    def migrate_verify(self, parent: str, migrations_dir: str) -> dict[str, Any]: ...

    def migrate_apply(self, branch: str, migrations_dir: str) -> dict[str, Any]: ...

    def migrate_status(self, branch: str, migrations_dir: str) -> dict[str, Any]: ...

    def diff(self, a: str, b: str, fmt: str = "markdown") -> dict[str, Any]: ...

    def promote(self, tier: str, source: str | None = None, migrations_dir: str | None = None) -> dict[str, Any]: ...


MIGRATION_CALLS = ("migrate_verify", "migrate_apply", "migrate_status", "diff", "promote")


def migrations(platform: Platform) -> Migrations | None:
    """The platform's migration calls, or None when this platform has none of them yet."""
    if all(hasattr(platform, name) for name in MIGRATION_CALLS):
        return cast(Migrations, platform)
    return None


def unsupported(what: str) -> Failure:
    return Failure("migrations-unsupported",
                   f"this repo has migrations to {what} but the platform offers no migration calls "
                   f"({', '.join(MIGRATION_CALLS)})",
                   "Upgrade the tierbase platform (`tierbase up` from a version with `tierbase migrate`)")


def explain(platform: Platform, principal: str, action: str, target: str, source: str | None) -> dict[str, Any] | None:
    """The policy's decision without acting, when the platform can tell it (else None)."""
    fn = getattr(platform, "explain", None)
    if fn is None:
        return None
    return dict(fn(principal, action, target, source))

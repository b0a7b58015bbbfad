"""One working copy of an app repo, its tierbase.toml, and the platform it works against.

A workspace (one per clone; its id lives in the repo's git config) has its
own history in the control plane: the scaffold, and which feature is
current. Each feature has its own history. The state file projects the
current one; :meth:`Workspace.current` rebuilds that projection from the
control plane and refuses when the file says anything else.
"""

from __future__ import annotations

import base64
import fcntl
import os
import re
import secrets
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

from ..errors import InvalidInput, PolicyDenied, TierbaseError
from ..git import KIT_DIR, Git
from ..governance.config import Config, load_config
from .errors import DOCTOR_HINT, Failure, GateFailed
from .names import check_feature
from .platform import Platform
from .state import FlowState, effective, project, read_raw, workspace_pointer, write_state

CONFIG_FILE = "tierbase.toml"
DEFAULT_MIGRATIONS = "db/migrations"
DEFAULT_TEST_COMMAND = "pytest -q"
WS_KEY = "tierbase.workspace"
#: names the kit derives from a feature name (ephemeral branches) or keeps for itself


class WorkspaceBusy(TierbaseError):
    code = "workspace_busy"
    http_status = 409


@dataclass(frozen=True)
class Current:
    """The verified state: what the control plane says, which the state file matched."""

    doc: dict[str, Any]

    @property
    def state(self) -> FlowState:
        return FlowState(self.doc["state"])

    @property
    def feature(self) -> str | None:
        return self.doc["feature"]  # type: ignore[no-any-return]

    @property
    def key(self) -> str:
        return str(self.doc["history"])

    def evidence(self, transition: str) -> dict[str, Any]:
        return dict(self.doc["transitions"].get(transition) or {})

    @property
    def claim(self) -> dict[str, Any]:
        return self.evidence("claim")


def project_name_from(repo: Path) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", repo.name.lower()).strip("-")[:40]
    return name or "app"


class Workspace:
    def __init__(self, repo: Path, platform: Platform) -> None:
        self.repo = Git.toplevel(repo)
        self.git = Git(self.repo)
        self.platform = platform
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """One transition at a time in a working copy; held until :meth:`close` or the process ends."""
        if self._lock_fd is not None:
            return
        path = self.kit_path(".lock")
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkspaceBusy(f"another tierbase command is changing the workflow state of {self.repo}",
                                "Wait for it to finish, then run this again") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    # -- configuration ------------------------------------------------------------------
    @cached_property
    def config(self) -> Config:
        path = self.repo / CONFIG_FILE
        if not path.exists():
            raise InvalidInput(f"{path} does not exist", "Run `tierbase init` in the app repo first")
        return load_config(path)

    @property
    def migrations_dir(self) -> Path:
        return self.repo / str(self.config.project.get("migrations", DEFAULT_MIGRATIONS))

    @property
    def test_command(self) -> str:
        return str(self.config.project.get("test_command", DEFAULT_TEST_COMMAND))

    def migration_files(self) -> list[str]:
        d = self.migrations_dir
        return sorted(p.name for p in d.glob("*.sql") if p.is_file()) if d.is_dir() else []

    @property
    def database(self) -> str:
        return str(self.config.project.get("database", "postgres"))

    def tier_git_branch(self, tier: str) -> str:
        t = self.config.tiers.get(tier)
        return (t.git_branch if t is not None else None) or tier

    @property
    def workspace_id(self) -> str | None:
        return self.git.config_get(WS_KEY)

    def ensure_workspace_id(self) -> str:
        ws = self.workspace_id
        if ws is None:
            ws = f"ws-{secrets.token_hex(6)}"
            self.git.config_set(WS_KEY, ws)
        return ws

    @cached_property
    def me(self) -> dict[str, Any]:
        return self.platform.whoami()

    def kit_path(self, *parts: str) -> Path:
        return self.repo.joinpath(KIT_DIR, *parts)

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.repo))

    # -- the control plane's view ----------------------------------------------------------
    def expected(self) -> dict[str, Any] | None:
        """The state file the control plane's history means (None: this workspace was never scaffolded)."""
        ws = self.workspace_id
        if ws is None:
            return None
        ws_events = self.platform.flow_history(ws)["events"]
        evs = effective(ws_events)
        if not evs:
            return None
        project_name = str(evs[0]["evidence"].get("project", ""))
        key = workspace_pointer(ws_events) or ws
        events = ws_events if key == ws else self.platform.flow_history(key)["events"]
        return project(workspace=ws, project_name=project_name, key=key, events=events)

    def current(self, gate: str) -> Current:
        """Load the state file, validate it, and match it against the control plane; refuse on any difference."""
        self.lock()
        expected = self.expected()
        if expected is None:
            raise GateFailed(gate, [Failure("not-scaffolded", f"{self.repo} was never scaffolded for tierbase",
                                            "Run `tierbase init` in the app repo")])
        doc, bad = read_raw(self.repo)
        failure: Failure | None = None
        if doc is None:
            failure = Failure("no-state-file", f"{KIT_DIR}/workflow-state.json is missing or unreadable: {bad[0]}",
                              DOCTOR_HINT)
        elif bad:
            failure = Failure("state-file-invalid", f"{KIT_DIR}/workflow-state.json breaks its schema: "
                              + "; ".join(bad[:5]), DOCTOR_HINT, {"problems": bad})
        elif doc != expected and self._stale(doc, expected):
            write_state(self.repo, expected)  # others recorded since (a runner, a reviewer): catch up
        elif doc != expected:
            differs = sorted(k for k in set(doc) | set(expected) if doc.get(k) != expected.get(k))
            said = (f" (the file says state {doc.get('state')!r}, the control plane {expected['state']!r})"
                    if doc.get("state") != expected["state"] else "")
            failure = Failure("state-file-drift",
                              f"{KIT_DIR}/workflow-state.json does not match the control plane's history of "
                              f"{expected['history']!r}{said}; it was edited by hand (fields: {', '.join(differs)})",
                              "Never edit it: " + DOCTOR_HINT[0].lower() + DOCTOR_HINT[1:],
                              {"fields": differs})
        cur = Current(expected)
        if failure is not None:
            self.refuse(gate, [failure], cur)
        return cur

    def _stale(self, doc: dict[str, Any], expected: dict[str, Any]) -> bool:
        """True when the file is exactly the projection of an earlier point of the same history.

        A runner's result or a reviewer's approval is recorded by another principal, from elsewhere:
        the file was right when it was written, so it is brought up to date rather than refused.
        """
        n = doc.get("events")
        if doc.get("history") != expected["history"] or not isinstance(n, int) or not 0 < n < expected["events"]:
            return False
        events = self.platform.flow_history(str(expected["history"]))["events"]
        cut = effective(events)[n - 1]["id"]
        earlier = project(workspace=str(expected["workspace"]), project_name=str(expected["project"]),
                          key=str(expected["history"]), events=[e for e in events if e["id"] <= cut])
        return earlier == doc

    def sync(self) -> dict[str, Any]:
        """Write the state file from the control plane (after a transition, or `doctor --fix`)."""
        doc = self.expected()
        if doc is None:
            raise GateFailed("sync", [Failure("not-scaffolded", f"{self.repo} was never scaffolded for tierbase",
                                              "Run `tierbase init` in the app repo")])
        write_state(self.repo, doc)
        return doc

    def refuse(self, gate: str, failures: list[Failure], cur: Current | None) -> NoReturn:
        """A refusal the client finds on its own (its state file, its working copy): nothing to record.

        The platform records the refusals of its own commands; the client writes no event.
        """
        state = cur.state if cur is not None else None
        raise GateFailed(gate, failures, str(state) if state else None)

    # -- what the platform needs from this working copy ---------------------------------------
    def local(self, *, head: bool = True) -> dict[str, Any]:
        """Facts about the working copy that the platform uses only to refuse (never to grant)."""
        out: dict[str, Any] = {"git_branch": self.git.current_branch(), "dirty": self.git.dirty()}
        if head:
            out["head"] = self.git.head()
        return out

    def bundle(self, *refs: str) -> str:
        """A git bundle (base64) of ``refs``: how commits reach the platform without it reading a path."""
        got = subprocess.run(["git", "bundle", "create", "--quiet", "-", *refs], cwd=self.repo,
                             capture_output=True, timeout=300)
        if got.returncode != 0:
            raise GateFailed("bundle", [Failure("git-bundle-failed", f"`git bundle create` failed: "
                                                f"{got.stderr.decode(errors='replace').strip()[:300]}",
                                                "Check the git repo")])
        return base64.b64encode(got.stdout).decode()

    def take_tiers(self, refs: dict[str, Any]) -> list[str]:
        """Set the local tier git branches to the platform's accepted commits (its bundle)."""
        said: list[str] = []
        if not refs.get("bundle"):
            return said
        with tempfile.NamedTemporaryFile(prefix="tierbase-tiers-", suffix=".bundle") as f:
            f.write(base64.b64decode(refs["bundle"]))
            f.flush()
            self.git.run("fetch", "--quiet", "--no-tags", f.name, "+refs/tierbase/out/*:refs/tierbase/platform/*")
        current = self.git.current_branch()
        for tier in refs.get("tiers", {}).values():
            branch, sha = str(tier["git_branch"]), str(tier["sha"])
            if self.git.sha(f"refs/heads/{branch}") == sha:
                continue
            if current == branch:
                self.git.run("merge", "--ff-only", "--quiet", sha, check=False)
                if self.git.head() != sha:
                    self.git.run("reset", "--keep", "--quiet", sha)
            else:
                self.git.run("branch", "--force", branch, sha)
            said.append(f"git branch {branch!r} is at the platform's accepted commit {sha[:10]}")
        return said

    def policy_failure(self, err: PolicyDenied) -> Failure:
        return Failure("policy-denied", err.message, err.hint, {"rule": err.data.get("rule", "")})

    def check_feature_name(self, feature: str) -> Failure | None:
        return check_feature(feature)

"""The few git operations the workflow needs, run with the git CLI in the app repo."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InvalidInput, TierbaseError

#: never count as uncommitted code: the kit's own files (state, reviews, change records, TDD artifacts)
KIT_DIR = ".tierbase"


class GitError(TierbaseError):
    code = "git_error"


class Git:
    def __init__(self, repo: Path) -> None:
        self.repo = repo

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        got = subprocess.run(["git", *args], cwd=self.repo, capture_output=True, text=True, timeout=120)
        if check and got.returncode != 0:
            raise GitError(f"`git {' '.join(args)}` failed: {(got.stderr or got.stdout).strip()[:500]}",
                           f"Check the git repo at {self.repo}")
        return got

    def out(self, *args: str) -> str:
        return self.run(*args).stdout.strip()

    @staticmethod
    def toplevel(path: Path) -> Path:
        got = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True)
        if got.returncode != 0:
            raise InvalidInput(f"{path} is not inside a git repository",
                               "Run it in your app's git repo (or pass --repo), after `git init` and a first commit")
        return Path(got.stdout.strip())

    # -- reading ---------------------------------------------------------------------
    def current_branch(self) -> str | None:
        got = self.run("symbolic-ref", "--quiet", "--short", "HEAD", check=False)
        return got.stdout.strip() or None

    def head(self) -> str | None:
        got = self.run("rev-parse", "--verify", "--quiet", "HEAD", check=False)
        return got.stdout.strip() or None

    def sha(self, ref: str) -> str | None:
        got = self.run("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
        return got.stdout.strip() or None

    def branch_exists(self, name: str) -> bool:
        return self.sha(f"refs/heads/{name}") is not None

    def dirty(self) -> list[str]:
        """Uncommitted or untracked paths, leaving out the kit's own directory."""
        lines = self.run("status", "--porcelain", "--untracked-files=all").stdout.splitlines()
        paths = [line[3:] for line in lines if line.strip()]
        return [p for p in paths if not (p == KIT_DIR or p.startswith(KIT_DIR + "/") or p.startswith(f'"{KIT_DIR}/'))]

    def commits_ahead(self, base: str, head: str = "HEAD") -> list[str]:
        """Subjects of the commits on ``head`` that ``base`` lacks, oldest first."""
        return self.run("log", "--reverse", "--format=%h %s", f"{base}..{head}").stdout.splitlines()

    def remotes(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in self.run("remote", "-v").stdout.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                out[parts[0]] = parts[1]
        return out

    def config_get(self, key: str) -> str | None:
        got = self.run("config", "--local", "--get", key, check=False)
        return got.stdout.strip() or None

    def config_set(self, key: str, value: str) -> None:
        self.run("config", "--local", key, value)

    def show(self, ref: str, path: str) -> str | None:
        got = self.run("show", f"{ref}:{path}", check=False)
        return got.stdout if got.returncode == 0 else None

    # -- changing ----------------------------------------------------------------------
    def checkout(self, branch: str, *, create_from: str | None = None) -> None:
        if create_from is not None:
            self.run("checkout", "--quiet", "-b", branch, create_from)
        else:
            self.run("checkout", "--quiet", branch)

    @contextmanager
    def worktree(self, ref: str) -> Iterator[Path]:
        """A temporary, detached checkout of ``ref`` (removed afterwards, also on failure)."""
        tmp = Path(tempfile.mkdtemp(prefix="tierbase-wt-"))
        where = tmp / "tree"
        self.run("worktree", "add", "--quiet", "--detach", str(where), ref)
        try:
            yield where
        finally:
            self.run("worktree", "remove", "--force", str(where), check=False)
            shutil.rmtree(tmp, ignore_errors=True)
            self.run("worktree", "prune", check=False)

"""The platform's own copy of each project's git history: a bare repository under the data dir.

The gates judge commits by what this repository holds, never by a client's
local refs. Clients hand commits over as git bundles (bytes in a request, so
the service reads no path a principal names); the service fetches them into
``refs/tierbase/incoming/*`` and keeps its own refs:

- ``refs/heads/<tier git branch>``: the tier's accepted commit, moved only by a merge the service made;
- ``refs/tierbase/features/<feature>``: the commit a feature was prepared at (``flow ready``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InvalidInput
from ..git import GitError

MAX_BUNDLE = 64 * 1024 * 1024
SHA = re.compile(r"[0-9a-f]{40}")
#: git must not read the service user's or the system's config (hooks, aliases, fsmonitor)
GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0",
           "GIT_AUTHOR_NAME": "tierbase", "GIT_AUTHOR_EMAIL": "tierbase@localhost",
           "GIT_COMMITTER_NAME": "tierbase", "GIT_COMMITTER_EMAIL": "tierbase@localhost"}


class GitStore:
    """One project's bare repository, owned and written by the service only."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return (self.path / "HEAD").exists()

    def create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.run("init", "--quiet", "--bare", str(self.path), cwd=self.path.parent)
        self.run("config", "core.hooksPath", os.devnull)

    def run(self, *args: str, cwd: Path | None = None, check: bool = True,
            stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("GIT_")}, **GIT_ENV}
        got = subprocess.run(["git", *args], cwd=cwd or self.path, capture_output=True, input=stdin,
                             env=env, timeout=300)
        if check and got.returncode != 0:
            raise GitError(f"`git {' '.join(args)}` failed in the platform's repository: "
                           f"{(got.stderr or got.stdout).decode(errors='replace').strip()[:400]}",
                           "This is the platform's own copy of the project: see the service log")
        return got

    def out(self, *args: str) -> str:
        return self.run(*args).stdout.decode().strip()

    # -- receiving commits ---------------------------------------------------------------
    def receive(self, bundle: bytes, key: str) -> dict[str, str]:
        """Fetch every head of ``bundle`` into ``refs/tierbase/incoming/<key>/``; return {branch: sha}."""
        if not bundle or len(bundle) > MAX_BUNDLE:
            raise InvalidInput(f"the git bundle is empty or larger than {MAX_BUNDLE // 2**20} MiB",
                               "Send the commits of your feature branch only")
        with tempfile.NamedTemporaryFile(prefix="tierbase-bundle-", suffix=".bundle") as f:
            f.write(bundle)
            f.flush()
            if self.run("bundle", "verify", "--quiet", f.name, check=False).returncode != 0:
                raise InvalidInput("the git bundle does not verify against the platform's repository (a commit "
                                   "it builds on is missing, or it is not a bundle)",
                                   "Base your branch on the tier's accepted commit (`tierbase flow status`)")
            heads = self.run("bundle", "list-heads", f.name).stdout.decode().splitlines()
            got: dict[str, str] = {}
            for line in heads:
                sha, _, ref = line.partition(" ")
                if SHA.fullmatch(sha) and ref.startswith("refs/heads/"):
                    got[ref.removeprefix("refs/heads/")] = sha
            if got:
                self.run("fetch", "--quiet", "--no-tags", f.name,
                         f"+refs/heads/*:refs/tierbase/incoming/{key}/*")
        return got

    # -- reading ---------------------------------------------------------------------------
    def sha(self, ref: str) -> str | None:
        got = self.run("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
        return got.stdout.decode().strip() or None

    def has_commit(self, sha: str) -> bool:
        return bool(SHA.fullmatch(sha)) and self.run("cat-file", "-e", f"{sha}^{{commit}}",
                                                      check=False).returncode == 0

    def show(self, sha: str, path: str) -> str | None:
        got = self.run("show", f"{sha}:{path}", check=False)
        return got.stdout.decode(errors="replace") if got.returncode == 0 else None

    def files(self, sha: str) -> list[str]:
        return self.run("ls-tree", "-r", "--name-only", "-z", sha).stdout.decode().split("\0")[:-1]

    def commits_between(self, base: str, head: str) -> list[str]:
        """Subjects of the commits on ``head`` that ``base`` lacks, oldest first."""
        return self.run("log", "--reverse", "--format=%h %s", f"{base}..{head}").stdout.decode().splitlines()

    def is_ancestor(self, a: str, b: str) -> bool:
        return self.run("merge-base", "--is-ancestor", a, b, check=False).returncode == 0

    def bundle(self, refs: dict[str, str]) -> bytes:
        """A bundle of ``refs`` ({name under refs/heads/: sha}), whole history (small app repos)."""
        tmp_refs = []
        try:
            for name, sha in refs.items():
                ref = f"refs/tierbase/out/{name}"
                self.run("update-ref", ref, sha)
                tmp_refs.append(ref)
            with tempfile.TemporaryDirectory(prefix="tierbase-out-") as d:
                path = Path(d) / "out.bundle"
                self.run("bundle", "create", "--quiet", str(path), *tmp_refs)
                return path.read_bytes()
        finally:
            for ref in tmp_refs:
                self.run("update-ref", "-d", ref, check=False)

    @contextmanager
    def checkout(self, sha: str) -> Iterator[Path]:
        """The tree of ``sha`` written out into a private temporary directory (no .git in it)."""
        tmp = Path(tempfile.mkdtemp(prefix="tierbase-tree-"))
        try:
            tar = self.run("archive", "--format=tar", sha).stdout
            subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar, check=True, capture_output=True)
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- writing ------------------------------------------------------------------------------
    def set_ref(self, ref: str, sha: str, old: str | None = None) -> None:
        """Move ``ref``; with ``old``, only if it still points there (a concurrent merge loses)."""
        self.run("update-ref", ref, sha, *([old] if old else []))

    def delete_ref(self, ref: str) -> None:
        self.run("update-ref", "-d", ref, check=False)

    def merge(self, base: str, head: str, message: str) -> tuple[str | None, str]:
        """A --no-ff merge commit of ``head`` into ``base`` made in a throwaway worktree; no ref moves.

        Returns (the merge commit, or None on a conflict; git's output).
        """
        tmp = Path(tempfile.mkdtemp(prefix="tierbase-merge-"))
        where = tmp / "tree"
        try:
            self.run("worktree", "add", "--quiet", "--detach", str(where), base)
            got = self.run("merge", "--no-ff", "--quiet", "-m", message, head, cwd=where, check=False)
            text = (got.stdout + got.stderr).decode(errors="replace").strip()
            if got.returncode != 0:
                return None, text
            return self.run("rev-parse", "HEAD", cwd=where).stdout.decode().strip(), text
        finally:
            self.run("worktree", "remove", "--force", str(where), check=False)
            shutil.rmtree(tmp, ignore_errors=True)
            self.run("worktree", "prune", check=False)

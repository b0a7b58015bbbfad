"""Everything tierbase does with an app repo's git, in one place.

* ``Git``: the one runner of the git CLI in a working copy (the workflow kit's reads and changes);
* pairing: a git branch and its database branch, one convention for the hooks and the flow
  (``feature/NAME`` <-> ``NAME``; the hooks also take feat/, fix/, ... and normalise the rest);
* hooks: post-checkout gets a feature git branch its database branch and DATABASE_URL in .env,
  post-merge into a tier's git branch promotes that tier (or prints the command when the policy
  refuses the actor);
* CI files: GitHub Actions workflows (per-PR CI branch with migrations, tests and a schema-diff
  comment; promotion on merge; weekly orphan cleanup).

The platform's own mirror of a project's repository is ``workflow/gitstore.py`` (server side).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import InvalidInput, TierbaseError

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


FEATURE_PREFIXES = ("feature/", "feat/", "fix/", "bugfix/", "hotfix/", "experiment/")
HOOK_MARK = "# installed by tierbase"


def git(repo: Path, *args: str) -> str:
    """``git ARGS`` in ``repo``, its output stripped (the hooks' and CI commands' shorthand for Git.out)."""
    return Git(repo).out(*args)


# -- pairing ------------------------------------------------------------------------------------
def feature_git_branch(feature: str) -> str:
    """The git branch of a feature's database branch (``flow claim`` makes it; the hooks pair it back)."""
    return FEATURE_PREFIXES[0] + feature


def db_branch_for(git_branch: str) -> str:
    """The database branch paired with a feature git branch: `feature/Inventory_split` -> `inventory-split`.

    ``db_branch_for(feature_git_branch(f)) == f`` for every valid feature name: one convention."""
    name = git_branch
    for prefix in FEATURE_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    name = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    if not name:
        raise InvalidInput(f"git branch {git_branch!r} gives no usable database branch name",
                           "Name git branches with letters or digits, e.g. feature/my-change")
    return name


def tier_for_git_branch(git_branches: dict[str, str], git_branch: str) -> str | None:
    """The tier whose declared git_branch is ``git_branch`` (None for feature branches)."""
    return next((tier for tier, gb in git_branches.items() if gb == git_branch), None)


# -- hooks ----------------------------------------------------------------------------------------
def install_hooks(repo: Path) -> list[str]:
    """Write post-checkout and post-merge hooks that call this tierbase (never blocking git)."""
    hooks = Path(git(repo, "rev-parse", "--git-path", "hooks"))
    hooks = hooks if hooks.is_absolute() else repo / hooks
    hooks.mkdir(parents=True, exist_ok=True)
    cli = f"{shlex.quote(sys.executable)} -m tierbase.cli.main"
    written = []
    for hook, sub in (("post-checkout", 'git on-checkout "$@"'), ("post-merge", 'git on-merge "$@"')):
        path = hooks / hook
        if path.exists() and HOOK_MARK not in path.read_text():
            raise InvalidInput(f"{path} exists and was not written by tierbase",
                               f"Merge it by hand: call `{cli} {sub}` from your hook")
        path.write_text(f"#!/bin/sh\n{HOOK_MARK}: a failure here never blocks git\n"
                        f"{cli} {sub} || true\n")
        path.chmod(0o755)
        written.append(str(path))
    return written


def write_env(repo: Path, url: str) -> Path:
    """Set DATABASE_URL in the repo's .env, keeping every other line.

    .env holds credentials: it is added to the clone's own ignore list
    (.git/info/exclude, never committed) so that it cannot be committed by accident.
    """
    exclude = Path(git(repo, "rev-parse", "--git-path", "info/exclude"))
    exclude = exclude if exclude.is_absolute() else repo / exclude
    known = exclude.read_text().splitlines() if exclude.exists() else []
    if ".env" not in known:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text("\n".join([*known, ".env"]) + "\n")
    env = repo / ".env"
    lines = env.read_text().splitlines() if env.exists() else []
    lines = [ln for ln in lines if not ln.startswith("DATABASE_URL=")] + [f"DATABASE_URL={url}"]
    env.write_text("\n".join(lines) + "\n")
    env.chmod(0o600)
    return env


# -- CI files -------------------------------------------------------------------------------------
PR_WORKFLOW = """\
# Written by `tierbase ci init github`. A CI database branch per pull request:
# fork the base tier, apply the migrations, run the tests, comment the schema diff.
name: tierbase PR
on:
  pull_request:
    types: [opened, synchronize, reopened]
permissions:
  contents: read
  pull-requests: write
jobs:
  database:
    runs-on: self-hosted
    env:
      TIERBASE_TOKEN: ${{ secrets.TIERBASE_TOKEN }}
      CI_FEATURE: pr-${{ github.event.pull_request.number }}
      CI_BRANCH: ci-pr-${{ github.event.pull_request.number }}
      BASE_REF: ${{ github.base_ref }}
    steps:
      - uses: actions/checkout@v4
        with:
          fetch-depth: 0
      - name: Create the CI database branch from the base tier
        run: |
          TIER=$(tierbase git tier "$BASE_REF")
          tierbase branch delete "$CI_BRANCH" --recursive >/dev/null 2>&1 || true
          tierbase branch create-ci "$CI_FEATURE" --parent "$TIER" --ttl 3d --json  # makes $CI_BRANCH
      - name: Apply the migrations
        run: tierbase migrate apply --branch "$CI_BRANCH" --json
      - name: Run the tests against the CI branch
        run: |
          export DATABASE_URL=$(tierbase branch url "$CI_BRANCH")
          {test_command}
      - name: Schema diff
        run: tierbase diff "$CI_BRANCH" --format markdown > schema-diff.md
      - name: Comment the schema diff on the pull request
        env:
          GH_TOKEN: ${{ github.token }}
        run: gh pr comment "${{ github.event.pull_request.number }}" --body-file schema-diff.md
"""

MERGE_WORKFLOW = """\
# Written by `tierbase ci init github`. Promotion is merge: a push to a tier's git
# branch promotes that tier (pre-promotion snapshot, migrations, smoke check,
# automatic rollback by repoint); a merged pull request drops its CI branch.
name: tierbase merge
on:
  push:
    branches-ignore: ["feature/**", "feat/**", "fix/**", "experiment/**", "ci-pr-**"]
  pull_request:
    types: [closed]
jobs:
  promote:
    if: github.event_name == 'push' && github.event.before != '0000000000000000000000000000000000000000'
    runs-on: self-hosted
    env:
      TIERBASE_TOKEN: ${{ secrets.TIERBASE_TOKEN }}
      REF_NAME: ${{ github.ref_name }}
    steps:
      - uses: actions/checkout@v4
      - name: Promote the tier of this git branch
        run: |
          TIER=$(tierbase git tier "$REF_NAME")
          tierbase promote "$TIER" --json
      - name: Promotion history
        if: always()
        run: tierbase promotions --json
  cleanup:
    if: github.event_name == 'pull_request' && github.event.pull_request.merged == true
    runs-on: self-hosted
    env:
      TIERBASE_TOKEN: ${{ secrets.TIERBASE_TOKEN }}
      CI_BRANCH: ci-pr-${{ github.event.pull_request.number }}
    steps:
      - name: Delete the CI database branch
        run: tierbase branch delete "$CI_BRANCH" --recursive --json || true
"""

CLEANUP_WORKFLOW = """\
# Written by `tierbase ci init github`. Safety net: weekly, delete ci-pr-* database
# branches whose pull request is no longer open.
name: tierbase orphan cleanup
on:
  schedule:
    - cron: "0 6 * * 1"
  workflow_dispatch: {}
jobs:
  cleanup:
    runs-on: self-hosted
    env:
      TIERBASE_TOKEN: ${{ secrets.TIERBASE_TOKEN }}
      GH_TOKEN: ${{ github.token }}
    steps:
      - name: Delete orphan CI branches
        run: |
          OPEN=$(gh pr list --state open --json number --jq '.[].number' | sed 's/^/ci-pr-/')
          for b in $(tierbase branch list --prefix ci-pr- --names); do
            echo "$OPEN" | grep -qx "$b" || tierbase branch delete "$b" --recursive --json
          done
"""


def write_github_workflows(repo: Path, test_command: str) -> list[str]:
    target = repo / ".github" / "workflows"
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("tierbase-pr.yml", PR_WORKFLOW.replace("{test_command}", test_command)),
                       ("tierbase-merge.yml", MERGE_WORKFLOW), ("tierbase-cleanup.yml", CLEANUP_WORKFLOW)):
        (target / name).write_text(text)
        written.append(str(target / name))
    return written

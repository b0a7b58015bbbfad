"""Git and CI integration: tiers map to git branches.

* git hooks: checking out a feature git branch gets its paired database branch
  (created from the entry tier if missing) and writes DATABASE_URL to .env; a
  merge into a tier's git branch promotes that tier (or prints the exact
  command when the policy forbids the actor).
* GitHub Actions workflows: per-PR CI branch with migrations, tests and a
  schema-diff comment; promotion on merge; weekly orphan cleanup.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from ..errors import InvalidInput

FEATURE_PREFIXES = ("feature/", "feat/", "fix/", "bugfix/", "hotfix/", "experiment/")
HOOK_MARK = "# installed by tierbase"


def git(repo: Path, *args: str) -> str:
    got = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if got.returncode != 0:
        raise InvalidInput(f"git {' '.join(args)} failed in {repo}: {got.stderr.strip()}",
                           "Run this inside a git repository")
    return got.stdout.strip()


def db_branch_for(git_branch: str) -> str:
    """The database branch paired with a feature git branch: `feature/Inventory_split` -> `inventory-split`."""
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

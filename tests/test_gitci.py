"""Git hooks in a real repository, and the GitHub workflows' commands run locally against a real platform."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import free_port, make_home, needs_root_btrfs, query
from .test_cli import as_json, new_env, tierbase

pytestmark = needs_root_btrfs
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "inventory"


def git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    got = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, timeout=120)
    assert got.returncode == 0, got.stderr
    return got.stdout + got.stderr


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[dict[str, str], Path]]:
    base = make_home()
    repo = base / "app"
    shutil.copytree(EXAMPLE, repo)
    held = base / "held"
    held.mkdir()
    for f in (repo / "db" / "migrations").glob("[VU]000[23]__*.sql"):
        f.rename(held / f.name)
    bindir = base / "bin"  # `tierbase` and a `gh` that records what it was asked (GitHub is not reachable here)
    bindir.mkdir()
    (bindir / "tierbase").write_text(f"#!/bin/sh\nexec {sys.executable} -m tierbase.cli.main \"$@\"\n")
    (bindir / "gh").write_text(f"#!/bin/sh\necho \"$@\" >> {base}/gh.log\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = new_env(base / "home", PATH=f"{bindir}:{os.environ['PATH']}", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x",
                  GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@x")
    mig = str(repo / "db" / "migrations")
    try:
        as_json(env, "up", "--btrfs-size", "2G", "--api-port", str(free_port()), "--proxy-port", str(free_port()))
        as_json(env, "branch", "create", "bootstrap")
        as_json(env, "migrate", "apply", "--branch", "bootstrap", "--dir", mig)
        as_json(env, "promote", "production", "--from", "bootstrap", "--dir", mig)
        tierbase(env, "import", str(repo / "seed.sql"))
        as_json(env, "policy", "reload", "--file", str(repo / "tierbase.toml"))
        git(repo, "init", "-q", "-b", "main")
        git(repo, "add", "-A")
        git(repo, "commit", "-qm", "inventory app", env=env)
        git(repo, "branch", "staging")
        yield env, base
    finally:
        tierbase(env, "down", "--purge", check=False)
        shutil.rmtree(base, ignore_errors=True)


def env_file(repo: Path) -> str:
    line = next(ln for ln in (repo / ".env").read_text().splitlines() if ln.startswith("DATABASE_URL="))
    return line.split("=", 1)[1]


def test_hooks_pair_branches_and_promote_on_merge(setup: tuple[dict[str, str], Path]) -> None:
    env, base = setup
    repo = base / "app"
    hooks = as_json(env, "git", "install-hooks", "--repo", str(repo))["hooks"]
    assert {Path(h).name for h in hooks} == {"post-checkout", "post-merge"}
    out = git(repo, "checkout", "-q", "-b", "feature/Split_Code", env=env)
    assert "database branch split-code (created)" in out
    branch = as_json(env, "branch", "show", "split-code")
    assert branch["parent"] == "staging"
    url = env_file(repo)
    assert url.endswith("/split-code")
    assert query(url, "SELECT count(*) FROM inventory")[0][0] == 10000  # through the proxy, woken on connect
    # the feature's work: the expand migration, applied to its branch and committed
    for f in (base / "held").glob("[VU]0002__*.sql"):
        shutil.copy(f, repo / "db" / "migrations" / f.name)
    as_json(env, "migrate", "apply", "--branch", "split-code", "--dir", str(repo / "db" / "migrations"))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "split inventory_code (expand)", env=env)
    out = git(repo, "checkout", "-q", "staging", env=env)
    assert env_file(repo).endswith("/staging")
    out = git(repo, "merge", "--no-ff", "-q", "-m", "merge split-code", "feature/Split_Code", env=env)
    assert "promoted staging: V0002__expand_split_inventory_code" in out
    # a developer merging into main may not promote production: the hook prints the command instead
    dev_token = as_json(env, "principal", "create", "devx", "--role", "developer")["token"]
    git(repo, "checkout", "-q", "main", env=env)
    out = git(repo, "merge", "--no-ff", "-q", "-m", "ship", "staging", env=dict(env, TIERBASE_TOKEN=dev_token))
    assert "you may not promote 'production'" in out and "tierbase promote production" in out
    assert [p["tier"] for p in as_json(env, "promotions")].count("production") == 1  # only the bootstrap
    # the platform engineer (the data dir's owner) runs it
    assert as_json(env, "promote", "production")["status"] == "succeeded"


def run_steps(job: dict[str, Any], values: dict[str, str], env: dict[str, str], cwd: Path) -> list[str]:
    """Run a workflow job's `run:` steps the way GitHub's runner would (bash -e), with expressions filled in."""
    def fill(text: str) -> str:
        return re.sub(r"\$\{\{\s*([^}]+?)\s*\}\}", lambda m: values[m.group(1)], text)

    job_env = {k: fill(str(v)) for k, v in job.get("env", {}).items()}
    outputs = []
    for step in job["steps"]:
        if "run" not in step:
            continue
        step_env = {**env, **job_env, **{k: fill(str(v)) for k, v in step.get("env", {}).items()}}
        got = subprocess.run(["bash", "-e", "-c", fill(step["run"])], cwd=cwd, env=step_env, capture_output=True,
                             text=True, timeout=300)
        assert got.returncode == 0, f"step {step.get('name')!r} failed: {got.stdout}\n{got.stderr}"
        outputs.append(got.stdout)
    return outputs


def test_github_workflows_are_valid_and_their_commands_work(setup: tuple[dict[str, str], Path]) -> None:
    env, base = setup
    repo = base / "app"
    written = as_json(env, "ci", "init", "github", "--repo", str(repo))["written"]
    flows = {Path(p).name: yaml.safe_load(Path(p).read_text()) for p in written}
    assert set(flows) == {"tierbase-pr.yml", "tierbase-merge.yml", "tierbase-cleanup.yml"}
    pr = flows["tierbase-pr.yml"]
    assert pr[True]["pull_request"]["types"] == ["opened", "synchronize", "reopened"]  # YAML 1.1 reads `on` as True
    token = (base / "home" / "api.token").read_text().strip()
    values = {"secrets.TIERBASE_TOKEN": token, "github.event.pull_request.number": "7", "github.base_ref": "staging",
              "github.token": "gh-token", "github.ref_name": "main"}
    # a pull request: CI branch from the base tier, migrations, the app's tests, the schema diff comment
    git(repo, "checkout", "-q", "-b", "feature/contract", env=env)
    for f in (base / "held").glob("V0003__*.sql"):
        shutil.copy(f, repo / "db" / "migrations" / f.name)
    run_steps(pr["jobs"]["database"], values, env, repo)
    assert as_json(env, "branch", "show", "ci-pr-7")["parent"] == "staging"
    comment = (repo / "schema-diff.md").read_text()
    assert "inventory_code" in comment
    assert "pr comment 7 --body-file schema-diff.md" in (base / "gh.log").read_text()
    # merged: the CI branch goes; pushing to staging promotes staging
    merge = flows["tierbase-merge.yml"]
    run_steps(merge["jobs"]["cleanup"], values, env, repo)
    names = [b["name"] for b in as_json(env, "branch", "list", "--no-bytes")]
    assert "ci-pr-7" not in names
    assert as_json(env, "branch", "show", "contract")["parent"] == "staging"  # made by the checkout hook
    as_json(env, "migrate", "apply", "--branch", "contract", "--dir", str(repo / "db" / "migrations"))
    as_json(env, "promote", "staging", "--from", "contract", "--dir", str(repo / "db" / "migrations"))
    out = run_steps(merge["jobs"]["promote"], values, env, repo)
    assert json.loads(out[0])["status"] == "succeeded"
    # weekly: orphan CI branches (no open pull request) are deleted
    as_json(env, "branch", "create-ci", "pr-99")  # ci-* names are the platform's: it makes them
    run_steps(flows["tierbase-cleanup.yml"]["jobs"]["cleanup"], values, env, repo)
    assert "ci-pr-99" not in [b["name"] for b in as_json(env, "branch", "list", "--no-bytes")]

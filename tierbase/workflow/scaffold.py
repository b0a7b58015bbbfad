"""`tierbase init`: the scaffold of an app repo (files first, then the platform's part)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import PolicyDenied
from ..git import KIT_DIR, Git
from ..governance.config import load_config
from .errors import Failure
from .workspace import CONFIG_FILE, DEFAULT_MIGRATIONS, DEFAULT_TEST_COMMAND, Current, Workspace, project_name_from

TEMPLATE = """\
# tierbase.toml: the database side of this app (written by `tierbase init`).
# `tierbase init` run by a platform engineer loads it into a platform that has no config yet;
# after an edit, load it with `tierbase policy reload --file tierbase.toml`.

[project]
name = "{name}"
migrations = "{migrations}"
test_command = "{test_command}"

# The promotion chain: production (git main) <- staging (git staging).
# Features fork from the entry tier and merge back into it.
[tiers.production]
protected = true
git_branch = "main"
promote = ["platform-engineer", "ci"]

[tiers.staging]
parent = "production"
protected = true
entry = true
git_branch = "staging"
promote = ["platform-engineer", "ci", "developer"]

[grants]
# CI may clean up the feature branches it merges for others (an agent's, say)
delete_any = ["platform-engineer", "ci"]
"""

KIT_GITIGNORE = ("# tierbase's records of this working copy (state, reviews, change requests, TDD artifacts):\n"
                 "# the control plane holds their history and hashes; never committed\n*\n!.gitignore\n")


def scaffold_files(repo: Path) -> tuple[Path, list[str]]:
    """Write what is missing (tierbase.toml, the migrations dir, .tierbase/); never needs the platform."""
    root = Git.toplevel(repo)
    said: list[str] = []
    cfg_path = root / CONFIG_FILE
    if not cfg_path.exists():
        cfg_path.write_text(TEMPLATE.format(name=project_name_from(root), migrations=DEFAULT_MIGRATIONS,
                                            test_command=DEFAULT_TEST_COMMAND))
        said.append(f"wrote {CONFIG_FILE} (production <- staging, migrations in {DEFAULT_MIGRATIONS})")
    cfg = load_config(cfg_path)  # a bad config stops here, before anything else is made
    mig = root / str(cfg.project.get("migrations", DEFAULT_MIGRATIONS))
    if not mig.is_dir():
        mig.mkdir(parents=True)
        (mig / ".gitkeep").write_text("")
        said.append(f"created the migrations dir {mig.relative_to(root)}/")
    kit = root / KIT_DIR
    kit.mkdir(exist_ok=True)
    if not (kit / ".gitignore").exists():
        (kit / ".gitignore").write_text(KIT_GITIGNORE)
    return root, said


def init(ws: Workspace, *, commit: bool = True) -> dict[str, Any]:
    """`tierbase init` after the files: load the config if the platform lacks its tiers, then scaffold.

    Without the right to load a config, nothing is refused: the result names the one command a
    platform engineer must run (``pending``), and a second `tierbase init` finishes the scaffold.
    """
    said, pending = load_tiers(ws)
    if pending is not None:
        return {"transition": "scaffold", "feature": None, "state": None, "previous": None, "said": said,
                "pending": pending}
    data = scaffold(ws, commit=commit)
    data["said"] = said + data["said"]
    return data


def load_tiers(ws: Workspace) -> tuple[list[str], dict[str, Any] | None]:
    """Load the repo's tierbase.toml when the platform lacks a tier it declares and runs no config of its own.

    A platform that runs a config loaded from a file keeps it: replacing someone's tiers and rules is
    `tierbase policy reload`, with its diff, never a side effect of scaffolding (scaffold() then refuses
    with the missing tiers). Returns what was done, and the command a platform engineer must run when the
    policy refuses this principal the load (the gate decides; this side only asks).
    """
    cfg = ws.config
    names = {b["name"] for b in ws.platform.list_branches()}
    missing = [t for t in cfg.tier_order() if t not in names]
    if not missing or ws.platform.show_config().get("source"):
        return [], None
    path = ws.repo / CONFIG_FILE
    try:
        got = ws.platform.apply_config(cfg.text, str(path))
    except PolicyDenied as err:
        command = f"tierbase policy reload --file {path}"
        return [f"the platform lacks the tier(s) {', '.join(missing)} of {CONFIG_FILE}; loading a config is for a "
                f"platform engineer ({err.data.get('reason') or err.message})"], \
            {"who": "platform-engineer", "command": command, "then": "tierbase init"}
    return list(got.get("said", [])), None


def scaffold(ws: Workspace, *, commit: bool = True) -> dict[str, Any]:
    """The platform's part: tiers exist, the scaffold is committed, tier git branches exist, history recorded."""
    ws.lock()
    cfg = ws.config
    said: list[str] = []
    existing = {b["name"]: b for b in ws.platform.list_branches()}
    failures = []
    for tier in cfg.tier_order():
        b = existing.get(tier)
        if b is None or b["kind"] != "tier":
            failures.append(Failure("tier-missing", f"tier {tier!r} of {CONFIG_FILE} does not exist on the platform"
                                    + ("" if b is None else f" ({tier!r} is a {b['kind']} branch)"),
                                    f"Load the config: `tierbase policy reload --file {CONFIG_FILE}` "
                                    f"(a platform engineer) or `tierbase up --config {CONFIG_FILE}`"))
    prior = ws.expected()
    if failures:
        ws.refuse("scaffold", failures, Current(prior) if prior else None)
    if commit:
        said += _commit_scaffold(ws.git, ws.rel(ws.migrations_dir))
    head = ws.git.head()
    if head is None:
        said.append("the repo has no commit yet: tier git branches are created at the first `tierbase init` "
                    "after one")
    else:
        for tier in cfg.tier_order():
            branch = ws.tier_git_branch(tier)
            if not ws.git.branch_exists(branch):
                ws.git.run("branch", branch, head)
                said.append(f"created git branch {branch!r} for tier {tier!r} at {head[:10]}")
    workspace = ws.ensure_workspace_id()
    tier_branches = [ws.tier_git_branch(t) for t in cfg.tier_order() if ws.git.branch_exists(ws.tier_git_branch(t))]
    # the first workspace brings the tiers' commits; later ones take the platform's (its record wins)
    got = ws.platform.flow_register(workspace, ws.bundle(*tier_branches) if tier_branches else None)
    said += list(got.get("said", []))
    said += ws.take_tiers(got)
    doc = ws.sync()
    return {"transition": "scaffold", "feature": doc["feature"], "state": doc["state"],
            "previous": prior["state"] if prior else None, "said": said,
            "evidence": doc["transitions"].get("scaffold", {}), "state_file": f"{KIT_DIR}/workflow-state.json"}


def _commit_scaffold(git: Git, migrations: str) -> list[str]:
    paths = [CONFIG_FILE, f"{KIT_DIR}/.gitignore", migrations]
    pending = git.run("status", "--porcelain", "--untracked-files=all", "--", *paths).stdout.strip()
    if not pending:
        return []
    git.run("add", "--", *paths)
    git.run("commit", "--quiet", "-m", "Scaffold tierbase (tierbase init)", "--", *paths)
    return [f"committed the scaffold ({', '.join(paths)})"]

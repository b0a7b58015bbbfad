"""CLI commands tying git to tiers: hooks, git-branch -> tier, CI workflows."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import BranchExists, InvalidInput, PolicyDenied, Refused
from .base import as_json, client, command
from .base import repo_option as REPO
from .render import emit_json, out

# git and config parsing are imported by the commands that use them (the config parser pulls in psycopg's SQL
# helpers): a `tierbase branch create` must not pay for them.


def _git_branches(ctx: click.Context) -> dict[str, str]:
    from ..governance.config import parse_config

    cfg = parse_config(client(ctx).show_config()["text"], "the platform's config")
    return {name: t.git_branch for name, t in cfg.tiers.items() if t.git_branch}


@click.group("git")
def git_group() -> None:
    """Pair git branches with database branches."""


@git_group.command("install-hooks")
@REPO
@command
@click.pass_context
def git_install_hooks(ctx: click.Context, repo: str) -> None:
    """post-checkout: a feature git branch gets its database branch and .env; post-merge: promote the tier."""
    from ..git import install_hooks

    written = install_hooks(Path(repo).absolute())
    emit_json({"hooks": written}) if as_json() else out.print("installed " + ", ".join(written))


@git_group.command("tier")
@click.argument("git_branch")
@command
@click.pass_context
def git_tier(ctx: click.Context, git_branch: str) -> None:
    """Print the tier whose git branch is GIT_BRANCH."""
    from ..git import tier_for_git_branch

    mapping = _git_branches(ctx)
    tier = tier_for_git_branch(mapping, git_branch)
    if tier is None:
        raise InvalidInput(f"no tier is declared with git_branch = {git_branch!r}",
                           "Declared: " + (", ".join(f"{t}={g}" for t, g in mapping.items()) or "none"))
    emit_json({"git_branch": git_branch, "tier": tier}) if as_json() else click.echo(tier)


@git_group.command("on-checkout", hidden=True)
@click.argument("args", nargs=-1)
@REPO
@command
@click.pass_context
def git_on_checkout(ctx: click.Context, args: tuple[str, ...], repo: str) -> None:
    """Called by the post-checkout hook (prev-head new-head is-branch-checkout)."""
    from ..git import db_branch_for, git, tier_for_git_branch, write_env

    if len(args) >= 3 and args[2] == "0":
        return  # a file checkout, not a branch switch
    root = Path(git(Path(repo), "rev-parse", "--show-toplevel"))
    branch = git(root, "rev-parse", "--abbrev-ref", "HEAD")
    if branch == "HEAD":
        return  # detached
    sdk = client(ctx)
    tier = tier_for_git_branch(_git_branches(ctx), branch)
    db = tier or db_branch_for(branch)
    made = False
    if tier is None:
        try:
            sdk.create_branch(db)
            made = True
        except BranchExists:
            pass
    env = write_env(root, sdk.branch_url(db))
    result = {"git_branch": branch, "database_branch": db, "created": made, "env": str(env)}
    if as_json():
        emit_json(result)
    else:
        out.print(f"tierbase: {branch} -> database branch {db}{' (created)' if made else ''}; DATABASE_URL in {env}")


@git_group.command("on-merge", hidden=True)
@click.argument("args", nargs=-1)
@REPO
@command
@click.pass_context
def git_on_merge(ctx: click.Context, args: tuple[str, ...], repo: str) -> None:
    """Called by the post-merge hook: a merge into a tier's git branch promotes that tier."""
    from ..git import git, tier_for_git_branch

    root = Path(git(Path(repo), "rev-parse", "--show-toplevel"))
    branch = git(root, "rev-parse", "--abbrev-ref", "HEAD")
    mapping = _git_branches(ctx)
    tier = tier_for_git_branch(mapping, branch)
    if tier is None:
        return
    source = _merged_source(root, mapping, branch)
    try:
        rec = client(ctx).promote(tier, source)
    except PolicyDenied as err:
        cmd = f"tierbase promote {tier}" + (f" --from {source}" if source else "")
        out.print(f"tierbase: you may not promote {tier!r} ({err.data.get('reason')}). Someone allowed must run:\n"
                  f"  {cmd}")
        return
    except Refused as err:
        out.print(f"tierbase: {tier!r} was not promoted: {err.message}")
        return
    emit_json(rec) if as_json() else out.print(f"tierbase: promoted {tier}: {', '.join(rec['migrations'])}")


def _merged_source(root: Path, mapping: dict[str, str], current: str) -> str | None:
    """The database branch behind the git branch just merged (HEAD^2 of the merge commit), if known."""
    import subprocess

    from ..git import db_branch_for, git, tier_for_git_branch

    got = subprocess.run(["git", "-C", str(root), "rev-parse", "-q", "--verify", "HEAD^2"], capture_output=True,
                         text=True)
    if got.returncode != 0:
        return None  # a fast-forward: the tier's default source applies
    heads = git(root, "branch", "--format=%(refname:short)", "--points-at", got.stdout.strip()).split()
    heads = [h for h in heads if h != current]
    for head in heads:
        tier = tier_for_git_branch(mapping, head)
        if tier is not None:
            return tier
    return db_branch_for(heads[0]) if heads else None


@click.group("ci")
def ci_group() -> None:
    """Continuous integration with a database branch per pull request."""


@ci_group.command("init")
@click.argument("provider", type=click.Choice(["github"]))
@REPO
@click.option("--test-command", default=None, help="Default: [project] test_command, else `pytest -q`.")
@command
@click.pass_context
def ci_init(ctx: click.Context, provider: str, repo: str, test_command: str | None) -> None:
    """Write GitHub Actions workflows: per-PR branch + tests + schema diff comment, promote on merge, cleanup."""
    from ..git import write_github_workflows
    from ..governance.config import parse_config

    if test_command is None:
        cfg = parse_config(client(ctx).show_config()["text"], "the platform's config")
        test_command = str(cfg.project.get("test_command", "pytest -q"))
    written = write_github_workflows(Path(repo).absolute(), test_command)
    emit_json({"written": written}) if as_json() else out.print("wrote " + ", ".join(written))


def _add_runner() -> None:
    """`tierbase ci runner` is the workflow kit's (cli/workflow.py): attached here, explicitly."""
    from .workflow import ci_runner

    ci_group.add_command(ci_runner)


_add_runner()

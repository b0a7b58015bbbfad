"""CLI commands of the workflow kit: `tierbase init`, `tierbase flow ...`, `tierbase tdd ...`.

Each parses, makes one call into tierbase.workflow with the SDK client as the
platform, and renders. A refused gate exits 2 and lists every failing
precondition (on stderr, or as JSON with --json).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import NotRunning
from ..workflow.constants import ARTIFACTS, CI_WAIT, ROLES
from .base import as_json, client, command, repo_option
from .render import emit_json, err, out

if TYPE_CHECKING:
    from ..workflow.workspace import Workspace

# The kit (git, JSON Schema, the gates) is imported by the commands that run it, not by every `tierbase` call.


def workspace(ctx: click.Context, repo: str) -> Workspace:
    from ..workflow.workspace import Workspace

    return Workspace(Path(repo).absolute(), client(ctx))


def run(call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Call into the kit; on a refused gate, list every failure for people before the one-line error."""
    from ..workflow.errors import GateFailed

    try:
        return call()
    except GateFailed as e:
        if not as_json():
            err.print(f"Refused: the {e.data['gate']} gate (state stays {e.data.get('state') or '-'}):", markup=False)
            for f in e.data["failures"]:
                err.print(f"  x {f['code']}: {f['message']}" + (f"\n      -> {f['hint']}" if f.get("hint") else ""),
                          markup=False)
        raise


def render(data: dict[str, Any]) -> None:
    if as_json():
        emit_json(data)
        return
    for line in data.get("said", []):
        out.print(f"- {line}", markup=False)
    feature = f" ({data['feature']})" if data.get("feature") else ""
    prev = data.get("previous")
    moved = f"{prev} -> {data['state']}" if prev and prev != data["state"] else f"state {data['state']}"
    out.print(moved + feature, markup=False)


# -- init -----------------------------------------------------------------------------------
@click.command("init")
@repo_option
@click.option("--no-commit", is_flag=True, help="Do not commit the scaffold files (tierbase.toml, migrations dir).")
@command
@click.pass_context
def init(ctx: click.Context, repo: str, no_commit: bool) -> None:
    """Scaffold an app repo: tierbase.toml, the migrations dir, the state file; load the tiers if missing.

    A platform engineer's `init` on a platform without a config of its own loads tierbase.toml (creating
    its tiers) in the same step; anyone else's writes the files and names the command to ask for."""
    from ..workflow import scaffold
    from ..workflow.workspace import Workspace

    root, said = scaffold.scaffold_files(Path(repo).absolute())
    try:
        plat = client(ctx)
    except NotRunning as e:
        for line in said:
            err.print(f"- {line}", markup=False)
        raise NotRunning(f"{e.message}; the files are written but the tiers cannot be checked",
                         "Start the platform (`tierbase up`), then run `tierbase init` again: it loads tierbase.toml "
                         "(or start it with `tierbase up --config tierbase.toml`)") from e
    data = run(lambda: scaffold.init(Workspace(root, plat), commit=not no_commit))
    data["said"] = said + data["said"]
    pending = data.get("pending")
    if pending is None or as_json():
        render(data)
        return
    for line in data["said"]:
        out.print(f"- {line}", markup=False)
    out.print(f"next: ask a platform engineer to run\n  {pending['command']}\n"
              f"then run `{pending['then']}` again to finish (commit, tier git branches, the workspace record)",
              markup=False)


# -- flow -----------------------------------------------------------------------------------
@click.group("flow")
def flow_group() -> None:
    """The five-state workflow: claim -> ready -> ci -> merge, with blocking gates."""


@flow_group.command("claim")
@click.argument("feature")
@click.option("--parent", default=None, help="The tier to fork from (default: the entry tier).")
@repo_option
@command
@click.pass_context
def flow_claim(ctx: click.Context, feature: str, parent: str | None, repo: str) -> None:
    """Claim FEATURE: git branch feature/FEATURE and database branch FEATURE, from the tier."""
    from ..workflow import flow

    ws = workspace(ctx, repo)
    render(run(lambda: flow.claim(ws, feature, parent)))


@flow_group.command("ready")
@repo_option
@command
@click.pass_context
def flow_ready(ctx: click.Context, repo: str) -> None:
    """Gate to pr-ready: commits ahead, clean tree, tests kept, migrations verified; writes the change request."""
    from ..workflow import checks

    ws = workspace(ctx, repo)
    render(run(lambda: checks.ready(ws)))


@flow_group.command("ci")
@click.option("--wait", type=float, default=CI_WAIT, show_default=True,
              help="Seconds to wait for a runner to take and finish the run.")
@repo_option
@command
@click.pass_context
def flow_ci(ctx: click.Context, wait: float, repo: str) -> None:
    """Gate to ci-green: ask for a CI run of the prepared commit; a runner (`tierbase ci runner`) reports it."""
    from ..workflow import checks

    ws = workspace(ctx, repo)
    render(run(lambda: checks.ci(ws, wait=wait)))


@flow_group.command("approve-tests")
@click.argument("feature")
@click.option("--sha", default=None, help="The commit whose test changes are approved (default: feature/FEATURE).")
@repo_option
@command
@click.pass_context
def flow_approve_tests(ctx: click.Context, feature: str, sha: str | None, repo: str) -> None:
    """A human reviewer accepts FEATURE's weakened or harness-changing tests, for one commit only."""
    from ..workflow import checks

    data = run(lambda: checks.approve_tests(workspace(ctx, repo), feature, sha))
    if as_json():
        emit_json(data)
    else:
        for line in data["said"]:
            out.print(f"- {line}", markup=False)


@click.command("runner")
@click.option("--once", is_flag=True, help="Run what is queued, then exit.")
@click.option("--os-user", default=None, help="Run the tests as this OS user (when started as root).")
@click.option("--poll", type=float, default=1.0, show_default=True, help="Seconds between looks at the queue.")
@command
@click.pass_context
def ci_runner(ctx: click.Context, once: bool, os_user: str | None, poll: float) -> None:
    """The CI runner: as a `ci` principal (TIERBASE_TOKEN), take queued runs, test the exact commit, report."""
    from ..workflow import runner

    n = runner.serve(client(ctx), os_user=os_user, poll=poll, once=once)
    emit_json({"ran": n}) if as_json() else out.print(f"ran {n} CI run(s)", markup=False)


@flow_group.command("merge")
@repo_option
@command
@click.pass_context
def flow_merge(ctx: click.Context, repo: str) -> None:
    """Gate to merged: green evidence for HEAD; git merge into the tier's branch; promote the migrations."""
    from ..workflow import flow

    ws = workspace(ctx, repo)
    render(run(lambda: flow.merge(ws)))


@flow_group.command("abandon")
@click.option("--delete-git-branch", is_flag=True, help="Also delete feature/FEATURE (default: kept).")
@repo_option
@command
@click.pass_context
def flow_abandon(ctx: click.Context, delete_git_branch: bool, repo: str) -> None:
    """Undo the claim: delete the database branch, switch back to the tier's git branch."""
    from ..workflow import flow

    ws = workspace(ctx, repo)
    render(run(lambda: flow.abandon(ws, delete_git_branch)))


@flow_group.command("status")
@repo_option
@command
@click.pass_context
def flow_status(ctx: click.Context, repo: str) -> None:
    """The state, every gate of the next transitions, and the evidence so far."""
    from ..workflow import doctor

    data = doctor.status(workspace(ctx, repo))
    if as_json():
        emit_json(data)
        return
    sf = data["state_file"]
    out.print(f"state {data['state']}" + (f", feature {data['feature']}" if data["feature"] else "")
              + f" (git {data['git_branch']} at {str(data['head'])[:10]})", markup=False)
    if not sf["matches_control_plane"]:
        out.print("! the state file does not match the control plane: `tierbase flow doctor --fix`", markup=False)
    for name, ev in data["evidence"].items():
        out.print(f"  done {name:<8} by {ev.get('by')} at {ev.get('at')}", markup=False)
    mark = {"pass": "ok", "fail": "x ", "deferred": ".."}
    for n in data["next"]:
        out.print(f"next: {n['command']}", markup=False)
        for g in n["gates"]:
            out.print(f"  {mark[g['status']]} {g['gate']}: {g['detail']}", markup=False)


@flow_group.command("doctor")
@click.option("--fix", is_flag=True, help="Apply the fixes that are safe (state file, branch switch, leftovers).")
@repo_option
@command
@click.pass_context
def flow_doctor(ctx: click.Context, fix: bool, repo: str) -> None:
    """Find drift between the state file, git, the database branches and the history. Exit 1 if any is left."""
    from ..workflow import doctor

    data = doctor.doctor(workspace(ctx, repo), fix=fix)
    if as_json():
        emit_json(data)
    else:
        for f in data["findings"]:
            tag = "fixed" if f["fixed"] else ("fixable" if f["fixable"] else "manual")
            out.print(f"[{tag}] {f['code']}: {f['message']} -> {f['fix']}", markup=False)
        if not data["findings"]:
            out.print(f"no drift (state {data['state']})", markup=False)
    if not data["ok"]:
        ctx.exit(1)


@flow_group.command("schema")
@click.argument("name", required=False, default="workflow-state")
@click.option("--list", "list_all", is_flag=True, help="List the shipped schemas.")
def flow_schema(name: str, list_all: bool) -> None:
    """Print a shipped JSON Schema (default: the state file's)."""
    from ..workflow.validate import SCHEMAS, schema

    if list_all:
        for key, what in SCHEMAS.items():
            click.echo(f"{key:<16} {what}")
        return
    try:
        click.echo(json.dumps(schema(name), indent=2))
    except Exception as e:  # an unknown name: say which exist
        raise click.BadParameter(str(e), param_hint="NAME") from e


# -- tdd ------------------------------------------------------------------------------------
@click.group("tdd")
def tdd_group() -> None:
    """The opt-in TDD layer: roles, artifacts, RED and GREEN recorded by tierbase."""


@tdd_group.command("enable")
@repo_option
@command
@click.pass_context
def tdd_enable(ctx: click.Context, repo: str) -> None:
    """Turn the TDD layer on for the feature in flight (it cannot be turned off)."""
    from ..workflow import tdd

    ws = workspace(ctx, repo)
    render(run(lambda: tdd.enable(ws)))


@tdd_group.command("assign")
@click.argument("role", type=click.Choice(ROLES))
@click.argument("principal")
@repo_option
@command
@click.pass_context
def tdd_assign(ctx: click.Context, role: str, principal: str, repo: str) -> None:
    """Give ROLE on the feature in flight to PRINCIPAL."""
    from ..workflow import tdd

    ws = workspace(ctx, repo)
    render(run(lambda: tdd.assign(ws, role, principal)))


@tdd_group.command("submit")
@click.argument("artifact", type=click.Choice(list(ARTIFACTS)))
@click.argument("file", type=click.Path(dir_okay=False))
@repo_option
@command
@click.pass_context
def tdd_submit(ctx: click.Context, artifact: str, file: str, repo: str) -> None:
    """Submit ARTIFACT (validated against its schema) from FILE, as the role that owns it."""
    from ..workflow import tdd

    ws = workspace(ctx, repo)
    render(run(lambda: tdd.submit(ws, artifact, Path(file).absolute())))


@tdd_group.command("approve")
@click.argument("artifact", type=click.Choice(list(ARTIFACTS)))
@repo_option
@command
@click.pass_context
def tdd_approve(ctx: click.Context, artifact: str, repo: str) -> None:
    """Approve ARTIFACT (records the approver and its content hash)."""
    from ..workflow import tdd

    ws = workspace(ctx, repo)
    render(run(lambda: tdd.approve(ws, artifact)))


@tdd_group.command("red")
@click.argument("test")
@repo_option
@command
@click.pass_context
def tdd_red(ctx: click.Context, test: str, repo: str) -> None:
    """Navigator: run TEST (an item id or node id) on an ephemeral branch; records RED only if it fails."""
    from ..workflow import tdd

    ws = workspace(ctx, repo)
    render(run(lambda: tdd.red(ws, test)))


@tdd_group.command("green")
@repo_option
@command
@click.pass_context
def tdd_green(ctx: click.Context, repo: str) -> None:
    """Driver: run the whole suite on an ephemeral branch; records GREEN only if it all passes."""
    from ..workflow import tdd

    ws = workspace(ctx, repo)
    render(run(lambda: tdd.green(ws)))


@tdd_group.command("status")
@repo_option
@command
@click.pass_context
def tdd_status(ctx: click.Context, repo: str) -> None:
    """Roles, artifacts (with approval drift), items and the next step."""
    from ..workflow import tdd

    data = tdd.status(workspace(ctx, repo))
    if as_json():
        emit_json(data)
        return
    out.print(f"TDD for {data['feature']}: {'on' if data['enabled'] else 'off'}", markup=False)
    for role, who in data["roles"].items():
        out.print(f"  {role:<20} {who}", markup=False)
    for name, a in data["artifacts"].items():
        state = "approved by " + a["approved_by"] if a["approved_by"] else ("submitted" if a["submitted"] else "-")
        out.print(f"  {name:<14} {state}" + ("  DRIFT" if a["drift"] else ""), markup=False)
    for i in data["items"]:
        out.print(f"  {i['id']:<4} {i['status']:<8} {i['test']}", markup=False)
    for d in data["drift"]:
        out.print(f"  ! {d['code']}: {d['message']}", markup=False)
    out.print(f"next: {data['next']}", markup=False)

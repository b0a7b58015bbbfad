"""The transitions that pair a git branch with a database branch: claim, abandon, merge.

Each one: verify the state file against the control plane, check every
precondition (all of them, so the refusal lists everything), then act, then
record in the control plane, then write the state file from it. A refusal
changes nothing and is recorded as ``<gate>-refused`` with the failures.
"""

from __future__ import annotations

import time
from typing import Any

from ..errors import BranchNotFound, PolicyDenied, TierbaseError
from .errors import Failure
from .gitrepo import KIT_DIR, GitError
from .platform import explain, migrations, unsupported
from .state import IN_FLIGHT, FlowState, Transition, allowed_from, effective, iso, next_state
from .workspace import Current, Workspace

STATE_FILE = f"{KIT_DIR}/workflow-state.json"


def result(transition: str, previous: FlowState | None, doc: dict[str, Any], said: list[str],
           **extra: Any) -> dict[str, Any]:
    return {"transition": transition, "feature": doc["feature"], "state": doc["state"],
            "previous": str(previous) if previous else None, "said": said,
            "evidence": doc["transitions"].get(transition, {}), "state_file": STATE_FILE, **extra}


def wrong_state(transition: Transition, cur: Current) -> Failure | None:
    if next_state(transition, cur.state) is not None:
        return None
    return Failure("wrong-state", f"`flow {transition}` needs state {' or '.join(allowed_from(transition))}, "
                   f"and the state is {cur.state}", _next_hint(cur))


def _next_hint(cur: Current) -> str:
    return {
        FlowState.SCAFFOLD_COMPLETE: "Claim a feature first: `tierbase flow claim FEATURE`",
        FlowState.FEATURE_CLAIMED: "Prepare the change first: `tierbase flow ready`",
        FlowState.PR_READY: "Run CI first: `tierbase flow ci`",
        FlowState.CI_GREEN: "Merge it: `tierbase flow merge`",
        FlowState.MERGED: "Claim the next feature: `tierbase flow claim FEATURE`",
    }[cur.state]


def on_branch(ws: Workspace, cur: Current) -> list[Failure]:
    """The two preconditions of every transition on a claimed feature: its git branch, no uncommitted code."""
    out = []
    want, now = cur.claim.get("git_branch"), ws.git.current_branch()
    if want and now != want:
        out.append(Failure("wrong-git-branch", f"the checked-out git branch is {now or '(detached)'!r}, "
                           f"not the claimed {want!r}", f"Switch to it: `git checkout {want}`"))
    dirty = ws.git.dirty()
    if dirty:
        out.append(Failure("dirty-worktree", f"uncommitted code: {', '.join(dirty[:8])}"
                           + (f" and {len(dirty) - 8} more" if len(dirty) > 8 else ""),
                           "Commit (or stash) your changes first", {"paths": dirty}))
    return out


def branch_exists(ws: Workspace, name: str) -> bool:
    try:
        ws.platform.get_branch(name)
        return True
    except BranchNotFound:
        return False


# -- claim ------------------------------------------------------------------------------
def claim(ws: Workspace, feature: str, parent: str | None = None) -> dict[str, Any]:
    cur = ws.current("claim")
    bad_name = ws.check_feature_name(feature)
    if bad_name is not None:
        ws.refuse("claim", [bad_name], cur)
    if cur.state in IN_FLIGHT:
        if cur.feature == feature:
            return _resume(ws, cur)
        ws.refuse("claim", [Failure("feature-in-flight", f"feature {cur.feature!r} is in flight ({cur.state})",
                                    f"Finish it (`tierbase flow status`) or abandon it (`tierbase flow abandon`) "
                                    f"before claiming {feature!r}")], cur)
    tier = parent or ws.config.entry
    failures = []
    if tier not in ws.config.tiers:
        failures.append(Failure("unknown-tier", f"{tier!r} is not a tier of tierbase.toml",
                                f"Use one of: {', '.join(ws.config.tier_order())}"))
    tier_git = ws.tier_git_branch(tier)
    if not ws.git.branch_exists(tier_git):
        failures.append(Failure("git-branch-missing", f"the tier's git branch {tier_git!r} does not exist",
                                "Run `tierbase init` again to create the tier git branches"))
    dirty = ws.git.dirty()
    if dirty:
        failures.append(Failure("dirty-worktree", f"uncommitted code: {', '.join(dirty[:8])}",
                                "Commit (or stash) your changes before switching to the feature branch"))
    if branch_exists(ws, feature):
        failures.append(Failure("db-branch-exists", f"a database branch named {feature!r} already exists",
                                "Pick another feature name, or delete that branch first"))
    past = effective(ws.platform.flow_history(feature)["events"])
    if past and past[-1]["state"] == FlowState.MERGED:
        failures.append(Failure("feature-merged", f"feature {feature!r} was merged already",
                                "Claim the follow-up work under a new feature name"))
    if failures:
        ws.refuse("claim", failures, cur)

    git_branch = f"feature/{feature}"
    said = []
    try:
        made = ws.platform.create_branch(feature, tier)
    except PolicyDenied as err:
        ws.refuse("claim", [ws.policy_failure(err)], cur)
    said.append(f"created database branch {feature!r} from tier {tier!r} in {made.get('elapsed_ms', '?')} ms")
    try:
        reused = ws.git.branch_exists(git_branch)
        if reused:
            ws.git.checkout(git_branch)
            said.append(f"switched to the existing git branch {git_branch!r}")
        else:
            ws.git.checkout(git_branch, create_from=tier_git)
            said.append(f"created git branch {git_branch!r} from {tier_git!r}")
    except GitError:
        ws.platform.delete_branch(feature)  # undo: a claim is both branches or neither
        raise
    evidence = {"feature": feature, "git_branch": git_branch, "db_branch": feature, "parent": tier,
                "tier_git_branch": tier_git, "base_sha": ws.git.head(), "git_branch_reused": reused,
                "owner": str(ws.me["name"]), "owner_role": str(ws.me.get("role", "")), "claimed_at": iso(time.time())}
    ws.record(feature, Transition.CLAIM, FlowState.FEATURE_CLAIMED, evidence)
    ws.record(cur.doc["workspace"], Transition.CLAIM, FlowState.FEATURE_CLAIMED, {"feature": feature})
    doc = ws.sync()
    return result("claim", cur.state, doc, said)


def _resume(ws: Workspace, cur: Current) -> dict[str, Any]:
    """Claiming the feature in flight again: nothing to record; put the git branch back if that is all."""
    said = [f"feature {cur.feature!r} is already claimed ({cur.state}): resumed"]
    want = cur.claim["git_branch"]
    if ws.git.current_branch() != want and not ws.git.dirty():
        ws.git.checkout(want)
        said.append(f"switched to {want!r}")
    if not branch_exists(ws, cur.claim["db_branch"]):
        said.append(f"its database branch {cur.claim['db_branch']!r} is gone: see `tierbase flow doctor`")
    doc = ws.sync()
    return result("claim", cur.state, doc, said, resumed=True)


# -- abandon ------------------------------------------------------------------------------
def abandon(ws: Workspace, delete_git_branch: bool = False) -> dict[str, Any]:
    """Undo a claim: the database branch goes, the git branch is kept (unless asked), back to the tier."""
    cur = ws.current("abandon")
    failures = [f for f in [wrong_state(Transition.ABANDON, cur)] if f]
    dirty = ws.git.dirty()
    if dirty and not failures:
        failures.append(Failure("dirty-worktree", f"uncommitted code: {', '.join(dirty[:8])}",
                                "Commit or stash it first: abandoning switches back to the tier's git branch"))
    if failures:
        ws.refuse("abandon", failures, cur)
    c, said = cur.claim, []
    try:
        gone = ws.platform.delete_branch(c["db_branch"], recursive=True)
        said.append(f"deleted database branch(es) {', '.join(gone)}")
    except BranchNotFound:
        said.append(f"database branch {c['db_branch']!r} was already gone")
    except PolicyDenied as err:
        ws.refuse("abandon", [ws.policy_failure(err)], cur)
    ws.git.checkout(c["tier_git_branch"])
    said.append(f"switched to {c['tier_git_branch']!r}")
    if delete_git_branch and ws.git.branch_exists(c["git_branch"]):
        ws.git.run("branch", "-D", c["git_branch"])
        said.append(f"deleted git branch {c['git_branch']!r}")
    elif ws.git.branch_exists(c["git_branch"]):
        said.append(f"kept git branch {c['git_branch']!r} (your commits); `git branch -D {c['git_branch']}` "
                    "removes it")
    evidence = {"feature": cur.feature, "from_state": str(cur.state), "git_branch_kept": not delete_git_branch}
    ws.record(cur.key, Transition.ABANDON, FlowState.SCAFFOLD_COMPLETE, evidence)
    ws.record(cur.doc["workspace"], Transition.ABANDON, FlowState.SCAFFOLD_COMPLETE, {"feature": cur.feature})
    doc = ws.sync()
    out = result("abandon", cur.state, doc, said)
    out["evidence"] = evidence
    return out


# -- merge --------------------------------------------------------------------------------
def merge(ws: Workspace) -> dict[str, Any]:
    cur = ws.current("merge")
    failures = [f for f in [wrong_state(Transition.MERGE, cur)] if f]
    if failures:
        ws.refuse("merge", failures, cur)
    c, ci = cur.claim, cur.evidence("ci")
    tier, tier_git, feature = c["parent"], c["tier_git_branch"], c["db_branch"]
    failures += on_branch(ws, cur)
    head = ws.git.head()
    if head != ci.get("sha"):
        failures.append(Failure("head-changed-since-ci", f"HEAD is {str(head)[:10]}, but the green CI run was for "
                                f"{str(ci.get('sha'))[:10]}", "Prepare and test it again: `tierbase flow ready` "
                                "then `tierbase flow ci`", {"head": head, "ci_sha": ci.get("sha")}))
    if not ws.git.branch_exists(tier_git):
        failures.append(Failure("git-branch-missing", f"the tier's git branch {tier_git!r} does not exist",
                                "Recreate it (`tierbase init`), then merge"))
    files = ws.migration_files()
    plat = migrations(ws.platform)
    if files and plat is None:
        failures.append(unsupported("promote"))
    me = str(ws.me["name"])
    try:
        decision = explain(ws.platform, me, "promote", tier, feature)
    except TierbaseError:
        decision = None  # the platform cannot tell in advance: promote itself decides below
    if decision is not None and not decision.get("allowed"):
        failures.append(Failure("promotion-refused", f"{me} may not merge into tier {tier!r}: {decision['reason']}",
                                "Ask a developer or CI to run `tierbase flow merge` (policy has no override)",
                                {"rule": decision.get("rule")}))
    if failures:
        ws.refuse("merge", failures, cur)

    said: list[str] = []
    before = ws.git.sha(tier_git)
    ws.git.checkout(tier_git)
    got = ws.git.run("merge", "--no-ff", "--quiet", "-m", f"Merge feature {feature} into {tier_git} (tierbase flow "
                     "merge)", c["git_branch"], check=False)
    if got.returncode != 0:
        ws.git.run("merge", "--abort", check=False)
        ws.git.checkout(c["git_branch"])
        ws.refuse("merge", [Failure("merge-conflict", f"{c['git_branch']} does not merge cleanly into {tier_git}: "
                                    f"{(got.stdout + got.stderr).strip()[:300]}",
                                    f"Merge {tier_git} into your branch, resolve, commit, then ready and ci again")],
                  cur)
    merge_sha = str(ws.git.head())
    said.append(f"merged {c['git_branch']} into {tier_git} ({merge_sha[:10]})")
    promotion: dict[str, Any] | None = None
    try:
        pending = plat.migrate_status(tier, str(ws.migrations_dir)).get("pending", []) if plat and files else []
        if plat is not None and pending:
            promotion = plat.promote(tier, source=feature, migrations_dir=str(ws.migrations_dir))
            said.append(f"promoted {len(pending)} migration(s) of {feature!r} into tier {tier!r}")
        elif files:
            said.append(f"tier {tier!r} has every migration already: nothing to promote")
    except TierbaseError as err:
        # the tier's database refused or failed: put git back as it was, so nothing changed
        ws.git.run("reset", "--hard", "--quiet", str(before))
        ws.git.checkout(c["git_branch"])
        code = "promotion-refused" if isinstance(err, PolicyDenied) else "promotion-failed"
        ws.refuse("merge", [Failure(code, err.message, err.hint, {"error": err.to_dict()})], cur)
    try:
        ws.platform.delete_branch(feature, recursive=True)
        said.append(f"deleted database branch {feature!r}")
        feature_deleted: bool | str = True
    except TierbaseError as err:
        feature_deleted = err.message
        said.append(f"could not delete database branch {feature!r}: {err.message} (see `tierbase flow doctor`)")
    if ws.git.run("branch", "-d", c["git_branch"], check=False).returncode == 0:
        said.append(f"deleted the merged git branch {c['git_branch']!r}")
    evidence = {"merge_sha": merge_sha, "tier": tier, "tier_git_branch": tier_git, "tier_sha_before": before,
                "merged_at": iso(time.time()), "promotion": promotion, "feature_branch_deleted": feature_deleted,
                "migrations": files}
    ws.record(cur.key, Transition.MERGE, FlowState.MERGED, evidence)
    ws.record(cur.doc["workspace"], Transition.MERGE, FlowState.MERGED, {"feature": feature})
    doc = ws.sync()
    return result("merge", cur.state, doc, said)

"""The transitions that pair a git branch with a database branch: claim, abandon, merge.

Each one: verify the state file against the control plane, then ask the
platform to execute the transition (it checks every precondition on its own
evidence and records the event, or the refusal), then make the local git
effect, then write the state file from the control plane's history. The
client records nothing itself.
"""

from __future__ import annotations

from typing import Any

from ..errors import BranchNotFound
from ..git import KIT_DIR, GitError
from .errors import Failure
from .state import FlowState, Transition, allowed_from, next_state
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
    workspace = str(cur.doc["workspace"])
    got = ws.platform.flow_claim(workspace, feature, parent, ws.local(head=False))
    if got.get("resumed"):
        return _resume(ws, ws.current("claim"), list(got.get("said", [])))
    said = list(got.get("said", []))
    c = got["evidence"]
    said += ws.take_tiers(ws.platform.flow_tiers())
    git_branch, base = str(c["git_branch"]), str(c["base_sha"])
    try:
        if ws.git.branch_exists(git_branch):
            ws.git.checkout(git_branch)
            said.append(f"switched to the existing git branch {git_branch!r}")
        else:
            ws.git.run("checkout", "--quiet", "-b", git_branch, base)
            said.append(f"created git branch {git_branch!r} from {c['tier_git_branch']!r} ({base[:10]}, the "
                        "platform's accepted commit)")
    except GitError as err:
        said.append(f"could not switch to {git_branch!r}: {err.message}")
    doc = ws.sync()
    return result("claim", cur.state, doc, said)


def _resume(ws: Workspace, cur: Current, said: list[str]) -> dict[str, Any]:
    """Claiming the feature in flight again: nothing recorded; put the git branch back if that is all."""
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
    """Undo a claim: the platform deletes the database branch; git goes back to the tier's branch."""
    cur = ws.current("abandon")
    if cur.feature is None:
        ws.refuse("abandon", [f for f in [wrong_state(Transition.ABANDON, cur)] if f], cur)
    c = cur.claim
    got = ws.platform.flow_abandon(str(cur.feature), {**ws.local(head=False), "delete_git_branch": delete_git_branch})
    said = list(got.get("said", []))
    ws.git.checkout(c["tier_git_branch"])
    said.append(f"switched to {c['tier_git_branch']!r}")
    if delete_git_branch and ws.git.branch_exists(c["git_branch"]):
        ws.git.run("branch", "-D", c["git_branch"])
        said.append(f"deleted git branch {c['git_branch']!r}")
    elif ws.git.branch_exists(c["git_branch"]):
        said.append(f"kept git branch {c['git_branch']!r} (your commits); `git branch -D {c['git_branch']}` "
                    "removes it")
    doc = ws.sync()
    out = result("abandon", cur.state, doc, said)
    out["evidence"] = got.get("evidence", out["evidence"])
    return out


# -- merge --------------------------------------------------------------------------------
def merge(ws: Workspace) -> dict[str, Any]:
    """One platform operation: git merge on its repository, promotion, cleanup, then `merged`."""
    cur = ws.current("merge")
    if cur.feature is None:
        ws.refuse("merge", [f for f in [wrong_state(Transition.MERGE, cur)] if f], cur)
    c = cur.claim
    got = ws.platform.flow_merge(str(cur.feature), ws.local())
    said = list(got.get("said", []))
    said += ws.take_tiers(got)
    ws.git.checkout(c["tier_git_branch"])
    if ws.git.run("branch", "-D", c["git_branch"], check=False).returncode == 0:
        said.append(f"deleted the merged git branch {c['git_branch']!r}")
    doc = ws.sync()
    return result("merge", cur.state, doc, said)

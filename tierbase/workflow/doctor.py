"""`flow status` (the state, the next gates and their evidence) and `flow doctor` (drift, and its fix)."""

from __future__ import annotations

from typing import Any

from ..errors import BranchNotFound, InvalidInput, TierbaseError
from .errors import Failure
from .flow import on_branch
from .state import IN_FLIGHT, FlowState, read_raw
from .tdd import pr_ready_failures
from .workspace import CONFIG_FILE, Current, Workspace

NEXT = {
    FlowState.SCAFFOLD_COMPLETE: ["claim"],
    FlowState.FEATURE_CLAIMED: ["ready", "abandon"],
    FlowState.PR_READY: ["ci", "ready", "abandon"],
    FlowState.CI_GREEN: ["merge", "ready", "abandon"],
    FlowState.MERGED: ["claim"],
}


def _gate(code: str, failures: list[Failure], passed: str) -> dict[str, Any]:
    mine = [f for f in failures if f.code == code]
    if mine:
        return {"gate": code, "status": "fail", "detail": mine[0].message, "hint": mine[0].hint}
    return {"gate": code, "status": "pass", "detail": passed}


def _deferred(code: str, detail: str) -> dict[str, Any]:
    return {"gate": code, "status": "deferred", "detail": detail}


def gates(ws: Workspace, cur: Current, transition: str) -> list[dict[str, Any]]:
    """Every gate of ``transition``, evaluated where it is cheap, deferred where it runs tests or migrations."""
    if transition == "claim":
        entry_git = ws.tier_git_branch(ws.config.entry)
        dirty = ws.git.dirty()
        return [{"gate": "git-branch-missing", "status": "pass" if ws.git.branch_exists(entry_git) else "fail",
                 "detail": f"entry tier git branch {entry_git!r}"},
                {"gate": "dirty-worktree", "status": "fail" if dirty else "pass",
                 "detail": ", ".join(dirty[:8]) or "clean"},
                _deferred("db-branch-exists", "checked against the platform at claim")]
    if transition == "abandon":
        return [{"gate": "dirty-worktree", "status": "fail" if ws.git.dirty() else "pass", "detail": "clean worktree"}]
    c = cur.claim
    found = on_branch(ws, cur)
    out = [_gate("wrong-git-branch", found, f"on {c['git_branch']}"), _gate("dirty-worktree", found, "clean")]
    head = ws.git.head()
    if transition == "ready":
        ahead = ws.git.commits_ahead(c["tier_git_branch"], c["git_branch"]) \
            if ws.git.branch_exists(c["git_branch"]) else []
        out.append({"gate": "no-commits-ahead", "status": "pass" if ahead else "fail",
                    "detail": f"{len(ahead)} commit(s) ahead of {c['tier_git_branch']}"})
        out.append(_deferred("fewer-tests", f"tests collected on HEAD vs {c['tier_git_branch']} (at `flow ready`)"))
        out.append(_deferred("tests-skipped", "no test of the tier skipped away (at `flow ready`)"))
        files = ws.migration_files()
        out.append(_deferred("migration-invalid", f"{len(files)} migration file(s) verified on a throwaway branch "
                             "(at `flow ready`)"))
        tdd = pr_ready_failures(ws, cur)
        if cur.doc.get("tdd"):
            out.append({"gate": "tdd", "status": "fail" if tdd else "pass",
                        "detail": "; ".join(f.message for f in tdd) or "every test-list item GREEN, intact"})
    elif transition == "ci":
        want = cur.evidence("ready").get("head_sha")
        out.append({"gate": "head-changed-since-ready", "status": "pass" if head == want else "fail",
                    "detail": f"HEAD {str(head)[:10]}, prepared at {str(want)[:10]}"})
        out.append(_deferred("tests-failed", "the test command on a fresh ci branch (at `flow ci`)"))
    elif transition == "merge":
        want = cur.evidence("ci").get("sha")
        out.append({"gate": "head-changed-since-ci", "status": "pass" if head == want else "fail",
                    "detail": f"HEAD {str(head)[:10]}, green at {str(want)[:10]}"})
        out.append(_deferred("promotion-refused", f"the policy on promoting into {c['parent']!r} (at `flow merge`)"))
    return out


def status(ws: Workspace) -> dict[str, Any]:
    expected = ws.expected()
    if expected is None:
        raise InvalidInput(f"{ws.repo} was never scaffolded for tierbase", "Run `tierbase init` in the app repo")
    doc, bad = read_raw(ws.repo)
    cur = Current(expected)
    matches = doc == expected
    nxt = [{"transition": t, "command": f"tierbase flow {t}", "gates": gates(ws, cur, t)} for t in NEXT[cur.state]]
    return {"workspace": expected["workspace"], "project": expected["project"], "feature": cur.feature,
            "state": str(cur.state), "git_branch": ws.git.current_branch(), "head": ws.git.head(),
            "state_file": {"path": ".tierbase/workflow-state.json", "matches_control_plane": matches,
                           "problems": bad if doc is not None or bad else []},
            "next": nxt, "evidence": expected["transitions"], "tdd": expected.get("tdd"),
            "digest": expected["digest"], "ci_runs": _ci_runs(ws, cur)}


def _ci_runs(ws: Workspace, cur: Current) -> list[dict[str, Any]]:
    """The platform's CI runs of the feature: who ran what, on which commit, with the log's tail."""
    if cur.feature is None:
        return []
    out = []
    for r in ws.platform.flow_ci_runs(str(cur.feature)):
        res = r.get("result") or {}
        out.append({"run": r["id"], "sha": r["sha"], "state": r["state"], "runner": r.get("runner"),
                    "requested_by": r["requested_by"], "green": res.get("green"),
                    "failures": [f.get("code") for f in res.get("failures", [])],
                    "counts": {k: (res.get("evidence") or {}).get(k) for k in ("passed", "failed", "skipped",
                                                                               "errors")},
                    "log": str(r.get("log") or "")[-4000:]})
    return out


def _finding(code: str, message: str, fix: str, fixable: bool) -> dict[str, Any]:
    return {"code": code, "message": message, "fix": fix, "fixable": fixable, "fixed": False}


def doctor(ws: Workspace, fix: bool = False) -> dict[str, Any]:
    """Drift between the state file, git, the database branches and the history; with ``fix``, repair it."""
    findings: list[dict[str, Any]] = []
    if fix:
        ws.lock()
    expected = ws.expected()
    if expected is None:
        findings.append(_finding("not-scaffolded", f"{ws.repo} has no workspace history in the control plane",
                                 "`tierbase init`", False))
        return {"ok": False, "state": None, "feature": None, "findings": findings}
    cur = Current(expected)
    doc, bad = read_raw(ws.repo)
    if doc is None or bad or doc != expected:
        what = bad[0] if bad else "it differs from the control plane's history (edited by hand?)"
        f = _finding("state-file-drift", f".tierbase/workflow-state.json: {what}",
                     "rewrite it from the control plane (`tierbase flow doctor --fix`)", True)
        if fix:
            ws.sync()
            f["fixed"] = True
        findings.append(f)
    findings += _config_findings(ws)
    names = _branch_names(ws)
    if cur.state in IN_FLIGHT:
        findings += _in_flight(ws, cur, names, fix)
    elif cur.state is FlowState.MERGED and cur.feature in names:
        f = _finding("db-branch-left", f"feature {cur.feature!r} was merged but its database branch remains",
                     f"delete it (`tierbase branch delete {cur.feature}`)", True)
        if fix and _delete(ws, str(cur.feature)):
            f["fixed"] = True
        findings.append(f)
    return {"ok": all(f["fixed"] for f in findings), "state": str(cur.state), "feature": cur.feature,
            "findings": findings}


def _branch_names(ws: Workspace) -> set[str]:
    return {b["name"] for b in ws.platform.list_branches()}


def _in_flight(ws: Workspace, cur: Current, names: set[str], fix: bool) -> list[dict[str, Any]]:
    c, out = cur.claim, []
    if not ws.git.branch_exists(c["git_branch"]):
        out.append(_finding("git-branch-missing", f"the claimed git branch {c['git_branch']!r} is gone",
                            "recreate it from your commits, or `tierbase flow abandon`", False))
    elif ws.git.current_branch() != c["git_branch"]:
        clean = not ws.git.dirty()
        f = _finding("git-branch-drift", f"the checked-out branch is {ws.git.current_branch()!r}, the feature's "
                     f"is {c['git_branch']!r}", f"`git checkout {c['git_branch']}`", clean)
        if fix and clean:
            ws.git.checkout(c["git_branch"])
            f["fixed"] = True
        out.append(f)
    if c["db_branch"] not in names:
        out.append(_finding("db-branch-missing", f"the feature's database branch {c['db_branch']!r} is gone",
                            "`tierbase flow abandon`, then claim again", False))
    for leftover in (f"ci-{cur.feature}", f"red-{cur.feature}", f"green-{cur.feature}"):
        if leftover in names:
            f = _finding("ephemeral-left", f"the ephemeral branch {leftover!r} was left behind (a crashed run?)",
                         f"delete it (`tierbase branch delete {leftover}`)", True)
            if fix and _delete(ws, leftover):
                f["fixed"] = True
            out.append(f)
    return out


def _config_findings(ws: Workspace) -> list[dict[str, Any]]:
    try:
        shown = ws.platform.show_config()
    except TierbaseError:
        return []
    if shown.get("sha256") == ws.config.digest:
        return []
    return [_finding("config-drift", f"the platform runs another {CONFIG_FILE} (sha256 "
                     f"{str(shown.get('sha256'))[:12]}) than this repo's ({ws.config.digest[:12]})",
                     f"a platform engineer loads it: `tierbase policy reload --file {CONFIG_FILE}`", False)]


def _delete(ws: Workspace, name: str) -> bool:
    try:
        ws.platform.delete_branch(name, recursive=True)
        return True
    except BranchNotFound:
        return True
    except TierbaseError:
        return False

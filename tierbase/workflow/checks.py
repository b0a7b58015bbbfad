"""The two evidence-gathering transitions: ready (prepare the change) and ci (have a runner test it).

The platform judges both: `ready` sends the feature branch (a git bundle)
and the platform compares it with the tier's recorded commit, verifies the
migrations and records pr-ready; `ci` asks for a run, which a CI runner
(`tierbase ci runner`, a `ci` principal) executes and reports. The client
writes the review and change request files from the recorded evidence.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from typing import Any

from ..git import feature_git_branch
from .constants import CI_WAIT
from .errors import Failure, GateFailed
from .flow import result, wrong_state
from .state import Transition, iso
from .workspace import Current, Workspace


# -- ready ---------------------------------------------------------------------------------
def ready(ws: Workspace) -> dict[str, Any]:
    cur = ws.current("ready")
    if cur.feature is None:
        ws.refuse("ready", [f for f in [wrong_state(Transition.READY, cur)] if f], cur)
    c = cur.claim
    branch = c["git_branch"] if ws.git.branch_exists(c["git_branch"]) else "HEAD"
    got = ws.platform.flow_ready(str(cur.feature), ws.bundle(branch), ws.local())
    said = list(got.get("said", []))
    doc = ws.sync()
    ev = doc["transitions"]["ready"]
    ahead, tests, files = ev["commits_ahead"], ev["tests"], ev["migrations"]["files"]
    review = ws.kit_path("reviews", f"{cur.feature}.md")
    review.parent.mkdir(parents=True, exist_ok=True)
    review.write_text(_review(cur, ev["head_sha"], ahead, files, str(ev.get("diff") or ""), tests))
    said.append(f"wrote the schema review {ws.rel(review)}")
    pr_url, pr_note = _pull_request(ws, cur, ahead, review.read_text())
    said.append(pr_note)
    change = ws.kit_path("changes", f"{cur.feature}.json")
    change.parent.mkdir(parents=True, exist_ok=True)
    record = {"feature": cur.feature, "title": ahead[-1].split(" ", 1)[-1] if ahead else cur.feature,
              "source": c["git_branch"], "target": c["tier_git_branch"], "tier": c["parent"],
              "head_sha": ev["head_sha"], "commits": ahead, "migrations": files, "review": ws.rel(review),
              "tests": tests, "pull_request": pr_url, "created_at": iso(time.time()), "created_by": ev["by"]}
    change.write_text(json.dumps(record, indent=2) + "\n")
    said.append(f"wrote the change request {ws.rel(change)}")
    return result("ready", cur.state, doc, said)


def approve_tests(ws: Workspace, feature: str, sha: str | None) -> dict[str, Any]:
    """A human reviewer accepts the changed tests of one commit (the platform records it, for that SHA only)."""
    sha = sha or ws.git.sha(f"refs/heads/{feature_git_branch(feature)}")
    if sha is None:
        raise GateFailed("approve-tests", [Failure("unknown-commit", "no commit to approve was named",
                                                   "Pass --sha SHA")])
    return ws.platform.flow_approve_tests(feature, sha)


def _review(cur: Current, head: str, ahead: list[str], files: list[str], diff_text: str,
            tests: dict[str, Any]) -> str:
    c = cur.claim
    lines = [f"# Change review: {cur.feature}", "",
             f"Database branch `{c['db_branch']}` (git `{c['git_branch']}` at `{head[:12]}`) against tier "
             f"`{c['parent']}` (git `{c['tier_git_branch']}`).", "", "## Commits", "",
             *[f"- {a}" for a in ahead], "", "## Migrations", "",
             *([f"- `{f}`" for f in files] or ["(none)"]), "", "## Schema diff", "", diff_text.strip(), "",
             "## Tests", "",
             f"- {c['tier_git_branch']}: {tests['tier']['total']} collected ({tests['tier']['inactive']} skip/xfail)",
             f"- HEAD: {tests['head']['total']} collected ({tests['head']['inactive']} skip/xfail)",
             *([f"- added: {', '.join(tests['added'])}"] if tests["added"] else []), ""]
    return "\n".join(lines)


def _pull_request(ws: Workspace, cur: Current, ahead: list[str], body: str) -> tuple[str | None, str]:
    """A GitHub pull request, only when the repo has a GitHub remote and `gh` is installed and logged in."""
    remotes = {k: v for k, v in ws.git.remotes().items() if "github.com" in v}
    if not remotes:
        return None, "no GitHub remote: the change request is local only"
    if shutil.which("gh") is None:
        return None, "the GitHub CLI `gh` is not installed: the change request is local only"
    if subprocess.run(["gh", "auth", "status"], cwd=ws.repo, capture_output=True).returncode != 0:
        return None, "`gh` is not logged in: the change request is local only"
    c, remote = cur.claim, "origin" if "origin" in remotes else next(iter(remotes))
    ws.git.run("push", "--quiet", "-u", remote, c["git_branch"])
    title = ahead[-1].split(" ", 1)[-1] if ahead else str(cur.feature)
    got = subprocess.run(["gh", "pr", "create", "--base", c["tier_git_branch"], "--head", c["git_branch"],
                          "--title", title, "--body", body], cwd=ws.repo, capture_output=True, text=True)
    if got.returncode != 0:
        return None, f"`gh pr create` failed ({got.stderr.strip()[:200]}): the change request is local only"
    url = got.stdout.strip().splitlines()[-1] if got.stdout.strip() else None
    return url, f"opened pull request {url}"


# -- ci -------------------------------------------------------------------------------------
def ci(ws: Workspace, *, wait: float = CI_WAIT) -> dict[str, Any]:
    """Ask for a CI run of the prepared commit and wait for a runner to report it."""
    cur = ws.current("ci")
    if cur.feature is None:
        ws.refuse("ci", [f for f in [wrong_state(Transition.CI, cur)] if f], cur)
    run = ws.platform.flow_ci(str(cur.feature), ws.local())
    said = [f"CI run #{run['id']} of {str(run['sha'])[:10]} asked for (requested by {run['requested_by']})"]
    deadline = time.monotonic() + wait
    while run["state"] != "done" and time.monotonic() < deadline:
        time.sleep(0.5)
        run = ws.platform.flow_ci_run(int(run["id"]))
    if run["state"] != "done":
        raise GateFailed("ci", [Failure("ci-not-finished", f"CI run #{run['id']} is {run['state']} after "
                                        f"{wait:.0f} s", "Start a runner (`tierbase ci runner`, as a `ci` "
                                        "principal), then `tierbase flow ci` again (it waits for the same run)")],
                         str(cur.state))
    res = run["result"] or {}
    if not res.get("green"):
        failures = [Failure(str(f["code"]), str(f["message"]), str(f.get("hint", "")), dict(f.get("data", {})))
                    for f in res.get("failures", [])] or [Failure("ci-failed", "the CI run failed")]
        raise GateFailed("ci", failures, str(cur.state))
    ev = res["evidence"]
    said.append(f"runner {run['runner']}: {ev['passed']} passed, {ev['failed']} failed, {ev['skipped']} skipped in "
                f"{ev['duration_s']} s")
    return result("ci", cur.state, ws.sync(), said)

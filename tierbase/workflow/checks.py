"""The two evidence-gathering transitions: ready (prepare the change) and ci (test it on a fresh branch)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import BranchNotFound, InvalidInput, PolicyDenied, TierbaseError
from . import testrun
from .errors import Failure, GateFailed
from .flow import on_branch, result, wrong_state
from .platform import migrations, unsupported
from .state import FlowState, Transition, iso
from .tdd import pr_ready_failures
from .workspace import Current, Workspace

CI_TTL = "2h"  # a crashed run's ci branch expires on its own


# -- ready ---------------------------------------------------------------------------------
def ready(ws: Workspace) -> dict[str, Any]:
    cur = ws.current("ready")
    failures = [f for f in [wrong_state(Transition.READY, cur)] if f]
    if failures:
        ws.refuse("ready", failures, cur)
    c = cur.claim
    failures += on_branch(ws, cur)
    ahead = ws.git.commits_ahead(c["tier_git_branch"], c["git_branch"]) if ws.git.branch_exists(c["git_branch"]) \
        else []
    if not ahead:
        failures.append(Failure("no-commits-ahead", f"{c['git_branch']} has no commit that "
                                f"{c['tier_git_branch']} lacks", "Commit your change first"))
    tests, test_failures = compare_tests(ws, c["tier_git_branch"])
    failures += test_failures
    files = ws.migration_files()
    plat = migrations(ws.platform)
    verify: dict[str, Any] = {"files": files}
    if files and plat is None:
        failures.append(unsupported("verify"))
    elif files and plat is not None:
        try:
            verify = {"files": files, **plat.migrate_verify(c["parent"], str(ws.migrations_dir))}
        except TierbaseError as err:
            verify = {"files": files, "ok": False, "problems": [str(err)]}
        if not verify.get("ok"):
            probs = [str(p) for p in verify.get("problems", [])] or ["verification failed"]
            failures.append(Failure("migration-invalid", "the pending migrations do not verify on a throwaway "
                                    f"branch of {c['parent']!r}: " + "; ".join(probs[:5]),
                                    "Fix the migration files, commit, and run `tierbase flow ready` again",
                                    {"problems": probs, "lint": verify.get("lint")}))
    failures += pr_ready_failures(ws, cur)
    if failures:
        ws.refuse("ready", failures, cur)

    said = [f"{len(ahead)} commit(s) ahead of {c['tier_git_branch']}",
            f"tests: {tests['head']['total']} on HEAD, {tests['tier']['total']} on {c['tier_git_branch']}"]
    applied: list[Any] = []
    diff_text = "No migrations in this change."
    if files and plat is not None:
        try:
            applied = list(plat.migrate_apply(c["db_branch"], str(ws.migrations_dir)).get("applied", []))
            diff_text = str(plat.diff(c["parent"], c["db_branch"], "markdown").get("text", "")) or "No schema change."
        except TierbaseError as err:
            ws.refuse("ready", [Failure("feature-branch-migrations", f"the migrations do not apply to the feature "
                                        f"branch {c['db_branch']!r}: {err.message}",
                                        f"Reset it to its tier (`tierbase branch reset {c['db_branch']}`) and run "
                                        "`tierbase flow ready` again")], cur)
        said.append(f"verified {len(files)} migration file(s) on a throwaway branch; applied {len(applied)} "
                    f"to {c['db_branch']!r}")
    head = str(ws.git.head())
    review = ws.kit_path("reviews", f"{cur.feature}.md")
    review.parent.mkdir(parents=True, exist_ok=True)
    review.write_text(_review(cur, head, ahead, files, diff_text, tests))
    said.append(f"wrote the schema review {ws.rel(review)}")
    pr_url, pr_note = _pull_request(ws, cur, ahead, review.read_text())
    said.append(pr_note)
    change = ws.kit_path("changes", f"{cur.feature}.json")
    change.parent.mkdir(parents=True, exist_ok=True)
    record = {"feature": cur.feature, "title": ahead[-1].split(" ", 1)[-1] if ahead else cur.feature,
              "source": c["git_branch"], "target": c["tier_git_branch"], "tier": c["parent"], "head_sha": head,
              "commits": ahead, "migrations": files, "review": ws.rel(review), "tests": tests,
              "pull_request": pr_url, "created_at": iso(time.time()), "created_by": str(ws.me["name"])}
    change.write_text(json.dumps(record, indent=2) + "\n")
    said.append(f"wrote the change request {ws.rel(change)}")
    evidence = {"head_sha": head, "commits_ahead": ahead, "tests": tests,
                "migrations": {"files": files, "verify": verify, "applied_to_feature": applied},
                "review": ws.rel(review), "change_request": ws.rel(change), "pull_request": pr_url,
                "pull_request_note": pr_note}
    ws.record(cur.key, Transition.READY, FlowState.PR_READY, evidence)
    return result("ready", cur.state, ws.sync(), said)


def compare_tests(ws: Workspace, tier_git: str) -> tuple[dict[str, Any], list[Failure]]:
    """Collect on the tier's git branch (a temporary worktree) and on HEAD; compare."""
    failures: list[Failure] = []
    try:
        with ws.git.worktree(tier_git) as tree, ThreadPoolExecutor(2) as pool:  # two pytest processes at once
            on_tier = pool.submit(testrun.collect, ws.test_command, tree)
            head = testrun.collect(ws.test_command, ws.repo)
            base = on_tier.result()
    except InvalidInput as err:
        return {"tier": {"total": 0, "inactive": 0}, "head": {"total": 0, "inactive": 0}}, \
            [Failure("test-count-unsupported", err.message, err.hint)]
    if not base.ok:
        failures.append(Failure("tier-collection-error", f"the tests of {tier_git} do not collect: "
                                f"{base.output.strip()[-300:]}", f"Fix the test suite on {tier_git} first"))
    if not head.ok:
        failures.append(Failure("collection-error", f"the tests on HEAD do not collect: {head.output.strip()[-300:]}",
                                "Fix the import or syntax error, commit, and run it again"))
    removed = sorted(set(base.tests) - set(head.tests))
    skipped_away = sorted((set(base.tests) - base.inactive) & head.inactive)
    active_base, active_head = base.total - len(base.inactive), head.total - len(head.inactive)
    # skipped-away tests are their own failure; anything else that shrinks the suite is a removal
    if head.ok and base.ok and (head.total < base.total or active_head + len(skipped_away) < active_base):
        failures.append(Failure("fewer-tests", f"HEAD has {head.total} tests ({active_head} that run), "
                                f"{tier_git} has {base.total} ({active_base} that run)"
                                + (f"; gone: {', '.join(removed[:10])}" if removed else ""),
                                "Restore the deleted tests: the suite may only grow", {"removed": removed}))
    if skipped_away:
        failures.append(Failure("tests-skipped", f"{len(skipped_away)} test(s) that run on {tier_git} are skipped "
                                f"or xfail on HEAD: {', '.join(skipped_away[:10])}",
                                "Remove the skip/xfail marks: a skipped-away test counts as removed",
                                {"tests": skipped_away}))
    tests = {"tier": base.summary(), "head": head.summary(), "removed": removed,
             "added": sorted(set(head.tests) - set(base.tests)), "skipped_away": skipped_away}
    return tests, failures


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
def ci(ws: Workspace) -> dict[str, Any]:
    cur = ws.current("ci")
    failures = [f for f in [wrong_state(Transition.CI, cur)] if f]
    if failures:
        ws.refuse("ci", failures, cur)
    c, ready_ev = cur.claim, cur.evidence("ready")
    failures += on_branch(ws, cur)
    head = ws.git.head()
    if head != ready_ev.get("head_sha"):
        failures.append(Failure("head-changed-since-ready", f"HEAD is {str(head)[:10]}, but the change was prepared "
                                f"at {str(ready_ev.get('head_sha'))[:10]}", "Prepare it again: `tierbase flow ready`"))
    files, plat = ws.migration_files(), migrations(ws.platform)
    if files and plat is None:
        failures.append(unsupported("apply"))
    if failures:
        ws.refuse("ci", failures, cur)

    branch, tier = f"ci-{cur.feature}", c["parent"]
    said = []
    try:
        ws.platform.delete_branch(branch, recursive=True)
        said.append(f"deleted a leftover {branch!r}")
    except BranchNotFound:
        pass
    try:
        ws.platform.create_ci_branch(branch.removeprefix("ci-"), tier, ttl=CI_TTL)  # the platform names it
    except PolicyDenied as err:
        ws.refuse("ci", [ws.policy_failure(err)], cur)
    said.append(f"created {branch!r} from tier {tier!r}")
    run: testrun.RunResult | None = None
    apply_error: TierbaseError | None = None
    try:
        if files and plat is not None:
            try:
                applied = plat.migrate_apply(branch, str(ws.migrations_dir)).get("applied", [])
                said.append(f"applied {len(applied)} migration(s) to {branch!r}")
            except TierbaseError as err:
                apply_error = err
        if apply_error is None:
            run = testrun.run(ws.test_command, ws.repo, ws.platform.branch_url(branch, ws.database))
    finally:
        ws.platform.delete_branch(branch, recursive=True)
        said.append(f"deleted {branch!r}")
    baseline = dict(ready_ev["tests"]["tier"])
    if apply_error is not None or run is None:
        msg = apply_error.message if apply_error else "the tests did not run"
        ws.refuse("ci", [Failure("ci-migrations-failed", f"the migrations do not apply to a fresh branch of "
                                 f"{tier!r}: {msg}", "Fix the migrations, then ready and ci again")], cur)
    evidence = {"sha": head, **{k: v for k, v in run.to_dict().items() if k != "failures"}, "ci_branch": branch,
                "baseline": baseline, "command": ws.test_command}
    failures = ci_failures(run, baseline)
    if failures:
        ws.record(cur.key, "ci-refused", cur.state, {"failures": [f.to_dict() for f in failures], "run": evidence})
        raise GateFailed("ci", failures, str(cur.state))
    said.append(f"{run.passed} passed, {run.failed} failed, {run.skipped} skipped in {run.duration_s} s")
    ws.record(cur.key, Transition.CI, FlowState.CI_GREEN, evidence)
    return result("ci", cur.state, ws.sync(), said)


def ci_failures(run: testrun.RunResult, baseline: dict[str, Any]) -> list[Failure]:
    out = []
    if run.failed or run.errors:
        out.append(Failure("tests-failed", f"{run.failed} failed and {run.errors} errored: "
                           f"{', '.join(run.failures[:10]) or run.output.strip()[-300:]}",
                           "Fix the code (not the tests), commit, then `tierbase flow ready` and `tierbase flow ci`",
                           {"failures": run.failures[:50], "output": run.output[-2000:]}))
    need_active = int(baseline["total"]) - int(baseline["inactive"])
    if run.total < int(baseline["total"]) or run.passed < need_active:
        out.append(Failure("fewer-tests-than-tier", f"{run.total} tests ran ({run.passed} passed); the tier's "
                           f"suite has {baseline['total']} ({need_active} that run)",
                           "Every test of the tier must still run and pass"))
    return out

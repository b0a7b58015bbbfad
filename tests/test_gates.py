"""Issue 10: the red team's attacks on the workflow gates, replayed as an agent through the HTTP API and the CLI.

Each attack gets exit 2 / HTTP 403 with a reason code and an audit record,
and leaves the feature's history, the platform's git record of the tiers,
the local git refs and the database branches as they were. The platform
judges by its own evidence: its copy of the repository, the tier's recorded
commit and tierbase.toml, and JUnit reports that only a `ci` runner sends.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tierbase import Tierbase
from tierbase.errors import InvalidInput, PolicyDenied

from .conftest import as_, make_principal
from .test_workflow import App, Platform, clone, git, needs_root_btrfs, new_app, run_cli
from .test_workflow import plat as plat

pytestmark = needs_root_btrfs


def api(plat: Platform, who: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, plat.api_url + path, headers={"Authorization": f"Bearer {plat.tokens[who]}"},
                         timeout=600, **kwargs)


def codes_of(resp: httpx.Response) -> list[str]:
    assert resp.status_code == 403, (resp.status_code, resp.text)
    err = resp.json()["error"]
    assert err["code"] == "gate_failed" and err["message"]
    return [f["code"] for f in err["data"]["failures"]]


def bundle(repo: Path, ref: str) -> str:
    got = subprocess.run(["git", "bundle", "create", "--quiet", "-", ref], cwd=repo, capture_output=True, check=True)
    return base64.b64encode(got.stdout).decode()


def world(plat: Platform, app: App, feature: str) -> dict[str, Any]:
    """Everything an attack must leave alone: history, the platform's tier record, git refs, branches."""
    return {"history": plat.json("flow", "status", "--repo", str(app.path))["digest"],
            "feature": api(plat, "dev", "GET", f"/v1/flow/{feature}").json()["digest"],
            "tiers": api(plat, "dev", "GET", "/v1/flow-tiers").json()["tiers"],
            "refs": git(app.path, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads"),
            "branches": sorted(b["name"] for b in plat.json("branch", "list", "--no-bytes"))}


def denied_by(plat: Platform, who: str, action: str, target: str) -> list[dict[str, Any]]:
    return [r for r in plat.json("audit", "log", "--actor", who, "--target", target)
            if r["action"] == action and r["decision"] == "denied"]


def test_forged_events_and_other_principals_features_are_refused(plat: Platform) -> None:
    """The old client-event route is gone; an agent cannot ci, merge, ready, abandon or re-point dev's work."""
    app = App(plat, clone(plat, "victim"), "dev")
    app.ok("init")  # dev's own workspace
    app.ok("flow", "claim", "victim-f")
    app.write("tests/check_victim.py", "def test_victim():\n    assert 'v'.upper() == 'V'\n")
    app.commit("A victim feature")
    app.ok("flow", "ready")
    ws = app.state()["workspace"]
    before = world(plat, app, "victim-f")

    forged = api(plat, "bot", "POST", "/v1/flow/victim-f", json={
        "transition": "ci", "state": "ci-green", "evidence": {"sha": git(app.path, "rev-parse", "HEAD")}})
    assert forged.status_code in (404, 405)  # no route takes an event any more
    assert codes_of(api(plat, "bot", "POST", "/v1/ci/take")) == ["not-a-runner"]
    runner = run_cli(plat.as_("bot"), "ci", "runner", "--once", "--json")  # an agent's token is no runner's
    assert runner.returncode == 2 and "not-a-runner" in runner.stdout
    assert codes_of(api(plat, "bot", "POST", "/v1/ci/runs/1/report", json={
        "junit": "<testsuite tests='4'/>", "output": "", "exit_code": 0, "duration_s": 1})) == ["not-a-runner"]
    assert codes_of(api(plat, "bot", "POST", "/v1/flow/victim-f/merge", json={})) == ["promotion-refused"]
    assert codes_of(api(plat, "bot", "POST", "/v1/flow/victim-f/abandon", json={})) == ["not-feature-owner"]
    assert codes_of(api(plat, "bot", "POST", "/v1/flow/victim-f/ready", json={
        "bundle": bundle(app.path, "feature/victim-f")})) == ["not-feature-owner"]
    assert codes_of(api(plat, "bot", "POST", "/v1/flow/bot-hijack/claim", json={"workspace": ws})) == \
        ["not-workspace-owner"]
    assert codes_of(api(plat, "bot", "POST", f"/v1/flow/workspaces/{ws}", json={"workspace": ws})) == \
        ["not-workspace-owner"]
    assert codes_of(api(plat, "bot", "POST", "/v1/flow/victim-f/tdd/enable")) == ["not-feature-owner"]
    # roles before state: not "TDD is not enabled", which would tell the agent about dev's feature
    red = {"item": "T1", "test": "tests/x.py::test_x", "fingerprint": "0" * 64}
    assert codes_of(api(plat, "bot", "POST", "/v1/flow/victim-f/tdd/red", json=red)) == ["not-your-role"]
    # an unknown feature is refused the same way, saying nothing about it
    assert codes_of(api(plat, "bot", "POST", "/v1/flow/no-such/abandon", json={})) == ["no-such-feature"]
    assert world(plat, app, "victim-f") == before
    for action in ("flow.merge", "flow.abandon", "flow.ready", "flow.tdd-enable"):
        assert denied_by(plat, "bot", action, "victim-f"), action
    assert denied_by(plat, "bot", "flow.claim", ws) and denied_by(plat, "bot", "flow.ci-report", "ci-1")
    app.ok("flow", "abandon", "--delete-git-branch")


def test_agent_cannot_fake_its_own_green(plat: Platform, tmp_path: Path) -> None:
    """On its own feature: no ready without commits, a red run stays red, no merge, no self-approved TDD."""
    app = new_app(plat, "forger", who="bot")
    app.ok("flow", "claim", "bot-forge")
    before = world(plat, app, "bot-forge")
    assert app.refused("flow", "ready") == ["no-commits-ahead"]
    assert codes_of(api(plat, "bot", "POST", "/v1/flow/bot-forge/ready", json={
        "bundle": bundle(app.path, "feature/bot-forge")})) == ["no-commits-ahead"]
    assert world(plat, app, "bot-forge")["refs"] == before["refs"]
    assert len(plat.json("audit", "log", "--action", "flow.ready-refused", "--target", "bot-forge")) == 2

    # TDD: roles are the platform's to check
    app.ok("tdd", "enable")
    assert codes_of(api(plat, "bot", "POST", "/v1/flow/bot-forge/tdd/assign",
                        json={"role": "navigator", "principal": "bot"})) == ["agent-cannot-assign"]
    app.ok("tdd", "assign", "spec-author", "bot", who="dev")
    spec = {"feature": "bot-forge", "title": "Forge", "stories": [{"id": "S1", "title": "x", "acceptance_criteria": [
        {"id": "AC1", "text": "y"}]}], "nfrs": []}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    app.ok("tdd", "submit", "spec", str(path))
    sha = app.state()["tdd"]["artifacts"]["spec"]["sha256"]
    assert codes_of(api(plat, "bot", "POST", "/v1/flow/bot-forge/tdd/approve",
                        json={"artifact": "spec", "sha256": sha})) == ["self-approval"]
    assert codes_of(api(plat, "dev", "POST", "/v1/flow/bot-forge/tdd/submit",
                        json={"artifact": "spec", "sha256": sha})) == ["not-your-role"]
    assert app.state()["tdd"]["artifacts"]["spec"]["approved"] is None
    assert denied_by(plat, "bot", "flow.tdd-approve", "bot-forge")
    app.ok("flow", "abandon")

    # a red run stays red, and a refused merger learns nothing of the state
    app.ok("flow", "claim", "bot-red")
    app.write("tests/check_red.py", "def test_red():\n    assert 1 + 1 == 3\n")
    app.commit("A failing test")
    app.ok("flow", "ready")
    got = app.cli("flow", "ci")
    assert got.returncode == 2
    assert [f["code"] for f in json.loads(got.stdout)["error"]["data"]["failures"]] == ["tests-failed"]
    assert app.state()["state"] == "pr-ready"
    tiers = world(plat, app, "bot-red")["tiers"]
    assert app.refused("flow", "merge") == ["promotion-refused"]  # policy first, not "wrong-state"
    assert world(plat, app, "bot-red")["tiers"] == tiers
    runs = plat.json("flow", "status", "--repo", str(app.path))["ci_runs"]
    assert runs[-1]["runner"] == "ci" and "test_red" in runs[-1]["log"]
    app.ok("flow", "abandon", "--delete-git-branch")


def test_tier_test_command_and_recorded_commit_decide(plat: Platform) -> None:
    """A deselecting test_command, a rewritten local tier branch, weakened tests and hooks: all caught."""
    app = new_app(plat, "weakener", who="bot")
    app.ok("flow", "claim", "bot-weak")
    recorded = api(plat, "dev", "GET", "/v1/flow-tiers").json()["tiers"]

    # 1. the failing test deselected in the feature's own tierbase.toml
    app.write("tests/check_fails.py", "def test_fails():\n    assert 'a' == 'b'\n")
    toml = (app.path / "tierbase.toml").read_text()
    app.write("tierbase.toml", toml.replace('test_command = "pytest -q"',
                                            'test_command = "pytest -q --deselect tests/check_fails.py::test_fails"'))
    head = app.commit("Deselect the failing test")
    assert app.refused("flow", "ready") == ["test-harness-changed"]
    assert app.human("flow", "approve-tests", "bot-weak").returncode == 2  # an agent is no reviewer
    approved = json.loads(app.cli("flow", "approve-tests", "bot-weak", "--sha", head, who="dev").stdout)
    assert approved["approved"] == ["test-harness-changed"]
    app.ok("flow", "ready")  # a human accepted the harness change for this commit...
    got = app.cli("flow", "ci")  # ...but CI runs the tier's command, which still runs the failing test
    assert got.returncode == 2
    failure = json.loads(got.stdout)["error"]["data"]["failures"][0]
    assert failure["code"] == "tests-failed" and "tests/check_fails.py::test_fails" in failure["message"]
    git(app.path, "reset", "--hard", "--quiet", "HEAD~1")

    # 2. the test deleted on the branch and on the agent's local copy of the tier's git branch
    git(app.path, "checkout", "--quiet", "staging")
    git(app.path, "rm", "--quiet", "tests/check_basics.py")
    git(app.path, "commit", "--quiet", "-m", "Rewrite the tier")
    git(app.path, "checkout", "--quiet", "feature/bot-weak")
    git(app.path, "rm", "--quiet", "tests/check_basics.py")
    app.commit("Drop the basics")
    assert app.refused("flow", "ready") == ["fewer-tests"]
    assert api(plat, "dev", "GET", "/v1/flow-tiers").json()["tiers"] == recorded
    git(app.path, "reset", "--hard", "--quiet", "HEAD~1")

    # 3. an assertion replaced by `assert True`, then a conftest hook turning failures into passes
    basics = (app.path / "tests" / "check_basics.py").read_text()
    app.write("tests/check_basics.py", basics.replace("assert 2 + 2 == 4", "assert True"))
    app.commit("Weaken a test")
    assert app.refused("flow", "ready") == ["test-weakened"]
    git(app.path, "reset", "--hard", "--quiet", "HEAD~1")
    app.write("tests/conftest.py", "import pytest\n\n\n@pytest.hookimpl(hookwrapper=True)\n"
              "def pytest_runtest_makereport(item, call):\n    out = yield\n    out.get_result().outcome = 'passed'\n")
    hooked = app.commit("A helpful hook")
    assert app.refused("flow", "ready") == ["test-harness-changed"]
    assert codes_of(api(plat, "bot", "POST", "/v1/flow/bot-weak/approve-tests", json={"sha": hooked})) == \
        ["reviewer-not-human"]
    assert denied_by(plat, "bot", "flow.approve-tests", "bot-weak")
    json.loads(app.cli("flow", "approve-tests", "bot-weak", "--sha", hooked, who="alice").stdout)
    assert app.ok("flow", "ready")["state"] == "pr-ready"  # recovered by a human reviewer's approval
    # the approval was for that commit only: a new commit needs its own
    app.write("tests/conftest.py", (app.path / "tests" / "conftest.py").read_text() + "\n# again\n")
    app.commit("Touch the hook")
    assert app.refused("flow", "ready") == ["test-harness-changed"]
    app.ok("flow", "abandon", "--delete-git-branch")


def test_agent_goes_the_whole_way_with_the_evidence_in_status(plat: Platform) -> None:
    app = new_app(plat, "agentway", who="bot")
    app.ok("flow", "claim", "bot-way")
    app.write("tests/check_way.py", "def test_way():\n    assert sorted([2, 1]) == [1, 2]\n")
    head = app.commit("The way")
    app.ok("flow", "ready")
    app.ok("flow", "ci")
    status = plat.json("flow", "status", "--repo", str(app.path), who="bot")
    ci = status["evidence"]["ci"]
    assert ci["sha"] == head and ci["runner"] == "ci" and ci["by"] == "ci" and ci["passed"] == 4
    assert ci["counted_from"] == "junit" and "passed" in ci["log"]
    assert status["ci_runs"][-1]["state"] == "done" and status["ci_runs"][-1]["sha"] == head
    merged = app.ok("flow", "merge", who="ci")
    tiers = api(plat, "dev", "GET", "/v1/flow-tiers").json()["tiers"]
    assert tiers["staging"]["sha"] == merged["evidence"]["merge_sha"] == git(app.path, "rev-parse", "staging")


def test_agent_promote_is_refused_by_policy_first(platform: Tierbase) -> None:
    """Authorization before validation: on a platform with no staging tier, an agent's `promote production`
    is the policy's refusal (exit 2), not "no child tier" (exit 1); so is a promote into no tier at all."""
    assert "staging" not in platform.config.tiers
    make_principal(platform, "gates-agent", "agent")
    for tier in ("production", "no-such-tier"):
        with pytest.raises(PolicyDenied) as err:
            as_(platform, "gates-agent").promote(tier)
        assert err.value.exit_code == 2 and err.value.data["rule"] == "builtin.agent-no-promote"
    denied = platform.audit_log(actor="gates-agent", denied=True)
    assert [r["target"] for r in denied if r["action"] == "promote"] == ["production", "no-such-tier"]
    with pytest.raises(InvalidInput, match="no child tier"):  # the platform's owner still gets the real answer
        platform.promote("production")


def test_runner_drops_to_its_own_os_user(tmp_path: Path) -> None:
    """`tierbase ci runner --os-user`: the test command runs as that user, not as the runner's."""
    import pwd

    from tierbase.workflow import testrun

    name, made = "tierbase-ci-t", False
    try:
        pwd.getpwnam(name)
    except KeyError:
        if subprocess.run(["useradd", "--system", "--no-create-home", name], capture_output=True).returncode != 0:
            pytest.skip("cannot create an OS user here (useradd)")
        made = True
    try:
        tmp_path.chmod(0o755)
        got = testrun.run("id -un", tmp_path, "postgresql://unused", user=name)
        assert got.exit_code == 0 and got.output.strip() == name
    finally:
        if made:
            subprocess.run(["userdel", name], capture_output=True)


def test_merge_is_one_operation_a_failed_promotion_merges_nothing(plat: Platform) -> None:
    """Two features race for the same table: the second merge's promotion fails, so git, the tier's record
    and the state stay as they were, and the refusal is in the history and the audit trail."""
    a, b = new_app(plat, "racer-a", who="dev"), new_app(plat, "racer-b", who="alice")
    a.ok("flow", "claim", "race-a")
    b.ok("flow", "claim", "race-b")
    for app, version in ((a, 501), (b, 502)):
        app.write(f"db/migrations/V{version:04d}__race.sql", "CREATE TABLE race_t (id int);\n")
        app.commit("The race table")
        app.ok("flow", "ready")
        app.ok("flow", "ci")
    a.ok("flow", "merge")
    tiers = api(plat, "dev", "GET", "/v1/flow-tiers").json()["tiers"]
    before = world(plat, b, "race-b")
    got = b.cli("flow", "merge")
    assert got.returncode == 2
    failure = json.loads(got.stdout)["error"]["data"]["failures"]
    assert [f["code"] for f in failure] == ["promotion-failed"] and "rolled back" in failure[0]["message"]
    after = world(plat, b, "race-b")
    assert after["tiers"] == tiers and after["refs"] == before["refs"] and after["history"] == before["history"]
    # the only new branches are the promotion's own: the snapshot the tier is served from again, the failed state
    assert {n.rsplit("-", 1)[0] for n in set(after["branches"]) - set(before["branches"])} <= \
        {"staging-pre", "staging-rb"}
    assert b.state()["state"] == "ci-green" and b.branch() == "feature/race-b"
    assert plat.json("audit", "log", "--action", "flow.merge-refused", "--target", "race-b")
    b.ok("flow", "abandon", "--delete-git-branch")

"""The workflow kit as users meet it: real git repos, a real platform (`tierbase up`), real pytest runs.

Every command goes through the CLI with --json, as a developer, an agent or CI
(TIERBASE_TOKEN selects who acts); every JSON output and every state file is
validated against the shipped schemas; every refusal exits 2 and leaves the
state file byte for byte as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tierbase.workflow.validate import problems, schema

from .conftest import free_port, free_port_base, make_home, needs_root_btrfs
from .test_cli import leftovers

pytestmark = needs_root_btrfs

FIXTURE = Path(__file__).parent / "fixtures" / "app"
# the workflow commands are registered by importing tierbase.cli.workflow (main() does so once wired)
ENTRY = ("import sys; import tierbase.cli.workflow; from tierbase.cli.main import main; "
         "sys.argv[0] = 'tierbase'; main()")
MIGRATIONS = True  # set by the platform fixture: does the platform offer migrate/promote over the API?


def run_cli(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", ENTRY, *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@dataclass
class Platform:
    env: dict[str, str]
    base: Path
    tokens: dict[str, str] = field(default_factory=dict)
    first_init: subprocess.CompletedProcess[str] | None = None
    runner: subprocess.Popen[str] | None = None
    api_url: str = ""
    second_init: dict[str, Any] = field(default_factory=dict)
    shop: Path | None = None

    def as_(self, who: str | None) -> dict[str, str]:
        env = dict(self.env)
        env.pop("TIERBASE_TOKEN", None)
        if who is not None:
            env["TIERBASE_TOKEN"] = self.tokens[who]
        return env

    def json(self, *args: str, who: str | None = None) -> Any:
        got = run_cli(self.as_(who), *args, "--json")
        assert got.returncode == 0, f"tierbase {' '.join(args)} exited {got.returncode}: {got.stderr}"
        return json.loads(got.stdout)


def git(repo: Path, *args: str) -> str:
    got = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    assert got.returncode == 0, f"git {' '.join(args)}: {got.stderr}"
    return got.stdout.strip()


def make_repo(path: Path, config: Path | None = None) -> Path:
    """A git repo holding the tiny app, one commit on main."""
    shutil.copytree(FIXTURE, path)
    (path / "dot-gitignore").rename(path / ".gitignore")
    if config is not None:
        shutil.copy(config, path / "tierbase.toml")
    git(path, "init", "--quiet", "-b", "main")
    git(path, "config", "user.email", "dev@example.com")
    git(path, "config", "user.name", "Dev")
    git(path, "add", "-A")
    git(path, "commit", "--quiet", "-m", "The tiny app")
    return path


@dataclass
class App:
    plat: Platform
    path: Path
    who: str = "dev"

    def state_bytes(self) -> bytes:
        return (self.path / ".tierbase" / "workflow-state.json").read_bytes()

    def state(self) -> dict[str, Any]:
        doc = json.loads(self.state_bytes())
        assert problems("workflow-state", doc) == []
        return dict(doc)

    def cli(self, *args: str, who: str | None = "", json_out: bool = True) -> subprocess.CompletedProcess[str]:
        actor = self.who if who == "" else who
        return run_cli(self.plat.as_(actor), *args, *(["--json"] if json_out else []), cwd=self.path)

    def ok(self, *args: str, who: str | None = "", kind: str = "transition") -> dict[str, Any]:
        got = self.cli(*args, who=who)
        assert got.returncode == 0, f"tierbase {' '.join(args)} exited {got.returncode}: {got.stdout} {got.stderr}"
        data = json.loads(got.stdout)
        assert problems(kind, data) == [], (kind, data)
        self.state()  # always valid against its schema
        return dict(data)

    def refused(self, *args: str, who: str | None = "") -> list[str]:
        """Exit 2, the gate-failure JSON, and the state file untouched; returns the failure codes."""
        before = self.state_bytes()
        got = self.cli(*args, who=who)
        assert got.returncode == 2, f"tierbase {' '.join(args)} exited {got.returncode}: {got.stdout} {got.stderr}"
        data = json.loads(got.stdout)
        assert problems("gate-failure", data) == [], data
        assert got.stderr.startswith("Error: the ") and "gate is closed" in got.stderr
        assert self.state_bytes() == before, "a refused gate changed the state file"
        return [f["code"] for f in data["error"]["data"]["failures"]]

    def human(self, *args: str, who: str | None = "") -> subprocess.CompletedProcess[str]:
        return self.cli(*args, who=who, json_out=False)

    def write(self, rel: str, text: str) -> None:
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def commit(self, message: str) -> str:
        git(self.path, "add", "-A")
        git(self.path, "commit", "--quiet", "-m", message)
        return git(self.path, "rev-parse", "HEAD")

    def branch(self) -> str:
        return git(self.path, "rev-parse", "--abbrev-ref", "HEAD")


@pytest.fixture(scope="module")
def plat() -> Iterator[Platform]:
    global MIGRATIONS
    base = make_home()
    home = base / "home"
    # the tiny app needs no pytest plugin: its nested test runs start faster without autoloading them
    env = dict(os.environ, TIERBASE_HOME=str(home), TIERBASE_PORT_BASE=str(free_port_base()),
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env.pop("TIERBASE_TOKEN", None)
    p = Platform(env=env, base=base)
    try:
        p.shop = make_repo(base / "shop")
        p.first_init = run_cli(env, "init", cwd=p.shop)  # no platform yet: writes the files, then says so
        up = p.json("up", "--config", str(p.shop / "tierbase.toml"), "--btrfs-size", "2G",
                    "--api-port", str(free_port()), "--proxy-port", str(free_port()))
        p.api_url = str(up["api_url"])
        missing = [path for path in ("/v1/whoami", "/v1/flow/x", "/v1/principals")
                   if httpx.get(up["api_url"] + path).status_code == 404]
        if missing:
            pytest.skip(f"the HTTP API lacks the routes the workflow kit calls ({', '.join(missing)}): "
                        "wire whoami, flow_history/flow_record and principals in tierbase/api/server.py")
        token = httpx.get(up["api_url"] + "/openapi.json").json()
        MIGRATIONS = "/v1/migrations/verify" in token["paths"] and "/v1/tiers/{tier}/promote" in token["paths"]
        for name, role in (("dev", "developer"), ("alice", "developer"), ("bot", "agent"), ("ci", "ci")):
            p.tokens[name] = p.json("principal", "create", name, "--role", role)["token"]
        p.second_init = App(p, p.shop).ok("init", who=None)
        # the CI runner: a `ci` principal taking the runs that `flow ci` asks for
        p.runner = subprocess.Popen([sys.executable, "-c", ENTRY, "ci", "runner", "--poll", "0.3"],
                                    env=p.as_("ci"), stdout=subprocess.DEVNULL,
                                    stderr=(base / "runner.log").open("w"), text=True)
        yield p
    finally:
        if p.runner is not None:
            p.runner.terminate()
            p.runner.wait(30)
        run_cli(env, "down", "--purge")
        assert leftovers(home) == []
        shutil.rmtree(base, ignore_errors=True)


def clone(plat: Platform, name: str) -> Path:
    """Another clone of the shop: the platform judges every workspace of a project by its own git record."""
    assert plat.shop is not None
    path = plat.base / name
    git(plat.base, "clone", "--quiet", str(plat.shop), str(path))
    git(path, "config", "user.email", "dev@example.com")
    git(path, "config", "user.name", "Dev")
    return path


def new_app(plat: Platform, name: str, who: str = "dev") -> App:
    app = App(plat, clone(plat, name), who)
    app.ok("init", who=None)
    return app


def needs_migrations(what: str) -> None:
    if not MIGRATIONS:
        print(f"SKIPPED PART ({what}): the platform's API has no migrate/promote routes yet")


def sql_file(version: int, name: str, body: str) -> tuple[str, str]:
    return f"db/migrations/V{version:04d}__{name}.sql", body


def query(plat: Platform, branch: str, sql: str) -> list[tuple[Any, ...]]:
    url = plat.json("branch", "url", branch)["url"]
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        return conn.execute(sql).fetchall()


# -- scaffold -------------------------------------------------------------------------------
def test_init_writes_the_scaffold_then_needs_the_tiers(plat: Platform) -> None:
    assert plat.first_init is not None and plat.shop is not None
    assert plat.first_init.returncode == 1
    assert "not running" in plat.first_init.stderr and "tierbase up --config tierbase.toml" in plat.first_init.stderr
    assert (plat.shop / "tierbase.toml").exists() and (plat.shop / "db" / "migrations").is_dir()
    shop = App(plat, plat.shop)
    data = plat.second_init
    assert data["state"] == "scaffold-complete" and data["feature"] is None
    assert any("created git branch 'staging'" in s for s in data["said"])
    assert any("committed the scaffold" in s for s in data["said"])
    doc = shop.state()
    assert doc["state"] == "scaffold-complete" and doc["workspace"].startswith("ws-")
    assert doc["transitions"]["scaffold"]["entry_tier"] == "staging"
    assert doc["transitions"]["scaffold"]["tiers"] == {"production": "main", "staging": "staging"}
    assert git(plat.shop, "config", "tierbase.workspace") == doc["workspace"]
    assert git(plat.shop, "status", "--porcelain") == ""  # the scaffold is committed, the state file ignored
    again = shop.ok("init", who=None)
    assert any("scaffolded before" in s for s in again["said"]) and shop.state() == doc
    printed = shop.human("flow", "schema")
    assert json.loads(printed.stdout) == schema("workflow-state")
    assert json.loads(shop.human("flow", "schema", "test-list").stdout) == schema("test-list")
    assert "gate-failure" in shop.human("flow", "schema", "--list").stdout


def test_init_refuses_when_a_tier_is_missing(plat: Platform) -> None:
    repo = make_repo(plat.base / "lonely")
    (repo / "tierbase.toml").write_text((plat.base / "shop" / "tierbase.toml").read_text()
                                        + '\n[tiers.qa]\nparent = "staging"\n')
    got = run_cli(plat.as_(None), "init", "--json", cwd=repo)
    assert got.returncode == 2
    err = json.loads(got.stdout)
    assert problems("gate-failure", err) == []
    assert [f["code"] for f in err["error"]["data"]["failures"]] == ["tier-missing"]
    assert "policy reload" in err["error"]["hint"]
    assert not (repo / ".tierbase" / "workflow-state.json").exists()


# -- the whole way, as a developer ------------------------------------------------------------
def test_developer_claims_prepares_tests_and_merges(plat: Platform) -> None:
    assert plat.shop is not None
    shop = App(plat, plat.shop)
    claimed = shop.ok("flow", "claim", "items")
    assert claimed["state"] == "feature-claimed" and claimed["previous"] == "scaffold-complete"
    ev = claimed["evidence"]
    assert ev["owner"] == "dev" and ev["parent"] == "staging" and ev["git_branch"] == "feature/items"
    assert shop.branch() == "feature/items"
    db = plat.json("branch", "show", "items")
    assert db["parent"] == "staging" and db["creator"] == "dev"

    if MIGRATIONS:
        shop.write(*sql_file(1, "create_items", "CREATE TABLE IF NOT EXISTS items (\n"
                             "    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
                             "    name text NOT NULL\n);\n"))
        shop.write("tests/check_items.py", "from app.testing import db  # noqa: F401\n\n\n"
                   "def test_items_table(db):  # noqa: F811\n"
                   "    db.execute(\"INSERT INTO items(name) VALUES ('pen')\")\n"
                   "    assert db.execute('SELECT count(*) FROM items').fetchone()[0] >= 1\n")
    else:
        needs_migrations("items migration")
        shop.write("tests/check_items.py", "def test_items():\n    assert 'pen'.upper() == 'PEN'\n")
    head = shop.commit("Items")
    ready = shop.ok("flow", "ready")
    assert ready["state"] == "pr-ready"
    rev = ready["evidence"]
    assert rev["head_sha"] == head and rev["tests"]["tier"]["total"] == 3 and rev["tests"]["head"]["total"] == 4
    assert rev["tests"]["added"] == ["tests/check_items.py::test_items_table" if MIGRATIONS
                                     else "tests/check_items.py::test_items"]
    assert "local only" in rev["pull_request_note"] and rev["pull_request"] is None
    review = (plat.shop / rev["review"]).read_text()
    change = json.loads((plat.shop / rev["change_request"]).read_text())
    assert change["head_sha"] == head and change["target"] == "staging" and change["source"] == "feature/items"
    if MIGRATIONS:
        assert rev["migrations"]["verify"]["ok"] is True and "items" in review

    green = shop.ok("flow", "ci")
    ci = green["evidence"]
    assert green["state"] == "ci-green" and ci["sha"] == head and ci["failed"] == 0 and ci["passed"] == 4
    assert ci["ci_branch"] == "ci-items" and ci["duration_s"] > 0
    assert "ci-items" not in [b["name"] for b in plat.json("branch", "list", "--no-bytes")]

    status = shop.ok("flow", "status", kind="status")
    merge_gates = {g["gate"]: g["status"] for g in status["next"][0]["gates"]}
    assert status["next"][0]["transition"] == "merge" and merge_gates["head-changed-since-ci"] == "pass"
    assert status["evidence"]["ci"]["runner"] == "ci" and status["evidence"]["ci"]["by"] == "ci"  # not the author
    assert status["ci_runs"][-1]["sha"] == head and status["ci_runs"][-1]["requested_by"] == "dev"

    merged = shop.ok("flow", "merge")
    assert merged["state"] == "merged" and shop.branch() == "staging"
    assert git(plat.shop, "log", "-1", "--format=%P", "staging").count(" ") == 1  # a --no-ff merge commit
    assert git(plat.shop, "branch", "--list", "feature/items") == ""
    names = [b["name"] for b in plat.json("branch", "list", "--no-bytes")]
    assert "items" not in names
    if MIGRATIONS:
        assert merged["evidence"]["promotion"] is not None
        assert query(plat, "staging", "SELECT to_regclass('items') IS NOT NULL") == [(True,)]
    history = shop.state()
    assert history["state"] == "merged" and set(history["transitions"]) == {"claim", "ready", "ci", "merge"}


# -- an agent goes the same way, and policy stops it at the merge -------------------------------
def test_agent_merge_is_refused_by_policy_then_ci_merges(plat: Platform) -> None:
    app = new_app(plat, "agentrepo", who="bot")
    assert app.refused("flow", "claim", "bot-prod", "--parent", "production") == ["policy-denied"]
    claimed = app.ok("flow", "claim", "bot-prices")
    assert claimed["evidence"]["owner"] == "bot" and claimed["evidence"]["owner_role"] == "agent"
    if MIGRATIONS:
        app.write(*sql_file(301, "create_prices", "CREATE TABLE IF NOT EXISTS prices (sku text PRIMARY KEY, "
                            "cents bigint NOT NULL);\n"))
    else:
        needs_migrations("agent migration")
    app.write("tests/check_prices.py", "def test_price_format():\n    assert f'{1234 / 100:.2f}' == '12.34'\n")
    app.commit("Prices")
    app.ok("flow", "ready")
    app.ok("flow", "ci")
    staging_before = git(app.path, "rev-parse", "staging")
    codes = app.refused("flow", "merge")
    assert codes == ["promotion-refused"]
    assert git(app.path, "rev-parse", "staging") == staging_before and app.branch() == "feature/bot-prices"
    assert app.state()["state"] == "ci-green"
    merged = app.ok("flow", "merge", who="ci")
    assert merged["state"] == "merged" and merged["evidence"]["by"] == "ci"
    assert merged["evidence"]["feature_branch_deleted"] is True
    if MIGRATIONS:
        assert query(plat, "staging", "SELECT to_regclass('prices') IS NOT NULL") == [(True,)]


# -- claim: one feature at a time, resume, abandon ----------------------------------------------------
def test_claim_gates_resume_and_abandon(plat: Platform) -> None:
    app = new_app(plat, "claims")
    assert app.refused("flow", "claim", "Bad_Name") == ["invalid-feature"]
    said = app.human("flow", "claim", "Bad_Name")
    assert said.returncode == 2 and "x invalid-feature: feature name 'Bad_Name' is not allowed" in said.stderr
    assert app.refused("flow", "claim", "ci-sneaky") == ["invalid-feature"]
    plat.json("branch", "create", "taken", "--parent", "staging", who="dev")
    assert app.refused("flow", "claim", "taken") == ["db-branch-exists"]
    plat.json("branch", "delete", "taken", who="dev")
    app.write("scratch.txt", "wip\n")
    assert app.refused("flow", "claim", "claimer") == ["dirty-worktree"]
    (app.path / "scratch.txt").unlink()
    app.ok("flow", "claim", "claimer")
    assert app.refused("flow", "claim", "other") == ["feature-in-flight"]
    assert app.refused("flow", "ready") == ["no-commits-ahead"]
    again = app.ok("flow", "claim", "claimer")
    assert again["resumed"] is True and again["state"] == "feature-claimed"
    git(app.path, "checkout", "--quiet", "staging")
    assert app.ok("flow", "claim", "claimer")["resumed"] is True and app.branch() == "feature/claimer"
    app.write("notes.md", "kept\n")
    app.commit("Work worth keeping")
    gone = app.ok("flow", "abandon")
    assert gone["state"] == "scaffold-complete" and gone["evidence"]["git_branch_kept"] is True
    assert app.branch() == "staging" and git(app.path, "branch", "--list", "feature/claimer") != ""
    assert "claimer" not in [b["name"] for b in plat.json("branch", "list", "--no-bytes")]
    assert app.refused("flow", "abandon") == ["wrong-state"]
    back = app.ok("flow", "claim", "claimer")  # the kept git branch is picked up again
    assert "switched to the existing git branch 'feature/claimer'" in back["said"]
    app.ok("flow", "abandon", "--delete-git-branch")
    assert git(app.path, "branch", "--list", "feature/claimer") == ""


# -- ready, ci and merge: each precondition on its own, and recovery ----------------------------------
def test_every_gate_refuses_on_its_own_and_recovers(plat: Platform) -> None:
    app = new_app(plat, "gates")
    app.ok("flow", "claim", "gated")
    app.write("tests/check_more.py", "def test_more():\n    assert 'a' < 'b'\n")
    app.commit("One more test")

    app.write("scratch.txt", "uncommitted\n")
    assert app.refused("flow", "ready") == ["dirty-worktree"]
    (app.path / "scratch.txt").unlink()

    git(app.path, "checkout", "--quiet", "staging")
    assert app.refused("flow", "ready") == ["wrong-git-branch"]
    git(app.path, "checkout", "--quiet", "feature/gated")

    git(app.path, "rm", "--quiet", "tests/check_basics.py")
    app.commit("Delete the basics")
    codes = app.refused("flow", "ready")
    assert codes == ["fewer-tests"]
    git(app.path, "revert", "--no-edit", "HEAD")

    basics = (app.path / "tests" / "check_basics.py").read_text()
    app.write("tests/check_basics.py", "import pytest\n" + basics.replace(
        "def test_arithmetic", "@pytest.mark.skip(reason='flaky')\ndef test_arithmetic"))
    app.commit("Skip a flaky test")
    assert app.refused("flow", "ready") == ["tests-skipped"]
    git(app.path, "revert", "--no-edit", "HEAD")

    if MIGRATIONS:
        app.write(*sql_file(101, "broken", "CREATE TABLE gated_things (id bigint PRIMARY KEY,\n"))
        app.commit("A broken migration")
        assert app.refused("flow", "ready") == ["migration-invalid"]
        app.write(*sql_file(101, "broken", "CREATE TABLE IF NOT EXISTS gated_things (id bigint PRIMARY KEY);\n"))
        app.commit("Fix the migration")
    else:
        needs_migrations("failing migration")
    assert app.ok("flow", "ready")["state"] == "pr-ready"  # recovered

    # ci: HEAD moved since ready; then a failing test; then green
    check = "tests/check_gated.py"
    app.write(check, "from app.testing import db  # noqa: F401\n\n\ndef test_gated(db):  # noqa: F811\n"
              "    assert db.execute('SELECT 40 + 2').fetchone() == (41,)\n")
    app.commit("A test that fails")
    assert app.refused("flow", "ci") == ["head-changed-since-ready"]
    app.ok("flow", "ready")
    before = app.state_bytes()
    got = app.cli("flow", "ci")
    assert got.returncode == 2 and app.state_bytes() == before
    failure = json.loads(got.stdout)["error"]["data"]["failures"][0]
    assert failure["code"] == "tests-failed" and "tests/check_gated.py::test_gated" in failure["message"]
    assert app.state()["state"] == "pr-ready"
    app.write(check, (app.path / check).read_text().replace("(41,)", "(42,)"))
    app.commit("Fix the code")
    app.ok("flow", "ready")
    assert app.ok("flow", "ci")["state"] == "ci-green"

    # merge: HEAD moved after the green run
    app.write("CHANGES.md", "late edit\n")
    app.commit("A late edit")
    assert app.refused("flow", "merge") == ["head-changed-since-ci"]
    status = app.ok("flow", "status", kind="status")
    gates = {g["gate"]: g["status"] for g in status["next"][0]["gates"]}
    assert gates["head-changed-since-ci"] == "fail"
    assert app.refused("flow", "ci") == ["head-changed-since-ready"]
    app.ok("flow", "ready")  # ci-green -> pr-ready: the evidence was stale
    app.ok("flow", "ci")
    assert app.ok("flow", "merge")["state"] == "merged"
    assert app.refused("flow", "merge") == ["wrong-state"]
    # every refusal above is in the control plane's history and its audit trail
    audited = plat.json("audit", "log", "--action", "flow.ready-refused", "--target", "gated")
    assert len(audited) == 5 and all(r["actor"] == "dev" for r in audited)
    assert len(plat.json("audit", "log", "--action", "flow.ci-refused", "--target", "gated")) == 3


# -- the state file is a projection: hand edits are refused, doctor rebuilds it -----------------------
def test_hand_edited_state_file_is_refused_and_doctor_fixes_it(plat: Platform) -> None:
    app = new_app(plat, "tamper")
    app.ok("flow", "claim", "tampered")
    path = app.path / ".tierbase" / "workflow-state.json"
    good = path.read_text()
    doc = json.loads(good)

    doc["state"] = "ci-green"  # what an agent might write; the schema alone already rejects it
    path.write_text(json.dumps(doc))
    assert app.refused("flow", "merge") == ["state-file-invalid"]

    sha = git(app.path, "rev-parse", "HEAD")
    stamp = {"at": "2030-01-01T00:00:00Z", "by": "bot"}
    doc["transitions"]["ready"] = {**stamp, "head_sha": sha, "commits_ahead": ["x"], "migrations": {},
                                   "tests": {"tier": {"total": 3, "inactive": 0}, "head": {"total": 3, "inactive": 0}},
                                   "review": "r.md", "change_request": "c.json"}
    doc["transitions"]["ci"] = {**stamp, "sha": sha, "passed": 3, "failed": 0, "skipped": 0, "errors": 0,
                                "duration_s": 1.0, "ci_branch": "ci-tampered",
                                "baseline": {"total": 3, "inactive": 0}}
    path.write_text(json.dumps(doc))
    assert problems("workflow-state", doc) == []  # a well-formed forgery
    got = app.cli("flow", "merge")
    assert got.returncode == 2
    err = json.loads(got.stdout)["error"]
    assert [f["code"] for f in err["data"]["failures"]] == ["state-file-drift"]
    assert "'ci-green'" in err["message"] and "'feature-claimed'" in err["message"]
    assert "tierbase flow doctor --fix" in err["hint"] and "tierbase flow doctor --fix" in got.stderr

    found = app.cli("flow", "doctor")
    assert found.returncode == 1
    report = json.loads(found.stdout)
    assert problems("doctor", report) == [] and report["ok"] is False
    assert [f["code"] for f in report["findings"]] == ["state-file-drift"]
    fixed = app.ok("flow", "doctor", "--fix", kind="doctor")
    assert fixed["ok"] is True and fixed["findings"][0]["fixed"] is True
    assert path.read_text() == json.dumps(json.loads(good), indent=2, sort_keys=True) + "\n"
    assert app.ok("flow", "status", kind="status")["state_file"]["matches_control_plane"] is True

    path.unlink()
    assert app.cli("flow", "ready").returncode == 2
    git(app.path, "checkout", "--quiet", "staging")
    report = app.ok("flow", "doctor", "--fix", kind="doctor")
    assert {f["code"] for f in report["findings"]} == {"state-file-drift", "git-branch-drift"}
    assert report["ok"] is True and app.branch() == "feature/tampered" and app.state()["state"] == "feature-claimed"
    assert app.ok("flow", "doctor", kind="doctor")["findings"] == []
    app.ok("flow", "abandon", "--delete-git-branch")


# -- the TDD layer --------------------------------------------------------------------------------
SPEC = {"feature": "totals", "title": "Cart totals", "stories": [
    {"id": "S1", "title": "A cart has a total", "acceptance_criteria": [
        {"id": "AC1", "text": "the total is the sum of the prices"},
        {"id": "AC2", "text": "a percentage discount lowers the total"}]}],
    "nfrs": [{"id": "NFR1", "category": "performance", "requirement": "totals in under 1 ms"}]}
ARCH = {"feature": "totals", "decisions": [
    {"nfr": "NFR1", "decision": "compute in Python, no query per item", "status": "approve"}]}
TESTS = {"feature": "totals", "ordered_for": "happy-path-first", "items": [
    {"id": "T1", "ac": "AC1", "test": "tests/check_totals.py::test_total_is_the_sum",
     "description": "sum of prices", "expected_failure": "ModuleNotFoundError"},
    {"id": "T2", "ac": "AC2", "test": "tests/check_totals.py::test_discount",
     "description": "10% off", "expected_failure": "TypeError"}]}
PLAN = {"feature": "totals", "cycles": [{"id": "C1", "items": ["T1"], "budget_minutes": 30},
                                        {"id": "C2", "items": ["T2"], "budget_minutes": 30}]}
T1 = ("def test_total_is_the_sum():\n    from app.totals import cart_total\n\n"
      "    assert cart_total([150, 250]) == 400\n")
T2 = ("\n\ndef test_discount():\n    from app.totals import cart_total\n\n"
      "    assert cart_total([1000], discount_pct=10) == 900\n")


def test_tdd_roles_artifacts_red_green_and_test_tampering(plat: Platform, tmp_path: Path) -> None:
    app = new_app(plat, "tddrepo")
    app.ok("flow", "claim", "totals")
    assert app.refused("tdd", "assign", "driver", "bot") == ["tdd-not-enabled"]
    app.ok("tdd", "enable")
    for role, who in (("spec-author", "dev"), ("architect-reviewer", "alice"), ("test-strategist", "alice"),
                      ("scrum-master", "dev"), ("navigator", "dev"), ("driver", "bot")):
        app.ok("tdd", "assign", role, who)
    assert app.refused("tdd", "assign", "driver", "dev") == ["role-conflict"]          # dev navigates
    assert app.refused("tdd", "assign", "test-strategist", "bot") == ["role-conflict"]  # bot drives
    assert app.refused("tdd", "assign", "navigator", "bot", who="bot") == ["agent-cannot-assign", "role-conflict"]

    def art(name: str, doc: Any) -> str:
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(doc, indent=2))
        return str(p)

    assert "gate-open" in app.refused("tdd", "submit", "architecture", art("architecture", ARCH), who="alice")
    assert app.refused("tdd", "submit", "spec", art("bad", {"feature": "totals", "title": "x"})) == \
        ["artifact-invalid"]
    assert app.refused("tdd", "submit", "spec", art("spec", SPEC), who="alice") == ["not-your-role"]
    app.ok("tdd", "submit", "spec", art("spec", SPEC))
    assert app.refused("tdd", "approve", "spec") == ["self-approval"]
    app.ok("tdd", "approve", "spec", who="alice")
    app.ok("tdd", "submit", "architecture", art("architecture", ARCH), who="alice")
    app.ok("tdd", "approve", "architecture")
    unmapped = {**TESTS, "items": TESTS["items"][:1]}
    assert app.refused("tdd", "submit", "test-list", art("tl", unmapped), who="alice") == ["ac-unmapped"]
    app.ok("tdd", "submit", "test-list", art("test-list", TESTS), who="alice")
    app.ok("tdd", "approve", "test-list")
    app.ok("tdd", "submit", "plan", art("plan", PLAN))
    app.ok("tdd", "approve", "plan", who="alice")
    st = app.ok("tdd", "status", kind="tdd-status")
    assert st["next"].startswith("the navigator writes tests/check_totals.py::test_total_is_the_sum")
    assert all(a["approved_by"] for a in st["artifacts"].values()) and st["drift"] == []

    # an approved artifact edited later is drift, reported and blocking
    spec_file = app.path / ".tierbase" / "tdd" / "totals" / "spec.json"
    original = spec_file.read_bytes()
    spec_file.write_bytes(original + b"\n")
    assert app.ok("tdd", "status", kind="tdd-status")["drift"][0]["code"] == "artifact-drift"
    assert app.refused("tdd", "red", "T1") == ["artifact-drift"]
    spec_file.write_bytes(original)

    app.write("tests/check_totals.py", T1)
    assert app.refused("tdd", "red", "T1", who="bot") == ["not-your-role"]
    assert app.refused("tdd", "red", "T2") == ["out-of-order"]
    red = app.ok("tdd", "red", "T1")
    assert red["evidence"]["items"]["T1"]["red"]["by"] == "dev"
    assert app.refused("tdd", "red", "T2") == ["red-pending"]
    assert app.refused("tdd", "green", who="dev") == ["not-your-role"]
    assert app.refused("tdd", "green", who="bot") == ["suite-failing"]
    app.write("app/totals.py", "def cart_total(prices):\n    return sum(prices)\n")
    app.write("tests/check_totals.py", T1.replace("== 400", "> 0"))  # the driver weakens the test
    assert app.refused("tdd", "green", who="bot") == ["test-modified"]
    app.write("tests/check_totals.py", T1)
    app.ok("tdd", "green", who="bot")
    app.commit("Cart totals, cycle 1")
    assert app.refused("flow", "ready") == ["tdd-incomplete"]

    app.write("tests/check_totals.py", T1 + T2)
    app.ok("tdd", "red", "T2")
    app.write("app/totals.py", "def cart_total(prices, discount_pct=0):\n"
              "    return sum(prices) * (100 - discount_pct) // 100\n")
    app.write("tests/check_totals.py", T2.lstrip())  # the driver deletes T1 to make things pass
    assert app.refused("tdd", "green", who="bot") == ["test-deleted"]
    app.write("tests/check_totals.py", T1 + T2)
    app.ok("tdd", "green", who="bot")
    app.commit("Cart totals, cycle 2")
    done = app.ok("tdd", "status", kind="tdd-status")
    assert [i["status"] for i in done["items"]] == ["green", "green"] and done["next"].startswith("every item")

    app.write("tests/check_totals.py", T1.replace("== 400", "> 0") + T2)  # weakened after GREEN, committed
    app.commit("Relax a test")
    codes = app.refused("flow", "ready")
    assert codes == ["tdd-test-modified"]
    git(app.path, "revert", "--no-edit", "HEAD")
    assert app.ok("flow", "ready")["state"] == "pr-ready"
    app.ok("flow", "abandon")

"""Rules follow lineage, configuration cannot weaken the built-in rules, platform names are reserved.

One platform: production (protected, sensitive, masked column customer.email) and staging (the
protected entry tier), with a promotion of each so that `production-pre-N` and `staging-pre-N`
exist as the platform makes them. Everything an agent tries here is tried as the agent principal.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import uvicorn
from click.testing import CliRunner
from fastapi.testclient import TestClient

from tierbase import Tierbase
from tierbase.api.server import create_app
from tierbase.cli import governance  # noqa: F401  (registers `policy` on the cli)
from tierbase.cli.main import cli
from tierbase.errors import InvalidInput, PolicyDenied, Refused
from tierbase.governance.config import ConfigError
from tierbase.migrate.promote import pre_snapshot_name, rollback_name
from tierbase.names import ReservedName, reserved_for

from .conftest import free_port, free_port_base, make_home, needs_root_btrfs, query, serving, teardown_platform

pytestmark = needs_root_btrfs

TOPOLOGY = """
[tiers.production]
protected = true
sensitive = true

[tiers.staging]
parent = "production"
protected = true
entry = true

[masking]
"customer.email" = "email"
"""
EMAILS = "SELECT email FROM customer ORDER BY id"
DENIED = "builtin.agent-no-branch-off-protected"


@dataclass
class Lin:
    tb: Tierbase
    base: Path
    migrations: Path
    tokens: dict[str, str]

    def as_(self, who: str) -> Tierbase:
        return self.tb.as_principal(who, token=self.tokens.get(who))

    def names(self) -> list[tuple[str, str | None]]:
        return sorted((b.name, b.parent) for b in self.tb.store.all())

    def config_file(self, text: str) -> str:
        path = self.base / f"tierbase-{time.monotonic_ns()}.toml"
        path.write_text(text)
        return str(path)


def migration(dir: Path, version: int, sql: str) -> None:
    (dir / f"V{version:04d}__step_{version}.sql").write_text(sql)


@pytest.fixture(scope="module")
def lin() -> Iterator[Lin]:
    base = make_home()
    os.environ["TIERBASE_PORT_BASE"] = str(free_port_base())
    tb = Tierbase(base / "home")
    migrations = base / "migrations"
    migrations.mkdir()
    try:
        tb.init(storage="btrfs", btrfs_size="2G", proxy_port=free_port())
        with psycopg.connect(tb.branch_url("production", direct=True), autocommit=True) as conn:
            conn.execute("CREATE TABLE customer (id int PRIMARY KEY, email text NOT NULL)")
            conn.execute("INSERT INTO customer SELECT g, 'person' || g || '@real.example' "
                         "FROM generate_series(1, 50) g")
        # production's pre-promotion snapshot, made the way the platform makes it: by promoting
        migration(migrations, 1, "CREATE TABLE orders (id int PRIMARY KEY);\n")
        tb.create_branch("bootstrap", "production")
        tb.migrate_apply("bootstrap", str(migrations))
        tb.promote("production", "bootstrap", str(migrations))
        tb.delete_branch("bootstrap")
        (base / "tierbase.toml").write_text(TOPOLOGY)
        tb.reload_config(str(base / "tierbase.toml"))  # staging from production, by the platform engineer
        tokens = {name: tb.create_principal(name, role)["token"]
                  for name, role in (("bot", "agent"), ("dev", "developer"))}
        with serving(tb):
            yield Lin(tb, base, migrations, tokens)
    finally:
        teardown_platform(tb, base)


def pre_snapshot(tb: Tierbase, tier: str) -> str:
    snap = tb.promotions(tier)[-1]["snapshot"]
    assert snap.startswith(f"{tier}-pre-") and tb.get_branch(snap, with_bytes=False)["kind"] == "snapshot"
    return str(snap)


def refused_as_production(lin: Lin, parent: str, **kw: bool) -> PolicyDenied:
    """The agent's branch of ``parent`` is refused with the rule that refuses it off production itself."""
    before = lin.names()
    with pytest.raises(PolicyDenied) as exc:
        lin.as_("bot").create_branch("bot-grab", parent, **kw)
    assert exc.value.exit_code == 2 and exc.value.data["rule"] == DENIED
    assert "'production'" in exc.value.data["reason"]
    assert lin.names() == before
    last = lin.tb.audit_log()[-1]
    assert last["actor"] == "bot" and last["decision"] == "denied" and str(last["reason"]).startswith(DENIED)
    return exc.value


# -- 6. rules follow lineage ----------------------------------------------------------------
def test_agent_off_production_pre_promotion_snapshot_is_refused_as_off_production(lin: Lin) -> None:
    snap = pre_snapshot(lin.tb, "production")
    refused_as_production(lin, "production")
    err = refused_as_production(lin, snap)
    assert f"{snap!r}, which holds the data of the protected tier 'production'" in err.data["reason"]
    assert lin.tb.explain("bot", "branch.create", snap)["rule"] == DENIED
    # the platform engineer still may: lineage narrows agents, not the platform
    assert lin.tb.explain(lin.tb.gate.owner, "branch.create", snap)["allowed"] is True


def test_agent_off_a_snapshot_of_production_is_refused(lin: Lin) -> None:
    lin.tb.create_branch("prod-snap", "production", snapshot=True)
    try:
        refused_as_production(lin, "prod-snap")
        refused_as_production(lin, "prod-snap", snapshot=True)
        refused_as_production(lin, "production", snapshot=True)
    finally:
        lin.tb.delete_branch("prod-snap")


def test_agent_off_a_branch_of_a_branch_of_production_is_refused(lin: Lin) -> None:
    lin.tb.create_branch("prod-f1", "production")
    lin.tb.create_branch("prod-f2", "prod-f1")
    try:
        refused_as_production(lin, "prod-f2")
        with pytest.raises(PolicyDenied):
            lin.as_("bot").branch_url("prod-f2")  # not the agent's: no credentials on production's data
        snap = pre_snapshot(lin.tb, "production")
        with pytest.raises(PolicyDenied) as exc:
            lin.as_("bot").branch_url(snap)
        assert exc.value.data["rule"] == "builtin.agent-no-credentials-on-protected"
    finally:
        lin.tb.delete_branch("prod-f1", recursive=True)


def test_agent_off_a_rollback_branch_of_production_is_refused(lin: Lin) -> None:
    tb = lin.tb
    out = tb.rollback("production")
    rb = out["serving_now"]
    try:
        assert tb.store.resolve_route("production") == rb
        refused_as_production(lin, rb)
        refused_as_production(lin, "production")  # the route leads to the rollback branch: same answer
        tb.set_route("production", out["replaced"])
        # no longer serving the route, the rollback branch still holds production's data
        refused_as_production(lin, rb)
        assert tb.gate.subject(tb.store.get(rb)).tier == "production"  # for every rule, not only the agents'
    finally:
        if tb.store.resolve_route("production") != "production":
            tb.set_route("production", "production")
        # the rollback branch is protected like its tier: it stays (the module's platform goes at the end)


def test_agent_branches_of_the_entry_tier_snapshots_are_masked(lin: Lin) -> None:
    """staging is the agent's entry tier and holds production's (sensitive) rows: whatever the agent
    takes from it, the platform's own pre-promotion snapshot included, comes masked."""
    tb = lin.tb
    originals = [r[0] for r in query(tb.branch_url("production", direct=True), EMAILS)]
    assert [r[0] for r in query(tb.branch_url("staging", direct=True), EMAILS)] == originals  # PE made it
    migration(lin.migrations, 2, "CREATE TABLE invoices (id int PRIMARY KEY);\n")
    tb.create_branch("stage-feat", "staging")
    tb.migrate_apply("stage-feat", str(lin.migrations))
    tb.promote("staging", "stage-feat", str(lin.migrations))
    tb.delete_branch("stage-feat")
    snap = pre_snapshot(tb, "staging")
    bot = lin.as_("bot")
    made = bot.create_branch("bot-off-pre", snap)
    try:
        assert made["masked"] is True and made["creator"] == "bot"
        got = [r[0] for r in query(bot.branch_url("bot-off-pre"), EMAILS)]
        assert len(got) == len(originals) and not set(got) & set(originals)
        for parent in (snap, "staging"):  # a snapshot of sensitive lineage would be unmasked: refused
            with pytest.raises(Refused, match="sensitive data"):
                bot.create_branch("bot-snap", parent, snapshot=True)
        assert tb.store.find("bot-snap") is None
        bot.create_branch("bot-snap", "bot-off-pre", snapshot=True)  # of its own masked branch: fine
    finally:
        bot.delete_branch("bot-off-pre", recursive=True)


# -- reserved names -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["staging-pre-{next}", "production-pre-7", "staging-rb-1", "production-rb-abc123",
                                  "staging-replaced-1", "shop-before-restore-2", "ci-items", "verify-a1b2c3"])
def test_reserved_names_are_refused_to_every_principal(lin: Lin, name: str) -> None:
    name = name.format(next=len(lin.tb.promotions()) + 1)
    before = lin.names()
    for who in ("bot", "dev", None):
        with pytest.raises(ReservedName) as exc:
            lin.as_(who).create_branch(name, "staging")
        assert exc.value.exit_code == 1 and "reserved for the platform" in exc.value.message
        assert "Pick a name" in exc.value.hint
    assert lin.names() == before
    last = lin.tb.audit_log()[-1]
    assert last["action"] == "branch.create" and "reserved for the platform" in str(last["outcome"])


def test_every_name_the_platform_makes_is_reserved() -> None:
    made = [pre_snapshot_name("staging", 12), rollback_name("production", "a1b2c3"), rollback_name("qa", "3"),
            "ci-" + "feature-x", "verify-0a1b2c"]
    assert [n for n in made if reserved_for(n) is None] == []
    assert [n for n in ("staging", "feature-x", "prepare-1", "pre-1", "herb") if reserved_for(n)] == []


def test_the_platform_still_makes_its_own_reserved_names(lin: Lin) -> None:
    tb = lin.tb
    nxt = f"staging-pre-{len(tb.promotions()) + 1}"
    with pytest.raises(ReservedName):
        lin.as_("bot").create_branch(nxt, "staging")  # the agent tries to take the next one first
    migration(lin.migrations, 3, "CREATE TABLE refunds (id int PRIMARY KEY);\n")
    tb.create_branch("pe-feat", "staging")
    try:
        report = tb.migrate_verify("pe-feat", str(lin.migrations))  # through its own verify-* branch
        assert report["ok"] is True and report["branch"].startswith("verify-"), report["problems"]
        tb.migrate_apply("pe-feat", str(lin.migrations))
        assert tb.promote("staging", "pe-feat", str(lin.migrations))["snapshot"] == nxt
    finally:
        tb.delete_branch("pe-feat", recursive=True)
    dev = lin.as_("dev")
    ci = dev.create_ci_branch("dev-feat", "staging", ttl="10m")  # the workflow's CI branch
    assert ci["name"] == "ci-dev-feat" and ci["creator"] == "dev"
    dev.delete_branch("ci-dev-feat")
    assert tb.get_branch(nxt, with_bytes=False)["kind"] == "snapshot"


def test_reserved_names_over_the_api(lin: Lin) -> None:
    api = TestClient(create_app(lin.tb))
    dev = {"Authorization": f"Bearer {lin.tokens['dev']}"}
    got = api.post("/v1/branches", json={"name": "ci-sneaky", "parent": "staging"}, headers=dev)
    assert got.status_code == 400 and got.json()["error"]["code"] == "reserved_name"
    got = api.post("/v1/branches", json={"name": "x", "parent": "staging", "platform_name": True}, headers=dev)
    assert lin.tb.store.find("x") is not None  # an unknown field sets nothing: a plain, unreserved name
    lin.as_("dev").delete_branch("x")
    got = api.post("/v1/branches", json={"name": "verify-x", "parent": "staging", "platform_name": True},
                   headers=dev)
    assert got.status_code == 400 and got.json()["error"]["code"] == "reserved_name"
    made = api.post("/v1/flow/sneaky/ci-branch", json={"parent": "staging"}, headers=dev)
    assert made.status_code == 201 and made.json()["name"] == "ci-sneaky"
    lin.as_("dev").delete_branch("ci-sneaky")
    bad = api.post("/v1/flow/Bad..Name/ci-branch", json={"parent": "staging"}, headers=dev)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_name"


# -- 7. configuration cannot weaken the built-in rules -------------------------------------------
@pytest.mark.parametrize(("extra", "key"), [
    ('[roles.agent]\nlike = "platform-engineer"\n', "roles.agent.like"),
    ('[roles.agent]\nlike = "developer"\n', "roles.agent.like"),
    ('[roles.ci]\nlike = "platform-engineer"\n', "roles.ci.like"),
    ('[roles.platform-engineer]\nlike = "developer"\n', "roles.platform-engineer.like"),
    ('[roles.helper]\nlike = "agent"\n[grants]\nunmasked_read = ["platform-engineer", "helper"]\n',
     "grants.unmasked_read"),
    ('[grants]\nrepoint = ["agent"]\n', "grants.repoint"),
    ('[grants]\ndelete_any = ["agent"]\n', "grants.delete_any"),
    ('[tiers.verify-env]\nparent = "staging"\n', "tiers.verify-env: the name is reserved"),
])
def test_configs_that_weaken_the_agent_rules_are_refused_naming_the_key(lin: Lin, extra: str, key: str) -> None:
    tb = lin.tb
    before, names = tb.config.digest, lin.names()
    with pytest.raises(ConfigError) as exc:
        tb.reload_config(lin.config_file(TOPOLOGY + extra))
    assert exc.value.exit_code == 1 and key in exc.value.message
    assert tb.config.digest == before and lin.names() == names
    assert tb.as_principal("bot").whoami()["base_role"] == "agent"
    with pytest.raises(PolicyDenied):
        lin.as_("bot").create_branch("bot-grab", "production")  # the old config is still in force


@pytest.mark.parametrize(("tier_keys", "key"), [
    ('promote = ["platform-engineer", "agent"]', "tiers.production.promote"),
    ('branch = ["agent"]', "tiers.production.branch"),
])
def test_tier_grants_to_agents_on_protected_tiers_are_refused(lin: Lin, tier_keys: str, key: str) -> None:
    text = TOPOLOGY.replace("sensitive = true\n", f"sensitive = true\n{tier_keys}\n", 1)
    before = lin.tb.config.digest
    with pytest.raises(ConfigError, match=re.escape(key)):
        lin.tb.reload_config(lin.config_file(text))
    assert lin.tb.config.digest == before


def test_an_agent_role_stays_agent_across_reloads(lin: Lin) -> None:
    tb = lin.tb
    helper = TOPOLOGY + '[roles.helper]\nlike = "agent"\n'
    tb.reload_config(lin.config_file(helper))
    tb.create_principal("helper-1", "helper")
    try:
        with pytest.raises(ConfigError, match=re.escape("roles.helper.like")):
            tb.reload_config(lin.config_file(helper.replace('like = "agent"', 'like = "developer"')))
        tb.reload_config(lin.config_file(TOPOLOGY))  # dropping the declaration leaves its holders agents
        assert tb.as_principal("helper-1").whoami()["base_role"] == "agent"
        with pytest.raises(ConfigError, match=re.escape("roles.helper.like")):  # and it cannot come back stronger
            tb.reload_config(lin.config_file(helper.replace('like = "agent"', 'like = "platform-engineer"')))
        assert tb.explain("helper-1", "branch.create", "production")["rule"] == DENIED
    finally:
        tb.revoke_principal("helper-1")
        tb.reload_config(lin.config_file(TOPOLOGY))


# -- policy reload reads only what a platform engineer names -----------------------------------
def test_reload_without_a_file_rereads_nothing(lin: Lin) -> None:
    tb = lin.tb
    source = tb.store.get_setting("config_source")
    Path(source).write_text(TOPOLOGY + '[roles.agent]\nlike = "platform-engineer"\n')  # the repo an agent edits
    try:
        before = tb.config.digest
        with pytest.raises(InvalidInput, match="does not re-read a stored file"):
            tb.reload_config()
        assert tb.config.digest == before
    finally:
        Path(source).write_text(TOPOLOGY)


def test_dry_run_shows_the_diff_and_changes_nothing(lin: Lin) -> None:
    tb = lin.tb
    new = lin.config_file(TOPOLOGY + '\n[tiers.perf]\nparent = "staging"\n')
    before, names, last = tb.config.digest, lin.names(), tb.audit_log()[-1]["id"]
    out = tb.reload_config(new, dry_run=True)
    assert out["applied"] is False and out["changed"] is True
    assert "+[tiers.perf]" in out["diff"] and "would create tier 'perf' from 'staging'" in out["said"]
    assert tb.config.digest == before and lin.names() == names and tb.audit_log()[-1]["id"] == last


@pytest.fixture
def service(lin: Lin) -> Iterator[str]:
    """The API over the module's platform on a real port, where the CLI finds it (home/service.json)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(lin.tb), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the API did not start"
        time.sleep(0.01)
    lin.tb.home.service.write_text(f'{{"api_url": "http://127.0.0.1:{port}"}}')
    try:
        yield str(lin.tb.home.root)
    finally:
        lin.tb.home.service.unlink(missing_ok=True)
        server.should_exit = True
        thread.join(10)


def test_reload_through_the_cli_and_the_api(lin: Lin, service: str) -> None:
    tb = lin.tb
    new = lin.config_file(TOPOLOGY + '\n[tiers.perf]\nparent = "staging"\n')
    before, names = tb.config.digest, lin.names()
    run = CliRunner()
    owner = {"TIERBASE_TOKEN": tb.home.token.read_text().strip()}
    got = run.invoke(cli, ["--home", service, "policy", "reload"], env=owner)
    assert got.exit_code == 1 and "does not re-read a stored file" in got.output and "--file" in got.output
    got = run.invoke(cli, ["--home", service, "policy", "reload", "--file", new],
                     env={"TIERBASE_TOKEN": lin.tokens["bot"]})
    assert got.exit_code == 2 and "agents cannot change policy" in got.output
    got = run.invoke(cli, ["--home", service, "policy", "reload", "--file", new, "--dry-run"],
                     env={"TIERBASE_TOKEN": lin.tokens["dev"]})
    assert got.exit_code == 2
    assert tb.config.digest == before and lin.names() == names
    got = run.invoke(cli, ["--home", service, "policy", "reload", "--file", new, "--dry-run"], env=owner)
    assert got.exit_code == 0 and "+[tiers.perf]" in got.output and "dry run" in got.output
    assert tb.config.digest == before and lin.names() == names
    # the server reads no path from a request: the old `file` field is refused, nothing is read
    api = TestClient(create_app(tb))
    auth = {"Authorization": f"Bearer {owner['TIERBASE_TOKEN']}"}
    got_api = api.post("/v1/policy/reload", json={"file": new}, headers=auth)
    assert got_api.status_code == 422 and "file" in got_api.json()["error"]["message"]
    got_api = api.post("/v1/policy/reload", json={"text": TOPOLOGY + '[roles.agent]\nlike = "developer"\n'},
                       headers=auth)
    assert got_api.status_code == 400 and "roles.agent.like" in got_api.json()["error"]["message"]
    assert tb.config.digest == before
    try:
        got = run.invoke(cli, ["--home", service, "policy", "reload", "--file", new], env=owner)
        assert got.exit_code == 0 and "+[tiers.perf]" in got.output and "created tier 'perf'" in got.output
        rec = tb.audit_log(action="policy.reload")[-1]
        assert rec["actor"] == tb.gate.owner and "+[tiers.perf]" in rec["after"]["diff"]
    finally:
        tb.reload_config(lin.config_file(TOPOLOGY))
        if tb.store.find("perf"):
            tb.delete_branch("perf", recursive=True)

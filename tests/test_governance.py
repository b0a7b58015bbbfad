"""Governance on a real platform: declared tiers, principals, policy with no override, audit chain."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from tierbase import Tierbase
from tierbase.api.server import create_app
from tierbase.errors import InvalidInput, PolicyDenied, Refused
from tierbase.workflow.history import FlowHistory

from .conftest import (
    as_,
    free_port,
    free_port_base,
    make_home,
    make_principal,
    needs_root_btrfs,
    query,
    serving,
    teardown_platform,
)

pytestmark = needs_root_btrfs

TOPOLOGY = """
[project]
name = "shop"

[tiers.production]
protected = true
sensitive = true
git_branch = "main"
promote = ["platform-engineer", "ci"]

[tiers.staging]
parent = "production"
protected = true
entry = true
git_branch = "staging"
promote = ["platform-engineer", "ci", "developer"]

[tiers.qa]
parent = "staging"

[tiers.uat]
parent = "staging"
branch = ["platform-engineer", "developer"]

[roles.release-bot]
like = "ci"

[grants]
repoint = ["platform-engineer"]
"""


@pytest.fixture(scope="module")
def gov(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tierbase]:
    import os

    base = make_home()
    os.environ["TIERBASE_PORT_BASE"] = str(free_port_base())
    cfg = base / "tierbase.toml"
    cfg.write_text(TOPOLOGY)
    tb = Tierbase(base / "home")
    try:
        said = tb.init(storage="btrfs", btrfs_size="2G", config=str(cfg), proxy_port=free_port())
        assert "created tier 'staging' from 'production'" in said
        for name, role in (("dev1", "developer"), ("dev2", "developer"), ("bot", "agent"), ("ci", "ci")):
            make_principal(tb, name, role)
        with serving(tb):
            yield tb
    finally:
        teardown_platform(tb, base)


def audit_tail(tb: Tierbase, n: int = 1) -> list[dict[str, object]]:
    return tb.audit_log()[-n:]


def test_declared_tiers_exist_as_protected_tier_branches(gov: Tierbase) -> None:
    tiers = {b["name"]: b for b in gov.list_branches(with_bytes=False) if b["kind"] == "tier"}
    assert set(tiers) == {"production", "staging", "qa", "uat"}
    assert tiers["staging"]["parent"] == "production" and tiers["qa"]["parent"] == "staging"
    assert tiers["staging"]["protected"] and not tiers["qa"]["protected"]
    assert gov.config.entry == "staging"


def test_features_fork_from_the_entry_tier_by_default(gov: Tierbase) -> None:
    b = as_(gov, "dev1").create_branch("dev1-feature")
    assert b["parent"] == "staging" and b["creator"] == "dev1"
    as_(gov, "dev1").delete_branch("dev1-feature")


@pytest.mark.parametrize(("who", "call", "rule"), [
    ("bot", lambda tb: tb.create_branch("bot-off-prod", "production"), "builtin.agent-no-branch-off-protected"),
    ("bot", lambda tb: tb.set_route("production", "staging"), "builtin.agent-no-repoint"),
    ("bot", lambda tb: tb.reload_config(), "builtin.agent-no-policy"),
    ("bot", lambda tb: make_principal(tb, "bot2", "agent"), "builtin.agent-no-policy"),
    ("bot", lambda tb: tb.branch_url("production"), "builtin.agent-no-credentials-on-protected"),
    ("dev1", lambda tb: tb.reload_config(), "default.deny"),
    ("dev1", lambda tb: tb.set_route("production", "staging"), "grants.repoint"),
    ("dev1", lambda tb: tb.create_branch("dev-uat-x", "qa") and tb.delete_branch("staging"), "tier.protected"),
    ("ci", lambda tb: tb.create_branch("ci-uat", "uat"), "tiers.uat.branch"),
])
def test_refusals_are_audited_and_change_nothing(gov: Tierbase, who: str, call: object, rule: str) -> None:
    before = [(b["name"], b["parent"]) for b in gov.list_branches(with_bytes=False)]
    routes = gov.list_routes()
    cfg = gov.config.digest
    with pytest.raises(PolicyDenied) as exc:
        call(as_(gov, who))  # type: ignore[operator]
    assert exc.value.exit_code == 2 and exc.value.data["rule"] == rule
    last = audit_tail(gov)[0]
    assert last["actor"] == who and last["decision"] == "denied" and str(last["reason"]).startswith(rule)
    for extra in ("dev-uat-x",):
        if gov.store.find(extra):
            gov.delete_branch(extra)
    assert [(b["name"], b["parent"]) for b in gov.list_branches(with_bytes=False)] == before
    assert gov.list_routes() == routes and gov.config.digest == cfg


def test_agent_works_on_its_own_branches_off_the_entry_tier(gov: Tierbase) -> None:
    bot = as_(gov, "bot")
    b = bot.create_branch("bot-task")
    assert b["parent"] == "staging"
    assert gov.explain("bot", "migrate.apply", "bot-task")["allowed"] is True
    assert gov.explain("bot", "migrate.apply", "qa")["rule"] == "builtin.agent-migrate-own-only"
    assert gov.explain("bot", "promote", "production", "staging")["rule"] == "builtin.agent-no-promote"
    with pytest.raises(PolicyDenied):
        as_(gov, "dev1").delete_branch("bot-task")  # not dev1's
    bot.delete_branch("bot-task")


def test_promotion_permissions(gov: Tierbase) -> None:
    assert gov.explain("ci", "promote", "production", "staging")["allowed"] is True
    dev = gov.explain("dev1", "promote", "production", "staging")
    assert dev["allowed"] is False and dev["rule"] == "tiers.production.promote"
    assert gov.explain("dev1", "promote", "staging", "qa")["allowed"] is True
    as_(gov, "dev1").create_branch("dev1-feat2")
    try:
        feat = gov.explain("dev1", "promote", "production", "dev1-feat2")
        assert feat["allowed"] is False and feat["rule"] == "promote.tiers-only"
        owner = gov.explain(gov.gate.owner, "promote", "production", "dev1-feat2")
        assert owner["allowed"] is False  # no role, not even platform engineers, promotes a feature past its tier
        assert gov.explain("dev1", "promote", "staging", "dev1-feat2")["allowed"] is True  # merge into its own tier
    finally:
        as_(gov, "dev1").delete_branch("dev1-feat2")


def test_custom_role_behaves_like_its_base(gov: Tierbase) -> None:
    gov.create_principal("shipper", "release-bot")
    assert gov.explain("shipper", "promote", "production", "staging")["allowed"] is False  # not listed by name
    assert gov.config.base_role("release-bot") == "ci"


@pytest.mark.parametrize(("text", "key"), [
    ("[tiers.production]\n[tiers.a]\nparent = 'b'\n[tiers.b]\nparent = 'a'\n", "tiers.a.parent: cycle"),
    ("[tiers.production]\n[tiers.a]\nparent = 'nowhere'\n", "tiers.a.parent: unknown tier 'nowhere'"),
    ("[tiers.production]\npromote = ['wizard']\n", "tiers.production.promote: unknown role 'wizard'"),
    ("[tiers.production]\nprotectd = true\n", "tiers.production: Additional properties"),
    ("[tiers.production]\n[masking]\n'customer.email' = 'scramble'\n", "masking.customer.email"),
    ("[tiers.prod]\n", "tiers.prod: the root tier must be the root branch 'production'"),
    ("[tiers.production]\n[tiers.staging]\nparent = 'production'\n[tiers.qa]\nparent = 'production'\n",
     "tiers.qa.parent: the existing tier's parent is 'staging'"),
    ("this is = = not toml", "TOML syntax"),
])
def test_bad_configs_name_the_key_and_keep_the_last_good_one(gov: Tierbase, tmp_path: Path, text: str,
                                                             key: str) -> None:
    before = gov.config.digest
    bad = tmp_path / "tierbase.toml"
    bad.write_text(text)
    with pytest.raises(InvalidInput) as exc:
        gov.reload_config(str(bad))
    assert key in str(exc.value)
    assert gov.config.digest == before
    assert gov.store.get_setting("config_source") != str(bad)


def test_reload_is_audited_with_hash_and_diff(gov: Tierbase, tmp_path: Path) -> None:
    new = tmp_path / "tierbase.toml"
    new.write_text(TOPOLOGY + "\n[tiers.perf]\nparent = \"staging\"\n")
    old_digest = gov.config.digest
    out = gov.reload_config(str(new))
    assert "created tier 'perf' from 'staging'" in out["said"]
    rec = gov.audit_log(action="policy.reload")[-1]
    assert rec["before"] == {"sha256": old_digest}
    assert rec["after"]["sha256"] == out["sha256"] and '+[tiers.perf]' in rec["after"]["diff"]


def test_database_credentials_follow_the_policy(gov: Tierbase) -> None:
    reader = as_(gov, "dev2").branch_url("staging")
    assert reader.startswith("postgresql://dev2:")
    assert query(reader, "SELECT count(*) FROM pg_class") [0][0] > 0
    with pytest.raises((psycopg.errors.InsufficientPrivilege, psycopg.errors.ReadOnlySqlTransaction)):
        query(reader, "CREATE TABLE staging_write (x int)")
    as_(gov, "dev2").create_branch("dev2-own")
    try:
        owner = as_(gov, "dev2").branch_url("dev2-own")
        query(owner, "CREATE TABLE mine (x int)")  # the owner has full rights on its own branch
        with pytest.raises(PolicyDenied):
            as_(gov, "dev1").branch_url("dev2-own")
    finally:
        as_(gov, "dev2").delete_branch("dev2-own")


def test_api_tokens_unknown_revoked_malformed(gov: Tierbase) -> None:
    made = gov.create_principal("temp", "developer")
    api = TestClient(create_app(gov))
    ok = api.get("/v1/branches?bytes=false", headers={"Authorization": f"Bearer {made['token']}"})
    assert ok.status_code == 200
    gov.revoke_principal("temp")
    for header in (f"Bearer {made['token']}", "Bearer tbt_unknown", "Bearer x", "Basic abc", ""):
        got = api.get("/v1/branches", headers={"Authorization": header} if header else {})
        assert got.status_code == 401 and got.json()["error"]["code"] == "unauthorized"
    last = audit_tail(gov)[0]
    assert last["actor"] == "anonymous" and last["decision"] == "denied" and last["action"] == "auth"
    # a denial over HTTP is a 403 with the same envelope
    bot_token = gov.create_principal("bot-http", "agent")["token"]
    denied = api.post("/v1/branches", json={"name": "x-off-prod", "parent": "production"},
                      headers={"Authorization": f"Bearer {bot_token}"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "policy_denied"


@pytest.mark.parametrize("tamper", ["edit", "delete", "insert"])
def test_audit_tampering_is_detected_at_the_record(gov: Tierbase, tamper: str) -> None:
    as_(gov, "dev1").create_branch("audit-a")
    as_(gov, "dev1").delete_branch("audit-a")
    assert gov.audit_verify()["ok"] is True
    db = sqlite3.connect(gov.home.db)
    rows = db.execute("SELECT id FROM audit ORDER BY id").fetchall()
    victim = rows[len(rows) // 2][0]
    backup = db.execute("SELECT * FROM audit WHERE id >= ?", (victim,)).fetchall()
    try:
        if tamper == "edit":
            db.execute("UPDATE audit SET decision='allowed', reason='nothing to see' WHERE id=?", (victim,))
        elif tamper == "delete":
            db.execute("DELETE FROM audit WHERE id=?", (victim,))
        else:
            db.execute("UPDATE audit SET id = id + 1000000 WHERE id >= ?", (victim,))
            db.execute("INSERT INTO audit SELECT ?, ts, actor, action, target, decision, reason, outcome, before, "
                       "after, prev_hash, hash FROM audit WHERE id = ?", (victim, victim + 1000000 - 1 + 1))
            db.execute("UPDATE audit SET id = id - 1000000 + 1 WHERE id >= 1000000")
        db.commit()
        verdict = gov.audit_verify()
        assert verdict["ok"] is False
        assert verdict["first_bad"] == (victim + 1 if tamper == "insert" else victim) or \
            verdict["first_bad"] == victim
    finally:
        db.execute("DELETE FROM audit WHERE id >= ?", (victim,))
        db.executemany(f"INSERT INTO audit VALUES ({','.join('?' * 12)})", backup)
        db.commit()
        db.close()
    assert gov.audit_verify()["ok"] is True


def test_audit_trail_is_sql_queryable_read_only(gov: Tierbase) -> None:
    with pytest.raises(PolicyDenied):
        as_(gov, "bot").delete_branch("staging")
    url = as_(gov, "dev1").audit_url()
    denied = query(url, "SELECT count(*) FROM audit_log WHERE decision = 'denied' AND actor = 'bot'")[0][0]
    assert denied == len(gov.audit_log(actor="bot", denied=True))
    last = query(url, "SELECT id, hash FROM audit_log ORDER BY id DESC LIMIT 1")[0]
    assert list(last) == [gov.audit_log()[-1]["id"], gov.audit_log()[-1]["hash"]]
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        query(url, "DELETE FROM audit_log")
    assert "tierbase-audit" not in [b["name"] for b in gov.list_branches(with_bytes=False)]
    with pytest.raises(Refused, match="cannot be branched"):
        gov.create_branch("audit-copy", "tierbase-audit")


def test_control_plane_refuses_skipped_workflow_gates(gov: Tierbase) -> None:
    """No facade method appends a client's event; the history itself still refuses skipped gates."""
    dev = as_(gov, "dev1")
    assert not hasattr(dev, "flow_record")
    history = FlowHistory(gov.store)
    history.record("forge-x", "claim", "feature-claimed", "dev1", {})
    for transition, state in (("ci", "ci-green"), ("merge", "merged"), ("ready", "merged"), ("tdd-green", "merged")):
        with pytest.raises(Refused):
            history.record("forge-x", transition, state, "dev1", {"forged": True})
    assert dev.flow_history("forge-x")["state"] == "feature-claimed"

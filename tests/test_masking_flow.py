"""The split-column story on a masked staging, as a team plays it: through the workflow, the CLI only.

Production holds pagila with 2,000 customers and is declared `sensitive`; staging is declared
`masked`. A developer splits `customer.email` (expand: add `email_local` and backfill it; contract:
drop `email`) with `tierbase flow claim -> ready -> ci -> merge`, a `ci` principal's runner runs the
app's own tests on the branch the flow gives them, and a platform engineer promotes production. At
every step a masked branch shows no original e-mail or local part: the sets to compare with are read
from production as the platform's superuser.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tierbase.compute.postgres import SUPERUSER
from tierbase.workflow.validate import problems

from .conftest import free_port, free_port_base, make_home, needs_root_btrfs
from .test_cli import leftovers
from .test_masking import PAGILA, SEED
from .test_workflow import ENTRY, App, Platform, make_repo, run_cli

pytestmark = [needs_root_btrfs,
              pytest.mark.skipif(not PAGILA.exists(), reason=f"the pagila fixture is not at {PAGILA}")]

# the app's tierbase.toml: the scaffold's tiers and grants, production sensitive, staging masked
CONFIG = """\
[project]
name = "shop"
database = "shop"
migrations = "db/migrations"
test_command = "pytest -q"

[tiers.production]
protected = true
sensitive = true
git_branch = "main"
promote = ["platform-engineer", "ci"]

[tiers.staging]
parent = "production"
protected = true
entry = true
masked = true
git_branch = "staging"
promote = ["platform-engineer", "ci", "developer"]

[grants]
delete_any = ["platform-engineer", "ci"]

[masking]
sensitive = ["customer"]
customer.store_id = "safe"
customer.email = "email"
customer.first_name = "hash"
customer.last_name = "hash"
"address.phone" = "partial"
"""
EXPAND = "db/migrations/V0001__split_email.sql"
ADD_ONLY = "ALTER TABLE customer ADD COLUMN email_local text;\n"
ADD_AND_BACKFILL = ADD_ONLY + (
    "UPDATE customer SET email_local = split_part(email, '@', 1);\n"
    # the rejects table, filled by position (no column list): raw e-mails that must not stay raw
    "CREATE TABLE rejected_email (id int PRIMARY KEY, raw text NOT NULL);\n"
    "INSERT INTO rejected_email SELECT customer_id, email FROM customer WHERE customer_id % 4 = 0;\n")
CONTRACT = "db/migrations/V0002__drop_email.sql"
DROP = "ALTER TABLE customer DROP COLUMN email CASCADE;\n"  # CASCADE: the materialized view customer_emails
CLASSIFIED = CONFIG + 'customer.email_local = "email"\n'
# the app's own tests: they pass only on a branch that has the change (and see whatever data it holds)
CHECK_LOCAL = """from app.testing import db  # noqa: F401


def test_every_customer_has_a_local_part(db):  # noqa: F811
    total, missing = db.execute("SELECT count(*), count(*) FILTER (WHERE coalesce(email_local, '') = '') "
                                "FROM customer").fetchone()
    assert total > 0 and missing == 0
"""
CHECK_GONE = """from app.testing import db  # noqa: F401


def test_the_email_column_is_gone(db):  # noqa: F811
    assert db.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'customer' "
                      "AND column_name = 'email'").fetchone() == (0,)
"""


@dataclass
class Story:
    plat: Platform
    app: App  # the shop's repo; the platform engineer scaffolded it, the developer works in it
    home: Path
    locals_: set[str]  # production's local parts and e-mails, read as the superuser before the story
    emails: set[str]

    def admin(self, branch: str) -> str:
        """The platform's superuser on a branch's shop database (unix socket, peer auth as root)."""
        port = self.plat.json("branch", "start", branch)["port"]
        return make_conninfo("", host=str(self.home / "sockets"), port=port, user=SUPERUSER, dbname="shop")

    def url(self, branch: str, who: str = "dev") -> str:
        return str(self.plat.json("branch", "url", branch, "--database", "shop", who=who)["url"])

    def masked_branch(self, name: str, parent: str) -> str:
        """A new branch of ``parent`` made by the developer: masked, and its URL (the developer's own)."""
        made = self.plat.json("branch", "create", name, "--parent", parent, who="dev")
        assert made["masked"] and made["creator"] == "dev", made
        return self.url(name)


def rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        return conn.execute(sql).fetchall()


def values(url: str, sql: str) -> set[Any]:
    return {r[0] for r in rows(url, sql)} - {None, ""}


def shown(url: str, sql: str, count: int) -> set[Any]:
    """The values of a one-column query, which must give ``count`` rows, none NULL or empty."""
    got = [r[0] for r in rows(url, sql)]
    assert len(got) == count and all(v not in (None, "") for v in got), (sql, len(got))
    return set(got)


def refusal(app: App, *args: str) -> list[dict[str, Any]]:
    """Exit 2, the gate-failure JSON, the state file byte for byte as it was; returns the failures."""
    before = app.state_bytes()
    got = app.cli(*args)
    assert got.returncode == 2, f"tierbase {' '.join(args)} exited {got.returncode}: {got.stdout} {got.stderr}"
    data = json.loads(got.stdout)
    assert problems("gate-failure", data) == [], data
    assert "gate is closed" in got.stderr
    assert app.state_bytes() == before, "a refused gate changed the state file"
    return list(data["error"]["data"]["failures"])


@pytest.fixture(scope="module")
def story() -> Iterator[Story]:
    base = make_home()
    home = base / "home"
    env = dict(os.environ, TIERBASE_HOME=str(home), TIERBASE_PORT_BASE=str(free_port_base()),
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env.pop("TIERBASE_TOKEN", None)
    plat = Platform(env=env, base=base)
    try:
        (base / "tierbase.toml").write_text(CONFIG)
        repo = make_repo(base / "shop", base / "tierbase.toml")
        # production first (the default tier), loaded through the platform as a platform engineer would
        up = plat.json("up", "--btrfs-size", "2G", "--api-port", str(free_port()), "--proxy-port", str(free_port()))
        plat.api_url = str(up["api_url"])
        plat.json("import", str(PAGILA), "--branch", "production", "--database", "shop")
        direct = plat.json("branch", "url", "production", "--database", "shop", "--direct")["url"]
        with psycopg.connect(direct, autocommit=True) as conn:
            conn.execute("SET search_path = public")
            conn.execute(SEED)
        # then the app's config: staging is made from production, masked
        said = plat.json("policy", "reload", "--file", str(repo / "tierbase.toml"))["said"]
        assert any("created tier 'staging'" in s for s in said), said
        for name, role in (("dev", "developer"), ("ci", "ci")):
            plat.tokens[name] = plat.json("principal", "create", name, "--role", role)["token"]
        app = App(plat, repo, "dev")
        app.ok("init", who=None)
        plat.runner = subprocess.Popen([sys.executable, "-c", ENTRY, "ci", "runner", "--poll", "0.3"],
                                       env=plat.as_("ci"), stdout=subprocess.DEVNULL,
                                       stderr=(base / "runner.log").open("w"), text=True)
        s = Story(plat, app, home, set(), set())
        prod = s.admin("production")
        s.locals_ = values(prod, "SELECT split_part(email, '@', 1) FROM customer")
        s.emails = values(prod, "SELECT email FROM customer")
        assert len(s.emails) == 2000 and len(s.locals_) == 2000
        yield s
    finally:
        if plat.runner is not None:
            plat.runner.terminate()
            plat.runner.wait(30)
        run_cli(env, "down", "--purge")
        assert leftovers(home) == []
        shutil.rmtree(base, ignore_errors=True)


def test_expand_as_a_developer_on_masked_staging_then_production(story: Story) -> None:
    s, app = story, story.app
    # 1. claim: a masked feature branch of staging, the developer's, no superuser, no original e-mail
    claimed = app.ok("flow", "claim", "split-email")
    assert claimed["state"] == "feature-claimed" and claimed["evidence"]["owner"] == "dev"
    made = s.plat.json("branch", "show", "split-email")
    assert made["masked"] and made["creator"] == "dev" and made["parent"] == "staging"
    assert "customer.email=email" in made["masking"]
    url = s.url("split-email")
    assert rows(url, "SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user") \
        == [("tb_owner", False)]
    assert not shown(url, "SELECT email FROM customer", 2000) & s.emails

    # 2. the column alone, unclassified: ready refuses (exit 2, state and branch unchanged)
    app.write(EXPAND, ADD_ONLY)
    app.write("tests/check_email_local.py", CHECK_LOCAL)
    app.commit("Split the e-mail: add email_local")
    failures = refusal(app, "flow", "ready")
    assert [f["code"] for f in failures] == ["unclassified-column"], failures
    assert failures[0]["message"].startswith("V0001__split_email.sql:1: public.customer.email_local is added to "
                                             "the sensitive table public.customer")
    assert 'customer.email_local = "<method>"' in failures[0]["hint"]
    assert app.state()["state"] == "feature-claimed"
    assert rows(url, "SELECT count(*) FROM information_schema.columns WHERE table_name = 'customer' "
                     "AND column_name = 'email_local'") == [(0,)]
    # the backfill and the column's classification in the same change
    app.write(EXPAND, ADD_AND_BACKFILL)
    app.write("tierbase.toml", CLASSIFIED)
    head = app.commit("Backfill email_local and classify it")

    # 3. ready: verified as the developer on a throwaway branch of masked staging, applied to its branch
    ready = app.ok("flow", "ready")
    assert ready["state"] == "pr-ready" and ready["evidence"]["head_sha"] == head
    mig = ready["evidence"]["migrations"]
    assert mig["files"] == ["V0001__split_email.sql"] and mig["verify"]["ok"] is True, mig["verify"]
    assert mig["verify"]["masking"]["unclassified"] == []
    assert [a["version"] for a in mig["applied_to_feature"]] == [1]
    got = rows(url, "SELECT email, email_local FROM customer")
    assert all(local == email.split("@")[0] for email, local in got)  # derived from the masked e-mail
    assert not {local for _, local in got} & s.locals_

    green = app.ok("flow", "ci")
    ci = green["evidence"]
    assert green["state"] == "ci-green" and ci["sha"] == head and ci["runner"] == "ci"
    assert ci["ci_branch"] == "ci-split-email" and ci["failed"] == 0 and ci["passed"] == 4  # the app's 3 + 1

    merged = app.ok("flow", "merge")
    assert merged["state"] == "merged" and merged["evidence"]["promotion"] is not None
    staging = s.admin("staging")
    assert not values(staging, "SELECT email_local FROM customer") & s.locals_
    assert values(staging, "SELECT count(*) FROM customer WHERE email_local IS NULL") == {0}

    # 4. a platform engineer promotes production: the real local parts are there now
    promoted = s.plat.json("promote", "production", "--dir", str(app.path / "db" / "migrations"))
    assert promoted["source"] == "staging"
    prod = s.admin("production")
    assert values(prod, "SELECT email_local FROM customer") == s.locals_
    assert values(prod, "SELECT raw FROM rejected_email") <= s.emails
    # a masked branch of production made by the developer: not one original local part; staging's likewise
    for name, parent in (("after-expand", "production"), ("staging-after-expand", "staging")):
        url = s.masked_branch(name, parent)
        seen = shown(url, "SELECT email_local FROM customer", 2000)
        assert not seen & s.locals_, f"original local parts are visible on {name}"
        rejects = shown(url, "SELECT raw FROM rejected_email", 500)
        assert not rejects & s.emails, f"raw rejected e-mails are visible on {name}"
    # the change's classification comes into force with the config it was merged with
    said = s.plat.json("policy", "reload", "--file", str(app.path / "tierbase.toml"))["said"]
    assert not any("stale" in line for line in said), said
    made = s.plat.json("branch", "create", "after-reload", "--parent", "production", who="dev")
    assert made["masked"] and "customer.email_local=email" in made["masking"]
    assert not values(s.url("after-reload"), "SELECT email_local FROM customer") & s.locals_


def test_contract_through_the_same_flow_and_masked_branches_keep_coming(story: Story) -> None:
    s, app = story, story.app
    prod = s.admin("production")
    assert values(prod, "SELECT email_local FROM customer") == s.locals_, "the expand did not reach production"
    app.ok("flow", "claim", "drop-email")
    app.write(CONTRACT, DROP)
    app.write("tests/check_no_email.py", CHECK_GONE)
    head = app.commit("Drop customer.email")  # tierbase.toml still has its rule: it goes stale
    ready = app.ok("flow", "ready")
    verify = ready["evidence"]["migrations"]["verify"]
    assert verify["ok"] is True, verify
    assert [d["column"] for d in verify["masking"]["dropped"]] == ["public.customer.email"]
    green = app.ok("flow", "ci")
    assert green["evidence"]["sha"] == head and green["evidence"]["failed"] == 0 and green["evidence"]["passed"] == 5
    assert app.ok("flow", "merge")["state"] == "merged"
    s.plat.json("promote", "production", "--dir", str(app.path / "db" / "migrations"))
    assert rows(s.admin("production"), "SELECT count(*) FROM information_schema.columns WHERE table_name = 'customer' "
                      "AND column_name = 'email'") == [(0,)]
    # the rule for the dropped column is skipped, never a reason to fail: masked branches keep coming
    for name, parent in (("after-contract", "production"), ("staging-after-contract", "staging")):
        seen = shown(s.masked_branch(name, parent), "SELECT email_local FROM customer", 2000)
        assert not seen & s.locals_, f"original local parts are visible on {name}"
    said = s.plat.json("policy", "reload", "--file", str(app.path / "tierbase.toml"))["said"]
    assert any("masking.customer.email is stale and was skipped: column public.customer.email was dropped by "
               "V0002__drop_email.sql:1" in line for line in said), said
    made = s.plat.json("branch", "create", "after-stale-reload", "--parent", "production", who="dev")
    assert made["masked"] and not values(s.url("after-stale-reload"), "SELECT email_local FROM customer") & s.locals_

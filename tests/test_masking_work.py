"""Masked branches people can work on: the owner role owns what it works on, and nothing leads back to
the unmasked data (pagila, production loaded by the platform's superuser, staging declared masked)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tierbase.compute.postgres import SUPERUSER
from tierbase.errors import InvalidInput, PolicyDenied, TierbaseError
from tierbase.governance.masking_owner import hand_over
from tierbase.names import ReservedName

from .conftest import as_, needs_root_btrfs, query
from .shop import Shop, shop_platform
from .test_masking import PAGILA

pytestmark = [needs_root_btrfs,
              pytest.mark.skipif(not PAGILA.exists(), reason=f"the pagila fixture is not at {PAGILA}")]

CONFIG = """
[project]
database = "shop"

[tiers.production]
protected = true
sensitive = true

[tiers.staging]
parent = "production"
entry = true
masked = true

[masking]
sensitive = ["customer"]
customer.store_id = "safe"
customer.email = "email"
customer.first_name = "hash"
customer.last_name = "hash"
"address.phone" = "partial"
"payment.amount" = "noise"
"""

# production as a platform loads it: every object the superuser's; a SECURITY DEFINER function the
# superuser owns; a CHECK whose function notes who runs it (masking must not run it as the superuser)
PLATFORM_LOAD = """
CREATE TABLE ran_as (who text, super bool);
CREATE FUNCTION note_runner(v text) RETURNS bool LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.ran_as SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user;
  RETURN true;
END $$;
ALTER TABLE customer ADD CONSTRAINT customer_email_noted CHECK (note_runner(email));
CREATE TABLE coupon (id int PRIMARY KEY, code text CHECK (char_length(code) <= 16));
INSERT INTO coupon SELECT g, CASE WHEN g BETWEEN 20 AND 30 THEN 'secret-' || g END FROM generate_series(1, 50) g;
CREATE TABLE profile (id int PRIMARY KEY, prefs jsonb NOT NULL DEFAULT '{}', ssn bigint UNIQUE);
-- production's data problems, which masked branches must show too: 1 in 10 e-mails is malformed or odd
UPDATE customer SET email = CASE customer_id % 60
    WHEN 0 THEN replace(email, '@', ' at ') WHEN 10 THEN replace(email, '@', '@@') WHEN 20 THEN upper(email)
    WHEN 30 THEN split_part(email, '.com', 1) WHEN 40 THEN email || '.' ELSE split_part(email, '@', 1) END
  WHERE customer_id % 10 = 0;
CREATE FUNCTION definer_whoami() RETURNS text LANGUAGE sql SECURITY DEFINER AS $$ SELECT current_user::text $$;
"""


def platform_load(conn: psycopg.Connection[Any]) -> None:
    conn.execute(PLATFORM_LOAD)
    with conn.transaction():
        hand_over(conn, SUPERUSER)  # loaded by the platform: nothing is the owner role's
    conn.execute("TRUNCATE ran_as")


@pytest.fixture(scope="module")
def shop() -> Iterator[Shop]:
    with shop_platform(CONFIG, load=platform_load) as got:
        yield got


def test_production_is_the_superusers_and_staging_the_owner_roles(shop: Shop) -> None:
    owners = ("SELECT DISTINCT relowner::regrole::text FROM pg_class WHERE relnamespace = 'public'::regnamespace "
              "AND relkind IN ('r', 'p', 'v', 'm', 'S')")
    assert query(shop.admin("production"), owners) == [(SUPERUSER,)]
    assert query(shop.admin("staging"), owners) == [("tb_owner",)]
    assert query(shop.admin("staging"), "SELECT datdba::regrole::text FROM pg_database WHERE datname = 'shop'") \
        == [("tb_owner",)]
    # masking ran as the owner role: the CHECK's function never ran with the superuser's rights
    assert set(query(shop.admin("staging"), "SELECT who, super FROM ran_as")) == {("tb_owner", False)}
    assert query(shop.admin("production"), "SELECT count(*) FROM ran_as") == [(0,)]


def test_a_masked_tier_is_frozen_like_an_image(shop: Shop) -> None:
    """Staging (masked) is cloned by every branch of it: masking's rewrite is settled once, at creation."""
    pages = query(shop.admin("staging"), "SELECT relname::text, relpages, relallvisible FROM pg_class WHERE oid IN "
                                         "('customer'::regclass, 'address'::regclass)")
    assert all(visible == n and n > 0 for _, n, visible in pages), pages


@pytest.mark.parametrize("who", ["dev", "bot"])
def test_owners_do_ddl_and_verify_migrations_on_masked_branches(shop: Shop, who: str) -> None:
    me = as_(shop.tb, who)
    name = f"{who}-ddl"
    made = me.create_branch(name)
    assert made["masked"]
    url = me.branch_url(name, "shop")
    query(url, "ALTER TABLE customer ADD COLUMN nickname text")
    query(url, "CREATE SCHEMA scratch; CREATE TABLE scratch.t (id int)")
    query(url, "CREATE INDEX ON customer (last_name)")
    query(url, "UPDATE customer SET nickname = 'n' || customer_id WHERE customer_id < 10")
    assert query(url, "SELECT count(nickname) FROM customer") == [(9,)]
    files = {"V0001__nickname.sql": "ALTER TABLE customer ADD COLUMN nickname text;\n"
                                    "ALTER TABLE address ADD COLUMN note text;\n",
             "U0001__nickname.sql": "ALTER TABLE customer DROP COLUMN nickname;\n"
                                    "ALTER TABLE address DROP COLUMN note;\n"}
    got = me.migrate_verify("staging", files=files)
    assert got["ok"], got["problems"]
    applied = me.migrate_apply(name, files={k: v for k, v in files.items() if k.startswith("V")} | {
        "V0001__nickname.sql": "ALTER TABLE address ADD COLUMN note text;\n"})
    assert [a["version"] for a in applied["applied"]] == [1]
    me.delete_branch(name)


def test_no_way_back_to_the_superuser_or_the_unmasked_data(shop: Shop) -> None:
    dev = as_(shop.tb, "dev")
    dev.create_branch("dev-attack")
    url = dev.branch_url("dev-attack", "shop")
    attacks = [
        "SET ROLE tierbase",
        "SET SESSION AUTHORIZATION tierbase",
        "ALTER TABLE customer OWNER TO tierbase",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1'; "
        "ALTER FUNCTION f() OWNER TO tierbase",
        "ALTER ROLE tb_owner SUPERUSER",
        "GRANT tierbase TO tb_owner",
        "ALTER DATABASE shop OWNER TO tierbase",
        "SELECT pg_read_binary_file('global/pg_control')",
        "COPY customer TO PROGRAM 'cat'",
        "CREATE EXTENSION pageinspect",
        "SELECT * FROM dblink('dbname=shop user=tierbase', 'SELECT 1') AS t(x int)",
    ]
    for attack in attacks:
        with pytest.raises(psycopg.Error) as err:
            query(url, attack)
        assert not isinstance(err.value, psycopg.OperationalError) or "dblink" in attack, (attack, err.value)
    # the superuser's SECURITY DEFINER function of production runs as the owner role here
    assert query(url, "SELECT definer_whoami()") == [("tb_owner",)]
    assert query(url, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") == [(False,)]
    # production's data (unmasked) is not reachable: no connection, no unmasked branch or snapshot of it
    with pytest.raises(PolicyDenied, match="unmasked_read"):
        dev.branch_url("production", "shop")
    with pytest.raises(PolicyDenied, match="unmasked_read"):  # SQL through the API (and MCP) is a connection too
        dev.run_sql("production", "SELECT email FROM customer", database="shop")
    with pytest.raises(PolicyDenied, match="unmasked_read"):
        dev.branch_url("production-pre-1" if shop.tb.store.find("production-pre-1") else "production")
    # the proxy asks the same policy: the developer's own credentials routed to production are refused
    with pytest.raises(psycopg.OperationalError, match="unmasked_read"):
        query(url.replace("/dev-attack.shop", "/production.shop"), "SELECT 1")
    assert dev.create_branch("dev-of-prod", "production")["masked"]
    with pytest.raises((PolicyDenied, TierbaseError)):
        dev.create_branch("dev-snap", "production", snapshot=True)
    assert shop.tb.store.find("dev-snap") is None
    original = {r[0] for r in query(shop.admin("production"), "SELECT email FROM customer")}
    for branch in ("dev-attack", "dev-of-prod"):
        seen = {r[0] for r in query(dev.branch_url(branch, "shop"), "SELECT email FROM customer")}
        assert seen and not seen & original
    for branch in ("dev-attack", "dev-of-prod"):
        dev.delete_branch(branch)


CUSTOMER = "SELECT customer_id, activebool, create_date, last_update, active, store_id FROM customer ORDER BY 1"


def test_unclassified_columns_of_sensitive_tables_are_masked_by_default(shop: Shop) -> None:
    staging = shop.tb.get_branch("staging")
    assert {"customer.*=sensitive", "customer.activebool=hash", "customer.create_date=shift",
            "customer.last_update=shift", "customer.active=noise", "customer.store_id=safe",
            "customer.customer_id=safe", "customer.address_id=safe"} <= set(staging["masking"])
    prod, masked = query(shop.admin("production"), CUSTOMER), query(shop.admin("staging"), CUSTOMER)
    assert [r[0] for r in prod] == [r[0] for r in masked]  # surrogate keys are kept: joins hold
    assert [r[5] for r in prod] == [r[5] for r in masked]  # declared safe
    for i, what in ((2, "create_date"), (3, "last_update")):
        moved = sum(a[i] != b[i] for a, b in zip(prod, masked, strict=True) if a[i] is not None)
        assert moved > 0.9 * len(prod), what
        assert all(abs((a[i] - b[i]).days) <= 30 for a, b in zip(prod, masked, strict=True) if a[i] is not None)
    assert all((a[4] is None) == (b[4] is None) for a, b in zip(prod, masked, strict=True))  # NULL stays NULL
    flips = sum(a[1] != b[1] for a, b in zip(prod, masked, strict=True))
    assert 0.3 * len(prod) < flips < 0.7 * len(prod)  # a keyed bit per row, not the original
    # a child of staging inherits: nothing masked twice, nothing new to apply
    dev = as_(shop.tb, "dev")
    child = dev.create_branch("dev-classified")
    assert child["masking"] == staging["masking"]
    assert query(dev.branch_url("dev-classified", "shop"), CUSTOMER) == masked
    dev.delete_branch("dev-classified")


def test_classification_problems_are_refused_at_load_naming_the_key(shop: Shop) -> None:
    tb, before = shop.tb, shop.tb.config.digest
    cases = {
        'sensitive = ["customer", "custmer"]': ["masking.sensitive: there is no table public.custmer"],
        'sensitive = ["customer", "customer_list"]': ["masking.sensitive: it is not a table"],
        'sensitive = ["customer", "profile"]': [
            "masking.profile.prefs: unclassified column of the sensitive table public.profile and no default "
            "mask fits (NOT NULL jsonb)", "masking.profile.ssn: unclassified column", "a unique bigint column"],
        'sensitive = "customer"': ["masking.sensitive: a list of table names is expected"],
    }
    for line, expected in cases.items():
        with pytest.raises(InvalidInput) as err:
            tb.apply_config(CONFIG.replace('sensitive = ["customer"]', line), "test")
        for text in expected:
            assert text in err.value.message, (line, err.value.message)
    assert tb.config.digest == before
    # classified, the same table loads (dry run: nothing changes)
    fixed = CONFIG.replace('sensitive = ["customer"]', 'sensitive = ["customer", "profile"]\n'
                           'profile.prefs = "safe"\nprofile.ssn = "safe"')
    assert tb.apply_config(fixed, "test", dry_run=True)["sha256"] != before


def test_a_rule_failing_on_some_rows_makes_no_branch_and_names_the_row_not_its_value(shop: Shop) -> None:
    tb = shop.tb
    tb.apply_config(CONFIG + 'coupon.code = "hash"\n', "test")  # 64 characters: the CHECK allows 16
    try:
        with pytest.raises(TierbaseError) as err:
            as_(tb, "dev").create_branch("dev-coupon")
        msg = err.value.message
        assert 'violates check constraint "coupon_code_check"' in msg and "table public.coupon, row id=20" in msg
        assert "secret" not in msg and "secret" not in str(err.value.data) and "secret" not in (err.value.hint or "")
        assert tb.store.find("dev-coupon") is None
        audit = tb.audit_log(action="branch.create")[-1]
        assert audit["outcome"].startswith("error") and "secret-" not in str(audit)
    finally:
        tb.apply_config(CONFIG, "test")


# constraints a migration might add; the masked branch must give each the outcome production gives
CHECKS = {
    "customer": ["email LIKE '%@%'", r"email ~ '^[^@ ]+@[^@ ]+\.[a-z]{2,}$'", "position(' ' in email) = 0",
                 "email = lower(email)", "char_length(email) <= 40", "email NOT LIKE '%.'",
                 "char_length(first_name) > 0", "create_date <= current_date", "last_update >= create_date",
                 "active IN (0, 1)", "activebool IS NOT NULL"],
    "address": [r"phone ~ '^\+\d \(\d{3}\) \d{3}-\d{4}$'", "char_length(phone) < 20",
                r"phone LIKE '+1 %'"],
    "payment": ["amount >= 0", "amount > 0", "amount < 12"],
}
KEYS = {"customer": "customer_id", "address": "address_id", "payment": "payment_id"}


def check_outcomes(url: str) -> dict[str, tuple[bool, dict[object, bool | None]]]:
    """Per check: would ADD CONSTRAINT succeed, and each row's value of the expression."""
    out = {}
    for table, checks in CHECKS.items():
        for check in checks:
            rows = dict(query(url, f"SELECT {KEYS[table]}, ({check}) FROM {table}"))
            out[f"{table}: {check}"] = (all(v is not False for v in rows.values()), rows)
    return out


def test_masks_keep_the_outcome_of_checks_production_gives(shop: Shop) -> None:
    prod, masked = check_outcomes(shop.admin("production")), check_outcomes(shop.admin("staging"))
    same_outcome = [name for name in prod if prod[name][0] == masked[name][0]]
    rows = [sum(masked[name][1][k] == v for k, v in prod[name][1].items()) / len(prod[name][1]) for name in prod]
    for name, fraction in zip(prod, rows, strict=True):
        print(f"{name}: production {'passes' if prod[name][0] else 'fails'}, masked "
              f"{'passes' if masked[name][0] else 'fails'}, rows agreeing {fraction:.4f}")
    print(f"\nCHECK outcomes preserved: {len(same_outcome)}/{len(prod)}; rows agreeing: "
          f"{sum(rows) / len(rows):.4f} (min {min(rows):.4f})")
    # every e-mail, name, date and phone-shape check keeps its outcome row by row; not kept: a bound that
    # noise crosses (11.99 * 1.1 > 12) and a literal inside a partial-masked value (the country code)
    lost = {"payment: amount < 12", "address: phone LIKE '+1 %'"}
    for name, fraction in zip(prod, rows, strict=True):
        if name not in lost:
            assert fraction == 1.0, (name, fraction)
    assert len(same_outcome) == len(prod) - len(lost)
    assert not prod["customer: email LIKE '%@%'"][0]  # production has malformed e-mails, and so does staging


def test_masked_branches_clone_the_tiers_masked_image(shop: Shop) -> None:
    tb, dev = shop.tb, as_(shop.tb, "dev")
    with_image = CONFIG.replace('[masking]\n', '[masking]\nimage = ["production"]\n')
    said = tb.apply_config(with_image, "test")["said"]
    assert any("masked image of 'production' re-made as 'production-masked-1'" in x for x in said), said
    image = tb.get_branch("production-masked-1")
    assert image["masked"] and image["parent"] == "production" and image["creator"] == tb.gate.owner
    try:
        made = dev.create_branch("img-a", "production")
        assert made["masked"] and made["parent"] == "production-masked-1" and made["masking"] == image["masking"]
        assert made["masked_image"]["image"] == "production-masked-1"
        emails = "SELECT email FROM customer WHERE email LIKE '%@%'"
        seen = {r[0] for r in query(dev.branch_url("img-a", "shop"), emails)}
        assert seen and not seen & {r[0] for r in query(shop.admin("production"), emails)}
        assert seen == {r[0] for r in query(shop.admin("production-masked-1"), emails)}
        # the platform's own name: nobody else can put an image in its place
        with pytest.raises(ReservedName):
            tb.create_branch("production-masked-7", "production")
        # a rule change re-masks the image once; the old one stays while a branch holds it
        said = tb.apply_config(with_image + 'customer.active = "noise"\n', "test")["said"]
        assert any("re-made as 'production-masked-2'" in x for x in said), said
        assert tb.store.find("production-masked-1") is not None
        made = dev.create_branch("img-b", "production")
        assert made["parent"] == "production-masked-2" and "customer.active=noise" in made["masking"]
        # an image that does not match the rules in force is not used: the branch is masked as before
        tb.apply_config(CONFIG, "test")
        made = dev.create_branch("img-c", "production")
        assert made["parent"] == "production" and made["masked"] and "masked_image" not in made
    finally:
        tb.apply_config(CONFIG, "test")
        for name in ("img-c", "img-b", "img-a", "production-masked-2", "production-masked-1"):
            if tb.store.find(name):
                tb.delete_branch(name)


def test_ready_refuses_an_unclassified_column_until_the_same_change_classifies_it(shop: Shop, tmp_path: Path) -> None:
    """flow ready's masking gate on the platform's own git record of the change (real git, real config)."""
    import subprocess

    from tierbase.workflow.commands import Flow

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()

    repo = tmp_path / "app"
    (repo / "db" / "migrations").mkdir(parents=True)
    (repo / "tierbase.toml").write_text(CONFIG)
    git("init", "-q", "-b", "staging")
    git("-c", "user.email=d@x", "-c", "user.name=d", "commit", "-q", "--allow-empty", "-m", "base")
    git("add", "-A")
    git("-c", "user.email=d@x", "-c", "user.name=d", "commit", "-q", "-m", "config")
    base = git("rev-parse", "HEAD")
    git("checkout", "-q", "-b", "feature/nick")
    (repo / "db" / "migrations" / "V0003__nick.sql").write_text("ALTER TABLE customer ADD COLUMN nick text;\n")
    git("add", "-A")
    git("-c", "user.email=d@x", "-c", "user.name=d", "commit", "-q", "-m", "nick")
    unclassified = git("rev-parse", "HEAD")
    (repo / "tierbase.toml").write_text(CONFIG + 'customer.nick = "safe"\n')
    git("-c", "user.email=d@x", "-c", "user.name=d", "commit", "-q", "-am", "classify nick")
    classified = git("rev-parse", "HEAD")
    bundle = subprocess.run(["git", "bundle", "create", "-q", "-", "staging", "feature/nick"], cwd=repo,
                            check=True, capture_output=True).stdout
    flow = Flow(as_(shop.tb, "dev"))
    if not flow.repo.exists():
        flow.repo.create()
    flow.repo.receive(bundle, "nick-test")
    for head, expected in ((unclassified, ["unclassified-column"]), (classified, [])):
        verify: dict[str, object] = {}
        with flow.migrations_at(head, base) as (mdir, files):
            assert files == ["V0003__nick.sql"]
            got = flow.masking_failures(head, base, mdir, verify)
        assert [f.code for f in got] == expected
        if got:
            assert "public.customer.nick is added to the sensitive table public.customer" in got[0].message
            assert 'customer.nick = "safe"' in got[0].hint and got[0].message.startswith("V0003__nick.sql:1")
        assert "masking" in verify


# -- derived data and rules that migrate with the schema: the split of customer.email ----------------------------
EXPAND = {
    "V0001__split_email.sql": """ALTER TABLE customer ADD COLUMN email_local text;
UPDATE customer SET email_local = split_part(email, '@', 1);
CREATE TABLE rejected_email (id int PRIMARY KEY, raw text NOT NULL);
INSERT INTO rejected_email (id, raw) SELECT customer_id, email FROM customer WHERE customer_id % 4 = 0;
CREATE TABLE mail_domains AS SELECT customer_id AS id, split_part(email, '@', 2) AS domain FROM customer;
CREATE FUNCTION keep_local() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN NEW.email_local := split_part(NEW.email, '@', 1); RETURN NEW; END $$;
CREATE TABLE customer_copy (id int PRIMARY KEY, email text, email_local text);
CREATE TRIGGER keep_local BEFORE INSERT OR UPDATE ON customer_copy FOR EACH ROW EXECUTE FUNCTION keep_local();
INSERT INTO customer_copy (id, email) SELECT customer_id, email FROM customer;
""",
}
CONTRACT = {
    "V0002__drop_email.sql": "DROP TRIGGER keep_local ON customer_copy;\n"
                             "ALTER TABLE customer DROP COLUMN email CASCADE;\n",
}


def test_the_change_tells_what_it_derives_and_what_it_leaves_unclassified(shop: Shop) -> None:
    from tierbase.migrate.files import from_contents

    dev = as_(shop.tb, "dev")
    got = dev.masking_change(from_contents({**EXPAND, "V0003__nick.sql": "ALTER TABLE customer ADD COLUMN nick text;"
                                                                         "ALTER TABLE store ADD COLUMN x int;"}))
    derived = {d["column"]: (d["from"], d["method"], d["how"]) for d in got["derived"]}
    assert derived == {
        "public.customer.email_local": ("public.customer.email", "email", "UPDATE ... SET"),
        "public.rejected_email.raw": ("public.customer.email", "email", "INSERT ... SELECT"),
        "public.mail_domains.domain": ("public.customer.email", "email", "CREATE TABLE AS"),
        "public.customer_copy.email": ("public.customer.email", "email", "INSERT ... SELECT"),
        "public.customer_copy.email_local": ("public.customer_copy.email", "email", "trigger function keep_local()"),
    }
    assert got["unclassified"] == [{"column": "public.customer.nick", "where": "V0003__nick.sql:1"}]
    # classified in the same change (its own [masking]): no longer unclassified; a declared rule beats inheriting
    own = {"customer": {"nick": "safe", "email_local": "partial"}}
    got = dev.masking_change(from_contents({**EXPAND, "V0003__nick.sql": "ALTER TABLE customer ADD COLUMN nick text;"}),
                             own)
    assert got["unclassified"] == [] and "public.customer.email_local" not in {d["column"] for d in got["derived"]}


def test_split_column_story_zero_local_parts_and_the_contract_keeps_branches_coming(shop: Shop) -> None:
    tb, dev = shop.tb, as_(shop.tb, "dev")
    prod = shop.admin("production")
    with psycopg.connect(prod, autocommit=True) as conn, conn.transaction():
        hand_over(conn, "tb_owner")  # promotions run as the owner role: production must be its to migrate
    locals_ = {r[0] for r in query(prod, "SELECT split_part(email, '@', 1) FROM customer WHERE email <> ''")}
    emails = {r[0] for r in query(prod, "SELECT email FROM customer WHERE email IS NOT NULL")}
    dev.create_branch("split")
    dev.migrate_apply("split", files=EXPAND)
    tb.promote("staging", "split", files=EXPAND)
    tb.promote("production", "staging", files=EXPAND)
    assert query(prod, "SELECT count(*) FROM customer WHERE email_local IS NOT NULL")[0][0] > 1000  # raw there
    lineage = {e["column"]: e for e in tb.masking_lineage()}
    assert lineage["public.rejected_email.raw"]["method"] == "email"
    # a fresh masked branch of production: no local part, no copied e-mail survives anywhere
    dev.create_branch("after-expand", "production")
    url = dev.branch_url("after-expand", "shop")
    seen = set()
    for q in ("SELECT email_local FROM customer", "SELECT raw FROM rejected_email", "SELECT domain FROM mail_domains",
              "SELECT email FROM customer_copy", "SELECT email_local FROM customer_copy"):
        got = {r[0] for r in query(url, q)} - {None, ""}
        assert got, q
        seen |= got
    assert not seen & locals_ and not seen & emails, "original local parts or e-mails are visible"
    assert query(url, "SELECT count(*) FROM rejected_email") == query(prod, "SELECT count(*) FROM rejected_email")

    # the contract drops customer.email: the rule in tierbase.toml is stale, masked branches keep coming
    dev.create_branch("contract")
    dev.migrate_apply("contract", files={**EXPAND, **CONTRACT})
    tb.promote("staging", "contract", files={**EXPAND, **CONTRACT})
    tb.promote("production", "staging", files={**EXPAND, **CONTRACT})
    made = dev.create_branch("after-contract", "production")
    assert made["masked"]
    got = {r[0] for r in query(dev.branch_url("after-contract", "shop"), "SELECT email_local FROM customer")}
    assert got and not got & locals_
    said = tb.apply_config(CONFIG, "test")["said"]
    assert any("masking.customer.email is stale and was skipped: column public.customer.email was dropped by "
               "V0002__drop_email.sql:2" in s for s in said), said
    # a typo is still refused: only what a migration retired is stale
    with pytest.raises(InvalidInput, match=r"masking\.customer\.emial"):
        tb.apply_config(CONFIG + 'customer.emial = "email"\n', "test")
    for name in ("after-contract", "contract", "after-expand", "split"):
        dev.delete_branch(name)
